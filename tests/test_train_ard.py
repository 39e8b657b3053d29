"""Distillation: the regression stage, the GAN stage, resume, DDP and input checks."""

import json
import os

import numpy as np
import pytest
import torch

from checkpoints import load_checkpoint, load_student
from helpers import make_teacher_checkpoint, run_script, run_script_expect_failure
from trajectory_store import TrajectoryDataset, TrajectoryStore

S = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ard")
    teacher = root / "teacher.pt"
    make_teacher_checkpoint(teacher)
    store = root / "traj"
    run_script(["train_teacher_traj.py", "--ckpt", str(teacher), "--out", str(store), "--num-trajectories", "96",
                "--num-sampling-steps", str(S), "--shard-size", "32", "--batch-size", "32"])
    return str(teacher), str(store), root


def ard_args(setup, run_dir, steps, *extra):
    teacher, store, _ = setup
    return ["train_ard.py", "--traj", store, "--teacher-ckpt", teacher, "--history-layers", "2",
            "--global-batch-size", "16", "--lr", "1e-3", "--ema-decay", "0.9", "--log-every", "1",
            "--sample-every", "0", "--max-steps", str(steps), "--run-dir", str(run_dir), *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a, b, keys=("model", "ema")):
    for key in keys:
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"


def test_loss_decreases_on_a_tiny_store(setup, tmp_path):
    run_script(ard_args(setup, tmp_path / "run", 30, "--val-count", "16", "--val-every", "30"))
    m = metrics(tmp_path / "run")
    first, last = np.mean([r["loss"] for r in m[:3]]), np.mean([r["loss"] for r in m[-3:]])
    assert last < 0.5 * first, (first, last)
    assert len(m[-1]["step_mse"]) == 4 and "val_ar_final_mse" in m[-1]


def test_student_checkpoint_holds_its_config_and_samples(setup, tmp_path):
    run_script(ard_args(setup, tmp_path / "run", 2, "--target", "x0", "--boundaries", "0", "2", "5"))
    model, config = load_student(str(tmp_path / "run" / "checkpoints" / "0000002.pt"))
    assert config["boundaries"] == [0, 2, 5] and config["target"] == "x0" and config["history_layers"] == 2
    assert model.num_steps == 2 and model.timesteps.tolist() == [999, 500]
    out = run_script(["sample.py", "--ckpt", str(tmp_path / "run" / "checkpoints" / "0000002.pt"),
                      "--out", str(tmp_path / "grid.png"), "--per-class", "1"])
    assert "ARD student, 2 steps" in out and os.path.isfile(tmp_path / "grid.png")


def test_resume_after_k_of_n_steps_equals_n_uninterrupted_steps(setup, tmp_path):
    run_script(ard_args(setup, tmp_path / "full", 6))
    run_script(ard_args(setup, tmp_path / "part", 3))
    resume = ard_args(setup, tmp_path / "unused", 6, "--resume", str(tmp_path / "part" / "checkpoints" / "0000003.pt"))
    run_script(resume)
    assert_same_weights(load_checkpoint(str(tmp_path / "full" / "checkpoints" / "0000006.pt")),
                        load_checkpoint(str(tmp_path / "part" / "checkpoints" / "0000006.pt")))


@pytest.fixture(scope="module")
def regression_ckpt(setup):
    run_dir = setup[2] / "regression"
    run_script(ard_args(setup, run_dir, 2))
    return str(run_dir / "checkpoints" / "0000002.pt")


def gan_args(setup, regression_ckpt, run_dir, steps, warmup, *extra):
    return ard_args(setup, run_dir, steps, "--gan", "--init-ckpt", regression_ckpt, "--gan-warmup", str(warmup),
                    "--gan-blocks", "1", "4", *extra)


def test_gan_resume_after_k_of_n_steps_equals_n_uninterrupted_steps(setup, regression_ckpt, tmp_path):
    run_script(gan_args(setup, regression_ckpt, tmp_path / "full", 4, 1))
    run_script(gan_args(setup, regression_ckpt, tmp_path / "part", 2, 1))
    run_script(gan_args(setup, regression_ckpt, tmp_path / "x", 4, 1, "--resume", str(tmp_path / "part" / "checkpoints" / "0000002.pt")))
    a = load_checkpoint(str(tmp_path / "full" / "checkpoints" / "0000004.pt"))
    b = load_checkpoint(str(tmp_path / "part" / "checkpoints" / "0000004.pt"))
    assert_same_weights(a, b, keys=("model", "ema", "disc"))
    assert a["disc_blocks"] == [1, 4]
    assert all(r["gan_weight"] > 0 for r in metrics(tmp_path / "full")[1:])  # lambda is on after the warm-up


