"""The metric formulas of the ADM evaluation protocol (openai/guided-diffusion,
evaluations/evaluator.py), on numpy arrays of features. Written for this repository; the
definitions are those of the papers:

  FID / sFID  Heusel et al., 2017: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), on pool_3 (FID)
              or on spatial mixed_6/conv features (sFID, Nash et al., 2021).
  IS          Salimans et al., 2016: exp(E_x KL(p(y|x) || p(y))), per split of consecutive samples,
              mean over splits.
  P / R       Kynkaenniemi et al., 2019: the fraction of one set inside the k-NN balls of the
              other set.
"""

import warnings

import numpy as np
from scipy import linalg

from ard.cli import UserError


def feature_statistics(features):
    """(mu, sigma) of (N, D) features, with np.cov as ADM does."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    When the product of the covariances is (nearly) singular, eps is added to both
    diagonals, as ADM does; imaginary parts of the matrix square root beyond 1e-3 are an
    error, smaller ones are dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(
            f"statistics of different shapes: {mu1.shape}/{sigma1.shape} vs "
            f"{mu2.shape}/{sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of covariances is singular; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=None, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) with p(y|x) = softmax(logits), over consecutive, unshuffled
    splits, averaged, as ADM computes it: splits of `split_size` samples (ADM: 5,000, so 10 splits
    for 50k), or `splits` splits of ceil(N / splits) samples. Takes logits (N, classes), like every
    output of the evaluator."""
    x = np.asarray(logits, dtype=np.float64)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    x /= x.sum(axis=1, keepdims=True)
    size = -(-len(x) // splits) if splits else split_size
    scores = []
    for start in range(0, len(x), size):
        part = x[start : start + size]
        p_y = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(p_y, 1e-30, None)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_sq_distances(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _knn_radii(features, k, block):
    """Squared distance of each point to its k-th nearest neighbour in the same
    set (itself excluded)."""
    radii = np.empty(len(features))
    for start in range(0, len(features), block):
        d = _pairwise_sq_distances(features[start : start + block], features)
        # index 0 is the point itself
        radii[start : start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points, manifold, radii, block):
    """The fraction of points inside at least one k-NN ball of the manifold."""
    inside = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), block):
        d = _pairwise_sq_distances(points[start : start + block], manifold)
        inside[start : start + block] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real_features, fake_features, k=3, block=10_000):
    """Improved precision and recall: precision is the fraction of fake samples within the
    real manifold (k-NN balls around real features), recall the fraction of real samples
    within the fake manifold."""
    real, fake = np.asarray(real_features), np.asarray(fake_features)
    if len(real) <= k or len(fake) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _coverage(fake, real, _knn_radii(real, k, block), block)
    recall = _coverage(real, fake, _knn_radii(fake, k, block), block)
    return precision, recall


def _resampled_precision_recall(real, fake, k, near=64):
    """A function of indices idx giving precision_recall(real, fake[idx], k), from distances
    computed once: which fakes lie in the real manifold does not depend on the resample, and the
    resample's own k-NN radii come from the fake-fake distances. For bootstrap intervals over many
    resamples of a few thousand samples (it holds the n x n distances, where precision_recall works
    in blocks and suits 50,000).

    A resample repeats points, so a point's k-NN radius within it is the k-th smallest (0-based,
    itself included) of its distances to the other points each counted as often as it was drawn.
    That order statistic is read off each point's `near` nearest neighbours, sorted once, by
    accumulating the draw counts along them: the same value as partitioning the resample's own n x n
    distances, at a fraction of the cost."""
    real, fake = np.asarray(real), np.asarray(fake)
    real_radii = _knn_radii(real, k, 10_000)
    fake_real = _pairwise_sq_distances(fake, real)  # (n_fake, n_real)
    in_real = (fake_real <= real_radii[None, :]).any(axis=1)
    fake_fake = _pairwise_sq_distances(fake, fake)
    near = min(near, len(fake))
    # (n, near): each point's nearest in order of distance, itself among them. A partial sort, a
    # tenth of a full one's time at 2,000 points: the order among equal distances may differ from a
    # full sort's, but no radius depends on it.
    nearest = np.argpartition(fake_fake, near - 1, axis=1)[:, :near]
    order = np.take_along_axis(
        nearest, np.argsort(np.take_along_axis(fake_fake, nearest, axis=1), axis=1), axis=1
    )
    near_d = np.take_along_axis(fake_fake, order, axis=1)

    def figures(idx):
        counts = np.bincount(idx, minlength=len(fake))
        drawn = np.flatnonzero(counts)
        # draws among each drawn point's nearest, cumulated
        reached = np.cumsum(counts[order[drawn]], axis=1)
        pos = (reached <= k).sum(axis=1)  # the first neighbour at which k + 1 draws are reached
        radii = np.empty(len(drawn))
        found = pos < near
        radii[found] = near_d[drawn[found], pos[found]]
        for j in np.flatnonzero(~found):  # its near nearest were hardly drawn: the whole row
            radii[j] = np.partition(fake_fake[drawn[j], idx], k)[k]
        recall = float((fake_real[drawn] <= radii[:, None]).any(axis=0).mean())
        return float(in_real[idx].mean()), recall

    return figures


def two_set_figures(real, fake, bootstrap=0, seed=0, k=3):
    """FID, precision and recall of `fake` features against `real` ones. With bootstrap > 0, also
    each figure's 95% interval from that many resamples (with replacement) of the fake set, the
    reference fixed: the spread that comes from drawing this many samples of the model
    (range_interval: ± 1.96 bootstrap standard errors, cut to the figure's range)."""
    out = {"fid": frechet_distance(*feature_statistics(fake), *feature_statistics(real))}
    out["precision"], out["recall"] = precision_recall(real, fake, k=k)
    if bootstrap:
        rng = np.random.default_rng(seed)
        real_stats = feature_statistics(real)
        resampled_pr = _resampled_precision_recall(real, fake, k)
        draws = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(fake), len(fake))
            draws.append(
                (frechet_distance(*feature_statistics(fake[idx]), *real_stats), *resampled_pr(idx))
            )
        draws = np.array(draws)
        for column, (name, bounded) in enumerate(
            (("fid", False), ("precision", True), ("recall", True))
        ):
            out[f"{name}_ci"] = range_interval(out[name], draws[:, column], bounded)
    return out


def range_interval(figure, draws, bounded, z=1.96):
    """The 95% interval of a figure from its bootstrap draws: the figure ± z bootstrap standard
    errors, cut to the figure's range, [0, inf) for FID and [0, 1] for a fraction (`bounded`); a
    figure outside its range by rounding (a FID of -1e-14, a set against itself) is its own end.

    Not the draws' percentiles nor BCa: a resample repeats samples, which raises FID by about as
    much as drawing the samples did (by about 1 at 2,000 digits, where a student's FID against its
    teacher is 0.4), so every draw can sit above the figure; the percentile interval then excludes
    the figure (0.82 to 2.26 for 0.40), the basic interval lies below 0, and BCa's bias correction
    (the normal quantile of the share of draws below the figure, 0) is minus infinity. Nor a normal
    interval on the log scale: near 0 the spread is larger than the figure, and its upper end is
    about eight times the figure (0.05 to 3.29 for 0.40) where no draw came near."""
    error = float(np.std(np.asarray(draws, dtype=np.float64), ddof=1))
    figure = float(figure)
    low = max(figure - z * error, min(0.0, figure))
    high = figure + z * error
    if bounded:
        high = min(high, max(1.0, figure))
    return [low, high]
