"""The Stable Diffusion VAE that maps images to DiT's latent space (through
diffusers' AutoencoderKL)."""

import torch

from ard.cli import MissingFileError

VAE_SCALE = 0.18215  # latents are scaled to roughly unit variance, as in LDM and DiT
VAE_DOWNSAMPLE = 8  # the SD VAE maps 256x256x3 images to 32x32x4 latents
SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name_or_path, device="cpu"):
    """diffusers' AutoencoderKL from a local folder, an SD_VAES short name
    ('ema', 'mse') or a hub id."""
    from diffusers.models import AutoencoderKL

    source = SD_VAES.get(name_or_path, name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise MissingFileError(
            f"cannot load the VAE {source!r}: it is neither a local folder nor in the "
            "Hugging Face cache, and the hub could not be reached; pass --vae PATH to a folder "
            f"saved with save_pretrained ({e})"
        ) from e
    return vae.to(device).eval()


@torch.no_grad()
def vae_encode(vae, x):
    """Images in [-1, 1], (N, 3, H, W) -> scaled latents (N, 4, H/8, W/8),
    sampled from the posterior."""
    return vae.encode(x).latent_dist.sample().mul_(VAE_SCALE)


@torch.no_grad()
def vae_decode(vae, z):
    """Scaled latents -> images in (about) [-1, 1]."""
    return vae.decode(z / VAE_SCALE).sample
