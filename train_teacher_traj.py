"""Runs the teacher's deterministic ODE solver and writes its trajectories to a trajectory store
(see ard/trajectory_store.py for the format).

    python train_teacher_traj.py --ckpt runs/digits/teacher/checkpoints/0003000.pt \\
        --out runs/digits/traj
    torchrun --nproc_per_node=8 train_teacher_traj.py --ckpt DiT-XL-2-256x256.pt \\
        --out /data/ard/traj --num-trajectories 1200000 --save-steps 0,6,10,12,15,18,20,25 \\
        --dtype float16 --batch-size 256
    torchrun --nproc_per_node=8 train_teacher_traj.py --ckpt SiT-XL-2-256x256.pt \\
        --out /data/ard/traj_sit --solver heun --num-sampling-steps 13 --save-steps 0,3,6,9,13 \\
        --num-trajectories 1200000 --dtype float16 --batch-size 256

A flow teacher (SiT, REPA, train.py --objective flow) runs Euler or Heun on its uniform grid; its
store records its prediction type and time convention, and its saved timesteps are the model's own
times.

Sample i gets its noise from a generator seeded by (seed, i) and the label i mod num_classes, so the
store's content does not depend on the number of processes. Shards go to ranks round-robin; each is
written to a temporary folder and renamed when complete, so running the same command again after an
interruption finishes only the missing shards. Running it with other settings into the same folder
stops.
"""

import argparse
import os
import time

import numpy as np
import torch

from ard import cli, dist_util
from ard.checkpoints import find_checkpoint, load_model, peek_config
from ard.cli import (
    UserError,
    add_dry_run_argument,
    check_output_path,
    non_negative_int,
    positive_int,
    print_dry_run,
)
from ard.collective import CollectiveStop
from ard.fileio import (
    WriterLock,
    check_free_space,
    file_sha256,
    start_or_resume,
)
from ard.generation import TeacherSampler, add_sampler_arguments, teacher_flow, teacher_process
from ard.logs import progress
from ard.preemption import (
    Preempted,
    StopRequest,
    add_stop_argument,
    clear_preempted,
    mark_preempted,
)
from ard.trajectory_store import (
    DEFAULT_STUDENT_STEPS,
    MANIFEST,
    complete_shards,
    schedule_steps,
    shard_name,
    shard_ranges,
    write_shard,
)
from diffusion.flow import FlowMatching
from diffusion.ode import solver_grid
from diffusion.sampling import SOLVERS

SMALL_MODEL_TOKENS = 64  # up to this many tokens per image, every solver step is saved by default


def parse_save_steps(spec, num_steps, default_all, grid=None, flow=None):
    """'all', 'every:N', 'student:K[:SCHEDULE]' (exactly the K + 1 boundaries a K-step student's
    default schedule wants on this solver's grid, `grid`: see trajectory_store.schedule_steps), or a
    comma-separated list of solver steps; the noise (0) and the sample (S) are always kept."""
    if spec is None:
        spec = "all" if default_all else f"student:{DEFAULT_STUDENT_STEPS}"
    try:
        if spec == "all":
            steps = set(range(num_steps + 1))
        elif spec.startswith("every:"):
            steps = set(range(0, num_steps + 1, int(spec.split(":", 1)[1])))
        elif spec.startswith("student:"):
            k, *schedule = spec.split(":")[1:]
            if int(k) < 1 or len(schedule) > 1:
                raise ValueError(spec)
            steps = set(schedule_steps(grid, int(k), schedule[0] if schedule else "t", flow))
        else:
            steps = {int(s) for s in spec.split(",") if s.strip()}
    except ValueError:
        raise UserError(
            f"--save-steps {spec!r} is not 'all', 'every:N' (N >= 1), 'student:K' (K >= 1, "
            "optionally :t or :logsnr) or a list of solver steps like 0,10,25"
        ) from None
    bad = sorted(s for s in steps if not 0 <= s <= num_steps)
    if bad:
        raise UserError(f"--save-steps {bad} are outside the solver's steps 0..{num_steps}")
    return sorted(steps | {0, num_steps})


def store_manifest(args, ckpt_path, config, sampler, save_steps):
    """What the store holds and how it was made; a rerun into the same folder must agree with it."""
    grid = solver_grid(sampler.diffusion)
    sha256 = dist_util.broadcast_object(file_sha256(ckpt_path) if dist_util.is_main() else None)
    return dict(
        format=1,
        teacher_ckpt=os.path.basename(ckpt_path),
        teacher_sha256=sha256,
        model=config["model"],
        shape=[config["in_channels"], config["input_size"], config["input_size"]],
        num_classes=config["num_classes"],
        space=config["space"],
        vae=config.get("vae"),
        image_size=config.get("image_size"),
        solver=args.solver,
        num_sampling_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale,
        legacy_cfg=args.legacy_cfg,
        clip_denoised=sampler.clip,
        save_steps=save_steps,
        save_timesteps=[grid[s] for s in save_steps],
        dtype=args.dtype,
        precision=args.precision,
        seed=args.global_seed,
        labels="index mod num_classes",
        count=args.num_trajectories,
        shard_size=args.shard_size,
        shards=[
            shard_name(i) for i in range(len(shard_ranges(args.num_trajectories, args.shard_size)))
        ],
        **flow_fields(config, args),
    )


