"""Cluster jobs: a preempted job leaves the sign its SLURM script requeues on, even under torchrun;
stop decisions and errors are collective, so no rank hangs; locks are leases that a requeue on
another host takes over; a resume compares what changes the result, by content; --resume auto falls
back to a checkpoint that loads; retention; the sampler is idempotent and lean. Real processes, real
signals, two ranks on gloo where it matters."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, run_script_expect_failure
from test_preemption import ard_args, env, signal_when, start, worker_pid

from ard.preemption import EXIT_PREEMPTED, MARKER

pytestmark = pytest.mark.xdist_group("test_cluster")

TEACHER = ["train.py", "--model", "DiT-T/4", "--global-batch-size", "16", "--ema-decay", "0.9"]


def traj_args(teacher, out, n, shard_size=32, batch_size=8, steps=25):
    return [
        "train_teacher_traj.py",
        "--ckpt",
        teacher,
        "--out",
        str(out),
        "--num-trajectories",
        str(n),
        "--num-sampling-steps",
        str(steps),
        "--shard-size",
        str(shard_size),
        "--batch-size",
        str(batch_size),
    ]


def requeue_condition():
    """The line of the SLURM job script in docs/reliability.md that decides to requeue."""
    text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    lines = [line for line in text.splitlines() if "scontrol requeue" in line]
    assert len(lines) == 1 and MARKER in lines[0], lines
    return lines[0].replace('scontrol requeue "$SLURM_JOB_ID"', "echo requeue")


def test_a_preempted_torchrun_job_leaves_the_sign_the_slurm_script_requeues_on(
    teacher, store, tmp_path
):
    run = tmp_path / "run"
    args = ard_args(teacher[0], store, run, 40, "--resume", "auto")
    proc = start(args, nproc=2)
    status, output = signal_when(proc, "distil", 4, worker_pid(proc.pid, 1))
    assert status == 1, output[-2000:]  # torchrun's agent reports its workers' 75 as 1
    check = ["bash", "-c", requeue_condition()]
    assert subprocess.run(
        check, env=dict(env(), RUN=str(run)), capture_output=True, text=True
    ).stdout
    run_script(args, nproc=2)
    assert not (run / MARKER).exists()  # finished: the script does not requeue
    done = subprocess.run(check, env=dict(env(), RUN=str(run)), capture_output=True, text=True)
    assert "requeue" not in done.stdout


def test_a_signal_to_a_rank_that_finished_its_share_stops_both_ranks_within_seconds(
    teacher, tmp_path
):
    # Three shards of one batch each: rank 0 writes shards 0 and 2, rank 1 only shard 1.
    store = tmp_path / "store"
    args = traj_args(teacher[0], store, 96, shard_size=32, batch_size=32, steps=300)
    proc = start(args, nproc=2)
    rank1 = worker_pid(proc.pid, 1)
    while not (store / "shard-00001").exists():
        assert proc.poll() is None
        time.sleep(0.05)
    os.kill(rank1, signal.SIGTERM)  # rank 1 has nothing left to do: it waits for rank 0
    signalled = time.time()
    output = proc.communicate(timeout=120)[0]
    assert time.time() - signalled < 30, output[-2000:]
    assert "stopped (rank 0)" in output and "stopped (rank 1)" in output, output[-2000:]
    assert (store / MARKER).exists() and (store / "shard-00001").exists()
    run_script(args, nproc=2)
    assert sorted(d for d in os.listdir(store) if d.startswith("shard-")) == [
        "shard-00000",
        "shard-00001",
        "shard-00002",
    ]


FAULT_ON_RANK1 = """import errno, os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository: torchrun puts this file's folder on the path
import ard.trajectory_store as store
if os.environ.get("RANK") == "1":
    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error (injected)")
    store._fill_shard = fail
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_error_on_one_rank_ends_every_rank_with_its_sentence(teacher, tmp_path):
    wrapper = tmp_path / "fault.py"
    wrapper.write_text(FAULT_ON_RANK1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(wrapper),
        *traj_args(teacher[0], tmp_path / "store", 128, batch_size=16, steps=50),
    ]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - started < 120, output[-2000:]
    assert "rank 1 stopped the job: OSError: [Errno 5] Input/output error (injected)" in output
    assert "Connection closed by peer" not in output, output[-3000:]


