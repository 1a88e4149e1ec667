"""Small exact distributions shared by the estimator tests (their log-likelihoods are the ground truth)."""

from __future__ import annotations

import torch

from itdiffusion.denoisers import GaussianMixture


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_mixture(d: int, seed: int, k: int = 4) -> GaussianMixture:
    """Well separated, unequal diagonal components: far from Gaussian, so the reference is wrong."""
    g = gen(seed)
    means = 1.5 * torch.randn(k, d, dtype=torch.float64, generator=g)
    variances = 0.3 + 0.7 * torch.rand(k, d, dtype=torch.float64, generator=g)
    return GaussianMixture(means, variances, torch.arange(1, k + 1, dtype=torch.float64))
