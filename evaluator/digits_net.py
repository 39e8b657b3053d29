"""The feature network of the embedded digits default: a small CNN classifier trained on the real training
digits. Inception has no weights here and is far too big for 8x8 images; this network plays its part for
the same metric code (FID on its 128-d penultimate features, precision/recall on them, class accuracy and
an Inception-Score analogue from its 10-way logits).

    python -m evaluator.train_digits_net --out runs/digits/digits_net.pt     # trains in seconds, prints its test accuracy

The network sees images as the evaluator does: uint8, grey, quantised exactly like generated samples. It is
trained and run in float64 (see train_digits_net), so that it is the same network on any CPU.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ard.checkpoints import load_checkpoint
from ard.cli import MissingFileError, UserError
from ard.data import DIGITS_CLASSES, load_digits, to_uint8


class DigitsNet(nn.Module):
    """conv 32 - conv 64 - pool - fc 128 (the features) - fc 10 (the logits), on 8x8 grey images."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, DIGITS_CLASSES)

    def forward(self, x):
        """x: (N, 1, 8, 8) in [-1, 1] -> (features (N, 128), logits (N, 10))."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        features = F.relu(self.fc1(h.flatten(1)))
        return features, self.fc2(features)


def uint8_to_input(images):
    """uint8 (N, 8, 8, 3) or (N, 8, 8) -> float64 (N, 1, 8, 8) in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"the digits network expects uint8 images, got {images.dtype}")
    if images.ndim == 4:
        images = images[..., 0]
    if images.shape[1:] != (8, 8):
        raise UserError(f"the digits network expects 8x8 images, got {images.shape[1:]}")
    return torch.from_numpy(images.astype(np.float64) / 127.5 - 1.0)[:, None]


def digits_uint8(split):
    """Real digits of a split, quantised like generated samples: (uint8 (N, 8, 8, 3), labels (N,))."""
    x, y = load_digits(split)
    return to_uint8(x), y.numpy()


def train_digits_net(epochs=40, batch_size=64, seed=0):
    """Trained in float64 on one thread. Training amplifies a difference in the last bit of a sum into another
    network after 40 epochs, and every real-data FID moves with the network (by 0.1-0.4 at an FID of 11, where
    the small teacher-fidelity FIDs move by less than their last printed digit). In float32 the last bit depends
    on the thread count and on the CPU's kernels: trained with the AVX2 kernels of PyTorch, oneDNN or MKL instead
    of this machine's AVX-512 ones (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR), each gave another network.
    In float64 those differences start 1e9 times smaller and stay far below what any figure prints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _train(epochs, batch_size, seed):
    torch.manual_seed(seed)
    images, labels = digits_uint8("train")
    x, y = uint8_to_input(images), torch.from_numpy(labels)
    net = DigitsNet().double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            # One-pixel random shifts make the features depend on shape, not on exact position.
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(batch)[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def test_accuracy(net):
    images, labels = digits_uint8("test")
    return float((net(uint8_to_input(images))[1].argmax(1).numpy() == labels).mean())


def load_digits_net(path):
    if not os.path.isfile(path):
        raise MissingFileError(f"no digits feature network at {path}: train one with "
                                f"python -m evaluator.train_digits_net --out {path}")
    net = DigitsNet().double()
    net.load_state_dict(load_checkpoint(path)["model"])  # a float32 network of an earlier version loads as it is
    return net.eval()


@torch.no_grad()
def digits_features(net, images, batch_size=2000):
    """uint8 images -> (features (N, 128), logits (N, 10)) as float64 numpy arrays."""
    x = uint8_to_input(images)
    feats, logits = zip(*(net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()
