"""python -m evaluator REF.npz SAMPLE.npz: the ADM evaluator's figures for a batch of samples.

Both files are ADM-format .npz: `arr_0` uint8 images (N, H, W, 3), optionally `arr_1`
labels; a reference batch may instead (or also) hold precomputed `mu`, `sigma` (pool_3) and
`mu_s`, `sigma_s` (spatial), like ADM's VIRTUAL_imagenet256_labeled.npz. Precision and
recall need the reference images.

    python -m evaluator VIRTUAL_imagenet256_labeled.npz samples.npz
    python -m evaluator runs/digits/ref_test.npz samples.npz --features digits \
        --feature-net runs/digits/digits_net.pt
"""

import argparse
import os

import numpy as np

from ard import cli
from ard.cli import MissingFileError, UserError, check_output_path, non_negative_int
from ard.fileio import write_json
from evaluator.feature_net import NETS as EMBEDDED_NETS
from evaluator.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    two_set_figures,
)


def load_batch(path):
    """An ADM-format batch, checked: arr_0 uint8 images (N, H, W, 3); arr_1, if present, N integer
    labels; or, for a reference batch, precomputed statistics."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            batch = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npz batch ({e})") from e
    if "arr_0" in batch:
        images = batch["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(
                f"{path}: arr_0 must be uint8 images (N, H, W, 3), got "
                f"{images.dtype} {images.shape}"
            )
        if "arr_1" in batch:
            labels = batch["arr_1"]
            if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
                raise UserError(
                    f"{path}: arr_1 must hold one integer label per image, shape ({len(images)},), "
                    f"got {labels.dtype} {labels.shape}"
                )
    elif "mu" not in batch:
        raise UserError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma)")
    return batch


def evaluate_inception(ref, sample, weights=None, device="cpu", verify=True):
    from evaluator.inception import InceptionFeatures

    net = InceptionFeatures(weights, device, verify=verify)
    fake = net(sample["arr_0"])
    real = net(ref["arr_0"]) if "arr_0" in ref else None
    mu, sigma = (ref["mu"], ref["sigma"]) if "mu" in ref else feature_statistics(real["pool"])
    mu_s, sigma_s = (
        (ref["mu_s"], ref["sigma_s"]) if "mu_s" in ref else feature_statistics(real["spatial"])
    )
    results = {
        "inception_score": inception_score(fake["logits"], split_size=5000),
        "fid": frechet_distance(*feature_statistics(fake["pool"]), mu, sigma),
        "sfid": frechet_distance(*feature_statistics(fake["spatial"]), mu_s, sigma_s),
    }
    if real is not None:
        results["precision"], results["recall"] = precision_recall(real["pool"], fake["pool"], k=3)
    return results


def evaluate_embedded(ref, sample, net_path, data, teacher_ref=None, bootstrap=0):
    """The figures of an embedded dataset (`data`), with its feature network: against the real
    reference and, with teacher_ref, against the teacher's own samples of the same noises and labels
    (teacher fidelity, 'teacher_*')."""
    from evaluator.feature_net import features, load_feature_net

    net, net_data = load_feature_net(net_path)
    if net_data != data:
        raise UserError(
            f"{net_path} is the feature network of {net_data}, not of {data}: pass --features "
            f"{net_data} or another --feature-net"
        )
    if "arr_0" not in ref:
        raise UserError(f"the {data} reference batch must hold its images (arr_0)")
    real_f, _ = features(net, ref["arr_0"])
    fake_f, fake_logits = features(net, sample["arr_0"])
    results = two_set_figures(real_f, fake_f, bootstrap)
    results["inception_score"] = inception_score(fake_logits, splits=1)
    if "arr_1" in sample:
        results["class_accuracy"] = float((fake_logits.argmax(1) == sample["arr_1"]).mean())
    if teacher_ref is not None:
        teacher_f, _ = features(net, teacher_ref["arr_0"])
        results.update(
            {f"teacher_{k}": v for k, v in two_set_figures(teacher_f, fake_f, bootstrap).items()}
        )
    return results


NAMES = [
    ("inception_score", "Inception Score"),
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("class_accuracy", "Class accuracy"),
    ("teacher_fid", "FID against the teacher's samples"),
    ("teacher_precision", "Precision against the teacher's samples"),
    ("teacher_recall", "Recall against the teacher's samples"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ref_batch", help="reference batch (.npz)")
    parser.add_argument("sample_batch", help="sample batch (.npz)")
    parser.add_argument(
        "--features",
        choices=["inception", *EMBEDDED_NETS],
        default="inception",
        help="the feature network: ADM's Inception (ImageNet-scale images), or the network of an "
        "embedded dataset (8x8 digits, 28x28 Fashion-MNIST)",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="path to weights-inception-2015-12-05-6726825d.pth",
    )
    parser.add_argument(
        "--skip-weights-checksum",
        action="store_true",
        help="do not check the Inception weights' sha256: only for rehearsals with random weights "
        "(python -m benchmarks.imagenet_rehearsal); figures made with it mean nothing",
    )
    parser.add_argument(
        "--feature-net",
        default=None,
        help="with --features digits or fashion: the feature network, made by "
        "python -m evaluator.train_feature_net --data DATA --out PATH",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--teacher-ref",
        default=None,
        help="embedded datasets: also the figures against this batch, the teacher's samples of "
        "the same noises and labels",
    )
    parser.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=0,
        help="embedded datasets: 95%% intervals of FID, precision and recall over this "
        "many resamples of the samples",
    )
    args = parser.parse_args(argv)
    if args.features != "inception" and args.feature_net is None:
        parser.error(
            f"--features {args.features} needs --feature-net PATH (train one with "
            f"python -m evaluator.train_feature_net --data {args.features} --out PATH)"
        )
    return args


def main(args):
    if args.json:
        check_output_path(args.json, "--json")
    ref, sample = load_batch(args.ref_batch), load_batch(args.sample_batch)
    if "arr_0" not in sample:
        raise UserError(f"{args.sample_batch} holds no images (arr_0)")
    if args.features != "inception":
        teacher_ref = load_batch(args.teacher_ref) if args.teacher_ref else None
        if teacher_ref is not None and not np.array_equal(
            teacher_ref.get("arr_1"), sample.get("arr_1")
        ):
            raise UserError(
                f"--teacher-ref {args.teacher_ref} holds other labels than {args.sample_batch}: "
                f"sample both with the same --global-seed and --num-samples"
            )
        results = evaluate_embedded(
            ref, sample, args.feature_net, args.features, teacher_ref, args.bootstrap
        )
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.skip_weights_checksum:
            print(
                "WARNING: --skip-weights-checksum: the Inception weights were not checked to be "
                "ADM's; these figures mean nothing"
            )
        results = evaluate_inception(
            ref, sample, args.inception_weights, device, verify=not args.skip_weights_checksum
        )
    for key, name in NAMES:
        if key in results:
            interval = (
                f" (95% interval {results[key + '_ci'][0]:.4g} to {results[key + '_ci'][1]:.4g})"
                if key + "_ci" in results
                else ""
            )
            print(f"{name}: {results[key]}{interval}")
    if args.json:
        write_json(
            args.json,
            dict(
                results,
                ref=args.ref_batch,
                sample=args.sample_batch,
                features=args.features,
                weights_checksum_skipped=args.skip_weights_checksum,
                num_samples=int(len(sample["arr_0"])),
            ),
        )


if __name__ == "__main__":
    cli.run(main, parse_args)
