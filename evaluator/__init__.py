"""Sample-quality metrics after the ADM evaluation protocol (openai/guided-diffusion, evaluations/):
FID, sFID, Inception Score, precision and recall, in PyTorch and numpy.

    # Inception features (ImageNet), as ADM prints them
    python -m evaluator REF.npz SAMPLE.npz
    # the digits feature network (embedded default)
    python -m evaluator REF.npz SAMPLE.npz --features digits
"""

from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall"]
