"""The degradation ratio of one seed with its interval: (FID_N=0 - FID_teacher) / (FID_ARD -
FID_teacher), against the real test images and against the teacher's own samples, from a paired
bootstrap over samples.

Every sample file of a run draws sample i from the same noise and label, so resampling the indices
once and applying them to the teacher's, step distillation's and ARD's samples alike keeps the three
paired; the reference (the real test images, or the teacher's samples for teacher fidelity) stays
fixed, as in the evaluator's intervals. The teacher's figure is its FID against the real images, or,
against its own samples, its floor (its samples of other noises). The ratio is undefined where its
denominator nears zero (no degradation to compare), which shows as a wide or sign-changing interval.

    python -m experiments.degradation --run-dir runs/fashion --data fashion --target state
"""

import argparse
import os

import numpy as np

from ard import cli
from ard.cli import MissingFileError, check_output_path, non_negative_int, positive_int
from ard.fileio import write_json
from evaluator.__main__ import load_batch
from evaluator.feature_net import NETS, features, load_feature_net
from evaluator.metrics import feature_statistics, frechet_distance


def paired_ratios(real, teacher, floor, n0, ard, resamples, seed=0):
    """The point estimate and each resample's: (ratio against the real images, against the
    teacher's samples)."""
    real_stats, teacher_stats = feature_statistics(real), feature_statistics(teacher)

    def ratios(idx):
        fid_real = {
            model: frechet_distance(*feature_statistics(feats[idx]), *real_stats)
            for model, feats in (("teacher", teacher), ("n0", n0), ("ard", ard))
        }
        fid_teacher = {
            model: frechet_distance(*feature_statistics(feats[idx]), *teacher_stats)
            for model, feats in (("teacher", floor), ("n0", n0), ("ard", ard))
        }
        return [
            (fid["n0"] - fid["teacher"]) / (fid["ard"] - fid["teacher"])
            for fid in (fid_real, fid_teacher)
        ]

    count = len(n0)
    rng = np.random.default_rng(seed)
    draws = np.array([ratios(rng.integers(0, count, count)) for _ in range(resamples)])
    return ratios(np.arange(count)), draws


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-dir",
        required=True,
        help="the run folder of python -m experiments.digits or experiments.fashion",
    )
    parser.add_argument(
        "--data", choices=list(NETS), required=True, help="the run's embedded dataset"
    )
    parser.add_argument(
        "--target",
        default="state",
        choices=["state", "x0", "short"],
        help="which students: the state or x0 target, or the headroom rows",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the students' seed")
    parser.add_argument(
        "--history-layers", type=positive_int, default=3, help="ARD's N in the run's row names"
    )
    parser.add_argument("--resamples", type=positive_int, default=500, help="bootstrap resamples")
    parser.add_argument("--json", default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(args):
    if args.json:
        check_output_path(args.json, "--json")
    run = args.run_dir
    net_path = os.path.join(
        run, "digits_net.pt" if args.data == "digits" else f"{args.data}_net.pt"
    )
    prefix, target = ("short_", "state") if args.target == "short" else ("", args.target)
    names = {
        "teacher": "teacher_ddim25",
        "floor": "teacher_ddim25_s1",
        "n0": f"{prefix}k4_n0_{target}_s{args.seed}",
        "ard": f"{prefix}k4_n{args.history_layers}_{target}_s{args.seed}",
    }
    paths = {model: os.path.join(run, "samples", f"{name}.npz") for model, name in names.items()}
    missing = [
        path
        for path in (net_path, os.path.join(run, "ref_test.npz"), *paths.values())
        if not os.path.isfile(path)
    ]
    if missing:
        raise MissingFileError(f"{missing[0]} does not exist: run the experiment into {run} first")
    net, _ = load_feature_net(net_path)
    real = features(net, load_batch(os.path.join(run, "ref_test.npz"))["arr_0"])[0]
    feats = {k: features(net, load_batch(p)["arr_0"])[0] for k, p in paths.items()}
    point, draws = paired_ratios(
        real, feats["teacher"], feats["floor"], feats["n0"], feats["ard"], args.resamples, args.seed
    )
    out = {"names": names, "resamples": args.resamples}
    for i, against in enumerate(("real", "teacher")):
        lo, hi = np.percentile(draws[:, i], [2.5, 97.5])
        out[against] = {
            "ratio": point[i],
            "ci95": [float(lo), float(hi)],
            "bootstrap_std": float(draws[:, i].std(ddof=1)),
        }
        what = "real test images" if against == "real" else "teacher's samples"
        print(
            f"degradation ratio against the {what}: {point[i]:.2f}, 95% paired-bootstrap interval "
            f"[{lo:.2f}, {hi:.2f}] ({args.resamples} resamples)"
        )
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    cli.run(main, parse_args)
