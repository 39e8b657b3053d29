"""Read throughput of the trajectory store against one .npz file per sample per saved step
(the public re-implementation's layout), built from the same random data in a temporary
folder, measured in one run.

    python -m benchmarks.traj_read  # 2,000 ImageNet-shaped trajectories (4x32x32), 26 saved steps
    python -m benchmarks.traj_read --shape 1 8 8 --count 10000

Each read is a random batch of --batch-size trajectories, both arrays (xt and x0) at the
K + 1 = 5 default boundaries (at most what train_ard.py reads per step; each .npz is opened
once). Both layouts are read warm from the page cache, where the difference is pure
file-handling overhead; a cold disk only widens it. Also prints the number of files each layout
needs for 1.2 M ImageNet trajectories.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from ard.cli import positive_int
from ard.fileio import write_json
from ard.trajectory_store import (
    MANIFEST,
    TrajectoryStore,
    default_boundaries,
    shard_name,
    shard_ranges,
)
from diffusion import create_diffusion
from diffusion.ode import solver_grid


def build_store(root, count, steps, shape, shard_size, dtype, rng):
    """Writes random trajectories in both layouts; returns the per-sample folder."""
    timesteps = solver_grid(create_diffusion(str(steps - 1)))
    ranges = shard_ranges(count, shard_size)
    per_sample = os.path.join(root, "per_sample")
    os.makedirs(per_sample)
    for s, (start, stop) in enumerate(ranges):
        n = stop - start
        xt = rng.standard_normal((n, steps, *shape)).astype(dtype)
        x0 = rng.standard_normal((n, steps, *shape)).astype(dtype)
        y = rng.integers(0, 1000, n).astype(np.int64)
        folder = os.path.join(root, "store", shard_name(s))
        os.makedirs(folder)
        for name, array in (("xt", xt), ("x0", x0), ("y", y), ("index", np.arange(start, stop))):
            np.save(os.path.join(folder, f"{name}.npy"), array)
        for j in range(n):
            for k in range(steps):
                np.savez(
                    os.path.join(per_sample, f"{start + j:07d}_{k:02d}.npz"),
                    xt=xt[j, k],
                    x0=x0[j, k],
                    y=y[j],
                )
    write_json(
        os.path.join(root, "store", MANIFEST),
        dict(
            count=count,
            shard_size=shard_size,
            dtype=np.dtype(dtype).name,
            shape=list(shape),
            save_steps=list(range(steps)),
            save_timesteps=timesteps,
            shards=[shard_name(s) for s in range(len(ranges))],
            num_classes=1000,
            model="random",
            teacher_sha256=None,
        ),
    )
    return per_sample


def read_per_sample(folder, indices, steps):
    """The public layout's read: one file per sample and step, then the same
    float32 tensors as ours."""
    xt, x0 = [], []
    for i in indices:
        for k in steps:
            with np.load(os.path.join(folder, f"{i:07d}_{k:02d}.npz")) as f:
                xt.append(f["xt"])
                x0.append(f["x0"])
    shape = (len(indices), len(steps), *xt[0].shape)
    return torch.from_numpy(np.stack(xt).reshape(shape)).float(), torch.from_numpy(
        np.stack(x0).reshape(shape)
    ).float()


def throughput(read, count, batch, repeats, rng):
    read(rng.choice(count, batch, replace=False))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        read(rng.choice(count, batch, replace=False))
    return repeats * batch / (time.perf_counter() - start)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--count",
        type=positive_int,
        default=2000,
        help="random trajectories written in both layouts",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=26, help="saved solver steps per trajectory (J)"
    )
    parser.add_argument(
        "--shape",
        type=positive_int,
        nargs=3,
        default=[4, 32, 32],
        help="C H W of a state (SD-VAE latents of 256x256)",
    )
    parser.add_argument(
        "--shard-size", type=positive_int, default=1000, help="trajectories per shard of the store"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, help="trajectories per random batch read"
    )
    parser.add_argument("--repeats", type=positive_int, default=10, help="batches read per layout")
    return parser.parse_args(argv)


def main(args):
    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="traj_read_")
    try:
        print(
            f"Writing {args.count} random trajectories of {args.steps} steps of "
            f"{'x'.join(map(str, args.shape))} float16 in both layouts to {root} ...",
            flush=True,
        )
        per_sample = build_store(
            root, args.count, args.steps, args.shape, args.shard_size, np.float16, rng
        )
        store = TrajectoryStore(os.path.join(root, "store"))
        bounds = default_boundaries(store.saved_steps, store.saved_timesteps, 4)
        ours = throughput(
            lambda idx: {
                k: torch.from_numpy(v).float() for k, v in store.read(idx, bounds).items()
            },
            args.count,
            args.batch_size,
            args.repeats,
            rng,
        )
        theirs = throughput(
            lambda idx: read_per_sample(per_sample, idx, bounds),
            args.count,
            args.batch_size,
            max(2, args.repeats // 5),
            rng,
        )
        n_files = sum(len(files) for _, _, files in os.walk(os.path.join(root, "store")))
        print(f"random batches of {args.batch_size} at boundaries {bounds}, warm page cache:")
        print(f"  trajectory store ({n_files} files):                 {ours:10.0f} trajectories/s")
        print(
            f"  one .npz per sample per step ({len(os.listdir(per_sample))} files): "
            f"{theirs:10.0f} trajectories/s"
        )
        print(f"  ratio: {ours / theirs:.1f}x")
        imagenet = 1_281_167
        shards = -(-imagenet // args.shard_size)
        print(
            f"files for {imagenet:,} ImageNet trajectories: store {4 * shards + 1:,} "
            f"(shards of {args.shard_size}); "
            f"per-sample-per-step {imagenet * 5:,} at 5 saved steps, {imagenet * 26:,} at 26"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main(parse_args())
