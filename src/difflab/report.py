"""``difflab report``: one self-contained HTML page of one or more run directories.

Everything comes from the run directory alone (config.json, log.jsonl, pictures/, the
checkpoints, invocations.jsonl), so a run in progress is reported as far as it got. Images are
inlined as data URIs: the page needs no server and no network. Several runs are columns side by
side, their preview grids on one slider of thousands of images seen (kimg).
"""

from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from pathlib import Path

from difflab.config import Config, load_json
from difflab.errors import DifflabError
from difflab.train.logs import read_log, read_metrics
from difflab.viz import plot_lines

_KIMG = re.compile(r"^(samples|strip)-(\d+)kimg\.png$")
#: Previews of a run on the slider at most, evenly spaced: each is inlined, and a paper preset's
#: run previews every 1,000 kimg of its 200,000.
MAX_PREVIEWS = 50
CURVES = [  # (title, log keys, y label)
    ("loss", ["loss", "ema_loss"], "loss"),
    ("learning rate", ["lr"], "lr"),
    ("speed", ["images_per_s"], "images / s"),
    ("quality", ["fid", "kid"], "FID / KID"),
]


def write_report(runs: list[Path], out: Path) -> Path:
    """Write the page for ``runs`` to ``out`` (an .html file); returns ``out``."""
    from difflab.io import atomic_write_text

    if not runs:
        raise DifflabError("give at least one run directory")
    columns = [_column(Path(run)) for run in runs]
    return atomic_write_text(out, _page(columns))


def _column(run: Path) -> dict:
    if not (run / "config.json").is_file():
        raise DifflabError(f"{run} is not a difflab run directory (no config.json)")
    config = load_json(run / "config.json")
    rows = read_metrics(run / "log.jsonl")
    pictures = run / "pictures"
    previews = {kimg: _data_uri(path) for kimg, path in _spaced(_numbered(pictures, "samples"))}
    return {
        "name": run.name,
        "facts": _facts(run, config, rows),
        "curves": _curves(rows),
        "previews": previews,
        "pictures": {
            name: _data_uri(pictures / file)
            for name, file in [
                ("final samples", "samples-latest.png"),
                ("reverse process", _newest(pictures, "strip")),
                ("reverse process (GIF)", "reverse-process.gif"),
                ("schedule", "schedule.png"),
                ("training images", "training-images.png"),
                ("forward process", "forward-process.png"),
            ]
            if file and (pictures / file).is_file()
        },
        "config": json.dumps(config.to_dict(), indent=1),
    }


def _facts(run: Path, config: Config, rows: list[dict]) -> dict[str, str]:
    from difflab.models import count_parameters
    from difflab.registry import build_network

    t, last = config.train, next((r for r in reversed(rows) if "loss" in r), {})
    limits = [f"{t.steps:,} steps" if t.steps else "", f"{t.images:,} images" if t.images else ""]
    limits += [f"{t.time_limit:.1f} min time limit (last invocation)" if t.time_limit else ""]
    invocations = read_log(run / "invocations.jsonl")
    data = config.data.source + (
        f", class {config.data.class_name}" if config.data.class_name else ""
    )
    if config.data.class_names:
        data += f", {len(config.data.class_names)} classes"
    return {
        "preset": f"{config.preset}: {config.description}",
        "method": config.method.name,
        "network": f"{config.network.name}, {count_parameters(build_network(config)):,} parameters",
        "data": data,
        "budget": ", ".join(x for x in limits if x) or "none",
        "progress": _progress(run, last),
        "machine": invocations[-1].get("machine", "not recorded")
        if invocations
        else "not recorded",
        "invocations": str(len(invocations)),
    }


def _progress(run: Path, last: dict) -> str:
    """Where training stands: the log's last row, else the newest checkpoint (a run stopped
    before its first log row)."""
    from difflab.train.checkpoint import checkpoint_step, list_checkpoints

    if last:
        minutes = f", {last['time_s'] / 60:.1f} min of training" if "time_s" in last else ""
        return f"step {last['step']:,.0f}, {last['kimg']:.1f} kimg{minutes}"
    checkpoints = list_checkpoints(run)
    if checkpoints:
        return f"step {checkpoint_step(checkpoints[-1]):,} (its newest checkpoint; no log rows)"
    return "not started"


def _curves(rows: list[dict]) -> dict[str, str]:
    """PNG data URIs of the log's curves against kimg, those with data."""
    pictures = {}
    with tempfile.TemporaryDirectory() as folder:
        for title, keys, ylabel in CURVES:
            series = {
                key: ([r["kimg"] for r in rows if key in r], [r[key] for r in rows if key in r])
                for key in keys
                if any(key in r for r in rows)
            }
            if series:
                path = Path(folder) / f"{title}.png"
                plot_lines(series, path, xlabel="kimg", ylabel=ylabel, title=title)
                pictures[title] = _data_uri(path)
    return pictures


