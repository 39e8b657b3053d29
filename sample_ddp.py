"""Samples N images (default 50,000, for FID-50K) from a teacher or a student checkpoint, on any
number of processes, into an ADM-format .npz: arr_0 uint8 (N, H, W, 3) (grey images repeated to 3
channels) and arr_1 int64 labels.

    python sample_ddp.py --ckpt runs/digits/ard/checkpoints/0001200.pt --num-samples 2000 \\
        --out samples.npz
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 \\
        --out dit_xl2_ddim25.npz
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt REPA-SiT-XL-2-256x256.pt --sampler heun \\
        --num-sampling-steps 13 --cfg-scale 1.8 --guidance-interval 0 0.7 --out repa_heun13.npz

Image i draws its label and noise from a generator seeded by (seed, i), so the file does not depend
on the number of processes. Images are made in chunks of consecutive indices, written to OUT.chunks/
under a temporary name and renamed when complete: running the same command again after an
interruption makes only the missing chunks; the chunks are gathered into OUT and removed at the end.
OUT.json records what made the file (the checkpoint's sha256, the sampler, its steps and guidance,
the seeds).
"""

import argparse
import os
import shutil
import time

import numpy as np
import torch

from ard import cli, dist_util
from ard.checkpoints import find_checkpoint, load_model
from ard.cli import check_output_path, non_negative_int, positive_int
from ard.data import to_uint8
from ard.fileio import (
    WriterLock,
    check_free_space,
    file_sha256,
    remove_stale_temporaries,
    save_npz,
    start_or_resume,
    write_json,
)
from ard.generation import (
    add_graph_argument,
    add_sampler_arguments,
    check_graph_device,
    sample_fn,
)
from ard.logs import progress
from ard.preemption import Preempted, StopRequest, add_stop_argument
from ard.seeding import EVALUATION_STREAM, per_index_noise
from ard.trajectory_store import shard_ranges
from ard.vae import VAE_DOWNSAMPLE, load_vae, vae_decode


def run_settings(args, ckpt_sha256, student):
    """What fixes the content of the file; a resumed run must match it."""
    settings = dict(
        ckpt_sha256=ckpt_sha256,
        kind="student" if student else "teacher",
        num_samples=args.num_samples,
        seed=args.global_seed,
        chunk_size=args.chunk_size,
    )
    if args.label_seed is not None and args.label_seed != args.global_seed:
        settings["label_seed"] = args.label_seed
    if not student:
        settings.update(
            sampler=args.sampler,
            steps=args.num_sampling_steps,
            cfg_scale=args.cfg_scale,
            legacy_cfg=args.legacy_cfg,
        )
        if args.guidance_interval is not None:
            settings["guidance_interval"] = list(args.guidance_interval)
    return settings


def chunk_file(chunk_dir, c):
    return os.path.join(chunk_dir, f"chunk-{c:05d}.npz")


def make_chunk(generate, vae, indices, args, config, device, stop=None):
    """Images and labels of consecutive sample indices: (uint8 (n, H, W, 3), int64 (n,)). On a stop
    request the batch in flight finishes and Preempted ends the process (the chunk is made again by
    the same command)."""
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    images, labels = [], []
    for b in range(0, len(indices), args.per_proc_batch_size):
        y, noise = per_index_noise(
            args.global_seed,
            indices[b : b + args.per_proc_batch_size],
            shape,
            EVALUATION_STREAM,
            num_classes=config["num_classes"],
            label_seed=args.label_seed,
        )
        with dist_util.autocast(device, args.precision):
            x = generate(noise.to(device), y.to(device)).float()
        if vae is not None:
            x = vae_decode(vae, x)
        images.append(to_uint8(x))
        labels.append(y.numpy())
        if stop is not None and stop.requested:
            raise Preempted(
                f"{stop.requested}: the complete chunks of {args.out} are kept in "
                f"{args.out}.chunks; the same command makes the rest"
            )
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def bytes_missing(args, chunk_dir, config):
    """The bytes still to write: the missing chunks, and the final file, which holds every image
    once more while the chunks are gathered into it."""
    side = config["input_size"] * (VAE_DOWNSAMPLE if config["space"] == "latent" else 1)
    per_image = side * side * 3 + 8  # uint8 RGB and an int64 label
    ranges = shard_ranges(args.num_samples, args.chunk_size)
    missing = sum(
        stop - start
        for c, (start, stop) in enumerate(ranges)
        if not os.path.isfile(chunk_file(chunk_dir, c))
    )
    return per_image * (missing + args.num_samples)


