"""Fréchet distance between Gaussian fits of feature sets (the machinery behind FID).

Statistics accumulate as a sum and a sum of outer products in float64 and are summed across DDP ranks
by torchmetrics, so one process or many give the same mean and covariance (NVlabs/edm does the same).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (float64), from one eigen-decomposition."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    sqrt_sigma2: np.ndarray | None = None,
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    Tr (sigma1 sigma2)^(1/2) = sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sigma2^(1/2) sigma1 sigma2^(1/2) (it is similar to sigma1 sigma2): symmetric eigen-decompositions
    instead of scipy's general `sqrtm`, five times faster at 2048-d, no complex round-off, and exact
    for singular covariances (fewer samples than features) without nudging the diagonals. Pass
    `sqrt_sigma2 = sqrtm_psd(sigma2)` to reuse the reference's root across evaluations (half the work)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics disagree in shape: {mu1.shape} vs {mu2.shape}")
    root = sqrtm_psd(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
    m = root @ sigma1 @ root
    eig = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrised against round-off
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


class FeatureStatistics(Metric):
    """Running mean and covariance of (N, D) features, float64, all-reduced across ranks."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"expected features of shape (N, {self.num_features}), got {tuple(features.shape)}"
            )
        f = features.detach().to(torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.count.item()
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {int(n)}")
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def statistics_of(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of one feature tensor, with the same arithmetic as FeatureStatistics."""
    stats = FeatureStatistics(features.shape[1])
    stats.update(features)
    return stats.compute()
