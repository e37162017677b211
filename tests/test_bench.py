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
    args = argparse.Namespace(device="cpu", students=["b"])
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


def test_gpu_students_can_be_chosen_by_name(monkeypatch, tmp_path):
    """``fewstep_gpu.py run --students 'A;B'`` distils only those (fewer side by side, more images
    each); a name not in STUDENTS is a one-line error naming the choices."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep_gpu

    first, *_, last = fewstep_gpu.STUDENTS
    assert fewstep_gpu.students(f" {last} ;{first}") == [last, first]
    for wrong in ("batch 7", ";"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"^no student .*: choose from "):
            fewstep_gpu.students(wrong)
    started = []
    monkeypatch.setattr(
        fewstep_gpu, "difflab_run", lambda *a, device: started.append(a[a.index("--out") + 1])
    )
    monkeypatch.setattr(fewstep_gpu, "wait", lambda processes: {name: "x" for name in processes})
    args = argparse.Namespace(device="cpu", students=[last])
    assert fewstep_gpu.distill(args, tmp_path / "teacher", tmp_path, 1.0) == {last: "x"}
    assert started == [fewstep_gpu.student_dir(tmp_path, last)]


def _lever_bench(monkeypatch, tmp_path, images: int):
    """bench/fewstep.py with its commands recorded (not run), scores stubbed (``_score`` gives the
    last of its options: the steps, or the start's sigma), settings for ``--images images``
    under tmp_path."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep

    commands: list[tuple] = []  # the difflab commands run; the scoring ones as ("eval", *extra)
    monkeypatch.setattr(fewstep, "difflab", lambda settings, *args: commands.append(args))

    def score(settings, run, *extra):
        commands.append(("eval", *extra))
        return {"fid": extra[-1]}

    monkeypatch.setattr(fewstep, "_score", score)
    monkeypatch.setattr(fewstep.quality, "_elapsed_minutes", lambda run: 3.0)
    args = fewstep.argparse.Namespace(
        quick=False, teacher=fewstep.DEFAULT_TEACHER, guide=None, ref="unused", data="unused",
        images=images, num=10, curve_num=0, max_minutes=float("inf"), minutes=0, chunks=1,
    )  # fmt: skip
    settings = fewstep.FewStepSettings(args)
    settings.results, settings.out = tmp_path / "results", tmp_path / "out"
    return fewstep, settings, commands


def test_a_few_step_lever_row_gets_its_missing_start_score_without_distilling_again(
    monkeypatch, tmp_path
):
    """bench/fewstep.py lever: a new lever is distilled and scored at 1 and 2 steps and at 1 step
    from START_SIGMA; a row recorded before that score existed gets only that score."""
    fewstep, settings, commands = _lever_bench(monkeypatch, tmp_path, 120)
    old = {"lever": "lr4", "images": 120, "sets": [], "minutes": 1.0,
           "scores": {"1": {"fid": 1.0}, "2": {"fid": 2.0}}}  # fmt: skip
    fewstep.save(settings.result("levers"), {"rows": [old]})

    start = ("eval", "--steps", 1, "--sigma-max", fewstep.START_SIGMA)
    fewstep.piece_lever(settings, "lr4")
    assert commands == [start]  # not distilled, not scored at 1 or 2 again
    fewstep.piece_lever(settings, "base")
    assert [c[0] for c in commands] == ["eval", "distill", "eval", "eval", "eval"]
    assert commands[2:] == [("eval", "--steps", 1), ("eval", "--steps", 2), start]
    rows = json.loads(settings.result("levers").read_text())["rows"]
    sigma = {"fid": fewstep.START_SIGMA}
    assert [r["scores"] for r in rows] == [
        {"1": {"fid": 1.0}, "2": {"fid": 2.0}, fewstep.START_KEY: sigma},
        {"1": {"fid": 1}, "2": {"fid": 2}, fewstep.START_KEY: sigma},
    ]
    fewstep.piece_lever(settings, "base")  # all measured: nothing runs
    assert len(commands) == 5


def test_a_lever_gives_distill_its_flags_and_paths_that_hold_in_the_checkout_root(
    monkeypatch, tmp_path
):
    """A lever's ``--`` item is a flag of ``difflab distill`` (not a --set) and the table shows
    it as one; the teacher, guide, reference and data given relative to where the benchmark was
    started are made absolute, since difflab runs in the checkout's root."""
    from report_fewstep import _setting

    fewstep, settings, commands = _lever_bench(monkeypatch, tmp_path, 120)
    fewstep.piece_lever(settings, "ct-pm0")
    distill = [str(a) for a in commands[0]]
    flag = distill.index("--no-teacher")
    assert distill[0] == "distill" and distill[flag - 1] != "--set"
    assert _setting("--no-teacher", 980) == "`--no-teacher`"
    assert _setting("method.consistency.p_mean=0.0", 980) == "`p_mean=0.0`"

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cars").mkdir()
    args = fewstep.argparse.Namespace(
        quick=False, teacher="t", guide="t/checkpoints/step-00000322", ref="ref.npz",
        data="cars", images=120, num=10, curve_num=0, max_minutes=1.0, minutes=0, chunks=1,
    )  # fmt: skip
    settings = fewstep.FewStepSettings(args)
    assert settings.teacher == tmp_path / "t" and settings.ref == tmp_path / "ref.npz"
    assert settings.guide == tmp_path / "t" / "checkpoints" / "step-00000322"
    assert settings.data == str(tmp_path / "cars")


def test_lever_rows_of_another_teacher_name_it_its_guide_and_its_machines():
    """A lever row distilled from a ``--teacher`` other than the benchmark's is marked, its
    guide's step shown, and a footnote per teacher says what it is and its rows' matmul peaks;
    a teacher the report has no words for is still named."""
    from report_fewstep import OTHER, _levers

    scores = {"1": {"fid": 100.0}, "2": {"fid": 60.0, "kid": 0.04}}
    sets = ["method.consistency.teacher_guide='{guide}'"]
    teachers = [("teacher-1k", 283.0), ("mine", 150.0), ("teacher-1k", 290.0)]
    rows = [{"lever": "lr4-ag", "images": 12_000, "sets": sets, "minutes": 30.0, "scores": scores,
             "teacher": name, "matmul_peak_gflops": peak,
             **({"guide": 322} if name == "teacher-1k" else {})} for name, peak in teachers]  # fmt: skip
    text = "\n".join(_levers(rows))
    assert text.count("`lr4-ag`, `teacher-1k`*") == 2 and "`lr4-ag`, `mine`*" in text
    assert text.count("its step 322") == 2 and "its step 980" in text  # the benchmark's, by default
    assert "Distilled from `teacher-1k`, the teacher's recipe stopped at 1,000" in text
    assert "(fp32 matmul peak 283, 290 GFLOP/s, row by row)" in text
    assert f"Distilled from `mine`, {OTHER} (fp32 matmul peak 150 GFLOP/s" in text


def test_a_guide_that_is_no_checkpoint_folder_is_refused_before_any_run(
    monkeypatch, tmp_path, capsys
):
    """bench/fewstep.py --guide names a run's checkpoint folder (its step is recorded in the
    row): anything else is refused at once, not after a distillation."""
    import fewstep

    (tmp_path / "run" / "checkpoints" / "step-00000322").mkdir(parents=True)
    (tmp_path / "export.safetensors").write_text("")
    monkeypatch.setattr(fewstep, "piece_lever", lambda *a: pytest.fail("ran"))
    for guide in ["export.safetensors", "run/checkpoints/step-00000980", "run"]:
        monkeypatch.setattr("sys.argv", ["fewstep.py", "lever", "--guide", str(tmp_path / guide)])
        with pytest.raises(SystemExit):
            fewstep.main()
        assert "name a checkpoint folder, RUN/checkpoints/step-N" in capsys.readouterr().err
    ran = []
    monkeypatch.setattr(fewstep, "piece_lever", lambda *a: ran.append(a))
    good = tmp_path / "run" / "checkpoints" / "step-00000322"
    monkeypatch.setattr("sys.argv", ["fewstep.py", "lever", "--guide", str(good)])
    fewstep.main()
    assert ran[0][0].guide == good


def test_a_longer_few_step_lever_goes_on_from_its_shorter_run(monkeypatch, tmp_path):
    """bench/fewstep.py lever NAME --images N: a run of the lever for fewer images (the longest,
    from the same teacher) is branched at its checkpoint and resumed, not distilled again."""
    fewstep, settings, commands = _lever_bench(monkeypatch, tmp_path, 480)
    batch = SimpleNamespace(train=SimpleNamespace(batch_size=32))
    monkeypatch.setattr("difflab.config.load_json", lambda path: batch)
    for name, images, steps in [("lr4", 120, 3), ("lr4", 240, 7), ("lr4", 320, 5),
                                ("lr4", 960, 30), ("lr4-ag", 400, 12)]:  # fmt: skip
        # 320: stopped short of its images (step 5 of 10); 960: longer; lr4-ag: another lever
        run = settings.run_dir(f"lever-{name}-{images}")
        (run / "checkpoints" / f"step-{steps:08d}").mkdir(parents=True)
        for file in ("config.json", "log.jsonl", "invocations.jsonl"):
            (run / file).write_text("{}")

    fewstep.piece_lever(settings, "lr4")
    run = settings.run_dir("lever-lr4-480")
    assert commands[0][:3] == ("train", "--resume", run)
    assert commands[0][4] == 480
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000007"]  # 240 images
    assert [c[0] for c in commands[1:]] == ["eval"] * 3  # then scored, not distilled afresh
