"""Images in and out: the embedded digits, an ImageFolder with ADM's centre crop, and generated images
to uint8 batches and to PNG grids. The VAE is in vae.py."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ard.cli import MissingFileError, UserError

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
            raise UserError(f"unknown digits split {split!r}: use train, test or all")
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
        raise MissingFileError(f"data folder {path} does not exist (expected one sub-folder of images per class)")
    transform = transforms.Compose([
        transforms.Lambda(lambda pil_image: center_crop_arr(pil_image.convert("RGB"), image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    return datasets.ImageFolder(path, transform=transform)


#################################################################################
#                                  Images out                                   #
#################################################################################

def to_uint8(x):
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, 3), quantised as DiT's sample_ddp.py does;
    grey images are repeated to 3 channels."""
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Images in [-1, 1], (N, C, H, W), as one PNG grid; images under 64 pixels are enlarged with
    nearest-neighbour so the grid stays readable."""
    from torchvision.utils import save_image

    if images.shape[-1] < 64:
        images = F.interpolate(images, scale_factor=64 // images.shape[-1], mode="nearest")
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
