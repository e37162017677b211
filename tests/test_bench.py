"""bench/quality.py's bookkeeping: which measurements it reuses, skips or runs, and the ranking.

A benchmark pass takes hours, so a wrong "already measured" rule silently costs a result (or an
hour re-measuring one). These tests stub the evaluation and the checkpoints; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def quality(monkeypatch, tmp_path):
    """bench/quality.py with its results in tmp_path and every evaluation recorded, not run."""
    monkeypatch.syspath_prepend(str(BENCH))
    import quality

    args = argparse.Namespace(
        quick=False, data="unused", minutes=30.0, chunks=3, num=1000, curve_num=1000,
        max_minutes=float("inf"),
    )  # fmt: skip
    settings = quality.Settings(args)
    settings.results = tmp_path / "results"
    settings.out = tmp_path / "out"
    calls: list[tuple] = []

    def fake_evaluate(settings, name, num, *extra):
        calls.append((name, num, *extra))
        options = dict(zip(extra[::2], extra[1::2], strict=True))
        return {
            "fid": 100.0 + len(calls), "kid_mean": 0.1, "kid_std": 0.01, "num_gen": num,
            "step": getattr(options.get("--checkpoint"), "name", "latest"),
            "evaluations": 2 * options.get("--steps", 18) - 1,
        }  # fmt: skip

    monkeypatch.setattr(quality, "_evaluate", fake_evaluate)
    return SimpleNamespace(module=quality, settings=settings, calls=calls)


def write_eval(settings, name: str, **values) -> None:
    result = {"fid": 70.0, "kid_mean": 0.05, "kid_std": 0.001, "num_gen": 1000, "step": 1489,
              "sampler": "heun", "sampler_steps": 18, "evaluations": 35, **values}  # fmt: skip
    settings.results.mkdir(parents=True, exist_ok=True)
    settings.result("eval", name).write_text(json.dumps(result))


def fake_checkpoints(monkeypatch, minutes_by_step: dict[int, float]) -> None:
    """Checkpoints with these steps and training minutes, in place of a run directory's."""
    from difflab.train import checkpoint

    paths = [Path(f"step-{step:08d}") for step in minutes_by_step]
    monkeypatch.setattr(checkpoint, "list_checkpoints", lambda run_dir: paths)
    monkeypatch.setattr(
        checkpoint,
        "load_checkpoint",
        lambda path: SimpleNamespace(
            path=path,
            step=int(path.name[5:]),
            state={"elapsed": 60 * minutes_by_step[int(path.name[5:])]},
        ),
    )


def test_measure_reuses_the_eval_result_only_when_it_is_the_same_measurement(quality):
    q, settings = quality.module, quality.settings
    write_eval(settings, "flow")
    assert q._measure(settings, "flow", 1000)["fid"] == 70.0
    assert q._measure(settings, "flow", 1000, sampler="heun", steps=18)["fid"] == 70.0
    assert quality.calls == []
    q._measure(settings, "flow", 1000, seed=1)
    q._measure(settings, "flow", 1000, sampler="heun", steps=9)
    q._measure(settings, "flow", 1000, sampler="euler", steps=18)
    q._measure(settings, "flow", 500)
    assert [call[1:] for call in quality.calls] == [
        (1000, "--seed", 1),
        (1000, "--seed", 0, "--sampler", "heun", "--steps", 9),
        (1000, "--seed", 0, "--sampler", "euler", "--steps", 18),
        (500, "--seed", 0),
    ]


def test_curve_takes_the_free_point_first_then_resumes_and_respects_max_minutes(
    quality, monkeypatch
):
    q, settings = quality.module, quality.settings
    write_eval(settings, "flow", step=1489)
    # chunk ends at 10, 20 and 29.6 minutes, then a 0.4-minute top-up to the 30-minute budget
    fake_checkpoints(monkeypatch, {481: 9.8, 968: 19.8, 1468: 29.6, 1489: 30.0})
    settings.max_minutes = 11
    q.piece_curve(settings, "flow")
    points = json.loads(settings.result("curve", "flow").read_text())["points"]
    assert [p["minutes"] for p in points] == [9.8, 30.0]
    assert points[1]["fid"] == 70.0  # the eval piece's result, not re-measured
    assert [call[-1].name for call in quality.calls] == ["step-00000481"]

    settings.max_minutes = float("inf")
    q.piece_curve(settings, "flow")  # resumes: only the 20-minute point is new
    points = json.loads(settings.result("curve", "flow").read_text())["points"]
    assert [p["minutes"] for p in points] == [9.8, 19.8, 30.0]
    assert [call[-1].name for call in quality.calls] == ["step-00000481", "step-00000968"]


