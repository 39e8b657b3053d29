"""Trains the feature network of an embedded dataset (evaluator/feature_net.py) on its real
training images, in float64 on one thread, and prints its accuracy on the held-out test images and
a calibration of its FID.

    python -m evaluator.train_feature_net --data digits --out runs/digits/digits_net.pt    # seconds
    python -m evaluator.train_feature_net --data fashion --out runs/fashion/fashion_net.pt # minutes
"""

import argparse

import numpy as np

from ard import cli
from ard.checkpoints import save_checkpoint
from ard.cli import check_output_path, non_negative_int, positive_int
from ard.data import find_embedded
from evaluator.feature_net import (
    NETS,
    TRAINING,
    features,
    real_uint8,
    test_accuracy,
    train_feature_net,
)
from evaluator.metrics import feature_statistics, frechet_distance


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        choices=list(NETS),
        default="digits",
        help="the embedded dataset whose network to train",
    )
    parser.add_argument("--out", type=str, required=True, help="where to save the network (.pt)")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="passes over the training images (default: "
        + ", ".join(f"{k} {v['epochs']}" for k, v in TRAINING.items())
        + ")",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the initial weights and the data order",
    )
    return parser.parse_args(argv)


def main(args):
    check_output_path(args.out, "--out")
    find_embedded(args.data)
    epochs = args.epochs or TRAINING[args.data]["epochs"]
    net = train_feature_net(args.data, epochs, seed=args.seed)
    accuracy = test_accuracy(net, args.data)
    save_checkpoint(
        args.out,
        {
            "model": net.state_dict(),
            "data": args.data,
            "test_accuracy": accuracy,
            "epochs": epochs,
            "seed": args.seed,
        },
    )
    images, _ = real_uint8(args.data, "all")
    print(
        f"Saved the {args.data} feature network to {args.out}; accuracy on the "
        f"{len(real_uint8(args.data, 'test')[1]):,} held-out real images: {100 * accuracy:.1f}%"
    )
    # Calibration of its FID: two random halves of the real images, and one half
    # against uniform noise.
    perm = np.random.default_rng(args.seed).permutation(len(images))
    half_a, half_b = (features(net, images[perm[i::2]])[0] for i in (0, 1))
    noise = np.random.default_rng(args.seed).integers(
        0, 256, (len(half_a), *images.shape[1:]), dtype=np.uint8
    )
    stats_a = feature_statistics(half_a)
    print(
        "FID between two halves of the real images: "
        f"{frechet_distance(*stats_a, *feature_statistics(half_b)):.2f}; "
        "real half against uniform noise: "
        f"{frechet_distance(*stats_a, *feature_statistics(features(net, noise)[0])):.1f}"
    )


if __name__ == "__main__":
    cli.run(main, parse_args)
