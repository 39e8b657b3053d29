"""The trajectory writer and the store's reader."""

import os
import shutil

import numpy as np
import pytest
from helpers import S, run_script_expect_failure, write_store

from ard.generation import TeacherSampler
from ard.trajectory_store import (
    TrajectoryDataset,
    TrajectoryStore,
    default_boundaries,
    trajectory_labels,
    trajectory_noise,
)
from diffusion import create_diffusion
from diffusion.ode import solver_grid


def shard_arrays(path):
    return {
        name: {a: np.load(os.path.join(path, name, f"{a}.npy")) for a in ("xt", "x0", "y", "index")}
        for name in sorted(os.listdir(path))
        if name.startswith("shard-")
    }


def test_one_and_two_process_runs_store_identical_trajectories(teacher, store, tmp_path):
    write_store(teacher[0], tmp_path / "two", nproc=2)
    one, two = shard_arrays(store), shard_arrays(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 3
    for name in one:
        for a in one[name]:
            assert np.array_equal(one[name][a], two[name][a]), (
                f"{name}/{a} differs between 1 and 2 processes"
            )


def test_interrupted_run_finishes_missing_shards_without_rewriting_finished_ones(
    teacher, store, tmp_path
):
    out = tmp_path / "store"
    shutil.copytree(store, out)
    finished = os.stat(out / "shard-00000" / "xt.npy")
    # Simulate a run killed while writing shard 2, after shard 1 was lost too.
    os.rename(out / "shard-00002", out / "shard-00002.tmp-0")
    np.save(out / "shard-00002.tmp-0" / "xt.npy", np.zeros(3))
    shutil.rmtree(out / "shard-00001")
    with pytest.raises(ValueError, match="incomplete"):
        TrajectoryStore(str(out))
    log = write_store(teacher[0], out)
    assert "1 already complete" in log
    again = os.stat(out / "shard-00000" / "xt.npy")
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    resumed = TrajectoryStore(str(out))
    indices = np.concatenate([resumed.shards[s]["index"] for s in range(len(resumed.shards))])
    assert sorted(indices.tolist()) == list(range(96))
    reference, resumed = shard_arrays(store), shard_arrays(out)
    for name in reference:
        for a in reference[name]:
            assert np.array_equal(reference[name][a], resumed[name][a])


def test_stored_final_sample_is_the_teachers_own_ddim_sample(teacher, store):
    ckpt, model = teacher
    data = TrajectoryStore(store).read([0, 5, 11, 95], [0, S])
    noise = trajectory_noise(0, [0, 5, 11, 95], (1, 8, 8))
    y = trajectory_labels([0, 5, 11, 95], 10)
    assert np.array_equal(data["y"], y.numpy())
    assert np.array_equal(data["xt"][:, 0], noise.numpy())
    expected = TeacherSampler(model, dict(space="pixel"), "ddim", S, cfg_scale=1.5)(noise, y)
    np.testing.assert_allclose(data["xt"][:, 1], expected.numpy(), rtol=1e-4, atol=1e-5)
    # x0 at the last step is the final sample
    assert np.array_equal(data["x0"][:, 1], data["xt"][:, 1])


def test_manifest_records_every_solver_step_and_its_timestep(store):
    m = TrajectoryStore(store).manifest
    assert m["save_steps"] == list(range(S + 1))
    assert (
        m["save_timesteps"] == solver_grid(create_diffusion(str(S)))
        and m["save_timesteps"][-1] == -1
    )
    assert m["clip_denoised"] is True and m["cfg_scale"] == 1.5 and m["count"] == 96


def test_rerun_with_other_settings_is_refused(teacher, store):
    out = run_script_expect_failure(
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher[0],
            "--out",
            store,
            "--num-trajectories",
            "96",
            "--num-sampling-steps",
            str(S),
            "--shard-size",
            "32",
            "--cfg-scale",
            "3.0",
        ]
    )
    assert "other settings" in out and "cfg_scale: 1.5 there, 3.0 now" in out


