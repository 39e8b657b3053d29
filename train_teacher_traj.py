"""Runs the teacher's deterministic ODE solver and writes its trajectories to a trajectory store
(see trajectory_store.py for the format).

    python train_teacher_traj.py --ckpt runs/digits/teacher/checkpoints/0003000.pt --out runs/digits/traj
    torchrun --nproc_per_node=8 train_teacher_traj.py --ckpt DiT-XL-2-256x256.pt --out /data/ard/traj \
        --num-trajectories 1200000 --save-steps 0,6,10,12,15,18,20,25 --dtype float16 --batch-size 256

Sample i gets its noise from a generator seeded by (seed, i) and the label i mod num_classes, so the
store's content does not depend on the number of processes. Shards go to ranks round-robin; each is
written to a temporary folder and renamed when complete, so running the same command again after an
interruption finishes only the missing shards. Running it with other settings into the same folder stops.
"""

import argparse
import os
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import dist_util
from checkpoints import file_sha256, find_checkpoint, load_dit
from diffusion import create_diffusion
from diffusion.ode import SOLVERS, model_timesteps, trajectory, FINAL_TIMESTEP
from models import guided_model_fn
from train_utils import check_same_settings, write_json
from trajectory_store import MANIFEST, shard_name, shard_ranges

SMALL_MODEL_TOKENS = 64  # up to this many tokens per image, every solver step is saved by default


def sample_noise(seed, indices, shape):
    """The noise of each sample index, each from its own generator: (len(indices), *shape)."""
    out = torch.empty(len(indices), *shape)
    for n, i in enumerate(indices):
        gen = torch.Generator().manual_seed(dist_util.step_seed(seed, int(i), 0))
        out[n] = torch.randn(shape, generator=gen)
    return out


def sample_labels(indices, num_classes):
    """Balanced classes: sample i has label i mod num_classes."""
    return torch.as_tensor(np.asarray(indices, dtype=np.int64) % num_classes)


def parse_save_steps(spec, num_steps, default_all):
    """'all', 'every:N', or a comma-separated list of solver steps; the noise (0) and the sample (S) are always kept."""
    if spec is None:
        spec = "all" if default_all else "every:5"
    if spec == "all":
        steps = set(range(num_steps + 1))
    elif spec.startswith("every:"):
        steps = set(range(0, num_steps + 1, int(spec.split(":", 1)[1])))
    else:
        steps = {int(s) for s in spec.split(",") if s.strip()}
    bad = sorted(s for s in steps if not 0 <= s <= num_steps)
    if bad:
        raise ValueError(f"--save-steps {bad} are outside the solver's steps 0..{num_steps}")
    return sorted(steps | {0, num_steps})


def write_shard(out_dir, shard, start, stop, args, model_fn, diffusion, config, save_steps, clip, device, progress):
    """Runs the solver on samples [start, stop) and writes them as one shard, renamed into place when complete."""
    final = os.path.join(out_dir, shard_name(shard))
    tmp = f"{final}.tmp-{dist_util.rank()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n, shape = stop - start, (config["in_channels"], config["input_size"], config["input_size"])
    dtype = np.dtype(args.dtype)
    arrays = {a: np.lib.format.open_memmap(os.path.join(tmp, f"{a}.npy"), mode="w+", dtype=dtype, shape=(n, len(save_steps), *shape))
              for a in ("xt", "x0")}
    indices = np.arange(start, stop, dtype=np.int64)
    labels = sample_labels(indices, config["num_classes"])
    for b in range(0, n, args.batch_size):
        batch = indices[b : b + args.batch_size]
        noise = sample_noise(args.global_seed, batch, shape).to(device)
        y = labels[b : b + args.batch_size].to(device)
        xt, x0 = trajectory(SOLVERS[args.solver], diffusion, model_fn, noise, dict(y=y), clip_denoised=clip, steps=save_steps)
        arrays["xt"][b : b + len(batch)] = xt.cpu().numpy().astype(dtype)
        arrays["x0"][b : b + len(batch)] = x0.cpu().numpy().astype(dtype)
        progress.update(len(batch))
    for array in arrays.values():
        array.flush()
    del arrays
    np.save(os.path.join(tmp, "y.npy"), labels.numpy())
    np.save(os.path.join(tmp, "index.npy"), indices)
    os.replace(tmp, final)
    return sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))


