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

REFERENCES = ("real", "teacher")  # FID against the real images, and against the teacher's samples


def paired_fids(real, teacher, floor, students, resamples, seed=0):
    """FIDs of the teacher and of each student ({name: features}) against the real images and
    against the teacher's samples (the teacher's own figure there: its floor), at the samples
    themselves and at each of `resamples` paired resamples: (point, draws), each
    {reference: {model: FID}} (draws: a list of them)."""
    stats = {"real": feature_statistics(real), "teacher": feature_statistics(teacher)}
    models = {"real": dict(teacher=teacher, **students), "teacher": dict(teacher=floor, **students)}

    def fids(idx):
        return {
            ref: {
                name: frechet_distance(*feature_statistics(feats[idx]), *stats[ref])
                for name, feats in models[ref].items()
            }
            for ref in REFERENCES
        }

    count = len(teacher)
    rng = np.random.default_rng(seed)
    draws = [fids(rng.integers(0, count, count)) for _ in range(resamples)]
    return fids(np.arange(count)), draws


def ratio(fid, baseline="n0", model="ard"):
    """(FID_baseline - FID_teacher) / (FID_model - FID_teacher) of one {model: FID}."""
    return (fid[baseline] - fid["teacher"]) / (fid[model] - fid["teacher"])


def paired_comparison(point, draws, baseline, model):
    """{reference: ratio, its 95% percentile interval, FID_baseline - FID_model and its interval,
    and whether both students are clearly worse than the teacher (the 95% interval of each one's
    FID_student - FID_teacher above zero: else the ratio has no degradation to divide by)} of one
    seed, from paired_fids.

    Percentiles here, where one set's FID takes ± standard errors (metrics.range_interval): a
    resample's repeated samples raise every model's FID by about the same amount, so the bias that
    puts one set's draws all above its figure cancels in a difference of two FIDs of the same
    resampled indices, and nearly so in their ratio."""
    out = {}
    for ref in REFERENCES:
        ratios = [ratio(d[ref], baseline, model) for d in draws]
        differences = [d[ref][baseline] - d[ref][model] for d in draws]
        lowest_excess = min(
            np.percentile([d[ref][name] - d[ref]["teacher"] for d in draws], 2.5)
            for name in (baseline, model)
        )
        out[ref] = dict(
            ratio=ratio(point[ref], baseline, model),
            ratio_ci95=[float(v) for v in np.percentile(ratios, [2.5, 97.5])],
            difference=point[ref][baseline] - point[ref][model],
            difference_ci95=[float(v) for v in np.percentile(differences, [2.5, 97.5])],
            clearly_worse_than_teacher=bool(lowest_excess > 0),
        )
    return out


def paired_ratios(real, teacher, floor, n0, ard, resamples, seed=0):
    """The point estimate and each resample's: (ratio against the real images, against the
    teacher's samples)."""
    point, draws = paired_fids(real, teacher, floor, dict(n0=n0, ard=ard), resamples, seed)
    return [ratio(point[ref]) for ref in REFERENCES], np.array(
        [[ratio(d[ref]) for ref in REFERENCES] for d in draws]
    )


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
