"""The ADM evaluator's Inception network, through torch-fidelity's port of the TF FID Inception
graph (weights-inception-2015-12-05-6726825d.pth, equal to the TF graph's; TF1-style bilinear resize
to 299x299, (x - 128) / 128). ADM's three outputs:

  pool      pool_3, (N, 2048)                                    FID, precision, recall
  spatial   mixed_6/conv (torchvision: Mixed_6d.branch1x1), first 7 of its 192 channels at 17x17,
            flattened in NHWC order, (N, 2023)                   sFID
  logits    pool_3 times the 2048x1008 logits weight, no bias, (N, 1008)   Inception Score
"""

import os

import numpy as np
import torch

from ard.cli import MissingFileError, UserError
from ard.fileio import file_sha256

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub's convention: the file name ends with the start of its sha256.
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
SPATIAL_CHANNELS = 7


def find_weights(path=None):
    """A local weights file: the given path, then ./pretrained_models/, then
    torch.hub's checkpoint cache."""
    candidates = (
        [path]
        if path
        else [
            os.path.join("pretrained_models", WEIGHTS_NAME),
            os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME),
        ]
    )
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise MissingFileError(
        f"the Inception weights were not found ({', '.join(c for c in candidates if c)}); download "
        f"{WEIGHTS_URL} into pretrained_models/ (or pass --inception-weights PATH)"
    )


def verify_weights(path):
    """Refuses any file but torch-fidelity's port of the TF FID Inception: another network gives
    figures that cannot be compared with ADM's."""
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise UserError(
            f"{path} is not {WEIGHTS_NAME} (its sha256 starts with {digest[:8]}, not "
            f"{WEIGHTS_SHA256_PREFIX}): download {WEIGHTS_URL}"
        )


def check_images(images):
    """uint8 (N, H, W, 3) numpy images, or one clear error."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        hint = (
            " (floats in [-1, 1] or [0, 1]? convert to uint8 0..255 first)"
            if images.dtype.kind == "f"
            else ""
        )
        raise UserError(
            f"the evaluator expects uint8 images with values 0..255, got {images.dtype}{hint}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"the evaluator expects images of shape (N, H, W, 3), got {images.shape}")
    return images


class InceptionFeatures:
    """pool (2048), spatial (2023) and logits (1008) of uint8 NHWC images, batch by batch."""

    def __init__(self, weights_path=None, device="cpu", verify=True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights_path = find_weights(weights_path)
        if verify:
            verify_weights(weights_path)
        # torch-fidelity unpickles the file without weights_only; refuse anything that is
        # not plain weights first.
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"{weights_path} is not a plain state dict (weights_only=True refused it): {e}"
            ) from e
        self.net = (
            FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights_path,
            )
            .to(device)
            .eval()
        )
        self.device = device
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # NHWC order, (N, 7*17*17)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def __call__(self, images, batch_size=100):
        """uint8 (N, H, W, 3) -> dict of float64 numpy arrays 'pool', 'spatial', 'logits'."""
        images = check_images(images)
        out = {"pool": [], "spatial": [], "logits": []}
        for start in range(0, len(images), batch_size):
            x = (
                torch.from_numpy(images[start : start + batch_size])
                .permute(0, 3, 1, 2)
                .to(self.device)
            )
            pool, logits = self.net(x)
            out["pool"].append(pool.double().cpu().numpy())
            out["logits"].append(logits.double().cpu().numpy())
            out["spatial"].append(self._spatial.double().cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}