def main(args):
    # Setup DDP:
    device = dist_util.setup()
    rank, world_size = dist_util.rank(), dist_util.world_size()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

    # Load the teacher and describe the run:
    ckpt_path = find_checkpoint(args.ckpt)
    model, config = load_dit(ckpt_path, device)
    diffusion = create_diffusion(str(args.num_sampling_steps))
    tokens = (config["input_size"] // int(config["model"].split("/")[1])) ** 2
    save_steps = parse_save_steps(args.save_steps, args.num_sampling_steps, tokens <= SMALL_MODEL_TOKENS)
    grid = model_timesteps(diffusion) + [FINAL_TIMESTEP]
    clip = config["space"] == "pixel"  # ADM's clip_denoised in pixel space; DiT does not clip latents
    manifest = dict(
        format=1, teacher_ckpt=os.path.basename(ckpt_path), teacher_sha256=dist_util.broadcast_object(file_sha256(ckpt_path) if rank == 0 else None),
        model=config["model"], shape=[config["in_channels"], config["input_size"], config["input_size"]],
        num_classes=config["num_classes"], space=config["space"], vae=config.get("vae"), image_size=config.get("image_size"),
        solver=args.solver, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale, legacy_cfg=args.legacy_cfg,
        clip_denoised=clip, save_steps=save_steps, save_timesteps=[grid[s] for s in save_steps], dtype=args.dtype,
        seed=args.global_seed, labels="index mod num_classes", count=args.num_trajectories, shard_size=args.shard_size,
        shards=[shard_name(i) for i in range(len(shard_ranges(args.num_trajectories, args.shard_size)))],
    )

    # Create the store, or check that an existing one was made with the same settings:
    manifest_path = os.path.join(args.out, MANIFEST)
    check_same_settings(manifest_path, manifest, f"the trajectory store {args.out}")
    dist_util.barrier()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if not os.path.isfile(manifest_path):
            write_json(manifest_path, manifest)
    dist_util.barrier()

    # Write this rank's missing shards:
    ranges = shard_ranges(args.num_trajectories, args.shard_size)
    mine = [s for s in range(len(ranges)) if s % world_size == rank]
    complete = {s for s in range(len(ranges)) if os.path.isdir(os.path.join(args.out, shard_name(s)))}
    todo = [s for s in mine if s not in complete]
    dist_util.print0(f"{len(ranges)} shards of up to {args.shard_size} trajectories, {len(complete)} already complete; "
                     f"saving solver steps {save_steps} of {args.num_sampling_steps}")
    model_fn = guided_model_fn(model, args.cfg_scale, args.legacy_cfg)
    total = sum(ranges[s][1] - ranges[s][0] for s in todo)
    progress = tqdm(total=total, disable=rank != 0, unit="traj", desc=f"trajectories (rank 0 of {world_size})", dynamic_ncols=True)
    start_time, written = time.time(), 0
    for s in todo:
        written += write_shard(args.out, s, *ranges[s], args, model_fn, diffusion, config, save_steps, clip, device, progress)
    progress.close()
    count = int(dist_util.all_reduce_mean(total, device) * world_size)
    written = int(dist_util.all_reduce_mean(written, device) * world_size)
    seconds = time.time() - start_time
    dist_util.print0(f"Wrote {count:,} trajectories ({written / 2**20:.1f} MiB) to {args.out} in {seconds:.1f} s "
                     f"({count / max(seconds, 1e-9):.1f} trajectories/s); the store holds {args.num_trajectories:,}")
    dist_util.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="teacher checkpoint: train.py's or an official DiT one")
    parser.add_argument("--out", type=str, required=True, help="the trajectory store folder")
    parser.add_argument("--num-trajectories", type=int, default=10_000)
    parser.add_argument("--solver", type=str, choices=list(SOLVERS), default="ddim", help="deterministic ODE solver")
    parser.add_argument("--num-sampling-steps", type=int, default=25, help="S, the teacher's steps on DiT's respaced grid")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--legacy-cfg", action=argparse.BooleanOptionalAction, default=False,
                        help="guide only the first 3 noise channels, as official DiT does")
    parser.add_argument("--save-steps", type=str, default=None,
                        help="solver steps to save: 'all', 'every:N' or a list like 0,10,15,20,25 "
                             f"(default: all for models of at most {SMALL_MODEL_TOKENS} tokens, else every:5); "
                             "0 (the noise) and S (the sample) are always saved")
    parser.add_argument("--dtype", type=str, choices=["float16", "float32"], default="float32")
    parser.add_argument("--batch-size", type=int, default=500, help="trajectories per solver batch, per process")
    parser.add_argument("--shard-size", type=int, default=1000, help="trajectories per shard")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--precision", type=str, choices=["fp32", "tf32"], default="fp32",
                        help="on GPU: TF32 matmuls make trajectories faster and slightly less exact")
    args = parser.parse_args(argv)
    if args.num_trajectories < 1 or args.shard_size < 1 or args.batch_size < 1:
        parser.error("--num-trajectories, --shard-size and --batch-size must be positive")
    return args


if __name__ == "__main__":
    main(parse_args())
