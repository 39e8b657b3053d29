"""Trains a DiT teacher as facebookresearch/DiT's train.py does (AdamW 1e-4, no weight decay, EMA,
class dropout 0.1 for classifier-free guidance), on the embedded digits or on an ImageFolder, in pixel
space or in the latent space of the Stable Diffusion VAE.

    python train.py                                    # the tiny digits teacher, on the CPU
    torchrun --nproc_per_node=2 train.py               # the same on two processes (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data /path/to/imagenet/train \
        --image-size 256 --vae ema --global-batch-size 256 --ema-decay 0.9999 --max-steps 400000
    python train.py --resume results/000-DiT-T-2/checkpoints/0003000.pt --max-steps 6000

All the randomness of a step (noise, timesteps, class dropout, flips, VAE posterior samples) is seeded
by (global seed, step, rank) and the data order is a function of the step, so --resume continues
exactly where the checkpoint left off.
"""

import argparse
import json
import os
import time
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import dist_util
from checkpoints import load_checkpoint, save_checkpoint
from diffusion import create_diffusion
from image_data import VAE_DOWNSAMPLE, image_folder, load_digits, load_vae, vae_encode
from models import DiT_models
from train_utils import (StepBatchSampler, check_resume, create_logger, new_run_dir, optimizer_to, requires_grad,
                         update_ema, write_json)

# Arguments that fix what is trained; a resumed run must agree with its checkpoint on them.
RUN_DEFINING_ARGS = ("model", "data", "image_size", "vae", "global_batch_size", "global_seed",
                     "class_dropout_prob", "learn_sigma", "ema_decay", "lr")


def build_data(args):
    """(dataset, num_classes, in_channels, input_size) of --data."""
    if args.data == "digits":
        if args.vae is not None:
            raise ValueError("the digits are 8x8 grey images and have no VAE latent space: drop --vae")
        x, y = load_digits("train", args.image_size)
        return torch.utils.data.TensorDataset(x, y), 10, 1, args.image_size
    dataset = image_folder(args.data, args.image_size)
    if args.vae is None:
        return dataset, len(dataset.classes), 3, args.image_size
    if args.image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size must be a multiple of {VAE_DOWNSAMPLE} to train in VAE latent space")
    return dataset, len(dataset.classes), 4, args.image_size // VAE_DOWNSAMPLE


def training_loss(model, diffusion, x, y, vae=None, random_flip=False):
    """DiT's loss on one local batch of images x and labels y: random flips, VAE encoding, a uniform
    timestep per image, the hybrid MSE + VB loss. Draws from the global RNG, which the loop seeds."""
    if random_flip:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if vae is not None:
        x = vae_encode(vae, x)
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    return diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()