def test_reader_refuses_boundaries_that_were_not_saved(sparse_store):
    store = TrajectoryStore(sparse_store)
    assert store.saved_steps == [0, 2, 5]
    with pytest.raises(ValueError, match=r"did not save solver steps \[3\]; it saved \[0, 2, 5\]"):
        TrajectoryDataset(store, [0, 3, 5])


def test_reader_refuses_a_model_of_another_shape(store):
    with pytest.raises(ValueError, match="holds 1x8x8 trajectories but the model expects 4x8x8"):
        TrajectoryStore(store).check_model(shape=(4, 8, 8))


def test_dataset_targets_state_and_x0(store):
    store = TrajectoryStore(store)
    bounds = [0, 2, 4, 5]
    full = store.read([3], list(range(S + 1)))
    inputs, targets, y = TrajectoryDataset(store, bounds, "state")[3]
    assert inputs.shape == targets.shape == (3, 1, 8, 8)
    assert np.array_equal(inputs.numpy(), full["xt"][0, [0, 2, 4]]) and np.array_equal(
        targets.numpy(), full["xt"][0, [2, 4, 5]]
    )
    inputs, targets, _ = TrajectoryDataset(store, bounds, "x0")[3]
    assert np.array_equal(
        inputs.numpy(), np.concatenate([full["xt"][0, [0]], full["x0"][0, [2, 4]]])
    )
    assert np.array_equal(targets.numpy(), full["x0"][0, [2, 4, 5]])
    # the last target is the sample in both
    assert np.array_equal(targets[-1].numpy(), full["xt"][0, 5])
    assert TrajectoryDataset(store, bounds).timesteps == [
        store.saved_timesteps[s] for s in (0, 2, 4)
    ]


def test_ranks_read_disjoint_parts_that_cover_the_training_indices(store):
    store = TrajectoryStore(store)
    for world in (1, 2, 4):
        parts = [store.rank_indices(range(80), r, world) for r in range(world)]
        assert sorted(i for part in parts for i in part) == list(range(80))


def test_default_boundaries_are_evenly_spaced_in_t_on_the_25_step_grid():
    timesteps = solver_grid(create_diffusion("25"))
    assert default_boundaries(list(range(26)), timesteps, 4) == [0, 6, 12, 18, 25]
    assert [timesteps[s] for s in (6, 12, 18)] == [749, 500, 250]
    assert default_boundaries(list(range(26)), timesteps, 1) == [0, 25]
    with pytest.raises(ValueError, match="too few steps"):
        default_boundaries([0, 10, 25], [999, 583, -1], 4)


def test_save_steps_student_k_saves_exactly_the_boundaries_of_a_k_step_student():
    from ard.trajectory_store import schedule_steps
    from train_teacher_traj import parse_save_steps

    timesteps = solver_grid(create_diffusion("25"))
    assert parse_save_steps("student:4", 25, False, grid=timesteps) == [0, 6, 12, 18, 25]
    assert parse_save_steps("student:4:logsnr", 25, False, grid=timesteps) == schedule_steps(
        timesteps, 4, "logsnr"
    )
    # what the README's trajectory command used to save: the default rule then moved boundaries
    assert parse_save_steps("every:5", 25, False) == [0, 5, 10, 15, 20, 25]
    with pytest.raises(ValueError, match="student:K"):
        parse_save_steps("student:0", 25, False, grid=timesteps)


def test_default_store_of_a_large_model_gives_the_default_students_boundaries():
    from ard.trajectory_store import default_boundaries
    from train_ard import parse_args
    from train_teacher_traj import parse_save_steps

    timesteps = solver_grid(create_diffusion("25"))
    saved = parse_save_steps(None, 25, False, grid=timesteps)
    student_steps = parse_args(["--traj", "t", "--teacher-ckpt", "t.pt"]).student_steps
    boundaries = default_boundaries(saved, [timesteps[s] for s in saved], student_steps)
    assert boundaries == saved == [0, 6, 12, 18, 25]
