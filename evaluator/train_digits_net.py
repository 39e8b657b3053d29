"""Trains the digits feature network (evaluator/digits_net.py) on the 1,437 real training digits, on one thread,
and prints its accuracy on the 360 held-out ones and a calibration of its FID.

    python -m evaluator.train_digits_net --out runs/digits/digits_net.pt
"""

import argparse

import numpy as np

from ard import cli
from ard.checkpoints import save_checkpoint
from ard.cli import check_output_path, non_negative_int, positive_int
from ard.data import load_digits
from evaluator.digits_net import digits_features, digits_uint8, test_accuracy, train_digits_net
from evaluator.metrics import feature_statistics, frechet_distance


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=str, required=True, help="where to save the network (.pt)")
    parser.add_argument("--epochs", type=positive_int, default=40, help="passes over the 1,437 training digits")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial weights and the data order")
    return parser.parse_args(argv)


def main(args):
    check_output_path(args.out, "--out")
    net = train_digits_net(args.epochs, seed=args.seed)
    accuracy = test_accuracy(net)
    save_checkpoint(args.out, {"model": net.state_dict(), "test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed})
    print(f"Saved the digits feature network to {args.out}; accuracy on the {len(load_digits('test')[1])} "
          f"held-out real digits: {100 * accuracy:.1f}%")
    # Calibration of its FID: two random halves of the real digits, and one half against uniform noise.
    images, _ = digits_uint8("all")
    perm = np.random.default_rng(args.seed).permutation(len(images))
    half_a, half_b = (digits_features(net, images[perm[i::2]])[0] for i in (0, 1))
    noise = np.random.default_rng(args.seed).integers(0, 256, (len(half_a), 8, 8, 3), dtype=np.uint8)
    stats_a = feature_statistics(half_a)
    print(f"FID between two halves of the real digits: {frechet_distance(*stats_a, *feature_statistics(half_b)):.2f}; "
          f"real half against uniform noise: {frechet_distance(*stats_a, *feature_statistics(digits_features(net, noise)[0])):.1f}")


if __name__ == "__main__":
    cli.run(main, parse_args)
