"""``difflab report``: one self-contained page, checked the way a person sees it."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture
def runs(tmp_path, tiny_preset, image_folder, capsys):
    """A finished run, and one stopped before its first checkpoint (a run in progress)."""
    done, early = tmp_path / "done", tmp_path / "early"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--no-progress"]
    assert run_cli(capsys, *args, "--out", done, "--steps", 6)[0] == 0
    assert run_cli(capsys, *args, "--out", early, "--steps", 2, "--checkpoint-every", 50)[0] == 0
    for path in (early / "pictures").glob("samples-*"):  # as if no preview had been written yet
        path.unlink()
    return done, early


def test_the_page_is_self_contained_and_reports_every_run(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, stdout, err = run_cli(capsys, "report", *runs, "--out", out)
    assert code == 0 and "2 runs)" in stdout, err
    page = out.read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    for text in ("preset", "network", "48,691 parameters", "budget", "loss", "learning rate",
                 "previews", "final samples", "reverse process (GIF)", "schedule", "config"):  # fmt: skip
        assert text in page, text
    assert page.count("<th>done</th>") == 1 and page.count("<th>early</th>") == 1
    assert "image/gif;base64" in page and len(re.findall("data:image/png;base64", page)) >= 10


def test_a_long_run_puts_at_most_fifty_evenly_spaced_previews_on_the_slider(runs, tmp_path):
    from difflab.report import MAX_PREVIEWS, _column

    done = runs[0]
    for kimg in range(1, 201):  # a paper run's previews: 200 of them
        shutil.copy(
            done / "pictures" / "samples-latest.png", done / f"pictures/samples-{kimg:06d}kimg.png"
        )
    kimgs = sorted(_column(done)["previews"])
    assert len(kimgs) == MAX_PREVIEWS == 50 and kimgs[0] == 0 and kimgs[-1] == 200
    assert max(b - a for a, b in itertools.pairwise(kimgs)) <= 5


def test_bad_report_input_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", tmp_path, "--out", tmp_path / "r.html")
    assert code == 2 and "not a difflab run directory" in err, err
    code, _, err = run_cli(capsys, "report", tmp_path, "--out", tmp_path / "r.txt")
    assert code == 2 and "the report must end in .html" in err, err


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian package chromium; .ci/run installs it)",
)
def test_chromium_renders_every_image_of_the_page(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert run_cli(capsys, "report", *runs, "--out", out)[0] == 0
    profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=10000"]
    dom = _chromium(*profile, "--dump-dom", out.as_uri()).stdout
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    pictures = len(re.findall(r'<img class="(?:curve|picture|wide)" src=', out.read_text()))
    assert loaded == total == pictures + 1  # and the finished run's preview on the slider
    shot = tmp_path / "shot.png"
    _chromium(*profile, "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.05  # not a blank page