def refresh(path, host, stop):
    """A live writer on another host: its LOCK, and a heartbeat until `stop`."""
    path.write_text(json.dumps({"host": host, "pid": 4242}))
    while not stop.wait(0.1):
        os.utime(path)


def test_a_requeue_on_another_host_takes_over_a_dead_jobs_run_and_a_live_job_is_refused(tmp_path):
    lease = dict(env(), ARD_LOCK_HEARTBEAT_SECONDS="0.5")
    run = tmp_path / "run"

    def train(max_steps):
        args = [*TEACHER, "--max-steps", str(max_steps), "--ckpt-every", "2"]
        cmd = [sys.executable, *args, "--run-dir", str(run), "--resume", "auto"]
        return subprocess.run(cmd, cwd=ROOT, env=lease, capture_output=True, text=True)

    assert train(2).returncode == 0
    # A job killed on another node: its lock, and a temporary checkpoint it was writing.
    (run / "LOCK").write_text(json.dumps({"host": "node-17", "pid": 4242}))
    partial = run / "checkpoints" / "0000003.pt.tmp-4242@node-17"
    partial.write_bytes(b"half a checkpoint")
    out = train(4)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "taking over" in out.stdout and not partial.exists() and not (run / "LOCK").exists()
    # A live job on another host keeps its heartbeat: a second job on the folder is refused.
    stop = threading.Event()
    thread = threading.Thread(target=refresh, args=(run / "LOCK", "node-18", stop))
    thread.start()
    try:
        refused = train(6)
    finally:
        stop.set()
        thread.join()
    assert refused.returncode == 2 and "is writing the run" in refused.stderr, refused.stderr[
        -2000:
    ]
    assert "node-18" in refused.stderr


def test_resume_compares_what_changes_the_result_by_content(teacher, store, tmp_path):
    run = tmp_path / "run"
    run_script(ard_args(teacher[0], store, run, 4, "--ckpt-every", "2", "--lr-schedule", "cosine"))
    ckpt = str(run / "checkpoints" / "0000002.pt")
    copy = tmp_path / "staged" / "traj"
    shutil.copytree(store, copy)  # the same store on another disk
    harmless = ["--log-every", "2", "--sample-every", "0", "--gan-scale", "3.0"]  # GAN off

    def resume(*extra, steps=4):
        return ard_args(teacher[0], str(copy), tmp_path / "x", steps, "--resume", ckpt, *extra)

    refused = run_script_expect_failure(resume("--weight-decay", "0.1"))
    assert "--weight-decay 0.0 (now 0.1)" in refused
    refused = run_script_expect_failure(resume("--lr-schedule", "cosine", steps=6))
    assert "--max-steps 4 (now 6)" in refused  # the cosine schedule depends on it
    run_script(resume("--lr-schedule", "cosine", *harmless))
    other = tmp_path / "other"
    shutil.copytree(store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(dict(manifest, seed=manifest["seed"] + 1)))
    refused = run_script_expect_failure(
        ard_args(
            teacher[0], str(other), tmp_path / "y", 4, "--resume", ckpt, "--lr-schedule", "cosine"
        )
    )
    assert "--traj" in refused and "holds something else" in refused


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_loads_and_keep_last_retires(tmp_path):
    run = tmp_path / "run"
    args = [*TEACHER, "--ckpt-every", "1", "--keep-last", "2", "--run-dir", str(run)]
    run_script([*args, "--max-steps", "3"])
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt", "0000003.pt"]
    (run / "checkpoints" / "0000002.pt.keep").touch()  # marked by the user: never retired
    with open(run / "checkpoints" / "0000003.pt", "r+b") as f:
        f.truncate(1000)  # a damaged newest checkpoint
    out = run_script([*args, "--max-steps", "5", "--resume", "auto"])
    assert "skipped" in out and "0000003.pt" in out
    kept = sorted(f for f in os.listdir(run / "checkpoints") if f.endswith(".pt"))
    assert kept == ["0000002.pt", "0000004.pt", "0000005.pt"]


