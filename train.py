"""Trains a DiT teacher as facebookresearch/DiT's train.py does (AdamW 1e-4, no weight decay, EMA,
class dropout 0.1 for classifier-free guidance), on an embedded dataset (the digits, Fashion-MNIST)
or on an ImageFolder, in pixel space or in the latent space of the Stable Diffusion VAE.

    python train.py                          # the tiny digits teacher, on the CPU
    torchrun --nproc_per_node=2 train.py     # the same on two processes (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 \\
        --data /path/to/imagenet/train --image-size 256 --vae ema --global-batch-size 256 \\
        --ema-decay 0.9999 --max-steps 400000
    python train.py --resume results/000-DiT-T-2/checkpoints/0003000.pt --max-steps 6000
    python train.py --objective flow         # a flow-matching (velocity) teacher, as SiT and REPA

All the randomness of a step (noise, timesteps, class dropout, flips, VAE posterior samples) is
seeded by (global seed, step, rank) and the data order is a function of the step, so --resume
continues exactly where the checkpoint left off.
"""

import argparse
import math
from copy import deepcopy

import torch

from ard import cli, dist_util
from ard.checkpoints import build_model, teacher_config
from ard.cli import (
    DefiningFlags,
    UserError,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from ard.data import EMBEDDED, data_identity, image_dataset
from ard.generation import teacher_process
from ard.seeding import step_seed
from ard.training import StepBatchSampler, TrainingRun, lr_factor, requires_grad, update_ema
from ard.vae import VAE_DOWNSAMPLE, load_vae, vae_encode
from diffusion.flow import NOISE_AT, TIME_SCALE
from models import DiT_models


def model_shape(args, dataset):
    """(num_classes, in_channels, input_size) of the model that learns --data: an embedded dataset's
    grey pixels, RGB pixels, or the VAE's 4-channel latents at an eighth of the side."""
    if args.data in EMBEDDED:
        if args.vae is not None:
            raise UserError(
                f"{args.data} are small grey images and have no VAE latent space: drop --vae"
            )
        return EMBEDDED[args.data].num_classes, 1, args.image_size
    if args.vae is None:
        return len(dataset.classes), 3, args.image_size
    if args.image_size % VAE_DOWNSAMPLE:
        raise UserError(
            f"--image-size must be a multiple of {VAE_DOWNSAMPLE} to train in VAE latent space"
        )
    return len(dataset.classes), 4, args.image_size // VAE_DOWNSAMPLE


def main(args):
    # Setup DDP and the run (new, or resumed; nothing is written before every check has passed):
    device = dist_util.setup(args.precision)
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the world size "
            f"{world_size}"
        )
    run = TrainingRun(args, build_parser(), device)

    # Setup data (the batch of each step is a function of the step, so a resume continues exactly):
    dataset = image_dataset(args.data, args.image_size)
    num_classes, in_channels, input_size = model_shape(args, dataset)
    if len(dataset) < args.global_batch_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} exceeds the {len(dataset)} images of "
            f"--data {args.data}"
        )
    vae = load_vae(args.vae, device) if args.vae is not None else None
    run.start(args.model.replace("/", "-"))
    run.logger.info(
        f"Dataset {args.data}: {len(dataset):,} images of {num_classes} classes, model input "
        f"{in_channels}x{input_size}x{input_size}"
    )
    sampler = StepBatchSampler(
        len(dataset),
        args.global_batch_size,
        args.global_seed,
        rank,
        world_size,
        start_step=run.start_step,
        num_steps=args.max_steps,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=0 if args.data in EMBEDDED else args.num_workers,
        worker_init_fn=run.stop.ignore_in_worker,
        pin_memory=device.type == "cuda",
    )

    # Create model (the same initial weights on every rank), its EMA and the optimiser:
    flow = dict(prediction="velocity", noise_at=NOISE_AT, time_scale=TIME_SCALE)
    config = teacher_config(
        args.model,
        input_size,
        in_channels,
        num_classes,
        args.learn_sigma,
        "pixel" if vae is None else "latent",
        args.vae,
        args.image_size,
        args.data,
        **(flow if args.objective == "flow" else {}),
    )
    process = teacher_process(config)  # DiT's 1000-step diffusion, or the flow
    torch.manual_seed(args.global_seed)
    model = build_model(config, class_dropout_prob=args.class_dropout_prob).to(device)
    ema = deepcopy(model).eval()  # the EMA starts from the initial weights
    requires_grad(ema, False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    if run.checkpoint is not None:
        model.load_state_dict(run.checkpoint["model"])
        ema.load_state_dict(run.checkpoint["ema"])
        opt.load_state_dict(run.checkpoint["opt"])
    ddp = dist_util.wrap_ddp(model, device)
    if args.compile:
        ddp = torch.compile(ddp)
    lr_scale = lr_factor(args.lr_schedule, args.warmup_steps, args.max_steps)
    run.logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}")

    # Training loop:
    ddp.train()
    run.begin_loop()
    for step, (x, y) in enumerate(loader, start=run.start_step):
        torch.manual_seed(step_seed(args.global_seed, step, rank))  # every random draw of the step
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with dist_util.autocast(device, args.precision):
            if args.random_flip:
                flip = torch.rand(x.shape[0], device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if vae is not None:
                x = vae_encode(vae, x)  # a posterior sample of the latents, scaled as DiT's
            if args.objective == "flow":
                loss = process.training_loss(ddp, x, y).mean()  # velocity MSE at s ~ U[0, 1]
            else:  # DiT's: a uniform timestep per image, the hybrid MSE + VB loss
                t = torch.randint(0, process.num_timesteps, (x.shape[0],), device=device)
                loss = process.training_losses(ddp, x, t, dict(y=y))["loss"].mean()
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # DiT does not clip: the norm is measured (clipping at infinity) for the finiteness check.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        run.check_finite(step, loss, grad_norm)  # every rank stops, before the weights change
        opt.step()
        update_ema(ema, model, args.ema_decay)

        # Log (averaged over steps and ranks), checkpoint or stop:
        train_steps = step + 1
        run.log(train_steps, dict(loss=loss.item()))
        run.end_step(
            train_steps,
            checkpoint=lambda: {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "config": config,
                "data": {
                    "epoch": train_steps // sampler.steps_per_epoch,
                    "batch_in_epoch": train_steps % sampler.steps_per_epoch,
                },
                "rng": {
                    "scheme": "seeded per (global_seed, step, rank)",
                    "global_seed": args.global_seed,
                },
            },
        )
    run.finish()


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defining = DefiningFlags(parser)  # flags that define the run: a resume must agree on them
    defining.add_argument(
        "--data",
        type=str,
        default="digits",
        identify=data_identity,
        help="'digits' (the embedded default), 'fashion' (Fashion-MNIST from its idx files) or an "
        "ImageFolder path (one sub-folder per class)",
    )
    defining.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image side in pixels (default: the embedded dataset's own, 8 or 28; 256 for an "
        "ImageFolder; the digits resize)",
    )
    defining.add_argument(
        "--vae",
        type=str,
        default=None,
        help="train in the latent space of this VAE: 'ema', 'mse' (the SD VAEs), a hub id or a "
        "local folder",
    )
    defining.add_argument(
        "--model",
        type=str,
        choices=list(DiT_models.keys()),
        default="DiT-T/2",
        help="DiT config",
    )
    defining.add_argument(
        "--objective",
        type=str,
        choices=["ddpm", "flow"],
        default="ddpm",
        help="ddpm: DiT's noise prediction on its 1000-step diffusion; flow: velocity prediction "
        "on the linear interpolant x_t = (1 - t) x + t noise (flow matching, as SiT and REPA)",
    )
    defining.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn the variance (DiT's hybrid loss; default for ddpm); its output channels are "
        "ignored by DDIM",
    )
    defining.add_argument(
        "--class-dropout-prob",
        type=probability,
        default=0.1,
        help="label dropout for classifier-free guidance",
    )
    defining.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for image folders, off for the embedded "
        "datasets, which are not mirror-symmetric)",
    )
    TrainingRun.add_arguments(parser, "MODEL")
    defining.add_argument(
        "--max-steps",
        when=lambda args: args.lr_schedule == "cosine",
        type=positive_int,
        default=3000,
        help="optimiser steps of the whole run (resumed ones included)",
    )
    defining.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=128,
        help="images per optimiser step, over all processes",
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
        "--ema-decay", type=cli.decay, default=0.9999, help="EMA decay per optimiser step"
    )
    dist_util.add_precision_argument(parser, default="tf32")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model",
    )
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=4,
        help="data loader workers for image folders",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # Defaults that depend on other flags are resolved here, so that the saved arguments hold what a
    # resume must match:
    if args.image_size is None:
        args.image_size = EMBEDDED[args.data].side if args.data in EMBEDDED else 256
    if args.random_flip is None:
        args.random_flip = args.data not in EMBEDDED  # Fashion-MNIST's shoes all face one way
    if args.learn_sigma is None:
        args.learn_sigma = args.objective == "ddpm"
    elif args.learn_sigma and args.objective == "flow":
        parser.error(
            "a flow teacher predicts a velocity and has no variance to learn: drop --learn-sigma"
        )
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