def _numbered(pictures: Path, kind: str) -> list[tuple[int, Path]]:
    """The training's ``KIND-NNNkimg.png`` pictures in order of kimg (other names ignored)."""
    found = pictures.glob(f"{kind}-*kimg.png") if pictures.is_dir() else []
    matches = [(_KIMG.match(p.name), p) for p in found]
    return sorted((int(m.group(2)), p) for m, p in matches if m)


def _spaced(items: list, most: int = MAX_PREVIEWS) -> list:
    """At most ``most`` of ``items``, evenly spaced, the first and the last among them."""
    if len(items) <= most:
        return items
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def _newest(pictures: Path, kind: str) -> str | None:
    found = _numbered(pictures, kind)
    return found[-1][1].name if found else None


def _data_uri(path: Path) -> str:
    kind = "gif" if path.suffix == ".gif" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------- HTML


def _page(columns: list[dict]) -> str:
    kimgs = sorted({k for c in columns for k in c["previews"]})
    head = "".join(f"<th>{html.escape(c['name'])}</th>" for c in columns)
    body = [_row("", head, header=True)]
    for key in columns[0]["facts"]:
        body.append(_row(key, "".join(f"<td>{html.escape(c['facts'][key])}</td>" for c in columns)))
    for title, _, _ in CURVES:
        if any(title in c["curves"] for c in columns):
            cells = "".join(_cell(c["curves"].get(title), "curve") for c in columns)
            body.append(_row(title, cells))
    if kimgs:
        slider = (
            f'<input type="range" id="kimg" min="0" max="{len(kimgs) - 1}" '
            f'value="{len(kimgs) - 1}" oninput="show(this.value)"><span id="kimg-label"></span>'
        )
        cells = "".join(
            f'<td><img class="preview" data-run="{i}" alt="preview"></td>'
            for i in range(len(columns))
        )
        body.append(_row(f"previews {slider}", cells))
    names = {name for c in columns for name in c["pictures"]}
    for name in [n for n in _ORDER if n in names]:
        kind = "wide" if name == "reverse process" else "picture"
        body.append(_row(name, "".join(_cell(c["pictures"].get(name), kind) for c in columns)))
    body.append(
        _row("config", "".join(f"<td><pre>{html.escape(c['config'])}</pre></td>" for c in columns))
    )
    previews = [{str(k): uri for k, uri in c["previews"].items()} for c in columns]
    script = _SCRIPT.replace("KIMGS", json.dumps(kimgs)).replace("PREVIEWS", json.dumps(previews))
    return (
        _TEMPLATE.replace("TITLE", html.escape(", ".join(c["name"] for c in columns)))
        .replace("BODY", "\n".join(body))
        .replace("SCRIPT", script)
    )


_ORDER = [
    "final samples",
    "reverse process",
    "reverse process (GIF)",
    "schedule",
    "training images",
    "forward process",
]


def _row(label: str, cells: str, header: bool = False) -> str:
    tag = "th" if header else "th scope='row'"
    return f"<tr><{tag}>{label}</{tag.split()[0]}>{cells}</tr>"


def _cell(uri: str | None, kind: str) -> str:
    return f'<td><img class="{kind}" src="{uri}" alt=""></td>' if uri else "<td>–</td>"


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>difflab: TITLE</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; table-layout: fixed; width: 100%; }
th, td { border-top: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }
th:first-child { width: 11em; } th[scope=row] { font-weight: 600; }
img { image-rendering: pixelated; max-width: 100%; height: auto; }
img.curve { width: 440px; }
img.picture, img.preview { width: 320px; }
img.wide { width: 520px; }
pre { max-height: 22em; overflow: auto; font-size: 11px; background: #f6f6f6; padding: 6px; }
input[type=range] { width: 10em; display: block; margin-top: 4px; }
</style></head>
<body><h1>difflab report: TITLE</h1>
<table>
BODY
</table>
<script>SCRIPT</script>
</body></html>
"""

_SCRIPT = """
const kimgs = KIMGS, previews = PREVIEWS;
function show(index) {
  const kimg = kimgs[index];
  document.getElementById('kimg-label').textContent = kimg + ' kimg';
  document.querySelectorAll('img.preview').forEach(img => {
    const mine = Object.keys(previews[img.dataset.run]).map(Number).filter(k => k <= kimg);
    img.src = mine.length ? previews[img.dataset.run][Math.max(...mine)] : '';
  });
}
if (kimgs.length) show(kimgs.length - 1);
window.addEventListener('load', () => {
  const images = [...document.images].filter(img => img.getAttribute('src'));
  const loaded = images.filter(img => img.complete && img.naturalWidth > 0);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = loaded.length;
});
"""