def test_gan_update_in_warmup_equals_regression_update(setup, regression_ckpt, tmp_path):
    run_script(gan_args(setup, regression_ckpt, tmp_path / "gan", 3, 100))
    run_script(ard_args(setup, tmp_path / "reg", 3, "--init-ckpt", regression_ckpt))
    gan = load_checkpoint(str(tmp_path / "gan" / "checkpoints" / "0000003.pt"))
    reg = load_checkpoint(str(tmp_path / "reg" / "checkpoints" / "0000003.pt"))
    assert_same_weights(gan, reg)
    assert all(r["gan_weight"] == 0 and np.isfinite(r["d_loss"]) for r in metrics(tmp_path / "gan"))


def test_two_process_training_logs_the_mean_over_ranks(setup, tmp_path):
    run_script(ard_args(setup, tmp_path / "ddp", 1), nproc=2)
    logged = metrics(tmp_path / "ddp")[0]
    teacher, store_path, _ = setup
    from ard_models import ARD_models
    from checkpoints import load_dit
    from train_ard import rank_indices
    from train_utils import StepBatchSampler

    store = TrajectoryStore(store_path)
    dataset = TrajectoryDataset(store, [0, 1, 2, 3, 5], "state")
    t_model, _ = load_dit(teacher)
    torch.manual_seed(0)
    student = ARD_models["DiT-T/4"](timesteps=dataset.timesteps, history_layers=2, input_size=8, in_channels=1,
                                    num_classes=10).load_teacher(t_model.state_dict())
    losses = []
    for rank in range(2):
        local = rank_indices(store, range(len(store)), rank, 2)
        positions = next(iter(StepBatchSampler(len(local), 8, 0 * 1009 + rank, 0, 1, 0, 1)))
        inputs, targets, y = dataset.__getitems__([local[p] for p in positions])
        with torch.no_grad():
            losses.append((student(inputs, y) - targets).square().mean().item())
    assert abs(losses[0] - losses[1]) > 1e-6
    assert logged["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_store_of_another_teacher_shape_is_refused(setup, tmp_path):
    other = tmp_path / "other.pt"
    make_teacher_checkpoint(other, input_size=16)
    out = run_script_expect_failure(ard_args((str(other), setup[1], None), tmp_path / "run", 1))
    assert "holds 1x8x8 trajectories but the model expects 1x16x16" in out


def test_missing_boundaries_are_refused(setup, tmp_path):
    teacher, _, root = setup
    sparse = tmp_path / "sparse"
    run_script(["train_teacher_traj.py", "--ckpt", teacher, "--out", str(sparse), "--num-trajectories", "16",
                "--num-sampling-steps", str(S), "--save-steps", "0,3,5", "--batch-size", "16"])
    out = run_script_expect_failure(ard_args((teacher, str(sparse), root), tmp_path / "run", 1, "--boundaries", "0", "2", "5"))
    assert "did not save solver steps [2]" in out


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(setup, tmp_path):
    teacher, store_path, root = setup
    bad = tmp_path / "bad"
    run_script(["train_teacher_traj.py", "--ckpt", teacher, "--out", str(bad), "--num-trajectories", "32",
                "--num-sampling-steps", str(S), "--batch-size", "32"])
    run_script(ard_args((teacher, str(bad), root), tmp_path / "run", 2, "--ckpt-every", "1"))
    xt = np.load(bad / "shard-00000" / "xt.npy")
    xt[:, -1] = np.nan
    np.save(bad / "shard-00000" / "xt.npy", xt)
    out = run_script_expect_failure(ard_args((teacher, str(bad), root), tmp_path / "x", 4,
                                             "--resume", str(tmp_path / "run" / "checkpoints" / "0000002.pt")))
    assert "infinite or NaN at step 3" in out and "step 2" in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000001.pt", "0000002.pt"]


def test_two_process_gan_stage_runs(setup, regression_ckpt, tmp_path):
    run_script(gan_args(setup, regression_ckpt, tmp_path / "ddp_gan", 2, 1), nproc=2)
    m = metrics(tmp_path / "ddp_gan")
    assert len(m) == 2 and m[-1]["gan_weight"] > 0 and np.isfinite(m[-1]["d_loss"])
