"""Samples N images (default 50,000, for FID-50K) from a teacher or a student checkpoint, on any number of
processes, into an ADM-format .npz: arr_0 uint8 (N, H, W, 3) (grey images repeated to 3 channels) and
arr_1 int64 labels.

    python sample_ddp.py --ckpt runs/digits/ard/checkpoints/0001200.pt --num-samples 2000 --out samples.npz
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 --out dit_xl2_ddim25.npz

Image i draws its label and noise from a generator seeded by (seed, i), so the file does not depend on the
number of processes. Images are made in chunks of consecutive indices, written to OUT.chunks/ under a
temporary name and renamed when complete: running the same command again after an interruption makes only
the missing chunks; the chunks are gathered into OUT and removed at the end.
"""

import argparse
import os
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import dist_util
from checkpoints import checkpoint_kind, file_sha256, find_checkpoint, load_dit, load_student
from diffusion import create_diffusion
from image_data import load_vae, to_uint8, vae_decode
from sample import teacher_sample
from trajectory_store import shard_ranges
from train_utils import check_same_settings, write_json

NOISE_STREAM = 1  # the trajectory writer uses stream 0: evaluation noise never repeats training noise


def labels_and_noise(seed, indices, num_classes, shape):
    """Each index's random class and noise, from its own generator."""
    y = torch.empty(len(indices), dtype=torch.long)
    noise = torch.empty(len(indices), *shape)
    for n, i in enumerate(indices):
        gen = torch.Generator().manual_seed(dist_util.step_seed(seed, int(i), NOISE_STREAM))
        y[n] = torch.randint(num_classes, (1,), generator=gen)
        noise[n] = torch.randn(shape, generator=gen)
    return y, noise


def run_settings(args, ckpt_sha256, student):
    """What fixes the content of the file; a resumed run must match it."""
    settings = dict(ckpt_sha256=ckpt_sha256, kind="student" if student else "teacher", num_samples=args.num_samples,
                    seed=args.global_seed, chunk_size=args.chunk_size)
    if not student:
        settings.update(sampler=args.sampler, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                        legacy_cfg=args.legacy_cfg)
    return settings


def main(args):
    # Setup DDP:
    device = dist_util.setup()
    rank, world_size = dist_util.rank(), dist_util.world_size()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"

    # Load the model and check any earlier partial run:
    ckpt_path = find_checkpoint(args.ckpt)
    student = checkpoint_kind(ckpt_path) == "ard"
    model, config = (load_student if student else load_dit)(ckpt_path, device)
    vae = load_vae(args.vae or config["vae"], device) if config["space"] == "latent" else None
    diffusion = None if student else create_diffusion(str(args.num_sampling_steps))
    settings = run_settings(args, dist_util.broadcast_object(file_sha256(ckpt_path) if rank == 0 else None), student)
    chunk_dir = f"{args.out}.chunks"
    settings_path = os.path.join(chunk_dir, "settings.json")
    check_same_settings(settings_path, settings, f"the chunk folder {chunk_dir}")
    dist_util.barrier()
    if rank == 0:
        os.makedirs(chunk_dir, exist_ok=True)
        if not os.path.isfile(settings_path):
            write_json(settings_path, settings)
    dist_util.barrier()

    # Make this rank's missing chunks:
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    clip = config["space"] == "pixel"
    ranges = shard_ranges(args.num_samples, args.chunk_size)
    chunk_path = lambda c: os.path.join(chunk_dir, f"chunk-{c:05d}.npz")  # noqa: E731
    todo = [c for c in range(rank, len(ranges), world_size) if not os.path.isfile(chunk_path(c))]
    total = sum(ranges[c][1] - ranges[c][0] for c in todo)
    progress = tqdm(total=total, disable=rank != 0, unit="img", desc=f"sampling (rank 0 of {world_size})", dynamic_ncols=True)
    start_time = time.time()
    for c in todo:
        images, labels = [], []
        indices = np.arange(*ranges[c])
        for b in range(0, len(indices), args.per_proc_batch_size):
            y, noise = labels_and_noise(args.global_seed, indices[b : b + args.per_proc_batch_size], config["num_classes"], shape)
            y, noise = y.to(device), noise.to(device)
            if student:
                x = model.sample(noise, y)[:, -1]
            else:
                x = teacher_sample(model, diffusion, noise, y, args.sampler, args.cfg_scale, args.legacy_cfg, clip)
            if vae is not None:
                x = vae_decode(vae, x)
            images.append(to_uint8(x))
            labels.append(y.cpu().numpy())
            progress.update(len(y))
        tmp = f"{chunk_path(c)}.tmp-{rank}.npz"
        np.savez(tmp, arr_0=np.concatenate(images), arr_1=np.concatenate(labels).astype(np.int64))
        os.replace(tmp, chunk_path(c))
    progress.close()
    made = int(round(dist_util.all_reduce_mean(total, device) * world_size))
    seconds = time.time() - start_time
    dist_util.barrier()

    # Gather the chunks into the ADM-format file:
    if rank == 0:
        parts = [np.load(chunk_path(c), allow_pickle=False) for c in range(len(ranges))]
        tmp = f"{args.out}.tmp.npz"
        np.savez(tmp, arr_0=np.concatenate([p["arr_0"] for p in parts]), arr_1=np.concatenate([p["arr_1"] for p in parts]))
        os.replace(tmp, args.out)
        shutil.rmtree(chunk_dir)
        print(f"Saved {args.num_samples:,} samples to {args.out}; made {made:,} in this run in {seconds:.1f} s "
              f"({made / max(seconds, 1e-9):.1f} images/s on {world_size} process(es), {1000 * seconds * world_size / max(made, 1):.1f} ms per image per process)")
    dist_util.barrier()
    dist_util.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="a teacher (train.py, official DiT) or student (train_ard.py) checkpoint")
    parser.add_argument("--out", type=str, required=True, help="the .npz to write")
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=int, default=250)
    parser.add_argument("--chunk-size", type=int, default=1000, help="images per resumable chunk")
    parser.add_argument("--sampler", type=str, choices=["ddim", "heun", "ddpm"], default="ddim", help="teachers only")
    parser.add_argument("--num-sampling-steps", type=int, default=25, help="teachers only")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="teachers only; students sample without guidance")
    parser.add_argument("--legacy-cfg", action=argparse.BooleanOptionalAction, default=False, help="teachers only")
    parser.add_argument("--vae", type=str, default=None, help="override the checkpoint's VAE (latent models)")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--precision", type=str, choices=["fp32", "tf32"], default="fp32")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.per_proc_batch_size < 1 or args.chunk_size < 1:
        parser.error("--num-samples, --per-proc-batch-size and --chunk-size must be positive")
    if not args.out.endswith(".npz"):
        parser.error("--out must end in .npz")
    return args


if __name__ == "__main__":
    main(parse_args())
