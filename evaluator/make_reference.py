"""Builds an ADM-format reference batch (arr_0 uint8 images, arr_1 labels) from a dataset.

    python -m evaluator.make_reference --data digits --split test --out runs/digits/ref_test.npz
    python -m evaluator.make_reference --data fashion --split test --out runs/fashion/ref_test.npz
    python -m evaluator.make_reference --data /data/imagenet/val --image-size 256 --num 50000 \
        --out ref_256.npz

Image folders are centre-cropped as ADM does (ard.data.center_crop_arr); the embedded datasets are
quantised exactly like generated samples (ard.data.to_uint8).
"""

import argparse

import numpy as np
import torch

from ard import cli
from ard.cli import check_output_path, positive_int
from ard.data import EMBEDDED, image_folder, load_embedded, to_uint8
from ard.fileio import save_npz


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="'digits', 'fashion' or an ImageFolder path")
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "test", "all"],
        help="split of an embedded dataset",
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=256, help="image folders: centre-crop size"
    )
    parser.add_argument(
        "--num",
        type=positive_int,
        default=None,
        help="at most this many images (a seeded random subset)",
    )
    parser.add_argument("--out", required=True, help="the .npz to write")
    return parser.parse_args(argv)


def main(args):
    check_output_path(args.out, "--out")
    if args.data in EMBEDDED:
        x, y = load_embedded(args.data, args.split)
        images, labels = to_uint8(x), y.numpy()
    else:
        dataset = image_folder(args.data, args.image_size)
        order = np.arange(len(dataset))
        if args.num is not None and args.num < len(dataset):
            order = np.sort(np.random.default_rng(0).choice(len(dataset), args.num, replace=False))
        items = [dataset[int(i)] for i in order]
        images = to_uint8(torch.stack([x for x, _ in items]))
        labels = np.array([y for _, y in items], dtype=np.int64)
    if args.num is not None and args.data in EMBEDDED:
        images, labels = images[: args.num], labels[: args.num]
    save_npz(args.out, arr_0=images, arr_1=labels.astype(np.int64))
    print(f"Saved {len(images)} reference images {images.shape[1:]} to {args.out}")


if __name__ == "__main__":
    cli.run(main, parse_args)
