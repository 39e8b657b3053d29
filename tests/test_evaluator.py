"""The evaluator: metric formulas against their definitions, the Inception
wrapper, the digits features."""

from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluator import frechet_distance, inception_score, precision_recall
from evaluator.metrics import feature_statistics


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-10
    )


def test_frechet_distance_of_full_covariances_matches_the_definition():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
    root = linalg.sqrtm(s1)  # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric form
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(
        s1 + s2 - 2 * linalg.sqrtm(root @ s2 @ root).real
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(rng.standard_normal((500, 8)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_stays_finite_and_real_with_singular_covariances():
    rng = np.random.default_rng(2)
    # 5 samples in 20-d: rank 2
    low_rank = rng.standard_normal((5, 2)) @ rng.standard_normal((2, 20))
    mu1, s1 = feature_statistics(low_rank)
    mu2, s2 = feature_statistics(low_rank[:, ::-1] + 1.0)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(value, float) and np.isfinite(value) and value > 0


def test_frechet_distance_offsets_the_diagonals_when_the_square_root_fails():
    sqrtm, calls = linalg.sqrtm, []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else sqrtm(matrix)

    s = np.diag([1.0, 0.0])
    with (
        mock.patch("evaluator.metrics.linalg.sqrtm", failing_once),
        pytest.warns(UserWarning, match="singular"),
    ):
        value = frechet_distance(np.zeros(2), s, np.zeros(2), s)
    assert len(calls) == 2 and np.allclose(
        calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2))
    )
    assert value == pytest.approx(0.0, abs=1e-5)


def test_precision_recall_identical_and_far_apart_sets():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 16))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_is_asymmetric_like_its_definition():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((400, 2))
    fake = real[:100] * 0.3  # collapsed to the centre of the real manifold: precise, poor recall
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95 and recall < 0.5


def one_hot_logits(labels, classes):
    """Logits whose softmax is one-hot to within 1e-12."""
    return np.log(np.clip(np.eye(classes)[labels], 1e-12, None))


def test_inception_score_of_uniform_one_hot_predictions_is_the_number_of_classes():
    assert inception_score(one_hot_logits(np.arange(1000) % 10, 10), splits=1) == pytest.approx(
        10.0, rel=1e-6
    )
    assert inception_score(
        one_hot_logits(np.zeros(1000, dtype=int), 10), splits=1
    ) == pytest.approx(1.0)


def test_inception_score_uses_consecutive_unshuffled_splits():
    logits = one_hot_logits(np.concatenate([np.arange(100) % 4, np.zeros(100, dtype=int)]), 4)
    assert inception_score(logits, splits=2) == pytest.approx((4.0 + 1.0) / 2, rel=1e-6)
    assert inception_score(logits, split_size=100) == pytest.approx(2.5, rel=1e-6)
    assert inception_score(logits[::-1], splits=2) == pytest.approx(2.5, rel=1e-6)
    shuffled = logits[np.random.default_rng(0).permutation(200)]
    # mixed splits (about 2.93): the order matters, as in ADM
    assert inception_score(shuffled, splits=2) > 2.8


