"""Distils a K-step ARD student from a trajectory store (the regression stage), or fine-tunes one
with the GAN stage (--gan).

    python train_ard.py --traj runs/digits/traj \\
        --teacher-ckpt runs/digits/teacher/checkpoints/0001400.pt \\
        --history-layers 3 --max-steps 1200             # ARD on the digits (N = 3 of 6 blocks)
    python train_ard.py ... --history-layers 0         # step distillation, the baseline
    torchrun --nproc_per_node=8 train_ard.py --traj /data/ard/traj \\
        --teacher-ckpt DiT-XL-2-256x256.pt --history-layers 6 --global-batch-size 64 \\
        --max-steps 300000 --precision bf16
    python train_ard.py --gan --init-ckpt RUN/checkpoints/0001200.pt --traj ... --teacher-ckpt ...

The student is built from the teacher (model key and shapes from the teacher's checkpoint), with one
input per boundary but the last; see ard/trajectory_store.py for solver steps, boundaries and
targets. The loss is the mean over the K steps of each step's MSE against its target. As in
train.py, all the randomness of a step is seeded by (seed, step, rank) and the data order is a
function of the step, so --resume continues exactly.
"""

import argparse
import os
from copy import deepcopy

import torch

from ard import cli, dist_util
from ard.checkpoints import (
    build_model,
    check_finite,
    find_checkpoint,
    load_checkpoint,
    load_model,
    peek_config,
    student_config,
)
from ard.cli import (
    DefiningFlags,
    MissingFileError,
    UserError,
    add_dry_run_argument,
    diffusion_steps,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_dry_run,
)
from ard.data import EMBEDDED, data_identity, find_embedded, grey_levels, image_dataset, save_grid
from ard.fileio import file_sha256
from ard.gan import GANSettings, GANStage
from ard.generation import teacher_flow
from ard.seeding import rank_seed, step_seed
from ard.training import (
    StepBatchSampler,
    TrainingRun,
    due,
    list_checkpoints,
    lr_factor,
    requires_grad,
    update_ema,
)
from ard.trajectory_store import (
    BOUNDARY_SCHEDULES,
    DEFAULT_STUDENT_STEPS,
    TARGETS,
    TrajectoryDataset,
    TrajectoryStore,
    collate_batch,
    resolve_boundaries,
    solver_timesteps,
    store_digest,
)
from ard.vae import load_vae, vae_decode
from ard_models import HISTORY_ATTENTION
from models import MODEL_CONFIGS


@torch.no_grad()
def validate(model, store_dataset, indices, device, batch_size=500):
    """Each step's MSE against its target on held-out trajectories, teacher-forced (TF: the inputs
    are the teacher's) and sampled (AR: the inputs are the student's own predictions, the way it
    samples); the last step's is the error of the sample against the teacher's sample."""
    model.eval()
    tf_steps, ar_steps, n = 0.0, 0.0, 0
    for b in range(0, len(indices), batch_size):
        inputs, targets, y = store_dataset.__getitems__(list(indices[b : b + batch_size]))
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        # (K,)
        tf_steps = tf_steps + (model(inputs, y) - targets).square().mean(dim=(2, 3, 4)).sum(0)
        ar = model.sample(inputs[:, 0], y)
        ar_steps = ar_steps + (ar - targets).square().mean(dim=(2, 3, 4)).sum(0)  # (K,)
        n += len(y)
    return {
        "val_tf_final_mse": tf_steps[-1].item() / n,
        "val_ar_final_mse": ar_steps[-1].item() / n,
        "val_tf_step_mse": (tf_steps / n).tolist(),
        "val_ar_step_mse": (ar_steps / n).tolist(),
    }


def load_store_teacher(args, store, device):
    """(teacher, its config, its sha256): the checkpoint that wrote the store, refused if it is
    another."""
    path = find_checkpoint(args.teacher_ckpt)
    sha256 = dist_util.broadcast_object(file_sha256(path) if dist_util.is_main() else None)
    if sha256 != store.manifest["teacher_sha256"]:
        raise UserError(
            f"the store {args.traj} was written by another teacher "
            f"({store.manifest.get('teacher_ckpt')}, sha256 "
            f"{str(store.manifest['teacher_sha256'])[:12]}...) than --teacher-ckpt "
            f"{args.teacher_ckpt} (sha256 {sha256[:12]}...): pass the teacher that wrote the store"
        )
    teacher, config = load_model(path, device, kind="dit")
    requires_grad(teacher, False)
    size = config["input_size"]
    store.check_model(
        shape=(config["in_channels"], size, size),
        num_classes=config["num_classes"],
        model=config["model"],
    )
    if args.history_layers > len(teacher.blocks):
        raise UserError(
            f"--history-layers {args.history_layers} exceeds the teacher's {len(teacher.blocks)} "
            "blocks"
        )
    return teacher, config, sha256


