"""Jobs that survive a cluster: a stop signal saves the work in flight and exits with status 75, the
same command (--resume auto) finishes the job exactly as an uninterrupted run, a full disk loses
nothing, and logs meant for files carry neither carriage returns nor colour codes. Real processes,
real signals."""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, run_script_expect_failure

from ard.checkpoints import load_checkpoint
from ard.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.xdist_group("test_preemption")

TEACHER = [
    "train.py",
    "--model",
    "DiT-T/4",
    "--global-batch-size",
    "16",
    "--log-every",
    "5",
    "--ema-decay",
    "0.9",
]
SIGNAL_AT = random.Random(0)  # the step or item count at which a test signals, drawn per test


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ARD_PROGRESS_SECONDS="0")


def start(args, nproc=1):
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else []
    )
    return subprocess.Popen(
        [sys.executable, *launcher, *args],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def worker_pid(launcher_pid, local_rank):
    """The pid of torchrun's worker of that local rank."""
    for _ in range(200):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if ppid == launcher_pid and f"LOCAL_RANK={local_rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of local rank {local_rank} under {launcher_pid}")


def signal_when(proc, desc, at, pid=None, signum=signal.SIGTERM):
    """Reads proc's output until its progress line `desc N/M` shows N >= at, sends signum to pid
    (default proc), and waits for the end; returns (exit status, output)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(re.escape(desc) + r" (\d+)/(\d+)", line)
        if m and int(m.group(1)) >= at:
            os.kill(pid or proc.pid, signum)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def stopped_step(run_dir, output):
    """The step the job says it stopped at, checked against the checkpoint it wrote."""
    step = int(re.search(r"at step (\d+)", output).group(1))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")), output[-2000:]
    return step


def assert_same_state(a, b):
    for key in ("model", "ema", "opt", "disc", "disc_opt"):
        if key in a:
            flat_a, flat_b = flatten(a[key]), flatten(b[key])
            assert flat_a.keys() == flat_b.keys()
            for name, value in flat_a.items():
                assert (
                    torch.equal(value, flat_b[name])
                    if isinstance(value, torch.Tensor)
                    else value == flat_b[name]
                ), f"{key}.{name}"


def flatten(state, prefix=""):
    if isinstance(state, dict):
        return {
            k: v
            for key, value in state.items()
            for k, v in flatten(value, f"{prefix}{key}.").items()
        }
    if isinstance(state, (list, tuple)):
        return {
            k: v
            for i, value in enumerate(state)
            for k, v in flatten(value, f"{prefix}{i}.").items()
        }
    return {prefix: state}


def stop_and_resume(args, run_dir, max_steps, desc, nproc=1, rank=None):
    """Starts `args` (which carry --resume auto), signals it at a random step (to one worker's rank
    if given), checks that it stopped with the status and a checkpoint of the step it reached, then
    runs the same command to the end; returns the final checkpoint."""
    proc = start(args, nproc)
    pid = worker_pid(proc.pid, rank) if rank is not None else None
    status, output = signal_when(proc, desc, SIGNAL_AT.randint(3, max_steps // 3), pid)
    if nproc == 1:
        assert status == EXIT_PREEMPTED, output[-3000:]
    else:  # every rank stopped, and torchrun reports its workers' failure
        assert status != 0 and "stopped (rank 0)" in output and "stopped (rank 1)" in output, (
            output[-3000:]
        )
    step = stopped_step(run_dir, output)
    assert 0 < step < max_steps and "Stopping: " in output
    run_script(args, nproc=nproc)
    return load_checkpoint(os.path.join(run_dir, "checkpoints", f"{max_steps:07d}.pt"))


def test_train_py_stopped_by_sigterm_resumes_to_the_uninterrupted_result(tmp_path):
    args = [*TEACHER, "--max-steps", "40", "--ckpt-every", "40"]
    run_script([*args, "--run-dir", str(tmp_path / "ref")])
    final = stop_and_resume(
        [*args, "--run-dir", str(tmp_path / "run"), "--resume", "auto"],
        str(tmp_path / "run"),
        40,
        "train",
    )
    assert_same_state(load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "0000040.pt")), final)


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
        "5",
        "--sample-every",
        "0",
        "--max-steps",
        str(steps),
        "--ckpt-every",
        str(steps),
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def test_train_ard_regression_and_gan_stages_stopped_by_sigterm_resume_to_the_uninterrupted_result(
    teacher, store, tmp_path
):
    regression = ard_args(teacher[0], store, tmp_path / "ref", 40)
    run_script(regression)
    final = stop_and_resume(
        ard_args(teacher[0], store, tmp_path / "run", 40, "--resume", "auto"),
        str(tmp_path / "run"),
        40,
        "distil",
    )
    assert_same_state(load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "0000040.pt")), final)

    gan = [
        "--gan",
        "--init-ckpt",
        str(tmp_path / "ref" / "checkpoints" / "0000040.pt"),
        "--gan-warmup",
        "3",
        "--lr",
        "1e-4",
    ]
    run_script(ard_args(teacher[0], store, tmp_path / "gan_ref", 30, *gan))
    final = stop_and_resume(
        ard_args(teacher[0], store, tmp_path / "gan", 30, *gan, "--resume", "auto"),
        str(tmp_path / "gan"),
        30,
        "distil",
    )
    reference = load_checkpoint(str(tmp_path / "gan_ref" / "checkpoints" / "0000030.pt"))
    assert "disc" in reference
    assert_same_state(reference, final)


def test_a_signal_to_one_torchrun_rank_stops_every_rank_at_the_same_step(teacher, store, tmp_path):
    run_script(ard_args(teacher[0], store, tmp_path / "ref", 40), nproc=2)
    final = stop_and_resume(
        ard_args(teacher[0], store, tmp_path / "run", 40, "--resume", "auto"),
        str(tmp_path / "run"),
        40,
        "distil",
        nproc=2,
        rank=1,
    )
    assert_same_state(load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "0000040.pt")), final)


def test_stopped_writer_and_sampler_finish_with_the_same_command_identically(teacher, tmp_path):
    traj = [
        "train_teacher_traj.py",
        "--ckpt",
        teacher[0],
        "--num-trajectories",
        "192",
        "--num-sampling-steps",
        "25",
        "--shard-size",
        "32",
        "--batch-size",
        "8",
    ]
    run_script([*traj, "--out", str(tmp_path / "ref")])
    status, output = signal_when(
        start([*traj, "--out", str(tmp_path / "store")]),
        "trajectories (rank 0 of 1)",
        SIGNAL_AT.randint(40, 100),
    )
    assert status == EXIT_PREEMPTED and "complete shards" in output, output[-2000:]
    kept = sorted(d for d in os.listdir(tmp_path / "store") if d.startswith("shard-"))
    assert 0 < len(kept) < 6 and not any(".tmp-" in d for d in os.listdir(tmp_path / "store"))
    run_script([*traj, "--out", str(tmp_path / "store")])
    for shard in sorted(d for d in os.listdir(tmp_path / "ref") if d.startswith("shard-")):
        for array in ("xt", "x0", "y", "index"):
            a = np.load(tmp_path / "ref" / shard / f"{array}.npy", allow_pickle=False)
            assert np.array_equal(
                a, np.load(tmp_path / "store" / shard / f"{array}.npy", allow_pickle=False)
            ), (shard, array)

    sample = [
        "sample_ddp.py",
        "--ckpt",
        teacher[0],
        "--num-samples",
        "192",
        "--num-sampling-steps",
        "25",
        "--chunk-size",
        "32",
        "--per-proc-batch-size",
        "8",
    ]
    run_script([*sample, "--out", str(tmp_path / "ref.npz")])
    status, output = signal_when(
        start([*sample, "--out", str(tmp_path / "s.npz")]),
        "sampling (rank 0 of 1)",
        SIGNAL_AT.randint(40, 100),
    )
    assert status == EXIT_PREEMPTED and not os.path.exists(tmp_path / "s.npz"), output[-2000:]
    assert 0 < len([c for c in os.listdir(tmp_path / "s.npz.chunks") if c.startswith("chunk-")]) < 6
    run_script([*sample, "--out", str(tmp_path / "s.npz")])
    with np.load(tmp_path / "ref.npz") as a, np.load(tmp_path / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def folder_digest(folder):
    digest = hashlib.sha256()
    for base, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(base, name)
            digest.update(
                path.encode() + open(path, "rb").read() + str(os.stat(path).st_mtime_ns).encode()
            )
    return digest.hexdigest()


def test_resume_auto_starts_a_new_folder_refuses_other_settings_and_changes_nothing_once_finished(
    tmp_path,
):
    run = str(tmp_path / "run")
    args = [*TEACHER, "--max-steps", "3", "--run-dir", run, "--resume", "auto"]
    out = run_script(args)
    assert os.path.isfile(os.path.join(run, "checkpoints", "0000003.pt"))
    # Logs meant for a file: progress as plain lines, no carriage returns, no colour codes.
    assert "train 3/3 [" in out and "\r" not in out and "\x1b" not in out
    assert "\x1b" not in open(os.path.join(run, "log.txt")).read()
    before = folder_digest(run)
    for _ in range(3):
        assert "nothing to do" in run_script(args)
    assert folder_digest(run) == before
    refused = run_script_expect_failure(
        [*TEACHER, "--max-steps", "3", "--lr", "1e-3", "--run-dir", run, "--resume", "auto"]
    )
    assert (
        "holds a run of other settings" in refused
        and "--lr" in refused
        and folder_digest(run) == before
    )


def test_a_second_signal_exits_at_once_and_a_duplicate_within_a_second_does_not():
    code = (
        "import time; from ard.preemption import StopRequest; stop = StopRequest(); "
        "print('ready', flush=True)\nwhile True:\n    time.sleep(0.01)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # the same request (a scheduler and torchrun's agent both deliver it)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=10) == -signal.SIGUSR1


FAULT = """import errno, os, runpy, shutil, sys, torch
kind, n, script, *args = sys.argv[1:]
calls = [0]
def fail(real):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == int(n):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)
    return wrapped
