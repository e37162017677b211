"""torchrun with 2 gloo processes on CPU matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from difflab.train.checkpoint import list_checkpoints


def _train(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_match_one(tmp_path, tiny_preset, image_folder):
    # SGD, not Adam: Adam's update is nearly scale-free (its first step is sign(g)), so it
    # would hide a wrongly scaled gradient; SGD moves each weight by lr * g.
    settings = ["network.unet.dropout=0.0", "train.sample_every_kimg=0", "train.optimizer='sgd'"]
    common = ["train", "--preset", str(tiny_preset), "--data", str(image_folder), "--no-progress"]
    common += [arg for item in [*settings, "train.lr=0.05"] for arg in ("--set", item)]
    single = _train([sys.executable, "-m", "difflab", *common, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = _train([*launcher, "-m", "difflab", *common, "--out", str(tmp_path / "two")], env)
    assert double.returncode == 0, double.stderr[-3000:]
    # rank 0 speaks for the run: one "data:" line and one result, not one per process
    assert double.stdout.count("trained ") == 1, double.stdout
    assert double.stderr.count("difflab: data: ") == 1, double.stderr[-3000:]

    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2
    a = load_file(str(list_checkpoints(tmp_path / "one")[-1] / "net.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "two")[-1] / "net.safetensors"))
    # Both compute the same per-sample losses; only the order of float32 sums differs (the
    # all-reduce adds two half-batch gradients), which leaves differences near 1e-8. A gradient
    # scaled by the world size or a batch split that drops or repeats samples moves weights
    # by lr * g, about 1e-3 here.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"largest weight difference {worst}"
