"""Shared helpers for the tests: running scripts as a user would, and a tiny teacher checkpoint."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 5  # solver steps of the tests' trajectory stores


def _run(cmd, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_script(args, nproc=1, timeout=300):
    """Runs `python SCRIPT ARGS` (or torchrun with nproc processes) in the repository root;
    returns stdout+stderr."""
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    proc = _run(cmd, timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def run_script_expect_failure(args, timeout=300):
    proc = _run([sys.executable, *args], timeout)
    assert proc.returncode != 0, f"{args} should have failed"
    return proc.stdout + proc.stderr


def make_teacher_checkpoint(
    path, key="DiT-T/4", input_size=8, in_channels=1, num_classes=10, seed=0, scale=0.05, flow=False
):
    """A teacher checkpoint in train.py's format with random (non-zero) weights, for tests: a DiT
    (noise prediction, learned sigma) or, with flow=True, a velocity model in
    train.py --objective flow's convention."""
    import torch

    from ard.checkpoints import build_model, save_checkpoint, teacher_config
    from diffusion.flow import NOISE_AT, TIME_SCALE

    prediction = (
        dict(prediction="velocity", noise_at=NOISE_AT, time_scale=TIME_SCALE) if flow else {}
    )
    config = teacher_config(
        key,
        input_size,
        in_channels,
        num_classes,
        not flow,
        "pixel",
        None,
        input_size,
        "digits",
        **prediction,
    )
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, scale)
    save_checkpoint(
        str(path),
        {
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "step": 0,
            "args": {},
            "config": config,
        },
    )
    return model.eval()


def write_store(ckpt, out, n=96, nproc=1, shard_size=32, extra=()):
    """A trajectory store of n trajectories of S steps, written by train_teacher_traj.py."""
    return run_script(
        [
            "train_teacher_traj.py",
            "--ckpt",
            str(ckpt),
            "--out",
            str(out),
            "--num-trajectories",
            str(n),
            "--num-sampling-steps",
            str(S),
            "--shard-size",
            str(shard_size),
            "--batch-size",
            "16",
            *extra,
        ],
        nproc=nproc,
    )


def randomised(model, seed=0):
    """models.randomise_weights at the tests' scale (std 0.1), so that tiny models
    give non-trivial outputs."""
    from models import randomise_weights

    return randomise_weights(model, std=0.1, seed=seed)


def write_fashion_idx(folder, n_train=64, n_test=32, gz=True, seed=0):
    """Tiny Fashion-MNIST-format idx files (random 28x28 images, labels cycling through the 10
    classes), as Debian's package installs them (gzipped) or as torchvision extracts them; returns
    {split: (images uint8, labels)}."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, header, array in (
            (f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 0x803, n, 28, 28), images),
            (f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 0x801, n), labels),
        ):
            data = header + array.tobytes()
            if gz:
                with gzip.open(os.path.join(folder, f"{name}.gz"), "wb") as f:
                    f.write(data)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
        out[split] = (images, labels)
    return out