def main(args):
    # Setup DDP:
    device = dist_util.setup()
    rank, world_size = dist_util.rank(), dist_util.world_size()
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world_size}")
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    if args.random_flip is None:
        args.random_flip = args.data != "digits"  # digits are not mirror-symmetric

    # Resume, or set up a new run folder:
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        check_resume(args, ckpt, RUN_DEFINING_ARGS)
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    else:
        run_dir = args.run_dir or new_run_dir(args.results_dir, args.model.replace("/", "-"))
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    if dist_util.is_main():
        os.makedirs(checkpoint_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "args.json" if ckpt is None else f"args-resume-{ckpt['step']}.json"), vars(args))
    dist_util.barrier()
    logger = create_logger(run_dir)
    logger.info(f"Run folder {run_dir}, world size {world_size}, device {device}")

    # Setup data:
    dataset, num_classes, in_channels, input_size = build_data(args)
    start_step = ckpt["step"] if ckpt is not None else 0
    sampler = StepBatchSampler(len(dataset), args.global_batch_size, args.global_seed, rank, world_size,
                               start_step, args.max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0 if args.data == "digits" else args.num_workers,
                                         pin_memory=device.type == "cuda")
    vae = load_vae(args.vae, device) if args.vae is not None else None
    logger.info(f"Dataset {args.data}: {len(dataset):,} images of {num_classes} classes, model input {in_channels}x{input_size}x{input_size}")

    # Create model (the same initial weights on every rank):
    torch.manual_seed(args.global_seed)
    model = DiT_models[args.model](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                   class_dropout_prob=args.class_dropout_prob, learn_sigma=args.learn_sigma)
    ema = deepcopy(model)  # an EMA of the weights, used for sampling
    requires_grad(ema, False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
    model, ema = model.to(device), ema.to(device).eval()
    optimizer_to(opt, device)
    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=args.learn_sigma)  # 1000 steps, linear schedule
    logger.info(f"{args.model} parameters: {sum(p.numel() for p in raw_model.parameters()):,}")
    config = dict(kind="dit", model=args.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=args.learn_sigma, space="pixel" if vae is None else "latent", vae=args.vae,
                  image_size=args.image_size, data=args.data)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def save(step):
        if dist_util.is_main():
            path = os.path.join(checkpoint_dir, f"{step:07d}.pt")
            save_checkpoint(path, {
                "model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "args": vars(args), "config": config,
                # The data position and the random state are functions of the step (see StepBatchSampler, step_seed).
                "data": {"epoch": step // sampler.steps_per_epoch, "batch_in_epoch": step % sampler.steps_per_epoch},
                "rng": {"scheme": "seeded per (global_seed, step, rank)", "global_seed": args.global_seed},
            })
            logger.info(f"Saved checkpoint to {path}")
        dist_util.barrier()

    # Training loop:
    model.train()
    if ckpt is None:
        update_ema(ema, raw_model, decay=0)  # the EMA starts from the initial weights
    logger.info(f"Training from step {start_step} to {args.max_steps}, global batch {args.global_batch_size}")
    running_loss, log_steps, start_time = 0.0, 0, time.time()
    progress = tqdm(total=args.max_steps, initial=start_step, disable=not dist_util.is_main(), desc="train", dynamic_ncols=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    for step, (x, y) in enumerate(loader, start=start_step):
        torch.manual_seed(dist_util.step_seed(args.global_seed, step, rank))
        with autocast:
            loss = training_loss(model, diffusion, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                 vae, args.random_flip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, raw_model, args.ema_decay)

        running_loss += loss.item()
        log_steps += 1
        progress.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            avg_loss = dist_util.all_reduce_mean(running_loss / log_steps, device)
            steps_per_sec = log_steps / (time.time() - start_time)
            logger.info(f"(step={done:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}")
            if dist_util.is_main():
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": avg_loss, "steps_per_sec": steps_per_sec}) + "\n")
            progress.set_postfix(loss=f"{avg_loss:.4f}")
            running_loss, log_steps, start_time = 0.0, 0, time.time()
        if done % args.ckpt_every == 0 or done == args.max_steps:
            save(done)
    progress.close()
    logger.info("Done!")
    dist_util.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default="digits",
                        help="'digits' (the embedded default) or an ImageFolder path (one sub-folder per class)")
    parser.add_argument("--image-size", type=int, default=8, help="image side in pixels (digits: 8, resized if larger)")
    parser.add_argument("--vae", type=str, default=None,
                        help="train in the latent space of this VAE: 'ema', 'mse' (the SD VAEs), a hub id or a local folder")
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-T/2")
    parser.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                        help="learn the variance (DiT's hybrid loss); its output channels are ignored by DDIM")
    parser.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips (default: on for image folders, off for the digits)")
    parser.add_argument("--results-dir", type=str, default="results", help="new runs go to RESULTS_DIR/NNN-MODEL")
    parser.add_argument("--run-dir", type=str, default=None, help="use this run folder instead of a new numbered one")
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint of this script to continue from")
    parser.add_argument("--max-steps", type=int, default=3000, help="total optimiser steps (including resumed ones)")
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers for image folders")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--precision", type=str, choices=["fp32", "tf32", "bf16"], default="tf32",
                        help="on GPU: fp32, TF32 matmuls, or bf16 autocast")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
