"""Data for the teacher and the evaluators: the embedded digits, an ImageFolder with ADM's centre
crop, and the Stable Diffusion VAE that maps images to DiT's latent space."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VAE_SCALE = 0.18215  # latents are scaled to roughly unit variance, as in LDM and DiT
VAE_DOWNSAMPLE = 8  # the SD VAE maps 256x256x3 images to 32x32x4 latents
SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
DIGITS_CLASSES = 10
DIGITS_HELD_OUT = 360  # real digits never used for training: the reference set of the evaluators


#################################################################################
#                          The embedded default: digits                         #
#################################################################################

def load_digits(split="train", image_size=8):
    """scikit-learn's handwritten digits (1,797 real 8x8 grey images of 10 classes) as
    ((N, 1, S, S) float32 in [-1, 1], (N,) int64). 'train' and 'test' are a fixed stratified split
    (1,437 / 360 images); 'all' is both. image_size > 8 resizes bilinearly with antialiasing."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # grey levels 0..16 -> [-1, 1]
    labels = digits.target.astype(np.int64)
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"unknown digits split {split!r}: use train, test or all")
        parts = train_test_split(images, labels, test_size=DIGITS_HELD_OUT, stratify=labels, random_state=0)
        images, labels = (parts[0], parts[2]) if split == "train" else (parts[1], parts[3])
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1, 1)
    return x, torch.from_numpy(np.ascontiguousarray(labels))


#################################################################################
#                          ImageFolder with ADM's centre crop               #
#################################################################################

def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the image is at least twice the target, resize the
    short side to image_size with bicubic, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def image_folder(path, image_size):
    """A torchvision ImageFolder of RGB images, centre-cropped to image_size, as tensors in [-1, 1].
    Flips are left to the training loop, whose randomness is seeded per step."""
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder {path} does not exist (expected one sub-folder of images per class)")
    transform = transforms.Compose([
        transforms.Lambda(lambda pil_image: center_crop_arr(pil_image.convert("RGB"), image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    return datasets.ImageFolder(path, transform=transform)


#################################################################################
#                                  The VAE                                      #
#################################################################################

def load_vae(name_or_path, device="cpu"):
    """diffusers' AutoencoderKL from a local folder, an SD_VAES short name ('ema', 'mse') or a hub id."""
    from diffusers.models import AutoencoderKL

    source = SD_VAES.get(name_or_path, name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load the VAE {source!r}: it is neither a local folder nor in the Hugging Face cache, "
            f"and the hub could not be reached; pass --vae PATH to a folder saved with save_pretrained ({e})"
        ) from e
    return vae.to(device).eval()


@torch.no_grad()
def vae_encode(vae, x):
    """Images in [-1, 1], (N, 3, H, W) -> scaled latents (N, 4, H/8, W/8), sampled from the posterior."""
    return vae.encode(x).latent_dist.sample().mul_(VAE_SCALE)


@torch.no_grad()
def vae_decode(vae, z):
    """Scaled latents -> images in (about) [-1, 1]."""
    return vae.decode(z / VAE_SCALE).sample


def to_uint8(x):
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, 3), quantised as DiT's sample_ddp.py does;
    grey images are repeated to 3 channels."""
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()