def test_samplers_run_fewest_steps_first_and_resume(quality, monkeypatch):
    q, settings = quality.module, quality.settings
    write_eval(settings, "flow")
    monkeypatch.setitem(q.SAMPLER_SWEEP, "flow", [("heun", [9, 18]), ("euler", [5, 35])])
    settings.result("samplers", "flow").write_text(json.dumps({"rows": [
        {"sampler": "euler", "steps": 5, "evaluations": 5, "fid": 80.0, "kid": 0.06},
    ]}))  # fmt: skip
    q.piece_samplers(settings, "flow")
    rows = json.loads(settings.result("samplers", "flow").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("euler", 5), ("heun", 9), ("heun", 18), ("euler", 35)
    ]  # fmt: skip
    assert rows[2]["fid"] == 70.0 and rows[2]["evaluations"] == 35  # the eval piece's row
    assert [call[-1] for call in quality.calls] == [9, 35]


def test_ranked_sums_the_kid_and_fid_ranks_and_breaks_ties_by_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import report_quality

    evals = {
        "cheap": {"fid": 80.0, "kid_mean": 0.040, "evaluations_per_image": 17},
        "costly": {"fid": 70.0, "kid_mean": 0.050, "evaluations_per_image": 100},
        "worst": {"fid": 90.0, "kid_mean": 0.060, "evaluations_per_image": 5},
    }
    assert report_quality.ranked(evals) == ["cheap", "costly", "worst"]
    evals["cheap"]["evaluations_per_image"] = 200
    assert report_quality.ranked(evals) == ["costly", "cheap", "worst"]


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


def test_the_gpu_few_step_section_holds_students_to_the_best_teacher_row(monkeypatch):
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
    assert "- s: 25,600 images in 2.0 minutes (213 img/s with the others beside it).\n" in text
    # the other students against the first's final scores, row by row
    assert (
        "- u: 12,800 images in 2.0 minutes (107 img/s with the others beside it); against s: "
        "1 step 58.3 (+10%).\n" in text
    )
    assert "t: **failed** (exited 1: out of memory)" in text
    assert "(60 s on the GPU)" in text
    # a teacher of the same recipe trained elsewhere is carried, not trained: its minutes go
    # to the students
    monkeypatch.setattr(fewstep_gpu, "difflab_run", lambda *a, **k: pytest.fail("trained"))
    args = argparse.Namespace(teacher=Path("t.safetensors"), quick=False)
    teacher, values["teacher"] = fewstep_gpu.train_teacher(args, Path("work"))
    assert teacher == Path("t.safetensors") and values["teacher"]["flags"] == fewstep_gpu.TEACHER
    assert "trained on a CPU, carried to the GPU as `t.safetensors`" in fewstep_gpu.section(values)


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


def test_ablation_levers_chain_and_pay_for_their_cost_in_images(monkeypatch, tmp_path):
    """bench/ablation.py: a lever keeps the settings of the one it builds on; one that changes
    the network or the batch gets the base's images times the base's cost over its own."""
    monkeypatch.syspath_prepend(str(BENCH))
    import ablation

    lr = ablation.LEVERS["lr2e-3"].overrides()
    assert lr[: len(ablation.LEVERS["base"].sets)] == ablation.LEVERS["base"].sets
    assert "train.lr_schedule='cooldown'" in lr and lr[-1] == "train.lr=2e-3"
    assert not ablation.costs_more("lr2e-3") and ablation.costs_more("attn8")
    assert ablation.images_for("no-ema", 30) == 1489 * 32
    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    speed = {"seconds_per_image": {"base": 0.02, "attn8": 0.025}}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    assert ablation.images_for("attn8", 10) == round(481 * 32 * 0.8)