def test_the_sampler_has_nothing_to_do_once_its_file_is_made_and_writes_it_with_its_settings(
    teacher, tmp_path
):
    out = tmp_path / "s.npz"
    args = [
        "sample_ddp.py",
        "--ckpt",
        teacher[0],
        "--out",
        str(out),
        "--num-samples",
        "16",
        "--num-sampling-steps",
        "3",
        "--chunk-size",
        "8",
        "--per-proc-batch-size",
        "8",
    ]
    run_script(args)
    with np.load(out, allow_pickle=False) as data:
        settings = json.loads(str(data["settings"]))
    assert settings["num_samples"] == 16 and settings["precision"] == "fp32"
    before = (out.read_bytes(), os.stat(out).st_mtime_ns)
    assert "nothing to do" in run_script(args)
    assert (out.read_bytes(), os.stat(out).st_mtime_ns) == before
    assert "nothing to do" in run_script([*args[:-1], "4"])  # another batch, the same images
    run_script([*args, "--cfg-scale", "2.0"])  # other settings: made again
    with np.load(out, allow_pickle=False) as data:
        assert json.loads(str(data["settings"]))["cfg_scale"] == 2.0


GATHER_PEAK = """import json, os, resource, sys, numpy as np
sys.path.insert(0, os.getcwd())
import sample_ddp
from argparse import Namespace
root, n, chunk = sys.argv[1], 16, 256
os.makedirs(f"{root}/s.npz.chunks")
for c in range(n):
    images = np.full((chunk, 128, 128, 3), c, np.uint8)
    np.savez(f"{root}/s.npz.chunks/chunk-{c:05d}.npz", arr_0=images, arr_1=np.arange(chunk))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
args = Namespace(num_samples=n * chunk, chunk_size=chunk, out=f"{root}/s.npz")
sample_ddp.gather(args, f"{root}/s.npz.chunks", {"n": 1}, 0, 1.0)
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def test_the_sampler_streams_its_chunks_into_the_file_holding_one_chunk_at_a_time(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", GATHER_PEAK, str(tmp_path)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])  # KiB
    chunk_kib = 256 * 128 * 128 * 3 / 1024  # 12 MiB; the file holds 16 of them (192 MiB)
    assert after - before < 4 * chunk_kib, (before, after)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        images = data["arr_0"]
        assert images.shape == (4096, 128, 128, 3) and int(images[-1, 0, 0, 0]) == 15
        assert json.loads(str(data["settings"])) == {"n": 1}


def test_a_shard_that_the_batch_in_flight_completes_is_kept(teacher, tmp_path):
    # One batch per shard: whenever the signal arrives, the batch in flight completes its shard.
    store = tmp_path / "store"
    args = traj_args(teacher[0], store, 256, shard_size=32, batch_size=32, steps=100)
    status, output = signal_when(start(args), "trajectories (rank 0 of 1)", 64)
    assert status == EXIT_PREEMPTED, output[-2000:]
    shown = max(int(n) for n in re.findall(r"trajectories \(rank 0 of 1\) (\d+)/256", output))
    kept = [d for d in os.listdir(store) if d.startswith("shard-")]
    # The bar counts a shard once it is saved, before the stop is decided: none is dropped.
    assert len(kept) * 32 >= shown, (kept, shown)


def test_an_explicit_device_index_is_kept(monkeypatch):
    from ard import dist_util
    from ard.graphs import _on_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_util.setup("fp32", "cuda:1") == torch.device("cuda", 1)
    assert dist_util.setup("fp32", "cuda") == torch.device("cuda", 3)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert _on_device(torch.device("cuda", 1)).idx == 1  # a capture runs on its inputs' device


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_of(has_bf16, monkeypatch, capsys):
    from ard import dist_util

    monkeypatch.setattr(dist_util, "cpu_has_bf16", lambda: has_bf16)
    dist_util.setup("bf16", "cpu")
    dist_util.setup("fp32", "cpu")
    warned = capsys.readouterr().err.count("WARNING: --precision bf16 on a CPU")
    assert warned == (0 if has_bf16 else 1)
