"""Distils a K-step ARD student from a trajectory store (regression stage), or fine-tunes one with the GAN
stage (--gan).

    python train_ard.py --traj runs/digits/traj --teacher-ckpt runs/digits/teacher/checkpoints/0001400.pt \
        --history-layers 3 --max-steps 1200                      # ARD on the digits (N = 3 of 6 blocks)
    python train_ard.py ... --history-layers 0                    # step distillation, the baseline
    torchrun --nproc_per_node=8 train_ard.py --traj /data/ard/traj --teacher-ckpt DiT-XL-2-256x256.pt \
        --history-layers 6 --global-batch-size 64 --max-steps 300000 --precision bf16
    python train_ard.py --gan --init-ckpt RUN/checkpoints/0001200.pt --traj ... --teacher-ckpt ... --max-steps 600

The student is built from the teacher (model key and shapes from the teacher's checkpoint), with one input
per boundary but the last; see ard/trajectory_store.py for solver steps and targets. The loss is the mean over
the K steps of each step's MSE against its target. As in train.py, all randomness of a step is seeded by
(seed, step, rank) and the data order is a function of the step, so --resume continues exactly.
"""

import argparse
import os

import torch

from ard import cli, dist_util
from ard.checkpoints import (
    build_model,
    check_finite,
    find_checkpoint,
    load_checkpoint,
    load_model,
    student_config,
)
from ard.cli import (
    MissingFileError,
    UserError,
    diffusion_steps,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from ard.data import EMBEDDED, find_embedded, save_grid
from ard.fileio import file_sha256
from ard.gan import GANStage, real_images
from ard.logs import progress
from ard.preemption import StopRequest
from ard.seeding import rank_seed, step_seed
from ard.training import (
    MetricsAverager,
    NonFiniteError,
    Run,
    StepBatchSampler,
    Trainer,
    add_run_arguments,
    log_due,
    lr_schedule,
    prepare_run,
    requires_grad,
    stop_if_requested,
    stop_on_nonfinite,
)
from ard.trajectory_store import (
    BOUNDARY_SCHEDULES,
    TARGETS,
    TrajectoryDataset,
    TrajectoryStore,
    collate_batch,
    default_boundaries,
)
from ard.vae import load_vae, vae_decode
from ard_models import HISTORY_ATTENTION
from diffusion.sampling import teacher_flow, teacher_process

# Arguments that fix what is trained; a resumed run must agree with its checkpoint on them.
RUN_DEFINING_ARGS = (
    "traj",
    "history_layers",
    "target",
    "boundaries",
    "boundary_schedule",
    "num_steps",
    "global_batch_size",
    "global_seed",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "ema_decay",
    "grad_clip",
    "val_count",
    "gan",
    "init_ckpt",
    "gan_blocks",
    "gan_scale",
    "gan_max_weight",
    "gan_weight",
    "gan_warmup",
    "gan_max_t",
    "gan_augment",
    "gan_dequantize",
    "disc_lr",
    "data",
    "image_size",
)


@torch.no_grad()
def validate(model, store_dataset, indices, device, batch_size=500):
    """Each step's MSE against its target on held-out trajectories, teacher-forced (TF: the inputs are the teacher's)
    and sampled (AR: the inputs are the student's own predictions, the way it samples); the last step's is the
    error of the sample against the teacher's sample."""
    model.eval()
    tf_steps, ar_steps, n = 0.0, 0.0, 0
    for b in range(0, len(indices), batch_size):
        inputs, targets, y = store_dataset.__getitems__(list(indices[b : b + batch_size]))
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        tf_steps = tf_steps + (model(inputs, y) - targets).square().mean(dim=(2, 3, 4)).sum(
            0
        )  # (K,)
        ar_steps = ar_steps + (model.sample(inputs[:, 0], y) - targets).square().mean(
            dim=(2, 3, 4)
        ).sum(0)  # (K,)
        n += len(y)
    return {
        "val_tf_final_mse": tf_steps[-1].item() / n,
        "val_ar_final_mse": ar_steps[-1].item() / n,
        "val_tf_step_mse": (tf_steps / n).tolist(),
        "val_ar_step_mse": (ar_steps / n).tolist(),
    }


def check_inputs(args, device):
    """Everything that can be wrong with the inputs, checked before any expensive work: the store, the teacher
    (the one that wrote the store), the boundaries, the held-out count, the resume checkpoint and the GAN start point."""
    store = TrajectoryStore(args.traj)
    teacher_path = find_checkpoint(args.teacher_ckpt)
    teacher_sha256 = dist_util.broadcast_object(
        file_sha256(teacher_path) if dist_util.is_main() else None
    )
    if teacher_sha256 != store.manifest["teacher_sha256"]:
        raise UserError(
            f"the store {args.traj} was written by another teacher ({store.manifest.get('teacher_ckpt')}, sha256 "
            f"{str(store.manifest['teacher_sha256'])[:12]}...) than --teacher-ckpt {args.teacher_ckpt} (sha256 "
            f"{teacher_sha256[:12]}...): pass the teacher that wrote the store"
        )
    teacher, teacher_cfg = load_model(teacher_path, device, kind="dit")
    requires_grad(teacher, False)
    store.check_model(
        shape=(teacher_cfg["in_channels"], teacher_cfg["input_size"], teacher_cfg["input_size"]),
        num_classes=teacher_cfg["num_classes"],
        model=teacher_cfg["model"],
    )
    depth = len(teacher.blocks)
    if args.history_layers > depth:
        raise UserError(
            f"--history-layers {args.history_layers} exceeds the teacher's {depth} blocks"
        )
    if args.gan_blocks is not None and not all(0 <= b < depth for b in args.gan_blocks):
        raise UserError(f"--gan-blocks {args.gan_blocks} must be teacher blocks, 0 to {depth - 1}")
    if args.gan and args.data not in EMBEDDED and not os.path.isdir(args.data):
        raise MissingFileError(
            f"--data {args.data} does not exist (the GAN stage's real images: {' or '.join(map(repr, EMBEDDED))} "
            f"or an ImageFolder)"
        )
    if (
        args.gan
        and args.data != teacher_cfg.get("data")
        and (args.data in EMBEDDED or teacher_cfg.get("data") in EMBEDDED)
    ):
        raise UserError(
            f"--data {args.data} is not what the teacher learnt ({teacher_cfg.get('data')}): the GAN stage's real "
            f"images must be the teacher's data; pass --data {teacher_cfg.get('data')}"
        )
    if args.gan and args.data in EMBEDDED:
        find_embedded(args.data)  # the files are there, before any work
    boundaries = args.boundaries or default_boundaries(
        store.saved_steps,
        store.saved_timesteps,
        args.num_steps,
        args.boundary_schedule,
        teacher_flow(store.manifest, store.manifest["num_sampling_steps"]),
    )
    if args.val_count >= len(store):
        raise UserError(
            f"--val-count {args.val_count} leaves no training trajectories in a store of {len(store)}"
        )
    dataset = TrajectoryDataset(
        store, boundaries, args.target
    )  # checks the boundaries against the store
    ckpt = prepare_run(args, RUN_DEFINING_ARGS)
    if ckpt is not None and ckpt.get("config", {}).get("teacher_sha256") != teacher_sha256:
        raise UserError(
            f"--resume {args.resume} was distilled from another teacher than --teacher-ckpt {args.teacher_ckpt}"
        )
    return store, teacher, teacher_cfg, boundaries, dataset, ckpt, load_init(args, boundaries)


def load_init(args, boundaries):
    """The regression checkpoint that --init-ckpt (required by --gan) starts from, checked against this run."""
    if args.gan and not args.init_ckpt:
        raise UserError("--gan starts from a regression checkpoint: pass --init-ckpt")
    if not args.init_ckpt:
        return None
    init = load_checkpoint(args.init_ckpt)
    if not isinstance(init, dict) or init.get("config", {}).get("kind") != "ard":
        raise UserError(f"--init-ckpt {args.init_ckpt} is not a checkpoint of train_ard.py")
    if (
        init["config"]["boundaries"] != boundaries
        or init["config"]["history_layers"] != args.history_layers
    ):
        raise UserError(
            f"--init-ckpt {args.init_ckpt} has boundaries {init['config']['boundaries']} and "
            f"N={init['config']['history_layers']}; pass the same --boundaries and --history-layers"
        )
    check_finite(init["ema"], args.init_ckpt)
    return init


def build_gan_stage(args, teacher, teacher_cfg, device, vae, start_step, ckpt, stop):
    """The GAN stage's discriminator on the frozen teacher, its optimiser and the real images it sees
    (VAE-encoded in latent space)."""
    embedded = args.data in EMBEDDED
    image_size = (
        teacher_cfg["input_size"]
        if embedded
        else (args.image_size or teacher_cfg.get("image_size"))
    )
    real = real_images(
        args.data,
        image_size,
        args.global_batch_size,
        args.global_seed,
        dist_util.rank(),
        dist_util.world_size(),
        start_step,
        args.max_steps,
        args.num_workers,
        stop.ignore_in_worker,
    )
    blocks = args.gan_blocks if args.gan_blocks is not None else list(range(len(teacher.blocks)))
    pixel = teacher_cfg["space"] == "pixel"
    augment = (
        args.gan_augment
        if args.gan_augment is not None
        else (teacher_cfg["input_size"] // 8 if pixel else 0)
    )
    return GANStage(
        teacher,
        teacher_cfg["num_classes"],
        blocks,
        device,
        real,
        vae,
        args.disc_lr,
        args.gan_scale,
        args.gan_max_weight,
        args.gan_warmup,
        args.gan_max_t,
        augment,
        flip=not embedded,
        dequantize=args.gan_dequantize
        if args.gan_dequantize is not None
        else (2 / 16 if args.data == "digits" else 2 / 255),
        precision=args.precision,
        state=ckpt,
        weight=args.gan_weight,
        process=teacher_process(teacher_cfg),
    )


def main(args):
    # Setup DDP and check the inputs (a stop signal from here on saves the step in flight):
    stop = StopRequest(args.stop_signals)
    device = dist_util.setup(args.precision)
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world_size}"
        )
    store, teacher, teacher_cfg, boundaries, dataset, ckpt, init = check_inputs(args, device)
    start_step = ckpt["step"] if ckpt is not None else 0
    local_indices = store.rank_indices(range(len(store) - args.val_count), rank, world_size)
    sampler = StepBatchSampler(
        len(local_indices),
        args.global_batch_size // world_size,
        rank_seed(args.global_seed, rank),
        0,
        1,
        start_step,
        args.max_steps,
    )
    latent = teacher_cfg["space"] == "latent" and (args.gan or args.sample_every)
    vae = (
        load_vae(teacher_cfg["vae"], device) if latent else None
    )  # real latents for the GAN, decoded sample grids
    run = Run(
        args,
        ckpt,
        f"ARD-{teacher_cfg['model'].replace('/', '-')}-N{args.history_layers}",
        subfolders=["samples"],
    )
    val_indices = list(range(len(store) - args.val_count, len(store)))
    run.logger.info(
        f"Store {args.traj}: {len(store):,} trajectories ({len(val_indices)} held out), boundaries {boundaries} "
        f"(solver steps), input timesteps {dataset.timesteps}, target {args.target}"
    )

    # Create the student (from the teacher, or from the regression checkpoint for the GAN stage):
    config = student_config(
        teacher_cfg,
        dataset.timesteps,
        args.history_layers,
        boundaries,
        args.target,
        store.manifest["teacher_sha256"],
        args.gan,
    )
    torch.manual_seed(args.global_seed)
    student = build_model(config, history_attention=args.history_attention).load_teacher(
        teacher.state_dict()
    )
    if init is not None:
        student.load_state_dict(init["ema"])
    trainer = Trainer(
        student,
        device,
        args.lr,
        args.weight_decay,
        args.ema_decay,
        args.grad_clip,
        args.compile,
        state=ckpt,
        schedule=lr_schedule(args.lr_schedule, args.warmup_steps, args.max_steps),
        stop=stop,
    )
    if init is not None and ckpt is None and "opt" in init:
        trainer.load_optimizer(
            init["opt"], lr=args.lr, weight_decay=args.weight_decay
        )  # the regression stage's moments
    gan = (
        build_gan_stage(args, teacher, teacher_cfg, device, vae, start_step, ckpt, stop)
        if args.gan
        else None
    )
    run.logger.info(
        f"Student {teacher_cfg['model']}, K={student.num_steps}, N={args.history_layers}: "
        f"{sum(p.numel() for p in student.parameters()):,} parameters"
        + (f", GAN on teacher blocks {gan.raw_disc.blocks}" if gan else "")
    )

    # Setup data (positions are functions of the step):
    loader = torch.utils.data.DataLoader(
        TrajectoryDataset(store, boundaries, args.target, indices=local_indices),
        batch_sampler=sampler,
        collate_fn=collate_batch,
        num_workers=0,
    )

    def save(done):
        run.save(
            done,
            {
                **trainer.state_dict(),
                "config": config,
                "data": {"local_epoch": done // sampler.steps_per_epoch},
                "rng": {
                    "scheme": "seeded per (global_seed, step, rank)",
                    "global_seed": args.global_seed,
                },
                **(gan.state_dict() if gan else {}),
            },
        )

    try:
        train_loop(args, run, trainer, gan, loader, device, dataset, val_indices, vae, save)
    except NonFiniteError as e:
        raise stop_on_nonfinite(run, e) from None
    run.logger.info("Done!")
    dist_util.cleanup()


def train_loop(args, run, trainer, gan, loader, device, dataset, val_indices, vae, save):
    """The distillation loop: per-step MSE against the targets, the GAN term when there is one, logging,
    validation, sample grids and checkpoints."""
    K, rank = trainer.raw.num_steps, dist_util.rank()
    num_classes = trainer.raw.num_classes
    fixed_noise = torch.randn(
        min(num_classes, 10) * 4,
        trainer.raw.in_channels,
        trainer.raw.input_size,
        trainer.raw.input_size,
        generator=torch.Generator().manual_seed(args.global_seed),
    ).to(device)
    fixed_y = (torch.arange(len(fixed_noise)) % min(num_classes, 10)).to(device)
    trainer.model.train()
    run.logger.info(
        f"Training from step {run.start_step} to {args.max_steps}, global batch {args.global_batch_size}"
    )
    averager = MetricsAverager(device)
    bar = progress(args.max_steps, "distil", initial=run.start_step)
    for step, (inputs, targets, y) in enumerate(loader, start=run.start_step):
        torch.manual_seed(step_seed(args.global_seed, step, rank))
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        with dist_util.autocast(device, args.precision):
            pred = trainer.model(inputs, y)
            per_step = (pred.float() - targets).square().mean(dim=(0, 2, 3, 4))  # (K,)
            loss = per_step.mean()
        figures = [loss.item(), *per_step.tolist()]
        if gan is not None:
            loss, gan_figures = gan.step(
                step, trainer.raw, inputs[:, 0], y, loss, trainer.raw.heads[-1].linear.weight
            )
            figures += gan_figures
        trainer.step(loss, step)
        averager.add(figures)
        bar.update(1)
        done = step + 1
        if log_due(done, args.log_every, args.max_steps):
            avg, steps_per_sec = averager.average()
            record = {
                "step": done,
                "loss": avg[0],
                "step_mse": avg[1 : 1 + K],
                "steps_per_sec": steps_per_sec,
            }
            if gan is not None:
                record.update(zip(GANStage.FIGURES, avg[1 + K :]))
            if args.val_count and log_due(done, args.val_every, args.max_steps):
                record.update(validate(trainer.ema, dataset, val_indices, device))
                trainer.model.train()
            run.logger.info(
                f"(step={done:07d}) loss {record['loss']:.5f}, last step {record['step_mse'][-1]:.5f}, "
                + (
                    f"val AR final {record['val_ar_final_mse']:.5f}, "
                    if "val_ar_final_mse" in record
                    else ""
                )
                + (
                    f"D {record['d_loss']:.3f} (real {record['d_real']:.2f}, fake {record['d_fake']:.2f}), "
                    f"lambda {record['gan_weight']:.3g}, "
                    if gan
                    else ""
                )
                + f"{steps_per_sec:.2f} steps/s"
            )
            run.write_metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if dist_util.is_main() and log_due(done, args.sample_every, args.max_steps):
            samples = trainer.ema.sample(fixed_noise, fixed_y)[:, -1]
            save_grid(
                vae_decode(vae, samples) if vae is not None else samples,
                run.path("samples", f"{done:07d}.png"),
                nrow=min(num_classes, 10),
            )
        saved = log_due(done, args.ckpt_every, args.max_steps)
        if saved:
            save(done)
        stop_if_requested(trainer, run, done, args.max_steps, saved, save)
    bar.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--traj", type=str, required=True, help="trajectory store written by train_teacher_traj.py"
    )
    parser.add_argument(
        "--teacher-ckpt", type=str, required=True, help="the teacher that wrote the store"
    )
    parser.add_argument(
        "--history-layers",
        "--stack",
        dest="history_layers",
        type=non_negative_int,
        default=6,
        help="N, the lowest blocks that see the history (0 = step distillation); --stack is the public code's name",
    )
    parser.add_argument(
        "--history-attention",
        type=str,
        choices=list(HISTORY_ATTENTION),
        default="mask",
        help="how training computes the history blocks' block-causal attention (the same function): one "
        "masked attention, or one unmasked (flash-eligible on a GPU) attention per step",
    )
    parser.add_argument(
        "--target",
        type=str,
        choices=list(TARGETS),
        default="state",
        help="history and targets: ODE states x_t, or the teacher's x0 predictions",
    )
    parser.add_argument(
        "--num-steps",
        type=positive_int,
        default=None,
        help="K, the student's steps (default 4, or as --boundaries give)",
    )
    parser.add_argument(
        "--boundaries",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="K + 1 solver steps, from 0 (noise) to S (sample), e.g. 0 10 15 20 25; default: by --boundary-schedule",
    )
    parser.add_argument(
        "--boundary-schedule",
        type=str,
        choices=BOUNDARY_SCHEDULES,
        default="t",
        help="default boundaries evenly spaced in the timestep ('t') or in log-SNR ('logsnr')",
    )
    add_run_arguments(parser, "ARD-MODEL-NN", "trajectories", batch_size=64, max_steps=300_000)
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=0.0,
        help="AdamW weight decay of the student",
    )
    parser.add_argument(
        "--grad-clip",
        type=positive_float,
        default=1.0,
        help="clip the student's gradient norm to this",
    )
    parser.add_argument(
        "--val-count",
        type=non_negative_int,
        default=0,
        help="trajectories at the end of the store held out for validation",
    )
    parser.add_argument(
        "--val-every",
        type=positive_int,
        default=1000,
        help="validate every this many steps (at a log step)",
    )
    parser.add_argument(
        "--sample-every",
        type=non_negative_int,
        default=5_000,
        help="EMA sample grid from fixed noise (0: never)",
    )
    gan = parser.add_argument_group("GAN fine-tuning")
    gan.add_argument(
        "--gan", action=argparse.BooleanOptionalAction, default=False, help="run the GAN stage"
    )
    gan.add_argument(
        "--init-ckpt",
        type=str,
        default=None,
        help="start from this train_ard.py checkpoint's EMA weights (required by --gan) instead of the teacher",
    )
    gan.add_argument(
        "--gan-blocks",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="teacher blocks with a head (default: all)",
    )
    gan.add_argument(
        "--gan-scale",
        type=non_negative_float,
        default=0.5,
        help="lambda = scale * |grad L_reg| / |grad L_GAN| on the last head (the paper: 10)",
    )
    gan.add_argument(
        "--gan-max-weight",
        type=non_negative_float,
        default=10.0,
        help="lambda is clamped to [0, this]",
    )
    gan.add_argument(
        "--gan-weight",
        type=non_negative_float,
        default=None,
        help="a fixed lambda instead of the adaptive one (--gan-scale and --gan-max-weight then do not apply)",
    )
    gan.add_argument(
        "--gan-warmup",
        type=non_negative_int,
        default=100,
        help="steps with lambda = 0, where the discriminator trains alone (the paper: 3000)",
    )
    gan.add_argument(
        "--gan-max-t",
        type=diffusion_steps,
        default=300,
        help="real and fake x0 are diffused to t ~ U[0, this) (300: alpha-bar >= 0.4)",
    )
    gan.add_argument(
        "--gan-augment",
        type=non_negative_int,
        default=None,
        help="random translation of real and fake by up to this many pixels (default: side / 8 in pixel space, 0 in latent space)",
    )
    gan.add_argument(
        "--gan-dequantize",
        type=non_negative_float,
        default=None,
        help="uniform noise of this width on the real images in [-1, 1] (default: one grey level, 2/16 for the "
        "digits' 17 levels, 2/255 for 8-bit images), so that the heads cannot tell real from fake by the levels",
    )
    gan.add_argument(
        "--disc-lr",
        type=positive_float,
        default=2e-4,
        help="AdamW learning rate of the discriminator heads",
    )
    gan.add_argument(
        "--data",
        type=str,
        default="digits",
        help="real data: 'digits', 'fashion' or an ImageFolder path",
    )
    gan.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image size of --data (default: the teacher's)",
    )
    gan.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=4,
        help="data loader workers for an ImageFolder",
    )
    args = parser.parse_args(argv)
    if args.boundaries is not None:
        if args.num_steps is not None and args.num_steps != len(args.boundaries) - 1:
            parser.error(
                f"--num-steps {args.num_steps} disagrees with the {len(args.boundaries) - 1} steps of --boundaries: drop one"
            )
        args.num_steps = len(args.boundaries) - 1
    elif args.num_steps is None:
        args.num_steps = 4
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
