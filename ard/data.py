"""Images in and out: the embedded datasets (scikit-learn's digits, Fashion-MNIST from its idx
files), an ImageFolder with ADM's centre crop, and generated images to uint8 batches and to PNG
grids. The VAE is in vae.py."""

import gzip
import hashlib
import os
import shutil
import tempfile
from typing import Callable, NamedTuple

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
        parts = train_test_split(
            images, labels, test_size=DIGITS_HELD_OUT, stratify=labels, random_state=0
        )
        images, labels = (parts[0], parts[2]) if split == "train" else (parts[1], parts[3])
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
        x = x.clamp(-1, 1)
    return x, torch.from_numpy(np.ascontiguousarray(labels))


#################################################################################
#                 Fashion-MNIST, from its idx files where they are               #
#################################################################################

FASHION_CLASSES = 10
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Where the four idx files are looked for (each as it is or gzipped): the folder FASHION_MNIST_DIR
# names if it is set, then this repository's data/ folder, the layout torchvision's FashionMNIST
# downloads to, and Debian's dataset-fashion-mnist package.
FASHION_DIRS = ("data/fashion-mnist", "data/FashionMNIST/raw", "/usr/share/datasets/fashion-mnist")


def find_fashion_mnist(dirs=None):
    """The first folder that holds all four Fashion-MNIST idx files, or one sentence saying how to
    get them."""
    if dirs is None:
        dirs = (
            (os.environ["FASHION_MNIST_DIR"],) if os.environ.get("FASHION_MNIST_DIR") else ()
        ) + FASHION_DIRS
    for folder in dirs:
        if all(_idx_path(folder, name) for pair in FASHION_FILES.values() for name in pair):
            return folder
    raise MissingFileError(
        f"Fashion-MNIST's idx files are in none of {', '.join(dirs)}: install them with "
        f"'apt-get install dataset-fashion-mnist' (Debian), or download the four "
        f"*-ubyte.gz files of github.com/zalandoresearch/fashion-mnist into data/fashion-mnist/"
    )


def _idx_path(folder, name):
    for candidate in (name, f"{name}.gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path, reader):
    """torchvision's idx reader on a file, gunzipped into a temporary copy first if it is
    compressed."""
    if not path.endswith(".gz"):
        return reader(path)
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, os.path.basename(path)[:-3])
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return reader(plain)


def load_fashion_mnist(split="train", dirs=None):
    """Fashion-MNIST (60,000 training and 10,000 test images, 28x28 grey, 10 classes) as ((N, 1, 28,
    28) float32 in [-1, 1], (N,) int64), read with torchvision's idx reader. 'all' is both
    splits."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if split == "all":
        parts = [load_fashion_mnist(s, dirs) for s in ("train", "test")]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if split not in FASHION_FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: use train, test or all")
    folder = find_fashion_mnist(dirs)
    images_file, labels_file = (_idx_path(folder, name) for name in FASHION_FILES[split])
    try:
        images, labels = (
            _read_idx(images_file, read_image_file),
            _read_idx(labels_file, read_label_file),
        )
    except (AssertionError, OSError, RuntimeError, ValueError) as e:
        raise UserError(
            f"{images_file} or {labels_file} is not a readable idx file ({e}): the files are "
            "damaged"
        ) from e
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise UserError(
            f"{images_file} holds images of shape {tuple(images.shape)} and {labels_file} "
            f"{len(labels)} labels: not Fashion-MNIST"
        )
    x = images.to(torch.float32).div(127.5).sub(1.0).unsqueeze(1)  # 0..255 -> [-1, 1]
    return x, labels.to(torch.int64)


class Embedded(NamedTuple):
    """An embedded dataset: pixel space, one grey channel."""

    load: Callable  # load(split) -> (images in [-1, 1], labels)
    num_classes: int
    side: int  # image side in pixels
    grey_levels: int  # the distinct values a pixel takes


EMBEDDED = {
    "digits": Embedded(load_digits, DIGITS_CLASSES, 8, grey_levels=17),
    "fashion": Embedded(load_fashion_mnist, FASHION_CLASSES, 28, grey_levels=256),
}


def grey_levels(data):
    """How many values a pixel of --data takes: an embedded dataset's own count, 256 for 8-bit
    images."""
    return EMBEDDED[data].grey_levels if data in EMBEDDED else 256


def find_embedded(name):
    """Raises the one-sentence MissingFileError when an embedded dataset's files are missing (the
    digits ship with scikit-learn)."""
    if name == "fashion":
        find_fashion_mnist()


def load_embedded(name, split, image_size=None):
    """(images (N, 1, S, S) in [-1, 1], labels (N,)) of an embedded dataset at its own side, or at
    image_size (the digits resize; Fashion-MNIST comes at 28 only)."""
    loader, side = EMBEDDED[name].load, EMBEDDED[name].side
    if image_size in (None, side):
        return loader(split)
    if name != "digits":
        raise UserError(f"--image-size {image_size}: {name} comes at {side}x{side} only")
    return loader(split, image_size)


#################################################################################
#                          ImageFolder with ADM's centre crop               #
#################################################################################


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the image is at least twice the target,
    resize the short side to image_size with bicubic, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def image_folder(path, image_size):
    """A torchvision ImageFolder of RGB images, centre-cropped to image_size, as tensors in [-1, 1].
    Flips are left to the training loop, whose randomness is seeded per step."""
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise MissingFileError(
            f"data folder {path} does not exist (expected one sub-folder of images per class)"
        )
    transform = transforms.Compose(
        [
            transforms.Lambda(
                lambda pil_image: center_crop_arr(pil_image.convert("RGB"), image_size)
            ),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
        ]
    )
    return datasets.ImageFolder(path, transform=transform)


def image_dataset(data, image_size):
    """The training images of --data as a Dataset of (x in [-1, 1], label): an embedded dataset's
    training split, or an ImageFolder."""
    if data in EMBEDDED:
        return torch.utils.data.TensorDataset(*load_embedded(data, "train", image_size))
    return image_folder(data, image_size)


def data_identity(data):
    """What --data holds, as a string: an embedded dataset's name, or a hash of an ImageFolder's
    class folders and file names (not their bytes: reading 1.28 M ImageNet images to hash them would
    take longer than a resume is worth), so that a copy staged on another disk is the same data."""
    if data in EMBEDDED:
        return data
    if not os.path.isdir(data):
        raise MissingFileError(f"data folder {data} does not exist")
    digest = hashlib.sha256()
    for root, folders, files in os.walk(data):
        folders.sort()
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(root, name), data).encode() + b"\n")
    return digest.hexdigest()


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