def load_init(args, boundaries):
    """The regression checkpoint that --init-ckpt (required by --gan) starts from, checked against
    this run; None without --init-ckpt."""
    if args.gan and not args.init_ckpt:
        raise UserError("--gan starts from a regression checkpoint: pass --init-ckpt")
    if not args.init_ckpt:
        return None
    init = load_checkpoint(args.init_ckpt)
    if not isinstance(init, dict) or init.get("config", {}).get("kind") != "ard":
        raise UserError(f"--init-ckpt {args.init_ckpt} is not a checkpoint of train_ard.py")
    config = init["config"]
    if config["boundaries"] != boundaries or config["history_layers"] != args.history_layers:
        raise UserError(
            f"--init-ckpt {args.init_ckpt} has boundaries {config['boundaries']} and "
            f"N={config['history_layers']}; pass the same --boundaries and --history-layers"
        )
    check_finite(init["ema"], args.init_ckpt)
    return init


def resolve_gan_settings(args, teacher_config, depth):
    """The GAN stage's settings from the flags, with their defaults that depend on the data: heads
    on every block, a translation by an eighth of the side in pixel space, dequantisation by one
    grey level, flips for image folders (an embedded dataset's images are not mirror-symmetric)."""
    if args.data not in EMBEDDED and not os.path.isdir(args.data):
        raise UserError(
            f"--data {args.data} does not exist (the GAN stage's real images: "
            f"{' or '.join(map(repr, EMBEDDED))} or an ImageFolder)"
        )
    learnt = teacher_config.get("data")
    if args.data != learnt and (args.data in EMBEDDED or learnt in EMBEDDED):
        raise UserError(
            f"--data {args.data} is not what the teacher learnt ({learnt}): the GAN stage's real "
            f"images must be the teacher's data; pass --data {learnt}"
        )
    if args.data in EMBEDDED:
        find_embedded(args.data)  # the files are there, before any work
    blocks = args.gan_blocks if args.gan_blocks is not None else list(range(depth))
    if not all(0 <= b < depth for b in blocks):
        raise UserError(f"--gan-blocks {args.gan_blocks} must be teacher blocks, 0 to {depth - 1}")
    pixel_side = teacher_config["input_size"] if teacher_config["space"] == "pixel" else 0
    augment = args.gan_augment if args.gan_augment is not None else pixel_side // 8
    dequantize = args.gan_dequantize
    if dequantize is None:
        dequantize = 2 / (grey_levels(args.data) - 1)  # one grey level of [-1, 1]
    return GANSettings(
        blocks=tuple(blocks),
        disc_lr=args.disc_lr,
        scale=args.gan_scale,
        max_weight=args.gan_max_weight,
        fixed_weight=args.gan_weight,
        warmup=args.gan_warmup,
        max_t=args.gan_max_t,
        augment=augment,
        flip=args.data not in EMBEDDED,
        dequantize=dequantize,
    )


