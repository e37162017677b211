"""docs/config.md, written from the schema and its comments:

    python -m difflab.config_reference docs/config.md

Every setting as ``--set`` names it, its default, what it allows (its declared limits, or the
registry's names) and what it means (the comment beside or right above its field in schema.py).
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from difflab import schema
from difflab.limits import limits_of
from difflab.plans import SAMPLERS
from difflab.registry import METHODS, NETWORKS

#: What a setting without declared limits allows: the registry's names, else its type.
NAMES = {
    "network.name": ", ".join(NETWORKS),
    "method.name": ", ".join(METHODS),
    "sampler.name": "empty, or one of " + ", ".join(SAMPLERS),
    "train.device": "auto, cpu, cuda, cuda:N or mps",
}
TYPES = {"str": "text", "bool": "true or false", "str | None": "text, or none", "int": "an integer"}


def reference() -> str:
    """The page: one table per section of the config."""
    lines = [
        "# Configuration",
        "",
        "Every setting of a run, as `--set key=value` changes it, a preset's TOML sets it and a",
        "run's `config.json` stores it. Written by `python -m difflab.config_reference",
        "docs/config.md` from `src/difflab/schema.py` and its comments;",
        "`tests/test_config_reference.py` checks that this page is current. Of the `method`",
        "sections, only the chosen method's is read.",
        "",
        *_section(schema.Config, "", _field_comments()),
    ]
    return "\n".join(lines) + "\n"


def _section(cls: type, prefix: str, meaning: dict[tuple[str, str], str]) -> list[str]:
    """A table of ``cls``'s own settings, then one section per nested section."""
    doc = " ".join(cls.__doc__.split()) if cls.__doc__ and "__doc__" in vars(cls) else ""
    lines = [f"## `{prefix[:-1]}`" if prefix else "## The run", ""]
    lines += [doc, ""] if doc and not doc.startswith(f"{cls.__name__}(") else []
    lines += ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    nested = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            nested.append((type(default), f"{key}."))
            continue
        allowed = limits_of(cls, f.name).describe() if "limits" in f.metadata else ""
        if isinstance(default, list):  # "an integer in [1, 64]" of each item
            each = allowed.replace("an integer", "integers").replace("a number", "numbers")
            allowed = f"a list of {each or 'names'}"
        allowed = allowed or NAMES.get(key) or TYPES[f.type]
        text = meaning.get((cls.__name__, f.name), "").replace("|", "\\|")
        lines.append(f"| `{key}` | `{json.dumps(default)}` | {allowed} | {text} |")
    for kind, inner in nested:
        lines += ["", *_section(kind, inner, meaning)]
    return lines


def _field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines right above the field and the comment beside it."""
    source = inspect.getsource(schema)
    text = source.splitlines()
    tokens = tokenize.generate_tokens(iter(source.splitlines(True)).__next__)
    comments = {
        t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
    }
    meaning = {}
    for node in ast.walk(ast.parse(source)):
        for item in node.body if isinstance(node, ast.ClassDef) else []:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, line = [], item.lineno - 1
                while line in comments and text[line - 1].lstrip().startswith("#"):
                    above.insert(0, comments[line])
                    line -= 1
                beside = [
                    comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments
                ]
                meaning[(node.name, item.target.id)] = " ".join(above + beside)
    return meaning


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(reference())