if kind == "save":
    torch.save = fail(torch.save)
elif kind == "fallocate":
    os.posix_fallocate = fail(os.posix_fallocate)
else:
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def run_with_fault(kind, n, args):
    proc = subprocess.run(
        [sys.executable, "-c", FAULT, kind, str(n), *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_full_disk_during_a_checkpoint_write_keeps_the_earlier_ones_and_leaves_no_partial_file(
    tmp_path,
):
    run = tmp_path / "run"
    status, output = run_with_fault(
        "save", 2, [*TEACHER, "--max-steps", "6", "--ckpt-every", "2", "--run-dir", str(run)]
    )
    assert status == 2 and "no space left to write" in output and "Traceback" not in output, output[
        -2000:
    ]
    # intact, and nothing half-written beside it
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt"]
    assert load_checkpoint(str(run / "checkpoints" / "0000002.pt"))["step"] == 2


def test_a_full_disk_during_a_shard_write_keeps_the_complete_shards_and_leaves_no_partial_one(
    teacher, tmp_path
):
    store = tmp_path / "store"
    args = [
        "train_teacher_traj.py",
        "--ckpt",
        teacher[0],
        "--out",
        str(store),
        "--num-trajectories",
        "64",
        "--num-sampling-steps",
        "5",
        "--shard-size",
        "16",
        "--batch-size",
        "8",
    ]
    # xt and x0 of the first shard, then the second shard's xt
    status, output = run_with_fault("fallocate", 3, args)
    assert status == 2 and "no space left to write" in output and "Traceback" not in output, output[
        -2000:
    ]
    assert sorted(os.listdir(store)) == ["manifest.json", "shard-00000"]
    run_script(args)  # the same command finishes the store once there is space


def test_the_free_space_check_refuses_before_any_work(teacher, tmp_path):
    status, output = run_with_fault(
        "disk",
        0,
        [
            "train_teacher_traj.py",
            "--ckpt",
            teacher[0],
            "--out",
            str(tmp_path / "store"),
            "--num-trajectories",
            "64",
            "--num-sampling-steps",
            "5",
        ],
    )
    assert status == 2 and "GiB free" in output and not os.path.exists(tmp_path / "store"), output[
        -2000:
    ]
    status, output = run_with_fault(
        "disk",
        0,
        [
            "sample_ddp.py",
            "--ckpt",
            teacher[0],
            "--out",
            str(tmp_path / "s.npz"),
            "--num-samples",
            "64",
            "--num-sampling-steps",
            "5",
        ],
    )
    assert status == 2 and "GiB free" in output and not os.path.exists(tmp_path / "s.npz.chunks"), (
        output[-2000:]
    )