def test_inception_score_takes_logits_and_is_invariant_to_a_shift_per_sample():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((300, 7))
    shifted = logits + rng.standard_normal((300, 1)) * 10  # softmax is unchanged by a per-row shift
    assert inception_score(logits, splits=3) == pytest.approx(
        inception_score(shifted, splits=3), rel=1e-10
    )


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    fid = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    # Build torch-fidelity's network without its download, with random weights, and
    # save them as a plain file.
    with (
        mock.patch.object(fid, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(
            fid.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None
        ),
    ):
        torch.manual_seed(0)
        net = fid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_wrapper_returns_adm_feature_shapes(random_inception_weights):
    from evaluator.inception import InceptionFeatures

    net = InceptionFeatures(random_inception_weights, verify=False)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = net(images, batch_size=2)
    assert (
        out["pool"].shape == (3, 2048)
        and out["spatial"].shape == (3, 2023)
        and out["logits"].shape == (3, 1008)
    )


def test_inception_wrapper_refuses_wrong_dtype_range_and_shape(random_inception_weights):
    from evaluator.inception import InceptionFeatures

    net = InceptionFeatures(random_inception_weights, verify=False)
    with pytest.raises(
        ValueError, match=r"uint8 images with values 0\.\.255, got float32 \(floats in \[-1, 1\]"
    ):
        net(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, 3\)"):
        net(np.zeros((2, 3, 32, 32), dtype=np.uint8))


def test_inception_weights_of_another_file_are_refused_by_their_hash(random_inception_weights):
    from evaluator.inception import InceptionFeatures

    with pytest.raises(
        ValueError,
        match=r"is not weights-inception-2015-12-05-6726825d\.pth \(its sha256 starts with",
    ):
        InceptionFeatures(random_inception_weights)


def test_missing_inception_weights_say_how_to_get_them(tmp_path):
    from evaluator.inception import find_weights

    with pytest.raises(
        FileNotFoundError, match="download https://github.com/toshas/torch-fidelity"
    ):
        find_weights(str(tmp_path / "absent.pth"))


@pytest.fixture(scope="module")
def digits_net():
    from evaluator.feature_net import test_accuracy, train_feature_net

    net = train_feature_net("digits", epochs=15)
    return net, test_accuracy(net, "digits")


def test_digits_feature_network_classifies_held_out_digits(digits_net):
    assert digits_net[1] > 0.9


def test_digits_fid_is_small_between_real_halves_and_large_against_noise(digits_net):
    from evaluator.feature_net import features, real_uint8

    net = digits_net[0]
    images, _ = real_uint8("digits", "all")
    perm = np.random.default_rng(0).permutation(len(images))
    a, b = features(net, images[perm[:900]])[0], features(net, images[perm[900:]])[0]
    noise = np.random.default_rng(1).integers(0, 256, (900, 8, 8, 3), dtype=np.uint8)
    n = features(net, noise)[0]
    fid_real = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    fid_noise = frechet_distance(*feature_statistics(a), *feature_statistics(n))
    assert fid_noise > 20 * fid_real, (fid_real, fid_noise)


def test_digits_network_is_the_same_whatever_kernels_the_cpu_runs(tmp_path):
    """Trained with PyTorch's, oneDNN's and MKL's AVX2 kernels instead of the machine's own, the
    network must be the same to 1e-10: in float32 (the earlier version) each of these alone gave
    another network, and every real-data FID moved by 0.1-0.4."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    code = (
        "import sys, torch; from evaluator.feature_net import train_feature_net; "
        "torch.save(train_feature_net('digits', epochs=3).state_dict(), sys.argv[1])"
    )
    avx2 = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2")
    nets = []
    for name, extra in (("own", {}), ("avx2", avx2)):
        path = tmp_path / f"{name}.pt"
        env = {k: v for k, v in os.environ.items() if k not in avx2}
        subprocess.run(
            [sys.executable, "-c", code, str(path)], cwd=ROOT, env={**env, **extra}, check=True
        )
        nets.append(torch.load(path, weights_only=True))
    for key, value in nets[0].items():
        assert value.dtype == torch.float64
        assert (nets[1][key] - value).abs().max() <= 1e-10 * value.abs().max(), key


def test_fashion_feature_network_trains_on_idx_files_and_refuses_the_digits_batches(
    tmp_path, monkeypatch
):
    from helpers import run_script, write_fashion_idx

    from ard.cli import UserError
    from evaluator.__main__ import evaluate_embedded
    from evaluator.feature_net import features, train_feature_net

    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    written = write_fashion_idx(tmp_path / "fashion", n_train=128, n_test=64)
    net = train_feature_net("fashion", epochs=1)
    feats, logits = features(net, np.repeat(written["test"][0][..., None], 3, axis=-1))
    assert feats.shape == (64, 128) and logits.shape == (64, 10) and feats.dtype == np.float64
    run_script(
        [
            "-m",
            "evaluator.train_feature_net",
            "--data",
            "fashion",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "net.pt"),
        ]
    )
    run_script(
        [
            "-m",
            "evaluator.make_reference",
            "--data",
            "fashion",
            "--split",
            "test",
            "--out",
            str(tmp_path / "ref.npz"),
        ]
    )
    with np.load(tmp_path / "ref.npz") as ref:
        batch = {k: ref[k] for k in ref.files}
    figures = evaluate_embedded(batch, batch, str(tmp_path / "net.pt"), "fashion")
    assert abs(figures["fid"]) < 1e-6 and figures["class_accuracy"] >= 0
    with pytest.raises(UserError, match="feature network of fashion"):
        evaluate_embedded(batch, batch, str(tmp_path / "net.pt"), "digits")


def test_bootstrap_intervals_hold_the_figure_and_stay_in_its_range():
    from evaluator.metrics import range_interval

    rng = np.random.default_rng(0)
    # A FID near 0 (a student against its teacher's samples) with a bootstrap spread as large as
    # itself, every draw above it: ±1.96 standard errors would go below 0, the percentiles would
    # exclude the figure.
    draws = 1.4 + 0.4 * rng.standard_normal(200)
    low, high = range_interval(0.4, draws, bounded=False)
    assert low == 0 and high > 0.4
    assert high == pytest.approx(0.4 + 1.96 * draws.std(ddof=1))
    # Fractions stay in [0, 1], a figure of exactly 1 included.
    for figure in (0.995, 1.0, 0.0, 0.003):
        low, high = range_interval(figure, figure + 0.01 * rng.standard_normal(200), True)
        assert 0 <= low <= figure <= high <= 1
    # A set against itself: 0 up to rounding, its own end.
    low, high = range_interval(-3e-14, draws, bounded=False)
    assert low == -3e-14 < high


def test_bootstrap_intervals_are_196_standard_errors_inside_the_range():
    from evaluator.metrics import range_interval

    draws = 12.0 + 0.35 * np.random.default_rng(1).standard_normal(500)
    error = draws.std(ddof=1)
    assert range_interval(12.0, draws, bounded=False) == pytest.approx(
        [12.0 - 1.96 * error, 12.0 + 1.96 * error]
    )
    draws = 0.56 + 0.012 * np.random.default_rng(2).standard_normal(500)
    error = draws.std(ddof=1)
    assert range_interval(0.56, draws, bounded=True) == pytest.approx(
        [0.56 - 1.96 * error, 0.56 + 1.96 * error]
    )


def test_two_set_figures_intervals_respect_each_figures_range():
    from evaluator.metrics import two_set_figures

    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 8))
    # A model close to the data: FID near 0, precision and recall near 1, where ± 1.96 standard
    # errors would leave the range.
    fake = real[rng.permutation(300)[:200]] + 0.01 * rng.standard_normal((200, 8))
    figures = two_set_figures(real, fake, bootstrap=20, seed=0)
    assert 0 <= figures["fid_ci"][0] <= figures["fid"] <= figures["fid_ci"][1]
    for name in ("precision", "recall"):
        low, high = figures[f"{name}_ci"]
        assert 0 <= low <= figures[name] <= high <= 1
    assert figures["precision"] > 0.9 and figures["fid_ci"][0] == 0