def flow_fields(config, args):
    """A flow teacher's store also records what the model predicts and its time convention (its
    save_timesteps are the model's own times, which the student embeds), and the guidance interval;
    a DiT teacher's store has neither."""
    if teacher_flow(config) is None:
        return {}
    return dict(
        prediction="velocity",
        noise_at=config["noise_at"],
        time_scale=config["time_scale"],
        guidance_interval=args.guidance_interval,
    )


def store_bytes_missing(args, manifest):
    """The bytes the shards not yet complete will take: xt and x0 at every saved step, labels and
    indices."""
    complete, _ = complete_shards(args.out, manifest)
    per_trajectory = (
        2
        * len(manifest["save_steps"])
        * int(np.prod(manifest["shape"]))
        * np.dtype(args.dtype).itemsize
        + 16
    )
    ranges = shard_ranges(args.num_trajectories, args.shard_size)
    return per_trajectory * sum(
        stop - start for s, (start, stop) in enumerate(ranges) if s not in complete
    )


def dry_run(args):
    """--dry-run: the store this command would write, from the checkpoint's config alone."""
    config = peek_config(args.ckpt)
    if config["kind"] != "dit":
        raise UserError(f"{args.ckpt} holds an ARD student, not a teacher")
    process = teacher_process(config, args.num_sampling_steps)
    grid = solver_grid(process)
    patch = int(config["model"].split("/")[1])
    save_steps = parse_save_steps(
        args.save_steps,
        args.num_sampling_steps,
        (config["input_size"] // patch) ** 2 <= SMALL_MODEL_TOKENS,
        grid=grid,
        flow=process if isinstance(process, FlowMatching) else None,
    )
    shape = [config["in_channels"], config["input_size"], config["input_size"]]
    layout = dict(
        count=args.num_trajectories,
        shard_size=args.shard_size,
        save_steps=save_steps,
        shape=shape,
        dtype=args.dtype,
    )
    print_dry_run(
        "train_teacher_traj.py",
        {
            "teacher": f"{args.ckpt}: {config['model']}, {config['space']} {shape}, predicts "
            f"{config.get('prediction', 'eps')}",
            "solver": f"{args.solver}, {args.num_sampling_steps} steps, CFG {args.cfg_scale} "
            f"({'first 3 channels' if args.legacy_cfg else 'every channel'}), guidance interval "
            f"{args.guidance_interval}, precision {args.precision}",
            "saved solver steps": save_steps,
            "their timesteps": [grid[s] for s in save_steps],
            "trajectories": f"{args.num_trajectories:,} in shards of {args.shard_size:,}, "
            f"{args.dtype}, seed {args.global_seed}",
        },
        [(args.out, store_bytes_missing(args, layout))],
    )


def main(args):
    # Setup DDP and check the inputs (a stop signal from here on keeps every complete shard):
    stop = StopRequest(args.stop_signals)
    device = dist_util.setup(args.precision)
    torch.set_grad_enabled(False)
    check_output_path(args.out, "the trajectory store", folder=True)
    if args.dry_run:
        dry_run(args)
    ckpt_path = find_checkpoint(args.ckpt)

    # Load the teacher and describe the run:
    model, config = load_model(ckpt_path, device, kind="dit")
    sampler = TeacherSampler(
        model,
        config,
        args.solver,
        args.num_sampling_steps,
        args.cfg_scale,
        args.legacy_cfg,
        args.guidance_interval,
    )
    tokens = (config["input_size"] // model.patch_size) ** 2
    flow = sampler.diffusion if isinstance(sampler.diffusion, FlowMatching) else None
    save_steps = parse_save_steps(
        args.save_steps,
        args.num_sampling_steps,
        tokens <= SMALL_MODEL_TOKENS,
        grid=solver_grid(sampler.diffusion),
        flow=flow,
    )
    manifest = store_manifest(args, ckpt_path, config, sampler, save_steps)

    # Create the store, or check that an existing one was made with the same settings and that the
    # rest fits on the disk; one writer at a time:
    start_or_resume(
        os.path.join(args.out, MANIFEST),
        manifest,
        f"the trajectory store {args.out}",
        before_writing=lambda: check_free_space(
            args.out, store_bytes_missing(args, manifest), f"the store {args.out}"
        ),
    )
    with WriterLock(args.out, f"the trajectory store {args.out}"):
        if dist_util.is_main():
            clear_preempted(args.out)
        try:
            write_missing_shards(args, manifest, sampler, save_steps, device, stop)
        except Preempted as e:
            if dist_util.is_main():
                mark_preempted(args.out, str(e))
            raise
    dist_util.cleanup()


def write_missing_shards(args, manifest, sampler, save_steps, device, stop):
    """This rank's shards that are missing or damaged, with progress on rank 0 and a summary at the
    end. Every rank takes part in the same rounds of stop decisions, one after each batch, until all
    are done (CollectiveStop): a signal to any rank stops every rank after the batch in flight,
    keeping each complete shard (an unfinished one is written again by the same command), and an
    error on any rank ends every rank with its sentence."""
    rank, world_size = dist_util.rank(), dist_util.world_size()
    ranges = shard_ranges(args.num_trajectories, args.shard_size)
    complete, damaged = complete_shards(args.out, manifest)
    for problem in damaged:
        dist_util.print0(f"rewriting a damaged shard: {problem}")
    dist_util.barrier()
    todo = [s for s in range(rank, len(ranges), world_size) if s not in complete]
    dist_util.print0(
        f"{len(ranges)} shards of up to {args.shard_size} trajectories, {len(complete)} already "
        f"complete; saving solver steps {save_steps} of {args.num_sampling_steps}"
    )
    total = sum(ranges[s][1] - ranges[s][0] for s in todo)
    bar = progress(total, f"trajectories (rank 0 of {world_size})", unit="traj")
    shape = tuple(manifest["shape"])
    rounds = CollectiveStop(
        stop,
        device,
        f"the complete shards of {args.out} are kept; the same command writes the rest",
    )

    def solve(noise, y):
        with dist_util.autocast(device, args.precision):
            xt, x0 = sampler.trajectory(noise.to(device), y.to(device), save_steps)
        return xt.float(), x0.float()

    shown = 0  # trajectories of the shard in progress counted by the bar

    def between_batches(n):  # of one shard; the unfinished shard is dropped on a stop
        nonlocal shown
        bar.update(n)
        shown += n
        if rounds.after_batch():
            raise rounds.preempted()

    start_time, written = time.time(), 0
    with rounds.sharing_errors():  # an error here ends every rank, with its sentence
        for s in todo:
            shown = 0
            written += write_shard(
                args.out,
                s,
                *ranges[s],
                solve,
                shape,
                manifest["num_classes"],
                args.global_seed,
                args.dtype,
                args.batch_size,
                between_batches,
            )
            bar.update(ranges[s][1] - ranges[s][0] - shown)
            if rounds.after_batch():  # the shard is complete, and kept
                raise rounds.preempted()
    rounds.wait_for_peers()
    bar.close()
    count = int(dist_util.all_reduce_sum(total, device))
    written = int(dist_util.all_reduce_sum(written, device))
    seconds = time.time() - start_time
    dist_util.print0(
        f"Wrote {count:,} trajectories ({written / 2**20:.1f} MiB) to {args.out} in {seconds:.1f} "
        f"s ({count / max(seconds, 1e-9):.1f} trajectories/s); the store holds "
        f"{args.num_trajectories:,}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sampler_arguments(parser, flag="--solver", choices=SOLVERS)
    parser.add_argument(
        "--ckpt",
        type=str,
        required=True,
        help="teacher checkpoint: train.py's or an official DiT one",
    )
    parser.add_argument("--out", type=str, required=True, help="the trajectory store folder")
    parser.add_argument(
        "--num-trajectories",
        type=positive_int,
        default=10_000,
        help="how many trajectories the store holds",
    )
    parser.add_argument(
        "--save-steps",
        type=str,
        default=None,
        help="solver steps to save: 'all', 'every:N', 'student:K' (exactly the boundaries of a "
        "K-step student's default schedule, 'student:K:logsnr' for the log-SNR one) or a list like "
        f"0,10,15,20,25 (default: all for models of at most {SMALL_MODEL_TOKENS} tokens, else "
        f"student:{DEFAULT_STUDENT_STEPS}); 0 (the noise) and S (the sample) are always saved",
    )
    parser.add_argument(
        "--dtype",
        type=str,
        choices=["float16", "float32"],
        default="float32",
        help="dtype of the stored arrays",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=500,
        help="trajectories per solver batch, per process",
    )
    parser.add_argument(
        "--shard-size", type=positive_int, default=1000, help="trajectories per shard"
    )
    parser.add_argument(
        "--global-seed", type=non_negative_int, default=0, help="seed of every trajectory's noise"
    )
    dist_util.add_precision_argument(parser, default="fp32")
    add_stop_argument(parser)
    add_dry_run_argument(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
