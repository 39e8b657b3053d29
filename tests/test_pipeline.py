"""The main job's --quick mode: every stage runs and hands on valid files (not the numbers)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, run_script

from ard.preemption import EXIT_PREEMPTED

# One worker runs the module, its fixtures once.
pytestmark = pytest.mark.xdist_group("test_pipeline")


def test_quick_pipeline_with_the_flow_teacher_runs_every_stage_end_to_end_and_resumes_after_sigterm(
    tmp_path,
):
    run_dir = tmp_path / "quick"
    command = [
        "-m",
        "experiments.digits",
        "--quick",
        "--flow",
        "--run-dir",
        str(run_dir),
        "--assets-dir",
        str(tmp_path / "assets"),
    ]
    # Stopped by a scheduler while the students train: the running stages save their work, the job
    # exits with status 75.
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("[student_k4_n0_state_s0] train_ard.py"):
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.communicate(timeout=600)[0]
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "the same command resumes" in output, output[-3000:]
    out = run_script(command, timeout=900)
    with open(run_dir / "results.json") as f:
        results = json.load(f)
    groups = [row["group"] for row in results["rows"]]
    assert groups == [
        "teacher_ddim2",
        "teacher_ddim3",
        "teacher_ddim4",
        "teacher_ddim25",
        "teacher_ddim25_s1",
        "k4_n0_state",
        "k4_n0_state_gan",
        "k4_n3_state",
        "k4_n3_state_gan",
        "flow_teacher_heun13",
        "flow_teacher_heun13_s1",
        "flow_k4_n0_state",
        "flow_k4_n3_state",
    ]
    for row in results["rows"]:
        assert row["flops_per_image"] > 0 and row["cpu_seconds_per_image"] > 0
        assert 0 <= row["precision"]["mean"] <= 1 and row["fid"]["mean"] >= 0
        lo, hi = row["fid"]["ci"][0]
        assert lo <= row["fid"]["mean"] <= hi  # every figure has its interval, holding the figure
        # And its teacher-fidelity twin (0 up to rounding for the teacher).
        assert row["teacher_fid"]["mean"] > -1e-6
    rows = {row["group"]: row for row in results["rows"]}
    # The teacher against its own samples; the flow teacher's students are judged against it.
    assert abs(rows["teacher_ddim25"]["teacher_fid"]["mean"]) < 1e-6
    assert abs(rows["flow_teacher_heun13"]["teacher_fid"]["mean"]) < 1e-6
    # The floor: two independent sets of noises.
    assert rows["teacher_ddim25_s1"]["teacher_fid"]["mean"] > 0
    # Students cost more per image than nothing and far less than the 25-step teacher.
    flops = {row["group"]: row["flops_per_image"] for row in results["rows"]}
    assert flops["k4_n0_state"] < flops["k4_n3_state"] < flops["teacher_ddim25"] / 5
    assert flops["flow_k4_n3_state"] == flops["k4_n3_state"]
    # 25 evaluations each; no variance channels.
    assert 0.99 < flops["flow_teacher_heun13"] / flops["teacher_ddim25"] <= 1
    assert "| model | steps |" in out and "Degradation ratio" in out and "teacher fidelity" in out
    probe = json.loads((run_dir / "history_probe.json").read_text())
    assert [result["history_layers"] for result in probe] == [0, 3]
    # The figures are drawn in the run folder, and --assets-dir receives a copy.
    figure = (run_dir / "figures" / "digits_history_probe.png").read_bytes()
    assert (tmp_path / "assets" / "digits_history_probe.png").read_bytes() == figure
    with open(run_dir / "timings.json") as f:
        timed = set(json.load(f))
    assert {"teacher", "trajectories", "student_k4_n0_state_s0", "eval_teacher_ddim25"} <= timed
    # A second run reuses every finished stage, and still copies the figures an earlier one drew.
    os.remove(tmp_path / "assets" / "digits_history_probe.png")
    again = run_script(command)
    assert "[teacher] reusing" in again and "[student_k4_n3_state_s0] reusing" in again
    assert os.path.isfile(run_dir / "results.md")
    assert (tmp_path / "assets" / "digits_history_probe.png").read_bytes() == figure


def test_headroom_mode_declares_three_seeds_of_both_students_at_the_headroom_step(tmp_path):
    from experiments import digits
    from experiments.pipeline import ROOT as root
    from experiments.stage_runner import StageRunner

    args = digits.parse_args(
        ["--headroom", "--run-dir", str(tmp_path / "run"), "--assets-dir", str(tmp_path / "assets")]
    )
    budget, estimates = digits.BUDGETS["default"], digits.ESTIMATES["default"]
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = digits.declare(runner, budget, estimates, args)
    short = [row for row in rows if row.variant == "short"]
    assert {row.group for row in short} == {"k4_n0_short", f"k4_n{digits.HISTORY_LAYERS}_short"}
    assert len(short) == 6
    assert all(row.checkpoint.endswith(f"{budget['headroom_steps']:07d}.pt") for row in short)
    # Seed 0 is the default row; seeds 1 and 2 train only to the headroom step.
    for seed, steps in (
        (0, budget["distil_steps"]),
        (1, budget["headroom_steps"]),
        (2, budget["headroom_steps"]),
    ):
        stage = runner.stages[f"student_k4_n0_state_s{seed}"]
        assert stage.args[stage.args.index("--max-steps") + 1] == str(steps)
        every = int(stage.args[stage.args.index("--ckpt-every") + 1])
        assert budget["headroom_steps"] % every == 0  # so the headroom checkpoint is written
    # A headroom row's samples wait for the student that writes its checkpoint.
    assert runner.stages["sample_short_k4_n0_state_s1"].after == ("student_k4_n0_state_s1",)
    assert "history_probe_short" in runner.stages
    # Without --assets-dir, nothing is written outside the run folder.
    assert digits.parse_args([]).assets_dir is None


def test_fashion_declares_both_targets_students_gan_stages_and_the_teacher_at_2_to_25_steps(
    tmp_path,
):
    from experiments import fashion
    from experiments.pipeline import ROOT as root
    from experiments.stage_runner import StageRunner

    args = fashion.parse_args(
        [
            "--seeds",
            "3",
            "--run-dir",
            str(tmp_path / "run"),
            "--assets-dir",
            str(tmp_path / "assets"),
        ]
    )
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = fashion.declare(
        runner, fashion.BUDGETS["default"], fashion.ESTIMATES["default"], args
    )
    groups = {row.group for row in rows}
    layers = fashion.FASHION.history_layers
    assert {
        "k4_n0_state",
        f"k4_n{layers}_state",
        "k4_n0_x0",
        f"k4_n{layers}_x0",
        "k4_n0_state_gan",
        f"k4_n{layers}_state_gan",
    } <= groups
    assert {f"teacher_ddim{steps}" for steps in (2, 3, 4, 5, 8, 16, 25)} <= groups
    assert "teacher_ddim25_s1" in groups
    assert sum(row.group == "k4_n0_x0" for row in rows) == 3  # one row per seed
    teacher = runner.stages["teacher"].args
    assert teacher[teacher.index("--data") + 1] == "fashion"
    assert teacher[teacher.index("--model") + 1] == "DiT-T/4"
    # The GAN stage's real images are the teacher's data.
    gan = runner.stages["student_gan_k4_n0_state_s0"].args
    assert gan[gan.index("--data") + 1] == "fashion"
    evaluation = runner.stages["eval_k4_n0_x0_s0"].args
    assert evaluation[evaluation.index("--features") + 1] == "fashion"
    assert "history_probe" in runner.stages


def test_history_mode_declares_every_depth_and_noise_level_for_three_seeds(tmp_path):
    from experiments import digits
    from experiments.pipeline import ROOT as root
    from experiments.stage_runner import StageRunner

    args = digits.parse_args(["--history", "--run-dir", str(tmp_path / "run")])
    budget, estimates = digits.BUDGETS["default"], digits.ESTIMATES["default"]
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = digits.declare(runner, budget, estimates, args)
    short = [row for row in rows if row.variant == "short"]
    kinds = {(row.history_layers, row.history_noise) for row in short}
    assert kinds == {(n, 0.0) for n in digits.HISTORY_DEPTHS} | {
        (n, noise) for noise in digits.HISTORY_NOISES for n in (0, digits.HISTORY_LAYERS)
    }
    for kind in kinds:
        assert sorted(r.seed for r in short if (r.history_layers, r.history_noise) == kind) == [
            0,
            1,
            2,
        ]
    stage = runner.stages["student_k4_n3_state_hn0.05_s2"]
    assert stage.args[stage.args.index("--history-noise") + 1] == "0.05"
    assert stage.args[stage.args.index("--max-steps") + 1] == str(budget["headroom_steps"])
    # The main pair's stages take no noise flag, so a run folder of the other modes is reused.
    assert "--history-noise" not in runner.stages["student_k4_n3_state_s0"].args
    # The probe of the headroom checkpoints reads the main pair only.
    probe = runner.stages["history_probe_short"].args
    assert not any("hn" in arg or "_n6_" in arg for arg in probe)


def test_fashion_history_mode_reads_seed_zeros_run_at_both_budgets_and_adds_seeds_and_noise(
    tmp_path,
):
    from experiments import fashion
    from experiments.pipeline import ROOT as root
    from experiments.stage_runner import StageRunner

    args = fashion.parse_args(["--history", "--run-dir", str(tmp_path / "run")])
    budget = fashion.BUDGETS["default"]
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = fashion.declare(runner, budget, fashion.ESTIMATES["default"], args)
    layers = fashion.FASHION.history_layers
    for n in (0, layers):
        # Three seeds of the state students; the x0 target and the GAN stage keep one.
        assert sorted(r.seed for r in rows if r.group == f"k4_n{n}_state") == [0, 1, 2]
        assert [r.seed for r in rows if r.group == f"k4_n{n}_x0"] == [0]
        assert [r.seed for r in rows if r.group == f"k4_n{n}_state_gan"] == [0]
        # The budget curve: one run, read at distil_steps (the plain row) and at long_steps.
        plain = next(r for r in rows if r.name == f"k4_n{n}_state_s0")
        long = next(r for r in rows if r.name == f"long_k4_n{n}_state_s0")
        assert os.path.dirname(plain.checkpoint) == os.path.dirname(long.checkpoint)
        assert plain.checkpoint.endswith(f"{budget['distil_steps']:07d}.pt")
        assert long.checkpoint.endswith(f"{budget['long_steps']:07d}.pt")
        stage = runner.stages[plain.stage].args
        assert stage[stage.index("--max-steps") + 1] == str(budget["long_steps"])
        # It saves and validates (on a log step) at the plain run's steps: the plain row has both.
        for flag in ("--ckpt-every", "--val-every", "--log-every"):
            assert budget["distil_steps"] % int(stage[stage.index(flag) + 1]) == 0
        # Seeds 1 and 2 are plain runs, the same stages as --seeds 3's.
        other = runner.stages[f"student_k4_n{n}_state_s1"].args
        assert other[other.index("--max-steps") + 1] == str(budget["distil_steps"])
        for noise in fashion.HISTORY_NOISES:  # three seeds of the noise students too
            for seed in (0, 1, 2):
                noised = runner.stages[f"student_k4_n{n}_state_hn{noise:g}_s{seed}"].args
                assert noised[noised.index("--history-noise") + 1] == str(noise)
                assert noised[noised.index("--global-seed") + 1] == str(seed)
    # The GAN stage starts from the plain row's checkpoint, not the long run's end.
    gan = runner.stages["student_gan_k4_n0_state_s0"].args
    assert gan[gan.index("--init-ckpt") + 1].endswith(f"{budget['distil_steps']:07d}.pt")


def _fashion_runner(tmp_path, argv):
    from experiments import fashion
    from experiments.pipeline import ROOT as root
    from experiments.stage_runner import StageRunner

    args = fashion.parse_args(argv + ["--run-dir", str(tmp_path / "run")])
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = fashion.declare(
        runner, fashion.BUDGETS["default"], fashion.ESTIMATES["default"], args
    )
    return runner, rows


def test_only_keeps_the_matching_rows_their_references_and_every_stage_they_need(tmp_path):
    from experiments.pipeline import select

    runner, rows = _fashion_runner(tmp_path, ["--seeds", "3"])
    kept = select(runner, rows, ["k4_*_state_s*"])
    students = {f"k4_n{n}_state_s{seed}" for n in (0, 3) for seed in (0, 1, 2)}
    # The matching rows, and the teacher's samples every figure is read against, with their floor.
    assert {row.name for row in kept} == students | {"teacher_ddim25", "teacher_ddim25_s1"}
    assert {f"eval_{name}" for name in students} | {"teacher", "eval_real_train"} <= set(
        runner.stages
    )
    # Nothing else: the x0 students, the GAN stage, the teacher at other step counts, the probe.
    assert not any("x0" in name or "gan" in name for name in runner.stages)
    assert "eval_teacher_ddim4" not in runner.stages and "history_probe" not in runner.stages
    # Every stage a kept stage waits for is kept, so the run can start.
    for stage in runner.stages.values():
        assert set(stage.after) <= set(runner.stages)


def test_only_with_a_stage_name_keeps_that_stage_and_the_students_it_reads(tmp_path):
    from experiments.pipeline import select

    runner, rows = _fashion_runner(tmp_path, [])
    probe_needs = set(runner.stages["history_probe"].after)
    kept = select(runner, rows, ["history_probe"])
    assert "history_probe" in runner.stages and probe_needs <= set(runner.stages)
    # The 25-step teacher's samples head every table, so they are kept too; nothing else is.
    assert {row.name for row in kept} == {"teacher_ddim25", "teacher_ddim25_s1"}
    assert not any(name.startswith("sample_k4") for name in runner.stages)


def test_only_keeps_the_reference_of_the_rows_it_keeps_not_every_teachers(tmp_path):
    from experiments import digits
    from experiments.pipeline import ROOT as root
    from experiments.pipeline import select
    from experiments.stage_runner import StageRunner

    args = digits.parse_args(["--full", "--run-dir", str(tmp_path / "run")])
    runner = StageRunner(str(tmp_path / "run"), root)
    rows, _, _ = digits.declare(
        runner, digits.BUDGETS["default"], digits.ESTIMATES["default"], args
    )
    kept = select(runner, rows, ["k4_n0_state_s0"])
    assert {row.name for row in kept} == {"k4_n0_state_s0", "teacher_ddim25", "teacher_ddim25_s1"}
    assert "flow_teacher" not in runner.stages  # the flow teacher is not trained for a DDIM row


def test_only_refuses_a_pattern_that_matches_nothing_and_names_the_rows(tmp_path):
    from experiments.pipeline import select

    runner, rows = _fashion_runner(tmp_path, [])
    stages = dict(runner.stages)
    with pytest.raises(SystemExit, match=r"--only long_\* matches no row.*k4_n0_state_s0"):
        select(runner, rows, ["k4_n0_state_s0", "long_*"])  # long_* exists with --history only
    assert runner.stages == stages  # refused before anything is dropped


def test_only_refuses_assets_dir_before_any_stage_runs(tmp_path):
    from experiments import fashion
    from experiments.pipeline import make_runner

    args = fashion.parse_args(
        ["--run-dir", str(tmp_path / "run"), "--only", "k4_*", "--assets-dir", str(tmp_path / "a")]
    )
    with pytest.raises(SystemExit, match="--assets-dir copies the mode's figures"):
        make_runner(args, "fashion")
    assert not (tmp_path / "run").exists() and not (tmp_path / "a").exists()


def test_paired_sets_hold_each_seeds_students_against_its_step_distillation(tmp_path):
    from experiments.pipeline import paired_sets

    runner, rows = _fashion_runner(tmp_path, ["--history"])
    sets = paired_sets(rows)
    names = {key: sorted(row.name for row in group) for key, (_, group) in sets.items()}
    assert {key: baseline.name for key, (baseline, _) in sets.items()} == {
        ("ddpm", "state", "plain", 0): "k4_n0_state_s0",
        ("ddpm", "state", "plain", 1): "k4_n0_state_s1",
        ("ddpm", "state", "plain", 2): "k4_n0_state_s2",
        ("ddpm", "x0", "plain", 0): "k4_n0_x0_s0",
        ("ddpm", "state", "long", 0): "long_k4_n0_state_s0",
    }
    # The noise students are read against step distillation without noise, of their seed.
    for seed in (0, 1, 2):
        assert names[("ddpm", "state", "plain", seed)] == sorted(
            [f"k4_n0_state_s{seed}", f"k4_n3_state_s{seed}"]
            + [f"k4_n{n}_state_hn{noise:g}_s{seed}" for n in (0, 3) for noise in (0.05, 0.1)]
        )
    assert names[("ddpm", "state", "long", 0)] == ["long_k4_n0_state_s0", "long_k4_n3_state_s0"]
    # The GAN stage's students are in no set: no table reads their ratio.
    assert not any(row.variant == "gan" for _, group in sets.values() for row in group)


def test_history_table_of_the_plain_students_shows_ratios_only_where_both_degrade(tmp_path):
    from experiments import fashion
    from experiments.report import history_table

    _, rows = _fashion_runner(tmp_path, ["--history"])
    results = {row.name: {"fid": 30.0, "teacher_fid": 10.0} for row in rows}

    def comparison(ratio, clear):
        return {"ratio": ratio, "ratio_ci95": [ratio - 0.1, ratio + 0.1], "difference": 1.0,
                "difference_ci95": [0.5, 1.5], "clearly_worse_than_teacher": clear}  # fmt: skip

    paired = {
        row.name: {"real": comparison(0.9, True), "teacher": comparison(0.8, row.seed != 2)}
        for row in rows
        if row.variant == "plain" and (row.history_layers or row.history_noise)
    }
    lines, out = history_table(
        fashion.FASHION, results, rows, fashion.BUDGETS["default"], paired, variant="plain"
    )
    ard = next(line for line in lines if line.startswith("| 3 | 0 |"))
    cells = [c.strip() for c in ard.split("|")[1:-1]]
    # Three seeds; vs real every seed degrades, so a ratio; vs the teacher seed 2 does not: '-'.
    assert cells[-1] == "3" and cells[6].startswith("0.90 ± 0.00") and cells[7] == "-"
    # No run folder here, so no validation logged: '-', not 'nan'.
    assert cells[4] == cells[5] == "-" and "nan" not in "\n".join(lines)
    noised = next(line for line in lines if line.startswith("| 3 | 0.05 |"))
    assert noised.rstrip(" |").endswith("3")  # the noise students: three seeds too
    assert out["n3_noise0"]["seeds"] == [0, 1, 2]
