"""Trains a DiT teacher as facebookresearch/DiT's train.py does (AdamW 1e-4, no weight decay, EMA,
class dropout 0.1 for classifier-free guidance), on an embedded dataset (the digits, Fashion-MNIST) or on an ImageFolder, in pixel
space or in the latent space of the Stable Diffusion VAE.

    python train.py                                    # the tiny digits teacher, on the CPU
    torchrun --nproc_per_node=2 train.py               # the same on two processes (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data /path/to/imagenet/train \
        --image-size 256 --vae ema --global-batch-size 256 --ema-decay 0.9999 --max-steps 400000
    python train.py --resume results/000-DiT-T-2/checkpoints/0003000.pt --max-steps 6000
    python train.py --objective flow                   # a flow-matching (velocity) teacher, as SiT and REPA train

All the randomness of a step (noise, timesteps, class dropout, flips, VAE posterior samples) is seeded
by (global seed, step, rank) and the data order is a function of the step, so --resume continues
exactly where the checkpoint left off.
"""

import argparse

import torch

from ard import cli, dist_util
from ard.checkpoints import build_model, teacher_config
from ard.cli import UserError, non_negative_int, positive_int, probability
from ard.data import EMBEDDED, image_folder, load_embedded
from ard.logs import progress
from ard.preemption import StopRequest
from ard.seeding import step_seed
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
    stop_if_requested,
    stop_on_nonfinite,
    teacher_loss,
)
from ard.vae import VAE_DOWNSAMPLE, load_vae
from diffusion.flow import NOISE_AT, TIME_SCALE
from diffusion.sampling import teacher_process
from models import DiT_models

# Arguments that fix what is trained; a resumed run must agree with its checkpoint on them.
RUN_DEFINING_ARGS = (
    "model",
    "objective",
    "data",
    "image_size",
    "vae",
    "global_batch_size",
    "global_seed",
    "class_dropout_prob",
    "learn_sigma",
    "ema_decay",
    "lr",
    "lr_schedule",
    "warmup_steps",
)


def build_data(args):
    """(dataset, num_classes, in_channels, input_size) of --data."""
    if args.data in EMBEDDED:
        if args.vae is not None:
            raise UserError(
                f"{args.data} are small grey images and have no VAE latent space: drop --vae"
            )
        x, y = load_embedded(args.data, "train", args.image_size)
        return torch.utils.data.TensorDataset(x, y), EMBEDDED[args.data][1], 1, args.image_size
    dataset = image_folder(args.data, args.image_size)
    if args.vae is None:
        return dataset, len(dataset.classes), 3, args.image_size
    if args.image_size % VAE_DOWNSAMPLE:
        raise UserError(
            f"--image-size must be a multiple of {VAE_DOWNSAMPLE} to train in VAE latent space"
        )
    return dataset, len(dataset.classes), 4, args.image_size // VAE_DOWNSAMPLE


def main(args):
    # Setup DDP and check the inputs (a stop signal from here on saves the step in flight):
    stop = StopRequest(args.stop_signals)
    device = dist_util.setup(args.precision)
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world_size}"
        )
    if args.random_flip is None:
        args.random_flip = (
            args.data not in EMBEDDED
        )  # digits are not mirror-symmetric, and Fashion-MNIST's shoes all face one way
    dataset, num_classes, in_channels, input_size = build_data(args)
    if len(dataset) < args.global_batch_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} exceeds the {len(dataset)} images of --data {args.data}"
        )
    vae = load_vae(args.vae, device) if args.vae is not None else None
    ckpt = prepare_run(args, RUN_DEFINING_ARGS)
    run = Run(args, ckpt, args.model.replace("/", "-"))
    run.logger.info(
        f"Dataset {args.data}: {len(dataset):,} images of {num_classes} classes, model input {in_channels}x{input_size}x{input_size}"
    )

    # Setup data:
    sampler = StepBatchSampler(
        len(dataset),
        args.global_batch_size,
        args.global_seed,
        rank,
        world_size,
        run.start_step,
        args.max_steps,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=0 if args.data in EMBEDDED else args.num_workers,
        worker_init_fn=stop.ignore_in_worker,
        pin_memory=device.type == "cuda",
    )

    # Create model (the same initial weights on every rank):
    prediction = (
        dict(prediction="velocity", noise_at=NOISE_AT, time_scale=TIME_SCALE)
        if args.objective == "flow"
        else {}
    )
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
        **prediction,
    )
    torch.manual_seed(args.global_seed)
    trainer = Trainer(
        build_model(config, class_dropout_prob=args.class_dropout_prob),
        device,
        args.lr,
        ema_decay=args.ema_decay,
        compile=args.compile,
        state=ckpt,
        schedule=lr_schedule(args.lr_schedule, args.warmup_steps, args.max_steps),
        stop=stop,
    )
    run.logger.info(
        f"{args.model} parameters: {sum(p.numel() for p in trainer.raw.parameters()):,}"
    )

    def save(done):
        # The data position and the random state are functions of the step (see StepBatchSampler, ard/seeding.py).
        run.save(
            done,
            {
                **trainer.state_dict(),
                "config": config,
                "data": {
                    "epoch": done // sampler.steps_per_epoch,
                    "batch_in_epoch": done % sampler.steps_per_epoch,
                },
                "rng": {
                    "scheme": "seeded per (global_seed, step, rank)",
                    "global_seed": args.global_seed,
                },
            },
        )

    try:
        train_loop(args, run, trainer, loader, vae, device, save, teacher_process(config))
    except NonFiniteError as e:
        raise stop_on_nonfinite(run, e) from None
    run.logger.info("Done!")
    dist_util.cleanup()