def dry_run(args):
    """--dry-run: what this command would train, from the store's manifest and the checkpoints'
    configs alone: no network is loaded, no run folder touched."""
    store = TrajectoryStore(args.traj)
    teacher_config = peek_config(args.teacher_ckpt)
    if args.gan and not args.init_ckpt:
        raise UserError("--gan starts from a regression checkpoint: pass --init-ckpt")
    if args.init_ckpt and not os.path.isfile(args.init_ckpt):
        raise MissingFileError(f"--init-ckpt {args.init_ckpt} does not exist")
    flow = teacher_flow(store.manifest, store.manifest["num_sampling_steps"])
    grid = solver_timesteps(store.manifest)
    boundaries = args.boundaries or resolve_boundaries(
        store, grid, args.student_steps, args.boundary_schedule, flow
    )
    depth = MODEL_CONFIGS[teacher_config["model"].split("-")[1].split("/")[0]]["depth"]
    gan_settings = resolve_gan_settings(args, teacher_config, depth) if args.gan else None
    timesteps = [grid[s] for s in boundaries]
    config = student_config(
        teacher_config, timesteps[:-1], args.history_layers, boundaries, args.target, None, args.gan
    )
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(config).parameters())
    # A checkpoint holds the weights, the EMA and AdamW's two moments in fp32.
    per_checkpoint = 16 * parameters
    count = -(-args.max_steps // args.ckpt_every)
    kept = min(count, args.keep_last) if args.keep_last else count
    run_dir = args.run_dir or os.path.join(args.results_dir, "NNN-...")
    existing = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    print_dry_run(
        "train_ard.py",
        {
            "store": f"{args.traj}: {len(store):,} trajectories, solver steps {store.saved_steps}",
            "teacher": f"{args.teacher_ckpt}: {teacher_config['model']}",
            "boundaries (solver steps)": boundaries,
            "their timesteps": timesteps,
            "student": f"K={args.student_steps}, N={args.history_layers}, target {args.target}, "
            f"{parameters:,} parameters",
            "optimiser": f"AdamW lr {args.lr} ({args.lr_schedule}, warm-up {args.warmup_steps}), "
            f"weight decay {args.weight_decay}, clip {args.grad_clip}, EMA {args.ema_decay}",
            "budget": f"{args.max_steps:,} steps of {args.global_batch_size}, "
            f"precision {args.precision}",
            "GAN stage": gan_settings,
            "run folder": f"{run_dir}, "
            + (f"newest checkpoint {existing[-1][1]}" if existing else "no checkpoint yet"),
        },
        [(os.path.join(run_dir, "checkpoints"), kept * per_checkpoint)],
    )


def main(args):
    # Setup DDP and the run (new, or resumed; nothing is written before every check has passed):
    device = dist_util.setup(args.precision)
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the world size "
            f"{world_size}"
        )
    if args.dry_run:
        dry_run(args)
    run = TrainingRun(args, build_parser(), device)

    # The store, the teacher that wrote it, the boundaries, the GAN stage's start point:
    store = TrajectoryStore(args.traj)
    teacher, teacher_config, teacher_sha256 = load_store_teacher(args, store, device)
    if run.checkpoint is not None and run.checkpoint["config"]["teacher_sha256"] != teacher_sha256:
        raise UserError(
            f"--resume {args.resume} was distilled from another teacher than --teacher-ckpt "
            f"{args.teacher_ckpt}"
        )
    flow = teacher_flow(store.manifest, store.manifest["num_sampling_steps"])
    boundaries = args.boundaries or resolve_boundaries(
        store, solver_timesteps(store.manifest), args.student_steps, args.boundary_schedule, flow
    )
    dataset = TrajectoryDataset(store, boundaries, args.target)  # refuses steps the store lacks
    if args.val_count >= len(store):
        raise UserError(
            f"--val-count {args.val_count} leaves no training trajectories in a store of "
            f"{len(store)}"
        )
    init = load_init(args, boundaries)
    # Setup data (the batch of each step is a function of the step, so a resume continues exactly);
    # each rank reads its own shards of the store, a world of one for its sampler:
    local_indices = store.rank_indices(range(len(store) - args.val_count), rank, world_size)
    sampler = StepBatchSampler(
        len(local_indices),
        args.global_batch_size // world_size,
        seed=rank_seed(args.global_seed, rank),
        rank=0,
        world_size=1,
        start_step=run.start_step,
        num_steps=args.max_steps,
    )
    loader = torch.utils.data.DataLoader(
        TrajectoryDataset(store, boundaries, args.target, indices=local_indices),
        batch_sampler=sampler,
        collate_fn=collate_batch,
        num_workers=0,
    )
    # The GAN stage's settings and the real images it shows its discriminator:
    gan_settings = None
    if args.gan:
        gan_settings = resolve_gan_settings(args, teacher_config, len(teacher.blocks))
        if args.data in EMBEDDED:
            image_size = teacher_config["input_size"]
        else:
            image_size = args.image_size or teacher_config.get("image_size")
        real_data = image_dataset(args.data, image_size)
        real_sampler = StepBatchSampler(
            len(real_data),
            args.global_batch_size,
            args.global_seed,
            rank,
            world_size,
            start_step=run.start_step,
            num_steps=args.max_steps,
        )
    # A VAE for the real latents of the GAN stage and to decode the sample grids:
    latent = teacher_config["space"] == "latent" and (args.gan or args.sample_every)
    vae = load_vae(teacher_config["vae"], device) if latent else None
    run.start(
        f"ARD-{teacher_config['model'].replace('/', '-')}-N{args.history_layers}",
        subfolders=["samples"],
        progress_name="distil",
    )
    val_indices = list(range(len(store) - args.val_count, len(store)))
    run.logger.info(
        f"Store {args.traj}: {len(store):,} trajectories ({len(val_indices)} held out), boundaries "
        f"{boundaries} (solver steps), input timesteps {dataset.timesteps}, target {args.target}"
    )

    # Create the student (from the teacher; for the GAN stage, from the regression checkpoint):
    config = student_config(
        teacher_config,
        dataset.timesteps,
        args.history_layers,
        boundaries,
        args.target,
        teacher_sha256,
        args.gan,
    )
    torch.manual_seed(args.global_seed)
    student = build_model(config, history_attention=args.history_attention)
    student.load_teacher(teacher.state_dict())
    if init is not None:
        student.load_state_dict(init["ema"])
    student = student.to(device)
    ema = deepcopy(student).eval()  # the EMA starts from the initial weights
    requires_grad(ema, False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if run.checkpoint is not None:
        student.load_state_dict(run.checkpoint["model"])
        ema.load_state_dict(run.checkpoint["ema"])
        opt.load_state_dict(run.checkpoint["opt"])
    elif init is not None and "opt" in init:
        opt.load_state_dict(init["opt"])  # the regression stage's moments, this run's lr and decay
        for group in opt.param_groups:
            group.update(lr=args.lr, weight_decay=args.weight_decay)
    ddp = dist_util.wrap_ddp(student, device)  # the student itself in a world of one
    if args.compile:
        ddp = torch.compile(ddp)
    lr_scale = lr_factor(args.lr_schedule, args.warmup_steps, args.max_steps)
    run.logger.info(
        f"Student {teacher_config['model']}, K={student.num_steps}, N={args.history_layers}: "
        f"{sum(p.numel() for p in student.parameters()):,} parameters"
    )

    # The GAN stage: discriminator heads on the frozen teacher, and the real images they see:
    gan = None
    if gan_settings is not None:
        real_loader = torch.utils.data.DataLoader(
            real_data,
            batch_sampler=real_sampler,
            num_workers=0 if args.data in EMBEDDED else args.num_workers,
            worker_init_fn=run.stop.ignore_in_worker,
        )
        real_batches = iter(real_loader)  # draws from the global RNG, before the heads are made
        gan = GANStage(
            teacher,
            teacher_config,
            gan_settings,
            real_batches,
            device,
            vae,
            args.precision,
            run.checkpoint,
        )
        run.logger.info(f"GAN stage: {gan_settings}")

    # Fixed noise and labels for the sample grids:
    num_shown = min(student.num_classes, 10)
    side, channels = student.input_size, student.in_channels
    generator = torch.Generator().manual_seed(args.global_seed)
    fixed_noise = torch.randn(num_shown * 4, channels, side, side, generator=generator).to(device)
    fixed_y = (torch.arange(len(fixed_noise)) % num_shown).to(device)

    # Training loop:
    ddp.train()
    run.begin_loop()
    for step, (inputs, targets, y) in enumerate(loader, start=run.start_step):
        torch.manual_seed(step_seed(args.global_seed, step, rank))  # every random draw of the step
        inputs, targets, y = inputs.to(device), targets.to(device), y.to(device)
        if args.history_noise:
            # The history the student will see when it samples is its own, not the teacher's:
            history = inputs[:, 1:]
            inputs = torch.cat(
                [inputs[:, :1], history + args.history_noise * torch.randn_like(history)], 1
            )
        with dist_util.autocast(device, args.precision):
            pred = ddp(inputs, y)  # (B, K, C, H, W): step k predicts the target of step k
            step_mse = (pred.float() - targets).square().mean(dim=(0, 2, 3, 4))  # (K,)
            loss = step_mse.mean()
        figures = dict(loss=loss.item(), step_mse=step_mse.tolist())
        if gan is not None:
            # The fake: the student's own K-step sample, differentiable once lambda may be > 0.
            adversarial = step >= gan_settings.warmup
            with dist_util.autocast(device, args.precision):
                fake = (student.rollout if adversarial else student.sample)(inputs[:, 0], y)[:, -1]
            d = gan.discriminator_step(fake.detach(), y)
            weight, grad_reg, grad_gan = 0.0, 0.0, 0.0
            if adversarial:
                loss_gan = gan.generator_loss(fake, y)
                weight, grad_reg, grad_gan = gan.gan_weight(loss, loss_gan, student.last_layer)
                loss = loss + weight * loss_gan
            figures.update(d_loss=d.loss, gan_weight=float(weight), grad_reg=grad_reg)
            figures.update(grad_gan=grad_gan, d_real=d.real, d_fake=d.fake)
            figures.update(fake_min=fake.min().item(), fake_max=fake.max().item())
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        # Every rank stops on a NaN (of the discriminator too), before the student changes:
        run.check_finite(step, loss, grad_norm, *([d.loss] if gan is not None else []))
        opt.step()
        update_ema(ema, student, args.ema_decay)

        # Log (averaged over steps and ranks), validate, sample a grid, checkpoint or stop:
        train_steps = step + 1
        validation = None
        if args.val_count and due(train_steps, args.log_every, args.max_steps):
            if due(train_steps, args.val_every, args.max_steps):
                validation = validate(ema, dataset, val_indices, device)
        run.log(train_steps, figures, validation)
        if dist_util.is_main() and due(train_steps, args.sample_every, args.max_steps):
            samples = ema.sample(fixed_noise, fixed_y)[:, -1]
            samples = vae_decode(vae, samples) if vae is not None else samples
            save_grid(samples, run.path("samples", f"{train_steps:07d}.png"), nrow=num_shown)
        run.end_step(
            train_steps,
            checkpoint=lambda: {
                "model": student.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "config": config,
                "data": {"local_epoch": train_steps // sampler.steps_per_epoch},
                "rng": {
                    "scheme": "seeded per (global_seed, step, rank)",
                    "global_seed": args.global_seed,
                },
                **(gan.state_dict() if gan is not None else {}),
            },
        )
    run.finish()


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defining = DefiningFlags(parser)  # flags that define the run: a resume must agree on them
    defining.add_argument(
        "--traj",
        type=str,
        required=True,
        identify=store_digest,
        help="trajectory store written by train_teacher_traj.py (a resume compares what it holds)",
    )
    parser.add_argument(
        "--teacher-ckpt", type=str, required=True, help="the teacher that wrote the store"
    )
    defining.add_argument(
        "--history-layers",
        "--stack",
        dest="history_layers",
        type=non_negative_int,
        default=6,
        help="N, the lowest blocks that see the history (0 = step distillation); --stack is "
        "the public code's name",
    )
    parser.add_argument(
        "--history-attention",
        type=str,
        choices=list(HISTORY_ATTENTION),
        default="mask",
        help="how training computes the history blocks' block-causal attention (the same "
        "function): one masked attention, or one unmasked (flash-eligible on a GPU) attention "
        "per step",
    )
    defining.add_argument(
        "--target",
        type=str,
        choices=list(TARGETS),
        default="state",
        help="history and targets: ODE states x_t, or the teacher's x0 predictions",
    )
    defining.add_argument(
        "--student-steps",
        type=positive_int,
        default=None,
        metavar="K",
        was="num_steps",
        help="K, the student's steps (default 4, or as many as --boundaries give)",
    )
    defining.add_argument(
        "--boundaries",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="K + 1 solver steps of the teacher, from 0 (noise) to S (sample), e.g. 0 10 15 "
        "20 25; default: by --boundary-schedule",
    )
    defining.add_argument(
        "--boundary-schedule",
        type=str,
        choices=BOUNDARY_SCHEDULES,
        default="t",
        help="default boundaries evenly spaced in the timestep ('t') or in log-SNR ('logsnr')",
    )
    defining.add_argument(
        "--history-noise",
        type=non_negative_float,
        default=0.0,
        metavar="STD",
        help="Gaussian noise of this std (in the data's units) added to the teacher-forced inputs "
        "of steps 2..K while training, so the student does not lean on a history exactly the "
        "teacher's; the noise input and every target stay clean (beyond the paper; 0: off)",
    )
    TrainingRun.add_arguments(parser, "ARD-MODEL-NN")
    defining.add_argument(
        "--max-steps",
        when=lambda args: args.lr_schedule == "cosine",
        type=positive_int,
        default=300_000,
        help="optimiser steps of the whole run (resumed ones included)",
    )
    defining.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=64,
        help="trajectories per optimiser step, over all processes",
    )
    defining.add_argument(
        "--global-seed",
        type=non_negative_int,
        default=0,
        help="seed of the initial weights, the data order and every step",
    )
    defining.add_argument(
        "--lr",
        type=positive_float,
        default=1e-4,
        help="AdamW learning rate (the peak, with a schedule)",
    )
    defining.add_argument(
        "--lr-schedule",
        type=str,
        choices=["constant", "cosine"],
        default="constant",
        help="the learning rate over the run: constant (DiT's), or a cosine decay to 0 at "
        "--max-steps",
    )
    defining.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=0,
        help="linear learning-rate warm-up over these optimiser steps",
    )
    defining.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=0.0,
        help="AdamW weight decay of the student",
    )
    defining.add_argument(
        "--grad-clip",
        type=positive_float,
        default=1.0,
        help="clip the student's gradient norm to this",
    )
    defining.add_argument(
        "--ema-decay", type=cli.decay, default=0.9999, help="EMA decay per optimiser step"
    )
    defining.add_argument(
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
        help="EMA sample grid from fixed noise every this many steps (0: never)",
    )
    dist_util.add_precision_argument(parser, default="tf32")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model",
    )
    gan_group = parser.add_argument_group("GAN fine-tuning")
    gan_defining = DefiningFlags(gan_group, when=lambda args: args.gan)  # compared with --gan
    DefiningFlags(gan_group).add_argument(
        "--gan", action=argparse.BooleanOptionalAction, default=False, help="run the GAN stage"
    )
    DefiningFlags(gan_group).add_argument(
        "--init-ckpt",
        type=str,
        default=None,
        identify=file_sha256,
        help="start from this train_ard.py checkpoint's EMA weights (required by --gan) "
        "instead of the teacher",
    )
    gan_defining.add_argument(
        "--gan-blocks",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="teacher blocks with a head (default: all)",
    )
    gan_defining.add_argument(
        "--gan-scale",
        type=non_negative_float,
        default=0.5,
        help="lambda = scale * |grad L_reg| / |grad L_GAN| on the last head (the paper: 10)",
    )
    gan_defining.add_argument(
        "--gan-max-weight",
        type=non_negative_float,
        default=10.0,
        help="lambda is clamped to [0, this]",
    )
    gan_defining.add_argument(
        "--gan-weight",
        type=non_negative_float,
        default=None,
        help="a fixed lambda instead of the adaptive one (--gan-scale and --gan-max-weight "
        "then do not apply)",
    )
    gan_defining.add_argument(
        "--gan-warmup",
        type=non_negative_int,
        default=100,
        help="optimiser steps with lambda = 0, where the discriminator trains alone (the "
        "paper: 3000)",
    )
    gan_defining.add_argument(
        "--gan-max-t",
        type=diffusion_steps,
        default=300,
        help="real and fake x0 are diffused to t ~ U[0, this) (300: alpha-bar >= 0.4)",
    )
    gan_defining.add_argument(
        "--gan-augment",
        type=non_negative_int,
        default=None,
        help="random translation of real and fake by up to this many pixels (default: side / "
        "8 in pixel space, 0 in latent space)",
    )
    gan_defining.add_argument(
        "--gan-dequantize",
        type=non_negative_float,
        default=None,
        help="uniform noise of this width on the real images in [-1, 1] (default: one grey "
        "level, 2/16 for the digits' 17 levels, 2/255 for 8-bit images), so that the heads "
        "cannot tell real from fake by the levels",
    )
    gan_defining.add_argument(
        "--disc-lr",
        type=positive_float,
        default=2e-4,
        help="AdamW learning rate of the discriminator heads",
    )
    gan_defining.add_argument(
        "--data",
        type=str,
        default="digits",
        identify=data_identity,
        help="real data: 'digits', 'fashion' or an ImageFolder path",
    )
    gan_defining.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image size of --data (default: the teacher's)",
    )
    gan_group.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=4,
        help="data loader workers for an ImageFolder",
    )
    add_dry_run_argument(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.boundaries is not None:
        if args.student_steps is not None and args.student_steps != len(args.boundaries) - 1:
            parser.error(
                f"--student-steps {args.student_steps} disagrees with the "
                f"{len(args.boundaries) - 1} steps of --boundaries: drop one"
            )
        args.student_steps = len(args.boundaries) - 1
    elif args.student_steps is None:
        args.student_steps = DEFAULT_STUDENT_STEPS
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
