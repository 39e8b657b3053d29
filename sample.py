"""Samples a grid of images from a checkpoint, on CPU or GPU: a teacher (train.py's, an official
DiT, or a flow teacher: SiT, REPA, train.py --objective flow) or an ARD student (train_ard.py's; it
samples in its own K steps, without guidance).

    python sample.py --ckpt results/000-DiT-T-2/checkpoints/0003000.pt  # digits teacher, DDIM-25
    python sample.py --ckpt results/001-ARD-DiT-T-2-N3/checkpoints/0001200.pt  # a student
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 4.0 --legacy-cfg \\
        --class-labels 207 360 387 974 88 979 417 279
    python sample.py --ckpt CKPT --sampler ddpm --num-sampling-steps 250
    python sample.py --ckpt SiT-XL-2-256x256.pt --sampler heun --num-sampling-steps 13 \\
        --cfg-scale 4.0 --legacy-cfg

With few classes each column of the grid is one class; every image gets its noise
from --seed, so the same command draws the same grid.
"""

import argparse
import time

import torch

from ard import cli, dist_util
from ard.checkpoints import load_model
from ard.cli import UserError, check_output_path, non_negative_int, positive_int
from ard.data import save_grid
from ard.generation import (
    add_graph_argument,
    add_sampler_arguments,
    check_graph_device,
    sample_fn,
)
from ard.vae import load_vae, vae_decode


def grid_labels(args, num_classes):
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"--class-labels {bad} are outside the model's {num_classes} classes")
        return args.class_labels
    return (
        list(range(num_classes)) * args.per_class
        if num_classes <= 16
        else list(range(0, num_classes, num_classes // 8))[:8]
    )


def main(args):
    torch.set_grad_enabled(False)
    device = dist_util.setup(args.precision, args.device)
    check_graph_device(args, device)
    check_output_path(args.out, "--out")

    # Load model:
    model, config = load_model(args.ckpt, device)
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

    # Sample:
    labels = grid_labels(args, config["num_classes"])
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(
        len(labels),
        config["in_channels"],
        config["input_size"],
        config["input_size"],
        generator=generator,
    )
    start = time.time()
    with dist_util.autocast(device, args.precision):
        samples = generate(noise.to(device), torch.tensor(labels, device=device)).float()
    if vae is not None:
        samples = vae_decode(vae, samples)
    seconds = time.time() - start

    # Save and display images:
    nrow = (
        config["num_classes"]
        if config["num_classes"] <= 16 and not args.class_labels
        else min(len(labels), 8)
    )
    save_grid(samples, args.out, nrow)
    how = (
        f"ARD student, {model.num_steps} steps, N={model.history_layers}"
        if config["kind"] == "ard"
        else f"{args.sampler}, {args.num_sampling_steps} steps, CFG {args.cfg_scale}"
    )
    print(
        f"Saved {len(labels)} samples to {args.out}: {1000 * seconds / len(labels):.1f} ms per "
        f"image on {device} ({how})"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt",
        type=str,
        required=True,
        help="a checkpoint of train.py or train_ard.py, or an official DiT one (a path or "
        "DiT-XL-2-256x256.pt)",
    )
    add_sampler_arguments(parser, note="teachers only: ")
    add_graph_argument(parser)
    parser.add_argument(
        "--class-labels",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="labels to sample (default: every class)",
    )
    parser.add_argument(
        "--per-class",
        type=positive_int,
        default=8,
        help="samples per class when the classes are few",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the grid's noise")
    parser.add_argument(
        "--vae", type=str, default=None, help="override the checkpoint's VAE (latent models only)"
    )
    parser.add_argument(
        "--device", type=str, default=None, help="default: cuda if available, else cpu"
    )
    dist_util.add_precision_argument(parser, default="tf32")
    parser.add_argument("--out", type=str, default="sample.png", help="the PNG to write")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
