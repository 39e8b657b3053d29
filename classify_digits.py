"""Checks that a digits teacher draws the digit it is asked for: samples --per-class images of every
class and classifies them with a logistic-regression classifier trained on the real training digits.
Its accuracy on the held-out real digits is printed beside, as the ceiling to compare with.

    python classify_digits.py --ckpt runs/digits/teacher/checkpoints/0002000.pt
"""

import argparse
import json
import time

import numpy as np
import torch

from checkpoints import load_dit
from diffusion import create_diffusion
from image_data import DIGITS_CLASSES, load_digits
from sample import teacher_sample


def fit_digits_classifier():
    """A logistic-regression classifier on the real training digits; returns (classifier, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    clf = LogisticRegression(max_iter=5000, C=1.0)
    clf.fit(x_train.flatten(1).numpy(), y_train.numpy())
    return clf, float(clf.score(x_test.flatten(1).numpy(), y_test.numpy()))


def main(args):
    torch.set_grad_enabled(False)
    model, config = load_dit(args.ckpt)
    if config.get("data") != "digits" or config["input_size"] != 8:
        raise ValueError(f"{args.ckpt} is not an 8x8 digits model")
    clf, real_accuracy = fit_digits_classifier()

    diffusion = create_diffusion(str(args.num_sampling_steps))
    y = torch.arange(DIGITS_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    start = time.time()
    samples = torch.cat([
        teacher_sample(model, diffusion, noise[i : i + args.batch_size], y[i : i + args.batch_size], args.sampler,
                       args.cfg_scale, clip_denoised=True)
        for i in range(0, len(y), args.batch_size)
    ])
    seconds = time.time() - start
    pred = clf.predict(samples.clamp(-1, 1).flatten(1).numpy())
    accuracy = float(np.mean(pred == y.numpy()))
    result = dict(sample_accuracy=accuracy, real_held_out_accuracy=real_accuracy, samples=len(y),
                  sampler=args.sampler, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                  ms_per_image=1000 * seconds / len(y))
    print(json.dumps(result))
    print(f"Class accuracy of {len(y)} samples ({args.sampler}-{args.num_sampling_steps}, CFG {args.cfg_scale}): "
          f"{100 * accuracy:.1f}% (the same classifier on held-out real digits: {100 * real_accuracy:.1f}%)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="a digits teacher checkpoint of train.py")
    parser.add_argument("--sampler", type=str, choices=["ddim", "heun", "ddpm"], default="ddim")
    parser.add_argument("--num-sampling-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