def test_a_sampling_lever_evaluates_the_run_it_builds_on(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import ablation

    lever = ablation.LEVERS["heun9"]
    assert ablation.run_dir("heun9", 30) == ablation.run_dir(lever.on, 30)
    assert ablation.images_for("heun9", 30) == ablation.images_for(lever.on, 30)


def test_the_benchmark_cars_run_is_the_conditional_runs_network_on_the_cars(monkeypatch):
    """bench/conditional.py's cars run (and so the few-step teacher, on the CPU and on a GPU)
    trains flow-cpu-cond's network, batch and rate without the labels: flow-cpu as it was
    when the classes and few-step benchmarks were measured, not today's smaller flow-cpu."""
    monkeypatch.syspath_prepend(str(BENCH))
    import dataclasses

    import conditional
    import fewstep_gpu

    from difflab.cli import build_parser
    from difflab.cli_train import _train_config
    from difflab.config import load_preset

    args = build_parser().parse_args(["train", *fewstep_gpu.TEACHER, "--data", "cifar10"])
    config, cond = _train_config(args), load_preset("flow-cpu-cond")
    assert fewstep_gpu.TEACHER[: len(conditional.CARS_RECIPE)] == conditional.CARS_RECIPE
    unet = dataclasses.replace(config.network.unet, num_classes=cond.network.unet.num_classes)
    assert unet == cond.network.unet
    for key in ("batch_size", "lr", "lr_schedule", "warmup_steps", "ema_halflife_kimg"):
        assert getattr(config.train, key) == getattr(cond.train, key), key
    assert not config.data.conditional and config.data.class_name == "automobile"
    assert config.train.steps == 3044


def test_gpu_students_cool_down_over_the_steps_of_their_second_half(monkeypatch, tmp_path):
    """bench/fewstep_gpu.py distils each student at a constant rate for a time, then resumes it
    for as many steps again with the rate cooling down over the last COOLDOWN (the CPU
    student's schedule), keeping no rolling checkpoints between the ends of the halves."""
    monkeypatch.syspath_prepend(str(BENCH))
    import argparse

    import fewstep_gpu

    commands = []

    def fake_run(*args, device):
        commands.append([str(a) for a in args])
        folder = fewstep_gpu.student_dir(tmp_path, "b")  # its first half ends at step 150
        (folder / "checkpoints" / "step-00000150").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(fewstep_gpu, "difflab_run", fake_run)
    monkeypatch.setattr(fewstep_gpu, "wait", lambda processes: {})
    monkeypatch.setattr(fewstep_gpu, "STUDENTS", {"b": (8, ["train.lr=4e-4"])})
    args = argparse.Namespace(device="cpu")
    assert fewstep_gpu.distill(args, tmp_path / "teacher", tmp_path, 1.5) == {}
    first, second = commands
    assert first[0] == "distill" and "train.lr=4e-4" in first
    assert f"train.checkpoint_every={fewstep_gpu.MAX_STEPS}" in first
    assert first[first.index("--time-limit") + 1] == "1.5"
    assert second[:3] == ["train", "--resume", str(fewstep_gpu.student_dir(tmp_path, "b"))]
    assert second[second.index("--steps") + 1] == "300"
    assert "train.lr_schedule='cooldown'" in second
    assert f"train.cooldown={fewstep_gpu.COOLDOWN}" in second
    assert second[second.index("--time-limit") + 1] == "1.5"


def test_a_few_step_lever_row_gets_its_missing_start_score_without_distilling_again(
    monkeypatch, tmp_path
):
    """bench/fewstep.py lever: a new lever is distilled and scored at 1 and 2 steps and at 1 step
    from START_SIGMA; a row recorded before that score existed gets only that score."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep

    commands: list[tuple] = []
    monkeypatch.setattr(fewstep, "difflab", lambda settings, *args: commands.append(args))
    monkeypatch.setattr(fewstep, "_score", lambda settings, run, *extra: {"fid": extra[-1]})
    monkeypatch.setattr(fewstep, "_score_folder", lambda settings, folder: {"fid": 9.0})
    monkeypatch.setattr(fewstep.quality, "_elapsed_minutes", lambda run: 3.0)
    args = fewstep.argparse.Namespace(
        quick=False, teacher=fewstep.DEFAULT_TEACHER, ref="unused", data="unused",
        images=120, num=10, curve_num=0, max_minutes=float("inf"), minutes=0, chunks=1,
    )  # fmt: skip
    settings = fewstep.FewStepSettings(args)
    settings.results, settings.out = tmp_path / "results", tmp_path / "out"
    old = {"lever": "lr4", "images": 120, "sets": [], "minutes": 1.0,
           "scores": {"1": {"fid": 1.0}, "2": {"fid": 2.0}}}  # fmt: skip
    fewstep.save(settings.result("levers"), {"rows": [old]})

    fewstep.piece_lever(settings, "lr4")
    assert [c[0] for c in commands] == ["sample"]  # not distilled, not scored at 1 or 2 again
    assert commands[0][4:6] == ("--sigma-max", fewstep.START_SIGMA)
    fewstep.piece_lever(settings, "base")
    assert [c[0] for c in commands] == ["sample", "distill", "sample"]
    rows = json.loads(settings.result("levers").read_text())["rows"]
    assert [r["scores"] for r in rows] == [
        {"1": {"fid": 1.0}, "2": {"fid": 2.0}, fewstep.START_KEY: {"fid": 9.0}},
        {"1": {"fid": 1}, "2": {"fid": 2}, fewstep.START_KEY: {"fid": 9.0}},
    ]
    fewstep.piece_lever(settings, "base")  # all measured: nothing runs
    assert len(commands) == 3
