"""Samples N images (default 50,000, for FID-50K) from a teacher or a student checkpoint, on any
number of processes, into an ADM-format .npz: arr_0 uint8 (N, H, W, 3) (grey images repeated to 3
channels), arr_1 int64 labels, and `settings`, what made the file (JSON text: the checkpoint's
sha256, the sampler, its steps and guidance, the seeds, the VAE, the precision).

    python sample_ddp.py --ckpt runs/digits/ard/checkpoints/0001200.pt --num-samples 2000 \\
        --out samples.npz
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 \\
        --out dit_xl2_ddim25.npz
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt REPA-SiT-XL-2-256x256.pt --sampler heun \\
        --num-sampling-steps 13 --cfg-scale 1.8 --guidance-interval 0 0.7 --out repa_heun13.npz

Image i draws its label and noise from a generator seeded by (seed, i), so the file does not depend
on the number of processes. Images are made in chunks of consecutive indices, written to OUT.chunks/
under a temporary name and renamed when complete: running the same command again after an
interruption makes only the missing chunks, and once OUT holds the samples of these settings it has
nothing to do. The chunks are streamed into OUT (one chunk in memory at a time), which is written
atomically with its settings inside; OUT.json repeats them for people, and OUT.chunks/ goes.
"""

import argparse
import json
import os
import shutil
import time
import zipfile

import numpy as np
import torch

