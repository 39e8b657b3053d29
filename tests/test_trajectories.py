"""The trajectory writer and the store's reader."""

import os

import numpy as np
import pytest

from diffusion import create_diffusion
from helpers import make_teacher_checkpoint, run_script, run_script_expect_failure
from sample import teacher_sample
from train_teacher_traj import sample_labels, sample_noise
from trajectory_store import TrajectoryDataset, TrajectoryStore, default_boundaries

S = 5  # solver steps in these tests


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    model = make_teacher_checkpoint(path)
    return str(path), model


def write_store(ckpt, out, n=30, nproc=1, extra=()):
    args = ["train_teacher_traj.py", "--ckpt", ckpt, "--out", str(out), "--num-trajectories", str(n),
            "--num-sampling-steps", str(S), "--shard-size", "10", "--batch-size", "4", *extra]
    return run_script(args, nproc=nproc)


def shard_arrays(path):
    return {name: {a: np.load(os.path.join(path, name, f"{a}.npy")) for a in ("xt", "x0", "y", "index")}
            for name in sorted(os.listdir(path)) if name.startswith("shard-")}


def test_one_and_two_process_runs_store_identical_trajectories(teacher, tmp_path):
    write_store(teacher[0], tmp_path / "one", n=30)
    write_store(teacher[0], tmp_path / "two", n=30, nproc=2)
    one, two = shard_arrays(tmp_path / "one"), shard_arrays(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 3
    for name in one:
        for a in one[name]:
            assert np.array_equal(one[name][a], two[name][a]), f"{name}/{a} differs between 1 and 2 processes"


def test_interrupted_run_finishes_missing_shards_without_rewriting_finished_ones(teacher, tmp_path):
    out = tmp_path / "store"
    write_store(teacher[0], out, n=30)
    reference = shard_arrays(out)
    finished = os.stat(out / "shard-00000" / "xt.npy")
    # Simulate a run killed while writing shard 2, after shard 1 was lost too.
    os.rename(out / "shard-00002", out / "shard-00002.tmp-0")
    np.save(out / "shard-00002.tmp-0" / "xt.npy", np.zeros(3))
    for f in os.listdir(out / "shard-00001"):
        os.remove(out / "shard-00001" / f)
    os.rmdir(out / "shard-00001")
    with pytest.raises(ValueError, match="incomplete"):
        TrajectoryStore(str(out))
    log = write_store(teacher[0], out, n=30)
    assert "1 already complete" in log
    again = os.stat(out / "shard-00000" / "xt.npy")
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    store = TrajectoryStore(str(out))
    indices = np.concatenate([store.shards[s]["index"] for s in range(len(store.shards))])
    assert sorted(indices.tolist()) == list(range(30))
    resumed = shard_arrays(out)
    for name in reference:
        for a in reference[name]:
            assert np.array_equal(reference[name][a], resumed[name][a])


def test_stored_final_sample_is_the_teachers_own_ddim_sample(teacher, tmp_path):
    ckpt, model = teacher
    write_store(ckpt, tmp_path / "store", n=12)
    store = TrajectoryStore(str(tmp_path / "store"))
    indices = [0, 5, 11]
    data = store.read(indices, [0, S])
    noise = sample_noise(0, indices, (1, 8, 8))
    y = sample_labels(indices, 10)
    assert np.array_equal(data["y"], y.numpy())
    assert np.array_equal(data["xt"][:, 0], noise.numpy())
    expected = teacher_sample(model, create_diffusion(str(S)), noise, y, "ddim", cfg_scale=1.5, clip_denoised=True)
    np.testing.assert_allclose(data["xt"][:, 1], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(data["x0"][:, 1], data["xt"][:, 1])  # x0 at the last step is the final sample
    m = store.manifest
    assert m["save_steps"] == list(range(S + 1)) and m["save_timesteps"][0] == 999 and m["save_timesteps"][-1] == -1


def test_rerun_with_other_settings_is_refused(teacher, tmp_path):
    write_store(teacher[0], tmp_path / "store", n=10)
    out = run_script_expect_failure(["train_teacher_traj.py", "--ckpt", teacher[0], "--out", str(tmp_path / "store"),
                                     "--num-trajectories", "10", "--num-sampling-steps", str(S), "--shard-size", "10",
                                     "--batch-size", "4", "--cfg-scale", "3.0"])
    assert "other settings" in out and "cfg_scale: 1.5 there, 3.0 now" in out


def test_reader_refuses_boundaries_that_were_not_saved(teacher, tmp_path):
    write_store(teacher[0], tmp_path / "store", n=10, extra=["--save-steps", "0,2,5"])
    store = TrajectoryStore(str(tmp_path / "store"))
    assert store.saved_steps == [0, 2, 5]
    with pytest.raises(ValueError, match=r"did not save solver steps \[3\]; it saved \[0, 2, 5\]"):
        TrajectoryDataset(store, [0, 3, 5])
    with pytest.raises(ValueError, match="holds 1x8x8 trajectories but the model expects 4x8x8"):
        store.check_model(shape=(4, 8, 8))


def test_dataset_targets_state_and_x0(teacher, tmp_path):
    write_store(teacher[0], tmp_path / "store", n=10)
    store = TrajectoryStore(str(tmp_path / "store"))
    bounds = [0, 2, 4, 5]
    full = store.read([3], list(range(S + 1)))
    inputs, targets, y = TrajectoryDataset(store, bounds, "state")[3]
    assert inputs.shape == targets.shape == (3, 1, 8, 8)
    assert np.array_equal(inputs.numpy(), full["xt"][0, [0, 2, 4]]) and np.array_equal(targets.numpy(), full["xt"][0, [2, 4, 5]])
    inputs, targets, _ = TrajectoryDataset(store, bounds, "x0")[3]
    assert np.array_equal(inputs.numpy(), np.concatenate([full["xt"][0, [0]], full["x0"][0, [2, 4]]]))
    assert np.array_equal(targets.numpy(), full["x0"][0, [2, 4, 5]])
    assert np.array_equal(targets[-1].numpy(), full["xt"][0, 5])  # the last target is the sample in both
    assert TrajectoryDataset(store, bounds).timesteps == [store.saved_timesteps[s] for s in (0, 2, 4)]


def test_default_boundaries_are_evenly_spaced_in_t_on_the_25_step_grid():
    from diffusion.ode import model_timesteps

    timesteps = model_timesteps(create_diffusion("25")) + [-1]
    assert default_boundaries(list(range(26)), timesteps, 4) == [0, 6, 12, 18, 25]
    assert [timesteps[s] for s in (6, 12, 18)] == [749, 500, 250]
    assert default_boundaries(list(range(26)), timesteps, 1) == [0, 25]
    with pytest.raises(ValueError, match="too few steps"):
        default_boundaries([0, 10, 25], [999, 583, -1], 4)