def main(args):
    # Setup DDP (a stop signal from here on keeps every complete chunk):
    stop = StopRequest(args.stop_signals)
    device = dist_util.setup(args.precision)
    check_graph_device(args, device)
    rank = dist_util.rank()
    torch.set_grad_enabled(False)
    check_output_path(args.out, "--out")
    ckpt_path = find_checkpoint(args.ckpt)

    # Load the model and check any earlier partial run:
    model, config = load_model(ckpt_path, device)
    vae = load_vae(args.vae or config["vae"], device) if config["space"] == "latent" else None
    generate = sample_fn(
        model,
        config,
        args.sampler,
        args.num_sampling_steps,
        args.cfg_scale,
        args.legacy_cfg,
        args.guidance_interval,
        args.cuda_graph,
    )
    settings = run_settings(
        args,
        dist_util.broadcast_object(file_sha256(ckpt_path) if rank == 0 else None),
        config["kind"] == "ard",
    )
    chunk_dir = f"{args.out}.chunks"
    start_or_resume(
        os.path.join(chunk_dir, "settings.json"),
        settings,
        f"the chunk folder {chunk_dir}",
        before_writing=lambda: check_free_space(
            args.out, bytes_missing(args, chunk_dir, config), f"the samples {args.out}"
        ),
    )
    with WriterLock(chunk_dir, f"the samples {args.out}"):
        seconds, made = make_missing_chunks(args, chunk_dir, generate, vae, config, device, stop)
        if rank == 0:
            gather(args, chunk_dir, settings, made, seconds)
    dist_util.cleanup()


def make_missing_chunks(args, chunk_dir, generate, vae, config, device, stop):
    """This rank's chunks that are not on disk yet; returns (seconds, images made by all ranks)."""
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if rank == 0:
        remove_stale_temporaries(chunk_dir)
    ranges = shard_ranges(args.num_samples, args.chunk_size)
    todo = [
        c
        for c in range(rank, len(ranges), world_size)
        if not os.path.isfile(chunk_file(chunk_dir, c))
    ]
    total = sum(ranges[c][1] - ranges[c][0] for c in todo)
    bar = progress(total, f"sampling (rank 0 of {world_size})", unit="img")
    start_time = time.time()
    for c in todo:
        images, labels = make_chunk(
            generate, vae, np.arange(*ranges[c]), args, config, device, stop
        )
        save_npz(chunk_file(chunk_dir, c), arr_0=images, arr_1=labels)
        bar.update(len(labels))
    bar.close()
    made = int(dist_util.all_reduce_sum(total, device))
    seconds = time.time() - start_time
    dist_util.barrier()
    return seconds, made


def gather(args, chunk_dir, settings, made, seconds):
    """The chunks, in order, into the ADM-format file, with its record OUT.json; the chunk folder
    goes."""
    parts = [
        np.load(chunk_file(chunk_dir, c), allow_pickle=False)
        for c in range(len(shard_ranges(args.num_samples, args.chunk_size)))
    ]
    save_npz(
        args.out,
        arr_0=np.concatenate([p["arr_0"] for p in parts]),
        arr_1=np.concatenate([p["arr_1"] for p in parts]),
    )
    write_json(f"{args.out}.json", settings)
    shutil.rmtree(chunk_dir)
    world_size = dist_util.world_size()
    print(
        f"Saved {args.num_samples:,} samples to {args.out}; made {made:,} in this run in "
        f"{seconds:.1f} s ({made / max(seconds, 1e-9):.1f} images/s on {world_size} process(es), "
        f"{1000 * seconds * world_size / max(made, 1):.1f} ms per image per process)"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt",
        type=str,
        required=True,
        help="a teacher (train.py, official DiT) or student (train_ard.py) checkpoint",
    )
    parser.add_argument("--out", type=str, required=True, help="the .npz to write")
    parser.add_argument("--num-samples", type=positive_int, default=50_000, help="how many images")
    parser.add_argument(
        "--per-proc-batch-size",
        type=positive_int,
        default=250,
        help="images per model batch, per process",
    )
    parser.add_argument(
        "--chunk-size", type=positive_int, default=1000, help="images per resumable chunk"
    )
    add_sampler_arguments(parser, note="teachers only: ")
    add_graph_argument(parser)
    parser.add_argument(
        "--vae", type=str, default=None, help="override the checkpoint's VAE (latent models)"
    )
    parser.add_argument(
        "--global-seed",
        type=non_negative_int,
        default=0,
        help="seed of every sample's label and noise",
    )
    parser.add_argument(
        "--label-seed",
        type=non_negative_int,
        default=None,
        help="draw the labels from this seed instead (the same labels as another file, with "
        "other noises)",
    )
    dist_util.add_precision_argument(parser, default="fp32")
    add_stop_argument(parser)
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        parser.error("--out must end in .npz")
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