from ard import cli, dist_util
from ard.checkpoints import find_checkpoint, load_model, peek_config
from ard.cli import (
    NothingToDo,
    UserError,
    add_dry_run_argument,
    check_output_path,
    non_negative_int,
    positive_int,
    print_dry_run,
)
from ard.collective import CollectiveStop
from ard.data import to_uint8
from ard.fileio import (
    WriterLock,
    atomic_write,
    check_free_space,
    file_sha256,
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
from ard.preemption import (
    Preempted,
    StopRequest,
    add_stop_argument,
    clear_preempted,
    mark_preempted,
)
from ard.seeding import EVALUATION_STREAM, per_index_noise
from ard.trajectory_store import shard_ranges
from ard.vae import VAE_DOWNSAMPLE, load_vae, vae_decode


def run_settings(args, ckpt_sha256, config, vae):
    """What fixes the content of the file; a resumed run must match it, and a file that holds it is
    done."""
    student = config["kind"] == "ard"
    settings = dict(
        ckpt_sha256=ckpt_sha256,
        kind="student" if student else "teacher",
        num_samples=args.num_samples,
        seed=args.global_seed,
        chunk_size=args.chunk_size,
        precision=args.precision,
    )
    if vae is not None:
        settings["vae"] = vae
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


def finished_settings(path):
    """The settings inside a complete output file, or None (no file, or one without them)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["settings"])) if "settings" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def make_chunk(generate, vae, indices, args, config, device, rounds):
    """Images and labels of consecutive sample indices: (uint8 (n, H, W, 3), int64 (n,)). Between
    batches every rank decides together whether to stop (rounds: a CollectiveStop); on a stop the
    unfinished chunk is dropped and the same command makes it again."""
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    images, labels = [], []
    starts = range(0, len(indices), args.per_proc_batch_size)
    for b in starts:
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
        if b != starts[-1] and rounds.after_batch():  # the last batch's round follows the save
            raise rounds.preempted()
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


def dry_run(args):
    """--dry-run: the file this command would make, from the checkpoint's config alone."""
    config = peek_config(args.ckpt)
    vae = (args.vae or config["vae"]) if config["space"] == "latent" else None
    sha256 = file_sha256(args.ckpt) if os.path.isfile(args.ckpt) else "(not downloaded)"
    settings = run_settings(args, sha256, config, vae)
    chunk_dir = f"{args.out}.chunks"
    made = (
        len([f for f in os.listdir(chunk_dir) if f.startswith("chunk-")])
        if os.path.isdir(chunk_dir)
        else 0
    )
    done = finished_settings(args.out) == settings
    kind = "an ARD student" if config["kind"] == "ard" else "a teacher"
    print_dry_run(
        "sample_ddp.py",
        {
            **settings,
            "model": f"{config['model']} ({kind})",
            "state": "already made: nothing to do" if done else f"{made} chunks already made",
        },
        [] if done else [(args.out, bytes_missing(args, chunk_dir, config))],
    )


def main(args):
    # Setup DDP (a stop signal from here on keeps every complete chunk):
    stop = StopRequest(args.stop_signals)
    device = dist_util.setup(args.precision)
    check_graph_device(args, device)
    rank = dist_util.rank()
    torch.set_grad_enabled(False)
    check_output_path(args.out, "--out")
    if args.dry_run:
        dry_run(args)
    ckpt_path = find_checkpoint(args.ckpt)

    # Load the model; stop if the file is already made, check any earlier partial run:
    model, config = load_model(ckpt_path, device)
    vae_name = (args.vae or config["vae"]) if config["space"] == "latent" else None
    sha256 = dist_util.broadcast_object(file_sha256(ckpt_path) if rank == 0 else None)
    settings = run_settings(args, sha256, config, vae_name)
    done = dist_util.broadcast_object(finished_settings(args.out) if rank == 0 else None)
    if done == settings:
        raise NothingToDo(
            f"{args.out} already holds the {args.num_samples:,} samples of these settings"
        )
    vae = load_vae(vae_name, device) if vae_name is not None else None
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
        if rank == 0:
            clear_preempted(chunk_dir)
        try:
            seconds, made = make_missing_chunks(
                args, chunk_dir, generate, vae, config, device, stop
            )
        except Preempted as e:
            if rank == 0:
                mark_preempted(chunk_dir, str(e))
            raise
        # Rank 0 writes the file; the others wait for it and stop with its error, if any:
        error = None
        if rank == 0:
            try:
                gather(args, chunk_dir, settings, made, seconds)
            except Exception as e:  # every rank must hear of it
                error = e
        shared = dist_util.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if shared is not None:
            raise UserError(f"rank 0 could not write {args.out}: {shared}")
    dist_util.cleanup()


def make_missing_chunks(args, chunk_dir, generate, vae, config, device, stop):
    """This rank's chunks that are not on disk yet; returns (seconds, images made by all ranks).
    Every rank takes part in the same rounds of stop decisions until all are done (CollectiveStop),
    so a signal or an error on any rank ends every rank after the same batch."""
    rank, world_size = dist_util.rank(), dist_util.world_size()
    ranges = shard_ranges(args.num_samples, args.chunk_size)
    todo = [
        c
        for c in range(rank, len(ranges), world_size)
        if not os.path.isfile(chunk_file(chunk_dir, c))
    ]
    total = sum(ranges[c][1] - ranges[c][0] for c in todo)
    bar = progress(total, f"sampling (rank 0 of {world_size})", unit="img")
    rounds = CollectiveStop(
        stop,
        device,
        f"the complete chunks of {args.out} are kept in {chunk_dir}; the same command makes the "
        "rest",
    )
    start_time = time.time()
    with rounds.sharing_errors():  # an error here ends every rank, with its sentence
        for c in todo:
            images, labels = make_chunk(
                generate, vae, np.arange(*ranges[c]), args, config, device, rounds
            )
            save_npz(chunk_file(chunk_dir, c), arr_0=images, arr_1=labels)
            bar.update(len(labels))
            if rounds.after_batch():  # the chunk is kept
                raise rounds.preempted()
    rounds.wait_for_peers()
    bar.close()
    made = int(dist_util.all_reduce_sum(total, device))
    return time.time() - start_time, made


def gather(args, chunk_dir, settings, made, seconds):
    """The chunks, in order, streamed into the ADM-format file with its settings inside (one chunk
    in memory at a time), then OUT.json; the chunk folder goes."""
    paths = [
        chunk_file(chunk_dir, c)
        for c in range(len(shard_ranges(args.num_samples, args.chunk_size)))
    ]
    with np.load(paths[0], allow_pickle=False) as first:
        image_shape = first["arr_0"].shape[1:]
    members = (
        ("arr_0", (args.num_samples, *image_shape), np.uint8),
        ("arr_1", (args.num_samples,), np.int64),
    )

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as npz:
            for name, shape, dtype in members:
                with npz.open(f"{name}.npy", "w", force_zip64=True) as member:
                    header = dict(
                        descr=np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        fortran_order=False,
                        shape=shape,
                    )
                    np.lib.format.write_array_header_1_0(member, header)
                    for path in paths:
                        with np.load(path, allow_pickle=False) as chunk:
                            member.write(np.ascontiguousarray(chunk[name], dtype=dtype).tobytes())
            with npz.open("settings.npy", "w") as member:
                np.lib.format.write_array(member, np.array(json.dumps(settings, sort_keys=True)))

    atomic_write(args.out, write)
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
    add_dry_run_argument(parser)
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        parser.error("--out must end in .npz")
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
