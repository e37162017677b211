"""docs/config.md lists every setting, its default, what it allows and what it means, and is
current: it is written from the schema and its comments (python -m difflab.config_reference FILE)."""

from __future__ import annotations

from pathlib import Path

from difflab.config import _flatten
from difflab.config_reference import reference
from difflab.schema import Config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_committed_page_is_the_schemas():
    assert PAGE.read_text() == reference(), "run: python -m difflab.config_reference docs/config.md"


def test_every_setting_has_a_row_with_a_meaning():
    rows = {line.split("`")[1]: line for line in reference().splitlines() if line.startswith("| `")}
    assert set(rows) == set(_flatten(Config().to_dict()))
    meanings = {key: line.rsplit("|", 2)[1].strip() for key, line in rows.items()}
    vague = [
        k for k, text in meanings.items() if not text or text.startswith("...") or text.isupper()
    ]
    assert vague == []  # each row says what its setting means on its own
