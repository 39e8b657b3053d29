"""Samples a grid of images from a checkpoint, on CPU or GPU: a DiT teacher (train.py's or an official one)
or an ARD student (train_ard.py's; it samples in its own K steps, without guidance).

    python sample.py --ckpt results/000-DiT-T-2/checkpoints/0003000.pt            # digits teacher, DDIM-25, CFG 1.5
    python sample.py --ckpt results/001-ARD-DiT-T-2-N3/checkpoints/0001200.pt    # a student
    python sample.py --ckpt DiT-XL-2-256x256.pt --cfg-scale 4.0 --legacy-cfg --class-labels 207 360 387 974 88 979 417 279
    python sample.py --ckpt CKPT --sampler ddpm --num-sampling-steps 250

With few classes each column of the grid is one class; every image gets its noise
from --seed, so the same command draws the same grid.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from checkpoints import checkpoint_kind, load_dit, load_student
from diffusion import create_diffusion
from diffusion.ode import SOLVERS
from image_data import load_vae, vae_decode
from models import guided_model_fn


@torch.no_grad()
def teacher_sample(model, diffusion, noise, y, sampler="ddim", cfg_scale=1.5, legacy_cfg=False, clip_denoised=False):
    """Samples (N, C, H, W) from noise (N, C, H, W) and labels y (N,) with the given solver and guidance."""
    model_fn = guided_model_fn(model, cfg_scale, legacy_cfg)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, noise.shape, noise=noise, clip_denoised=clip_denoised,
                                       model_kwargs=dict(y=y), device=noise.device)
    return SOLVERS[sampler](diffusion, model_fn, noise, model_kwargs=dict(y=y), clip_denoised=clip_denoised)


def grid_labels(args, num_classes):
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class-labels {bad} are outside the model's {num_classes} classes")
        return args.class_labels
    return list(range(num_classes)) * args.per_class if num_classes <= 16 else list(range(0, num_classes, num_classes // 8))[:8]


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Load model:
    student = checkpoint_kind(args.ckpt) == "ard"
    model, config = (load_student if student else load_dit)(args.ckpt, device)
    vae = load_vae(args.vae or config["vae"], device) if config["space"] == "latent" else None
    diffusion = create_diffusion(str(args.num_sampling_steps))
    clip = config["space"] == "pixel"  # ADM's clip_denoised in pixel space; DiT does not clip latents

    # Sample:
    labels = grid_labels(args, config["num_classes"])
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), config["in_channels"], config["input_size"], config["input_size"], generator=generator)
    y = torch.tensor(labels, device=device)
    start = time.time()
    if student:
        samples = model.sample(noise.to(device), y)[:, -1]
    else:
        samples = teacher_sample(model, diffusion, noise.to(device), y, args.sampler, args.cfg_scale, args.legacy_cfg, clip)
    if vae is not None:
        samples = vae_decode(vae, samples)
    seconds = time.time() - start

    # Save and display images:
    if samples.shape[-1] < 64:  # tiny images: enlarge with nearest-neighbour so the grid is readable
        samples = F.interpolate(samples, scale_factor=64 // samples.shape[-1], mode="nearest")
    nrow = config["num_classes"] if config["num_classes"] <= 16 and not args.class_labels else min(len(labels), 8)
    save_image(samples, args.out, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
    how = (f"ARD student, {model.num_steps} steps, N={model.history_layers}" if student
           else f"{args.sampler}, {args.num_sampling_steps} steps, CFG {args.cfg_scale}")
    print(f"Saved {len(labels)} samples to {args.out}: {1000 * seconds / len(labels):.1f} ms per image on {device} ({how})")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True,
                        help="a checkpoint of train.py or train_ard.py, or an official DiT one (a path or DiT-XL-2-256x256.pt)")
    parser.add_argument("--sampler", type=str, choices=["ddim", "heun", "ddpm"], default="ddim",
                        help="deterministic DDIM (eta 0), Heun on the same ODE, or ancestral DDPM sampling")
    parser.add_argument("--num-sampling-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--legacy-cfg", action=argparse.BooleanOptionalAction, default=False,
                        help="guide only the first 3 noise channels, as official DiT does")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="labels to sample (default: every class)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class when the classes are few")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", type=str, default=None, help="override the checkpoint's VAE (latent models only)")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=str, default="sample.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
