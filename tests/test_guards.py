"""Nothing lost, nothing silent: every fault a user can cause stops with one sentence before any
work, and nothing already written is lost or mixed with another run's output."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_teacher_checkpoint, run_script, run_script_expect_failure, write_store

from ard.checkpoints import find_checkpoint, load_checkpoint, load_model, save_checkpoint
from ard.cli import UserError, check_output_path, decay, diffusion_steps, positive_int
from ard.fileio import WriterLock, file_sha256, remove_stale_temporaries
from ard.trajectory_store import TrajectoryStore
from evaluator.__main__ import load_batch

TINY = ["--model", "DiT-T/4", "--global-batch-size", "16", "--log-every", "1", "--ema-decay", "0.9"]


def one_sentence(out):
    """A user error: one line starting with 'error:', and no traceback."""
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error")]
    assert len(lines) == 1, out
    return lines[0]


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# Non-finite values --------------------------------------------------------------------------------


def test_teacher_training_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = run_script_expect_failure(
        [
            "train.py",
            *TINY,
            "--max-steps",
            "12",
            "--lr",
            "1e3",
            "--ckpt-every",
            "1",
            "--run-dir",
            str(run),
        ]
    )
    line = one_sentence(out)
    assert "infinite or NaN at step 2" in line and "last good checkpoint is step 1" in line
    assert os.listdir(run / "checkpoints") == ["0000001.pt"]
    load_model(str(run / "checkpoints" / "0000001.pt"), kind="dit")  # intact and finite


def test_no_checkpoint_holding_a_non_finite_weight_is_written(tmp_path):
    state = {
        "model": {"w": torch.tensor([1.0, float("nan")])},
        "ema": {"w": torch.ones(2)},
        "step": 1,
    }
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        save_checkpoint(str(tmp_path / "bad.pt"), state)
    assert os.listdir(tmp_path) == []


def test_readers_refuse_a_checkpoint_with_non_finite_weights(teacher, tmp_path):
    ckpt = load_checkpoint(teacher[0])
    ckpt["ema"]["blocks.0.mlp.fc1.weight"][0, 0] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(ckpt, path)  # as a diverged run of an older version could have left it
    with pytest.raises(UserError, match="non-finite weights"):
        load_model(str(path))
    out = run_script_expect_failure(
        [
            "sample_ddp.py",
            "--ckpt",
            str(path),
            "--out",
            str(tmp_path / "s.npz"),
            "--num-samples",
            "4",
        ]
    )
    assert "non-finite weights" in one_sentence(out) and not os.path.exists(
        tmp_path / "s.npz.chunks"
    )


# Run folders --------------------------------------------------------------------------------------


def test_a_run_folder_is_never_overwritten_without_resume_or_replace(tmp_path):
    run = tmp_path / "run"
    run_script(["train.py", *TINY, "--max-steps", "1", "--run-dir", str(run)])
    before = {
        f: os.stat(run / f).st_mtime_ns
        for f in ("args.json", "metrics.jsonl", "checkpoints/0000001.pt")
    }
    out = run_script_expect_failure(["train.py", *TINY, "--max-steps", "2", "--run-dir", str(run)])
    assert "already holds a run" in one_sentence(out)
    assert {f: os.stat(run / f).st_mtime_ns for f in before} == before
    run_script(["train.py", *TINY, "--max-steps", "2", "--run-dir", str(run), "--replace"])
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt"]


def test_replace_refuses_a_folder_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = run_script_expect_failure(
        ["train.py", *TINY, "--max-steps", "1", "--run-dir", str(tmp_path), "--replace"]
    )
    assert "holds files but no run" in one_sentence(out) and (tmp_path / "notes.txt").exists()


def test_failed_validation_writes_nothing(tmp_path):
    out = run_script_expect_failure(
        [
            "train.py",
            "--data",
            str(tmp_path / "missing"),
            "--max-steps",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert "does not exist" in one_sentence(out) and not (tmp_path / "run").exists()


def test_stale_temporary_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    stale, live = f"0000001.pt.tmp-{dead_pid()}@{host}", f"0000002.pt.tmp-{os.getpid()}@{host}"
    for name in (stale, live, "0000003.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == [stale]
    assert sorted(os.listdir(tmp_path)) == [
        "0000002.pt.tmp-%d@%s" % (os.getpid(), host),
        "0000003.pt",
    ]


# Provenance ---------------------------------------------------------------------------------------


def test_resume_with_another_teacher_is_refused(teacher, store, tmp_path):
    traj = tmp_path / "traj"
    shutil.copytree(store, traj)
    args = [
        "train_ard.py",
        "--traj",
        str(traj),
        "--history-layers",
        "1",
        "--global-batch-size",
        "16",
        "--sample-every",
        "0",
    ]
    run_script(
        [
            *args,
            "--teacher-ckpt",
            teacher[0],
            "--max-steps",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    other = tmp_path / "other.pt"
    make_teacher_checkpoint(other, seed=1)
    # the store now claims the other teacher wrote it
    manifest = json.loads((traj / "manifest.json").read_text())
    (traj / "manifest.json").write_text(
        json.dumps(dict(manifest, teacher_sha256=file_sha256(str(other))))
    )
    out = run_script_expect_failure(
        [
            *args,
            "--teacher-ckpt",
            str(other),
            "--max-steps",
            "2",
            "--resume",
            str(tmp_path / "run" / "checkpoints" / "0000001.pt"),
        ]
    )
    # The store it resumes with now holds another teacher's trajectories: refused for either reason.
    line = one_sentence(out)
    assert "was distilled from another teacher" in line or "--traj" in line and "else" in line


def test_evaluator_refuses_labels_of_the_wrong_shape(tmp_path):
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    for labels in (
        np.zeros((6, 1), dtype=np.int64),
        np.zeros(5, dtype=np.int64),
        np.zeros(6, dtype=np.float32),
    ):
        np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
        with pytest.raises(UserError, match="arr_1 must hold one integer label per image"):
            load_batch(str(tmp_path / "s.npz"))


# The trajectory store -----------------------------------------------------------------------------


@pytest.fixture
def store_copy(store, tmp_path):
    shutil.copytree(store, tmp_path / "traj")
    return tmp_path / "traj"


def test_truncated_array_is_named_when_the_store_opens(store_copy):
    path = store_copy / "shard-00001" / "x0.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        UserError, match=r"shard-00001/x0\.npy cannot be read .* the shard is damaged"
    ):
        TrajectoryStore(str(store_copy))


def test_shard_with_fewer_rows_is_named_when_the_store_opens(store_copy):
    for name in ("xt", "y"):
        array = np.load(store_copy / "shard-00002" / f"{name}.npy")
        np.save(store_copy / "shard-00002" / f"{name}.npy", array[:-1])
    with pytest.raises(
        UserError,
        match=r"shard-00002 is damaged \(xt\.npy has shape \(31, 6, 1, 8, 8\), "
        r"not \(32, 6, 1, 8, 8\)",
    ):
        TrajectoryStore(str(store_copy))


def test_indices_out_of_place_are_named_when_the_store_opens(store_copy):
    np.save(store_copy / "shard-00000" / "index.npy", np.arange(1, 33))
    with pytest.raises(UserError, match=r"index\.npy does not hold the indices 0\.\.31"):
        TrajectoryStore(str(store_copy))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: "{not json", "is not valid JSON"),
        (
            lambda m: json.dumps({k: v for k, v in m.items() if k != "save_steps"}),
            "lacks save_steps",
        ),
        (
            lambda m: json.dumps(dict(m, shards=["../../etc", "shard-00001", "shard-00002"])),
            "lists shards",
        ),
    ],
)
def test_garbage_incomplete_or_escaping_manifests_are_refused(store_copy, damage, message):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    (store_copy / "manifest.json").write_text(damage(manifest))
    with pytest.raises(UserError, match=message):
        TrajectoryStore(str(store_copy))


def test_writer_verifies_shards_and_rewrites_a_damaged_one(teacher, store, store_copy):
    path = store_copy / "shard-00001" / "xt.npy"
    path.write_bytes(path.read_bytes()[:-100])
    log = write_store(teacher[0], store_copy)
    assert "rewriting a damaged shard" in log and "2 already complete" in log
    for a in ("xt", "x0", "y", "index"):
        assert np.array_equal(
            np.load(store_copy / "shard-00001" / f"{a}.npy"),
            np.load(os.path.join(store, "shard-00001", f"{a}.npy")),
        )


def test_one_writer_per_store_and_a_dead_writers_lock_is_taken_over(teacher, store_copy):
    lock = store_copy / "LOCK"
    # a live writer: this test
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    out = run_script_expect_failure(
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher[0],
            "--out",
            str(store_copy),
            "--num-trajectories",
            "96",
            "--num-sampling-steps",
            "5",
            "--shard-size",
            "32",
        ]
    )
    assert "is writing the trajectory store" in one_sentence(out) and lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    write_store(teacher[0], store_copy)
    assert not lock.exists()


def test_lock_is_released_for_the_next_writer(tmp_path):
    with WriterLock(str(tmp_path), "a test folder"):
        assert (tmp_path / "LOCK").exists()
        with pytest.raises(UserError, match="is writing a test folder"):
            WriterLock(str(tmp_path), "a test folder").__enter__()
    assert not (tmp_path / "LOCK").exists()


# Arguments and paths ------------------------------------------------------------------------------


def test_argument_types_refuse_values_that_cannot_work():
    import argparse

    for parse, bad in (
        (positive_int, "0"),
        (positive_int, "-3"),
        (positive_int, "two"),
        (decay, "1.5"),
        (diffusion_steps, "1001"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert positive_int("7") == 7 and decay("0.99") == 0.99 and diffusion_steps("25") == 25


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train_ard.py", "--traj", "x", "--teacher-ckpt", "y", "--val-every", "0"],
            "--val-every: must be a positive integer",
        ),
        (
            [
                "train_ard.py",
                "--traj",
                "x",
                "--teacher-ckpt",
                "y",
                "--student-steps",
                "3",
                "--boundaries",
                "0",
                "2",
                "5",
            ],
            "disagrees with",
        ),
    ],
)
def test_impossible_values_are_refused_before_any_work(args, message):
    out = run_script_expect_failure(args)
    assert message in out and "Traceback" not in out


def test_output_path_under_a_file_is_refused_before_sampling(teacher, tmp_path):
    (tmp_path / "file").write_text("")
    out = run_script_expect_failure(
        ["sample_ddp.py", "--ckpt", teacher[0], "--out", str(tmp_path / "file" / "s.npz")]
    )
    assert "cannot be made" in one_sentence(out)
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(str(tmp_path), "--out")


def test_official_checkpoint_name_in_a_folder_does_not_resolve_to_another_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="official names, without a folder"):
        find_checkpoint(str(tmp_path / "DiT-XL-2-256x256.pt"))


def test_bare_state_dict_that_is_not_a_latent_dit_is_refused(teacher, tmp_path):
    # 1 input channel: not an SD-VAE latent model
    torch.save(teacher[1].state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match="not an official DiT, SiT or REPA checkpoint"):
        load_model(str(tmp_path / "bare.pt"))


def test_dry_runs_resolve_the_settings_load_no_network_and_write_nothing(teacher, store, tmp_path):
    traj = run_script(
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher[0],
            "--out",
            str(tmp_path / "traj"),
            "--num-trajectories",
            "64",
            "--num-sampling-steps",
            "25",
            "--save-steps",
            "student:4",
            "--dry-run",
        ]
    )
    assert "saved solver steps: [0, 6, 12, 18, 25]" in traj and "writes" in traj
    student = run_script(
        [
            "train_ard.py",
            "--traj",
            store,
            "--teacher-ckpt",
            teacher[0],
            "--history-layers",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
            "--dry-run",
        ]
    )
    assert "boundaries (solver steps): [0, 1, 2, 3, 5]" in student and "parameters" in student
    sample = run_script(
        ["sample_ddp.py", "--ckpt", teacher[0], "--out", str(tmp_path / "s.npz"), "--dry-run"]
    )
    assert "num_samples: 50000" in sample and "s.npz: about" in sample
    assert os.listdir(tmp_path) == []  # nothing was written