def train_loop(args, run, trainer, loader, vae, device, save, diffusion):
    """DiT's training loop: the loss of each step (of DiT's 1000-step diffusion or the flow), logging and checkpoints."""
    trainer.model.train()
    run.logger.info(
        f"Training from step {run.start_step} to {args.max_steps}, global batch {args.global_batch_size}"
    )
    averager = MetricsAverager(device)
    bar = progress(args.max_steps, "train", initial=run.start_step)
    for step, (x, y) in enumerate(loader, start=run.start_step):
        torch.manual_seed(step_seed(args.global_seed, step, dist_util.rank()))
        with dist_util.autocast(device, args.precision):
            loss = teacher_loss(
                trainer.model,
                diffusion,
                x.to(device, non_blocking=True),
                y.to(device, non_blocking=True),
                vae,
                args.random_flip,
            )
        trainer.step(loss, step)
        averager.add([loss.item()])
        bar.update(1)
        done = step + 1
        if log_due(done, args.log_every, args.max_steps):
            (avg_loss,), steps_per_sec = averager.average()
            run.logger.info(
                f"(step={done:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}"
            )
            run.write_metrics({"step": done, "loss": avg_loss, "steps_per_sec": steps_per_sec})
            bar.set_postfix(loss=f"{avg_loss:.4f}")
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
        "--data",
        type=str,
        default="digits",
        help="'digits' (the embedded default), 'fashion' (Fashion-MNIST from its idx files) or an "
        "ImageFolder path (one sub-folder per class)",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image side in pixels (default: the embedded dataset's own, 8 or 28; 256 for an ImageFolder; "
        "the digits resize)",
    )
    parser.add_argument(
        "--vae",
        type=str,
        default=None,
        help="train in the latent space of this VAE: 'ema', 'mse' (the SD VAEs), a hub id or a local folder",
    )
    parser.add_argument(
        "--model", type=str, choices=list(DiT_models.keys()), default="DiT-T/2", help="DiT config"
    )
    parser.add_argument(
        "--objective",
        type=str,
        choices=["ddpm", "flow"],
        default="ddpm",
        help="ddpm: DiT's noise prediction on its 1000-step diffusion; flow: velocity prediction on the "
        "linear interpolant x_t = (1 - t) x + t noise (flow matching, as SiT and REPA)",
    )
    parser.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn the variance (DiT's hybrid loss; default for ddpm); its output channels are ignored by DDIM",
    )
    parser.add_argument(
        "--class-dropout-prob",
        type=probability,
        default=0.1,
        help="label dropout for classifier-free guidance",
    )
    parser.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for image folders, off for the embedded datasets)",
    )
    add_run_arguments(parser, "MODEL", "images", batch_size=128, max_steps=3000)
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=4,
        help="data loader workers for image folders",
    )
    args = parser.parse_args(argv)
    if (
        args.image_size is None
    ):  # resolved here, so that the saved arguments hold the size a resume must match
        args.image_size = EMBEDDED[args.data][2] if args.data in EMBEDDED else 256
    if args.learn_sigma is None:
        args.learn_sigma = args.objective == "ddpm"
    elif args.learn_sigma and args.objective == "flow":
        parser.error(
            "a flow teacher predicts a velocity and has no variance to learn: drop --learn-sigma"
        )
    return args


if __name__ == "__main__":
    cli.run(main, parse_args)
