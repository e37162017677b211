"""bench/gpu.py, its levers, its profile and its report, and bench/fewstep_gpu.py's report,
all on the CPU: the GPU is only needed for the figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_gpu_check_runs_every_part_on_the_cpu_and_writes_its_section(tmp_path, monkeypatch):
    """bench/gpu.py's smoke mode on the CPU: the paths of a preset and its speed rows land in
    gpu.json and in a "## GPU" section (the GPU itself is only needed for real figures)."""
    from conftest import make_images

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    folder = make_images(tmp_path / "images", 24, size=32, classes=("cars",)) / "cars"
    results = tmp_path / "results"
    argv = ["gpu.py", "--data", str(folder), "--device", "cpu", "--quick", "--minutes", "10"]
    argv += ["--presets", "flow-cpu", "--parts", "paths,speed,profile", "--results", str(results)]
    assert gpu.main([*argv, "--rows", "flow-cpu, bf16;flow-cpu, fp32"]) == 0
    values = json.loads((results / "gpu.json").read_text())
    (path,) = values["paths"]
    assert path["ok"] and path["gif"] and path["checkpoints"] >= 1, path
    assert path["samplers"] == ["euler", "heun", "edm", "dpm++2m", "ipndm"]
    assert [row["name"] for row in values["speed"]] == ["flow-cpu, bf16", "flow-cpu, fp32"]
    assert all(row["ok"] and row["images_per_s"] > 0 for row in values["speed"])
    # --rows with the profile part: each row says where its step's time went (ATen ops here)
    families = values["speed"][0]["kernels"]["families"]
    assert families["convolution/matmul"] > 0.2 and sum(families.values()) == pytest.approx(1)
    text = (results / "benchmarks.md").read_text()
    assert "## GPU" in text and "| 1 | flow-cpu | 1.14M | 0.49 | 16 |" in text
    assert "Where the time of one `flow-cpu, bf16` step goes" in text, text


def test_a_gpu_profile_counts_kernels_not_the_annotations_over_them(monkeypatch):
    """Inductor's "## Call CompiledFxGraph ##" ranges carry GPU time of their own in a profile
    (on an H200 they doubled a compiled step's time): only kernels count."""
    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_profile

    def event(key, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(
            key=key, device_type=device, self_device_time_total=us, is_user_annotation=annotation
        )

    conv, norm = event("sm90_xmma_fprop", 40.0), event("triton_poi_fused_norm", 30.0)
    events = [conv, norm, event("## Call CompiledFxGraph f1 ##", 70.0, annotation=True)]
    events += [event("aten::convolution", 5.0, DeviceType.CPU), event("idle", 0.0)]
    assert gpu_profile.device_kernels(events) == [conv, norm]


def test_gpu_runs_merge_into_one_section(monkeypatch):
    """A second GPU run that measures what the first skipped completes the first's section:
    its rows join, the skipped notes it answered go, and each run's peak is named."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu
    import report_gpu

    def speed(name, rate, fused=True):
        return {"name": name, "ok": True, "preset": "edm-paper", "batch": 512, "precision": "auto",
                "autocast": "bfloat16", "compile": True, "compile_mode": "default",
                "channels_last": False, "fused_optimizer": fused, "parameters": 35.7e6,
                "forward_gflop": 12.44, "steps": 9, "images_per_s": rate, "tflops": 1.0,
                "fraction_of_bf16_peak": 0.3, "first_step_s": 9, "compile_s": 9}  # fmt: skip

    machine = {"card": "H", "torch": "t", "cuda": "c", "cpu": "x", "peak_matmul": "mm",
               "device": "cuda", "minutes": 1, "date": "d"}  # fmt: skip
    base, lever = "edm-paper, batch 512, compiled", "edm-paper, batch 512, compiled, foreach Adam"
    first = {"machine": {**machine, "command": "one", "bf16_peak_tflops": 700.0},
             "speed": [speed(base, 100.0)], "skipped": [{"name": f"speed of {lever}"}]}  # fmt: skip
    second = {"machine": {**machine, "command": "two", "bf16_peak_tflops": 710.0},
              "speed": [speed(lever, 110.0, fused=False)],
              "fewstep": [{"name": "distill", "ok": True, "seconds": 3.0}]}  # fmt: skip
    third = {"machine": {**machine, "command": "three", "bf16_peak_tflops": 720.0},
             "speed": [speed(base, 200.0), speed(lever, 190.0, fused=False),
                       {**speed(f"{lever}, more", 209.0, fused=False), "batch": 1024}]}  # fmt: skip
    merged = report_gpu.merge([first, second, third])
    assert [row["name"] for row in merged["speed"]] == [base, lever, base, lever, f"{lever}, more"]
    assert merged["skipped"] == []
    text = report_gpu.section(merged)
    assert "`one`" in text and "`two`" in text and "700 and 710 and 720 TFLOP/s" in text
    assert "| distill (run 2) | ok | 3 |" in text and "Not measured" not in text
    # a lever is compared with the row it adds to in its own run, else with the base of its own
    # run or of the latest run before it
    assert (
        "foreach Adam (run 2): +10.0% against 100 img/s (batch 512, bfloat16, compiled (run 1))"
        in text
    )
    assert (
        "foreach Adam (run 3): -5.0% against 200 img/s (batch 512, bfloat16, compiled (run 3))"
        in text
    )
    assert (
        "batch 1024, bfloat16, compiled, foreach Adam (run 3): +10.0% against 190 img/s (batch 512, bfloat16, compiled, foreach Adam (run 3))"
        in text
    )
    # a run without the base still compares a lever with the row it adds to (the H200's run 8)
    graph = "edm-paper, batch 512, compiled, channels-last graph"
    alone = report_gpu._lever_lines({"speed": [speed(graph, 300.0), speed(f"{graph}, x", 291.0)]})
    assert any(": -3.0% against 300 img/s" in line for line in alone)
    assert report_gpu._lever_lines({"speed": [speed(graph, 300.0)]}) == []
    # the paper-size U-Net's levers are measured before every other row
    table = [name for name, _, _ in gpu.speed_table(["flow-cpu", "edm-paper"], quick=False)]
    assert table[0] == "edm-paper, bf16" and table.index(base) < table.index("flow-cpu, fp32")
    # a run on another card gets its own subsection (its figures are not the first card's),
    # its rows numbered in the whole list, its target judged on its own rows
    other = {"machine": {**machine, "card": "G", "command": "four", "bf16_peak_tflops": 750.0},
             "speed": [{**speed(base, 300.0), "fraction_of_bf16_peak": 0.36}]}  # fmt: skip
    cards = report_gpu.by_card([first, second, other, third])
    assert [c["machine"]["card"] for c in cards] == ["H", "G"]
    assert [row["run"] for row in cards[0]["speed"]] == [1, 2, 4, 4, 4]
    text = report_gpu.section(*cards)
    head, tail = text.split("### On G")
    assert "`four`" in tail and "`four`" not in head and "#### Training speed" in tail
    assert "**not met** on H;" in head and "met on G; best `edm-paper` row" in tail
    assert "| 3 | edm-paper |" in tail and "36.0%" in tail


def test_the_gpu_few_step_section_holds_students_to_the_best_teacher_row(monkeypatch, tmp_path):
    """bench/fewstep_gpu.py's report: each target against the teacher's best FID-1k, met or
    not, and each student's distillation rate from its most-trained scored samples."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep_gpu

    def sample(model, row, step, evaluations, fid, seen):
        return {"model": model, "row": row, "step": step, "evaluations": evaluations,
                "fid": fid, "kid": fid / 1000, "images": 1000, "images_seen": seen}  # fmt: skip

    values = {
        "machine": {"card": "H", "torch": "t", "date": "d", "command": "c"},
        "teacher": {
            "seconds": 60.0,
            "flags": fewstep_gpu.TEACHER,
            "sets": fewstep_gpu.TEACHER_SETS,
        },
        "students": {
            "s": {"batch": 128, "sets": [], "minutes": 2.0},
            "u": {"batch": 32, "sets": [], "minutes": 2.0},
        },
        "failed": {"t": "exited 1: out of memory"},
        "samples": [
            sample("teacher", "heun 18", 3000, 35, 50.0, 96000),
            sample("teacher", "heun 9, autoguided", 3000, 34, 40.0, 96000),
            sample("s", "1 step", 100, 1, 60.0, 12800),
            sample("s", "1 step", 200, 1, 53.0, 25600),
            sample("s", "2 steps", 200, 2, 47.0, 25600),
            sample("u", "1 step", 400, 1, 58.3, 12800),
        ],
    }
    text = fewstep_gpu.section(values)
    assert text.startswith(f"{fewstep_gpu.HEADING}\n\n_Written by")
    assert "best 53.0 (s, 1 step, step 200) against the teacher's 40.0" in text
    assert "+32.5%, target at most +35%: met" in text
    assert "+17.5%, target at most +15%: **not met**" in text
    assert "- s: 25,600 images in 2.0 minutes (213 img/s with the other beside it).\n" in text
    # the other students against the first's final scores, row by row
    assert (
        "- u: 12,800 images in 2.0 minutes (107 img/s with the other beside it); against s: "
        "1 step 58.3 (+10%).\n" in text
    )
    assert "t: **failed** (exited 1: out of memory)" in text
    three = {**values, "students": {**values["students"], "v": values["students"]["u"]}}
    assert "(213 img/s with the others beside it)" in fewstep_gpu.section(three)
    # a later run (gpu-2.json, gpu-10.json beside gpu.json) follows under its own heading
    folder = tmp_path / "fewstep"
    folder.mkdir()
    for name, card in [("gpu", "H"), ("gpu-10", "J"), ("gpu-2", "G"), ("gpu-h200-old", "X")]:
        machine = {**values["machine"], "card": card}
        (folder / f"{name}.json").write_text(json.dumps({**values, "machine": machine}))
    monkeypatch.setattr(fewstep_gpu, "RESULTS", folder / "gpu.json")
    text = fewstep_gpu.report(fewstep_gpu.runs())
    assert text.count(fewstep_gpu.HEADING) == 1 and text.startswith(fewstep_gpu.HEADING)
    assert text.index("\n### Run 2: G\n") < text.index("\n### Run 3: J\n")
    assert "X" not in [v["machine"]["card"] for v in fewstep_gpu.runs()]  # not a numbered run
    assert "; 60 s on the GPU)" in text
    # a teacher of the same recipe trained elsewhere is carried, not trained: its minutes go
    # to the students
    monkeypatch.setattr(fewstep_gpu, "difflab_run", lambda *a, **k: pytest.fail("trained"))
    args = argparse.Namespace(teacher=Path("t.safetensors"), quick=False)
    teacher, values["teacher"] = fewstep_gpu.train_teacher(args, Path("work"))
    assert teacher == Path("t.safetensors") and values["teacher"]["flags"] == fewstep_gpu.TEACHER
    assert "trained on a CPU, carried to the GPU as `t.safetensors`" in fewstep_gpu.section(values)
    # one student chosen (--students) had the GPU to itself: no "others beside it"
    values["students"] = {"s": values["students"]["s"]}
    text = fewstep_gpu.section(values)
    assert (
        "The student: `difflab distill` from it, autoguided at w = 2, run alone on the GPU" in text
    )
    assert "- s: 25,600 images in 2.0 minutes (213 img/s).\n" in text and "beside" not in text


def test_the_heads_copied_lever_puts_the_old_attention_in_place(monkeypatch):
    """gpu_levers.applied with HEADS_COPIED measures the attention as it was up to run 7, the
    control of the pixels-first split: in force only inside the row, recorded in the row, not
    handed to the config, and the same function (so an A/B of the two is one of layouts)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_levers

    from difflab.models.unet import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(8, 2)
    torch.nn.init.normal_(attn.proj.weight)
    x = torch.randn(2, 8, 4, 4)
    now = attn(x)
    overrides = ["train.batch_size=2", gpu_levers.HEADS_COPIED, "sdpa=math"]
    with gpu_levers.applied(overrides) as (config, lever):
        assert SelfAttention.forward is gpu_levers.copied_heads
        before = attn(x)
    assert config == ["train.batch_size=2"]
    assert lever == {"sdpa": ["math"], "attention": "heads copied"}
    assert SelfAttention.forward is not gpu_levers.copied_heads
    torch.testing.assert_close(before, now, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in gpu_levers.LEVERS]
    assert "batch 512, compiled, channels-last graph, heads copied" in names


def test_gpu_samples_come_back_in_few_tar_files_under_the_size_limit(tmp_path, monkeypatch):
    """bench/fewstep_gpu.py packs its sample folders into tar files each under the limit (a
    device machine returns 8 files of 16 MiB at most), every folder in exactly one, named in
    its row."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tarfile

    import fewstep_gpu

    rows = [{"folder": f"{i:02d}"} for i in range(5)]
    for row in rows:
        (tmp_path / "s" / row["folder"]).mkdir(parents=True)
        for k in range(3):
            (tmp_path / "s" / row["folder"] / f"{k}.png").write_bytes(b"x" * 1000)
    (tmp_path / "out").mkdir()
    limit = 11264 + 2 * 512 * (1 + 3 * 3)  # two folders of three 2-block files, and the end
    fewstep_gpu.bundle(tmp_path / "s", rows, tmp_path / "out", limit=limit)
    tars = sorted((tmp_path / "out").iterdir())
    assert [t.name for t in tars] == ["samples-1.tar", "samples-2.tar", "samples-3.tar"]
    for tar_path in tars:
        assert tar_path.stat().st_size <= limit  # (pax headers made them a third larger)
        with tarfile.open(tar_path) as tar:
            folders = {name.split("/")[0] for name in tar.getnames()}
        assert folders == {row["folder"] for row in rows if row["tar"] == tar_path.name}
        assert len(folders) <= 2
