"""The feature networks of the embedded datasets: small CNN classifiers trained on the real training
images. Inception has no weights here and is far too big for 8x8 digits or 28x28 Fashion-MNIST; a
network of this kind plays its part for the same metric code (FID on its 128-d penultimate features,
precision/recall on them, class accuracy and an Inception-Score analogue from its 10-way logits).

    python -m evaluator.train_feature_net --data digits --out runs/digits/digits_net.pt
    python -m evaluator.train_feature_net --data fashion --out runs/fashion/fashion_net.pt

A network sees images as the evaluator does: uint8, grey, quantised exactly like generated
samples. It is trained and run in float64 on one thread (see train_feature_net), so that it is
the same network on any CPU.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ard.checkpoints import load_checkpoint
from ard.cli import MissingFileError, UserError
from ard.data import EMBEDDED, load_embedded, to_uint8


class FeatureNet(nn.Module):
    """conv 32 - conv 64 - fc 128 (the features) - fc 10 (the logits) on side x side grey images,
    2x2 max-pooled after the second convolution (8x8 digits: 4x4 left) or after both (28x28
    Fashion-MNIST: 7x7 left)."""

    feature_dim = 128

    def __init__(self, side, classes, pools):
        super().__init__()
        self.side, self.pools = side, pools
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (side // 2**pools) ** 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, classes)

    def forward(self, x):
        """x: (N, 1, S, S) in [-1, 1] -> (features (N, 128), logits (N, classes))."""
        h = F.relu(self.conv1(x))
        if self.pools == 2:
            h = F.max_pool2d(h, 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        features = F.relu(self.fc1(h.flatten(1)))
        return features, self.fc2(features)


NETS = {
    "digits": dict(side=8, classes=EMBEDDED["digits"][1], pools=1),
    "fashion": dict(side=28, classes=EMBEDDED["fashion"][1], pools=2),
}
# Training: epochs, batch size, the largest random shift in pixels (shape, not exact position,
# should make a feature).
TRAINING = {
    "digits": dict(epochs=40, batch_size=64, shift=1),
    "fashion": dict(epochs=8, batch_size=128, shift=2),
}


def uint8_to_input(images, side):
    """uint8 (N, S, S, 3) or (N, S, S) -> float64 (N, 1, S, S) in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"the feature network expects uint8 images, got {images.dtype}")
    if images.ndim == 4:
        images = images[..., 0]
    if images.shape[1:] != (side, side):
        raise UserError(f"the feature network expects {side}x{side} images, got {images.shape[1:]}")
    return torch.from_numpy(images.astype(np.float64) / 127.5 - 1.0)[:, None]


def real_uint8(data, split):
    """Real images of an embedded dataset's split, quantised like generated samples:
    (uint8 (N, S, S, 3), labels (N,))."""
    x, y = load_embedded(data, split)
    return to_uint8(x), y.numpy()


def train_feature_net(data="digits", epochs=None, seed=0):
    """The feature network of `data`, trained in float64 on one thread. Training amplifies a
    difference in the last bit of a sum into another network, and every real-data FID moves with
    the network (for the digits by 0.1-0.4 at an FID of 11, where the small teacher-fidelity FIDs
    moved by less than their last printed digit). In float32 the last bit depends on the thread
    count and on the CPU's kernels: trained with the AVX2 kernels of PyTorch, oneDNN or MKL instead
    of this machine's AVX-512 ones (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR), each gave
    another digits network. In float64 those differences start 1e9 times smaller and stay far below
    what any figure prints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(
            data,
            epochs or TRAINING[data]["epochs"],
            TRAINING[data]["batch_size"],
            TRAINING[data]["shift"],
            seed,
        )
    finally:
        torch.set_num_threads(threads)


def _train(data, epochs, batch_size, shift, seed):
    torch.manual_seed(seed)
    net = FeatureNet(**NETS[data]).double()
    images, labels = real_uint8(data, "train")
    x, y = uint8_to_input(images, net.side), torch.from_numpy(labels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            offsets = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=offsets, dims=(2, 3))
            loss = F.cross_entropy(net(batch)[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def test_accuracy(net, data):
    images, labels = real_uint8(data, "test")
    return float((features(net, images)[1].argmax(1) == labels).mean())


def load_feature_net(path):
    """(network, the dataset it was trained on) of a checkpoint of train_feature_net; a file without
    its dataset is a digits network of an earlier version (float32, which loads as it is)."""
    if not os.path.isfile(path):
        raise MissingFileError(
            f"no feature network at {path}: train one with "
            f"python -m evaluator.train_feature_net --out {path}"
        )
    ckpt = load_checkpoint(path)
    data = ckpt.get("data", "digits")
    if data not in NETS:
        raise UserError(
            f"{path} is a feature network of {data!r}, which this version does not know"
        )
    net = FeatureNet(**NETS[data]).double()
    net.load_state_dict(ckpt["model"])
    return net.eval(), data


@torch.no_grad()
def features(net, images, batch_size=2000):
    """uint8 images -> (features (N, 128), logits (N, 10)) as float64 numpy arrays."""
    x = uint8_to_input(images, net.side)
    feats, logits = zip(*(net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()
