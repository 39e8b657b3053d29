"""Distillation: the regression stage, the GAN stage, resume, DDP and input checks."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import make_teacher_checkpoint, run_script, run_script_expect_failure

from ard.checkpoints import load_checkpoint, load_model
from ard.seeding import rank_seed
from ard.training import StepBatchSampler
from ard.trajectory_store import TrajectoryDataset, TrajectoryStore

# one worker runs the module, its fixtures once
pytestmark = pytest.mark.xdist_group("test_train_ard")


def ard_args(teacher, store, run_dir, steps, *extra):
    return [
        "train_ard.py",
        "--traj",
        store,
        "--teacher-ckpt",
        teacher,
        "--history-layers",
        "2",
        "--global-batch-size",
        "16",
        "--lr",
        "1e-3",
        "--ema-decay",
        "0.9",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--max-steps",
        str(steps),
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a, b, keys=("model", "ema")):
    for key in keys:
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"


@pytest.fixture(scope="module")
def runs(teacher, store, tmp_path_factory):
    """Regression runs of 30 steps (16 trajectories held out), and of 15 steps resumed to 30; the
    15-step checkpoint also starts the GAN stage."""
    root = tmp_path_factory.mktemp("ard")
    val = ["--val-count", "16", "--val-every", "30"]
    run_script(ard_args(teacher[0], store, root / "full", 30, *val))
    run_script(ard_args(teacher[0], store, root / "part", 15, *val))
    run_script(
        ard_args(
            teacher[0],
            store,
            root / "unused",
            30,
            *val,
            "--resume",
            str(root / "part" / "checkpoints" / "0000015.pt"),
        )
    )
    return root


def test_loss_decreases_on_a_tiny_store(runs):
    m = metrics(runs / "full")
    first, last = np.mean([r["loss"] for r in m[:3]]), np.mean([r["loss"] for r in m[-3:]])
    assert last < 0.5 * first, (first, last)
    assert len(m[-1]["step_mse"]) == 4 and "val_ar_final_mse" in m[-1]


def test_student_checkpoint_holds_its_config_and_samples(teacher, store, tmp_path):
    run_script(
        ard_args(
            teacher[0], store, tmp_path / "run", 2, "--target", "x0", "--boundaries", "0", "2", "5"
        )
    )
    model, config = load_model(str(tmp_path / "run" / "checkpoints" / "0000002.pt"), kind="ard")
    assert (
        config["boundaries"] == [0, 2, 5]
        and config["target"] == "x0"
        and config["history_layers"] == 2
    )
    assert model.num_steps == 2 and model.timesteps.tolist() == [999, 500]
    out = run_script(
        [
            "sample.py",
            "--ckpt",
            str(tmp_path / "run" / "checkpoints" / "0000002.pt"),
            "--out",
            str(tmp_path / "grid.png"),
            "--per-class",
            "1",
        ]
    )
    assert "ARD student, 2 steps" in out and os.path.isfile(tmp_path / "grid.png")


def test_resume_after_k_of_n_steps_equals_n_uninterrupted_steps(runs):
    assert_same_weights(
        load_checkpoint(str(runs / "full" / "checkpoints" / "0000030.pt")),
        load_checkpoint(str(runs / "part" / "checkpoints" / "0000030.pt")),
    )
    assert [m["loss"] for m in metrics(runs / "full")] == [
        m["loss"] for m in metrics(runs / "part")
    ]


def gan_args(teacher, store, init, run_dir, steps, warmup, *extra):
    return ard_args(
        teacher,
        store,
        run_dir,
        steps,
        "--gan",
        "--init-ckpt",
        init,
        "--gan-warmup",
        str(warmup),
        "--gan-blocks",
        "1",
        "4",
        *extra,
    )


@pytest.fixture(scope="module")
def gan_runs(teacher, store, runs):
    """GAN stages from the 15-step regression checkpoint, lambda on from step 3: 4 steps, and 2
    steps resumed to 4."""
    init = str(runs / "part" / "checkpoints" / "0000015.pt")
    run_script(gan_args(teacher[0], store, init, runs / "gan_full", 4, 2))
    run_script(gan_args(teacher[0], store, init, runs / "gan_part", 2, 2))
    run_script(
        gan_args(
            teacher[0],
            store,
            init,
            runs / "x",
            4,
            2,
            "--resume",
            str(runs / "gan_part" / "checkpoints" / "0000002.pt"),
        )
    )
    return runs / "gan_full", runs / "gan_part"


def test_gan_resume_after_k_of_n_steps_equals_n_uninterrupted_steps(gan_runs):
    full, part = gan_runs
    a = load_checkpoint(str(full / "checkpoints" / "0000004.pt"))
    b = load_checkpoint(str(part / "checkpoints" / "0000004.pt"))
    assert_same_weights(a, b, keys=("model", "ema", "disc"))
    assert a["disc_blocks"] == [1, 4]
    # lambda is on after the warm-up
    assert [r["gan_weight"] > 0 for r in metrics(full)] == [
        False,
        False,
        True,
        True,
    ]


def test_gan_update_in_warmup_equals_regression_update(teacher, store, runs, gan_runs, tmp_path):
    init = str(runs / "part" / "checkpoints" / "0000015.pt")
    run_script(ard_args(teacher[0], store, tmp_path / "reg", 2, "--init-ckpt", init))
    # both steps in the warm-up
    gan = load_checkpoint(str(gan_runs[1] / "checkpoints" / "0000002.pt"))
    reg = load_checkpoint(str(tmp_path / "reg" / "checkpoints" / "0000002.pt"))
    assert_same_weights(gan, reg)
    assert all(r["gan_weight"] == 0 and np.isfinite(r["d_loss"]) for r in metrics(gan_runs[1])[:2])


@pytest.fixture(scope="module")
def ddp_gan_run(teacher, store, runs):
    """One GAN step (lambda on) on two processes, from the 15-step regression checkpoint."""
    init = str(runs / "part" / "checkpoints" / "0000015.pt")
    run_script(
        gan_args(teacher[0], store, init, runs / "ddp_gan", 1, 0, "--val-count", "16"), nproc=2
    )
    return runs / "ddp_gan", init


def test_two_process_training_logs_the_mean_over_ranks(store, ddp_gan_run):
    run_dir, init = ddp_gan_run
    logged = metrics(run_dir)[0]
    traj = TrajectoryStore(store)
    dataset = TrajectoryDataset(traj, [0, 1, 2, 3, 5], "state")
    student, _ = load_model(init, kind="ard")  # the GAN stage starts from these (EMA) weights
    losses = []
    for rank in range(2):
        local = traj.rank_indices(range(len(traj) - 16), rank, 2)
        positions = next(iter(StepBatchSampler(len(local), 8, rank_seed(0, rank), 0, 1, 0, 1)))
        inputs, targets, y = dataset.__getitems__([local[p] for p in positions])
        with torch.no_grad():
            losses.append((student(inputs, y) - targets).square().mean().item())
    assert abs(losses[0] - losses[1]) > 1e-6
    # the regression loss, before the GAN term
    assert logged["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_two_process_gan_stage_runs(ddp_gan_run):
    m = metrics(ddp_gan_run[0])
    assert len(m) == 1 and m[0]["gan_weight"] > 0 and np.isfinite(m[0]["d_loss"])


def test_store_written_by_another_teacher_of_the_same_architecture_is_refused(store, tmp_path):
    other = tmp_path / "other.pt"
    make_teacher_checkpoint(other, seed=1)  # same config, other weights
    out = run_script_expect_failure(ard_args(str(other), store, tmp_path / "run", 1))
    assert (
        "was written by another teacher" in out and "pass the teacher that wrote the store" in out
    )
    assert "Traceback" not in out and not (tmp_path / "run").exists()


def test_missing_boundaries_are_refused(teacher, sparse_store, tmp_path):
    out = run_script_expect_failure(
        ard_args(teacher[0], sparse_store, tmp_path / "run", 1, "--boundaries", "0", "3", "5")
    )
    assert "did not save solver steps [3]" in out


def test_default_boundaries_the_store_cannot_give_exactly_are_refused_with_both_fixes(
    teacher, sparse_store, tmp_path
):
    # The sparse store saved solver steps 0, 2 and 5 of 5; the log-SNR schedule of a 2-step student
    # wants 0, 3, 5, and a 3-step student 0, 1, 3, 5 (of which 0, 2, 5 cannot give the nearest).
    args = ard_args(teacher[0], sparse_store, tmp_path / "run", 1, "--global-batch-size", "8")
    out = run_script_expect_failure(
        [*args, "--student-steps", "2", "--boundary-schedule", "logsnr"]
    )
    assert "wants solver steps [0, 3, 5]" in out and "saved [0, 2, 5], whose nearest are" in out
    assert "pass --boundaries 0 2 5" in out and "--save-steps student:2:logsnr" in out
    out = run_script_expect_failure([*args, "--student-steps", "3"])
    assert "too few for a 3-step student: write the store with --save-steps student:3" in out
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(teacher, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    run_script(ard_args(teacher[0], str(bad), tmp_path / "run", 2, "--ckpt-every", "1"))
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        xt = np.load(bad / shard / "xt.npy")
        xt[:, -1] = np.nan
        np.save(bad / shard / "xt.npy", xt)
    out = run_script_expect_failure(
        ard_args(
            teacher[0],
            str(bad),
            tmp_path / "x",
            4,
            "--resume",
            str(tmp_path / "run" / "checkpoints" / "0000002.pt"),
        )
    )
    assert "infinite or NaN at step 3" in out and "step 2" in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000001.pt", "0000002.pt"]


def test_a_checkpoint_after_k_steps_does_not_depend_on_max_steps(teacher, store, tmp_path):
    # The headroom rows of the main job read the 400-step checkpoint of 800-step runs as a 400-step
    # run's.
    run_script(
        ard_args(
            teacher[0],
            store,
            tmp_path / "short",
            4,
            "--ckpt-every",
            "4",
            "--val-count",
            "16",
            "--val-every",
            "4",
        )
    )
    run_script(
        ard_args(
            teacher[0],
            store,
            tmp_path / "long",
            8,
            "--ckpt-every",
            "4",
            "--val-count",
            "16",
            "--val-every",
            "2",
        )
    )
    assert_same_weights(
        load_checkpoint(str(tmp_path / "short" / "checkpoints" / "0000004.pt")),
        load_checkpoint(str(tmp_path / "long" / "checkpoints" / "0000004.pt")),
    )


def test_history_noise_touches_the_history_inputs_only(teacher, store, tmp_path):
    # With N = 0 step 1 sees only the noise input: its loss is the clean run's exactly when the
    # noise input and the targets stay clean; the losses of steps 2..K, whose inputs are noised,
    # move.
    for name, extra in (("clean", []), ("noised", ["--history-noise", "0.5"])):
        args = ard_args(teacher[0], store, tmp_path / name, 1, *extra)
        args[args.index("--history-layers") + 1] = "0"
        run_script(args)
    clean, noised = (metrics(tmp_path / name)[0]["step_mse"] for name in ("clean", "noised"))
    assert noised[0] == clean[0]
    assert all(n != c for n, c in zip(noised[1:], clean[1:]))
