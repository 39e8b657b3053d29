"""Shared helpers for the tests: running scripts as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, nproc=1, timeout=300):
    """Runs `python SCRIPT ARGS` (or torchrun with nproc processes) in the repository root; returns stdout+stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def run_script_expect_failure(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, f"{args} should have failed"
    return proc.stdout + proc.stderr


def make_teacher_checkpoint(path, key="DiT-T/4", input_size=8, in_channels=1, num_classes=10, seed=0, scale=0.05):
    """A teacher checkpoint in train.py's format with random (non-zero) weights, for tests."""
    import torch

    from checkpoints import save_checkpoint
    from models import DiT_models

    torch.manual_seed(seed)
    model = DiT_models[key](input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, scale)
    config = dict(kind="dit", model=key, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=True, space="pixel", vae=None, image_size=input_size, data="digits")
    save_checkpoint(str(path), {"model": model.state_dict(), "ema": model.state_dict(), "step": 0, "args": {}, "config": config})
    return model.eval()
