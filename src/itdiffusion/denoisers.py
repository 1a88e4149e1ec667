"""The denoiser protocol, the Gaussian channel, and exact (Bayes-optimal) denoisers.

Channel, in log-SNR ``a`` (``s = sigmoid(a)``, so ``1 - s = sigmoid(-a)``)::

    z = sqrt(s) x + sqrt(1 - s) eps,        eps ~ N(0, I)

A denoiser predicts the noise: ``eps_hat = denoiser(z, logsnr)`` with ``z`` shaped ``[B, *shape]`` like the
data and ``logsnr`` shaped ``[B]``. The matching data prediction is
``x_hat = (z - sqrt(1 - s) eps_hat) / sqrt(s) = sqrt(1 + e^-a) z - e^(-a/2) eps_hat``
(:func:`x_from_eps`), and ``||eps - eps_hat||^2 = e^a ||x - x_hat||^2``.

The exact denoisers below return the posterior mean ``E[eps | z]`` (the Bayes-optimal prediction under
squared error) and the exact ``log_prob(x)`` of their distribution, in nats per sample. They compute in
float64 whatever the input dtype and hand results back in the input's dtype; inputs of any shape
``[B, *shape]`` are flattened to ``[B, d]`` internally.

- :class:`Gaussian`: ``N(mean, cov)`` with a full covariance.
- :class:`GaussianMixture`: ``sum_k w_k N(m_k, diag(v_k))`` with isotropic (``v_k`` scalar) or diagonal
  components.
- :class:`Lattice`: a mixture of independent (per-coordinate) distributions on the grid
  ``low + delta * {0, ..., n-1}``; ``Lattice.discretize`` turns a diagonal Gaussian mixture into the
  lattice whose probabilities approximate ``p(x) delta^d`` on a fine grid.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
# Log-weights more than this below the largest are raised to it before exponentiating: their share is
# below e^-600 either way, and it keeps exp() away from denormal floats, which are ~50x slower on CPUs.
_LOG_FLOOR = 600.0


def _floor_log_weights(log_w: Tensor, dim: int) -> Tensor:
    return torch.maximum(log_w, log_w.amax(dim, keepdim=True) - _LOG_FLOOR)


@runtime_checkable
class Denoiser(Protocol):
    """``eps_hat = denoiser(z, logsnr)``: z ``[B, *shape]``, logsnr ``[B]`` -> eps_hat shaped like z."""

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------------------------------
# The channel
# ----------------------------------------------------------------------------------------------------


def _per_sample(logsnr: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample log-SNRs ``[B]`` to broadcast against ``like`` ``[B, ...]``."""
    return logsnr.reshape((-1,) + (1,) * (like.dim() - 1))


def noisy_channel(x: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
    """``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` with one log-SNR per sample."""
    a = _per_sample(logsnr, x)
    return torch.sigmoid(a).sqrt() * x + torch.sigmoid(-a).sqrt() * eps


def x_from_eps(z: Tensor, logsnr: Tensor, eps_hat: Tensor) -> Tensor:
    """Data prediction ``x_hat = (z - sqrt(sigmoid(-a)) eps_hat) / sqrt(sigmoid(a))`` of eps_hat."""
    a = _per_sample(logsnr, z)
    return (z - torch.sigmoid(-a).sqrt() * eps_hat) / torch.sigmoid(a).sqrt()


def _check_batch(z: Tensor, logsnr: Tensor, dim: int, name: str) -> tuple[Tensor, Tensor]:
    """Flatten ``z`` to float64 ``[B, d]`` and ``logsnr`` to float64 ``[B]``, with clear errors."""
    if z.dim() < 2:
        raise ValueError(f"{name}: z must be [B, *shape], got shape {tuple(z.shape)}")
    flat = z.reshape(z.shape[0], -1).to(torch.float64)
    if flat.shape[1] != dim:
        raise ValueError(f"{name}: z has {flat.shape[1]} dimensions per sample, the distribution has {dim}")
    a = torch.as_tensor(logsnr, device=z.device).to(torch.float64).reshape(-1)
    if a.numel() == 1 and flat.shape[0] != 1:
        a = a.expand(flat.shape[0])
    if a.shape[0] != flat.shape[0]:
        raise ValueError(f"{name}: logsnr must have one value per sample ({flat.shape[0]}), got {a.shape[0]}")
    return flat, a


def _as_float64(t, device=None) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------------------------------
# Gaussian
# ----------------------------------------------------------------------------------------------------


class Gaussian:
    """``x ~ N(mean, cov)`` in d dimensions, with the exact noise posterior mean.

    In the covariance eigenbasis ``cov = U diag(lam) U^T`` the optimal noise prediction is
    ``E[eps | z] = sqrt(1-s) U diag(1 / (s lam + 1 - s)) U^T (z - sqrt(s) mean)``.
    ``log_prob(x) = -1/2 [d ln(2 pi) + sum ln lam + ||diag(lam)^-1/2 U^T (x - mean)||^2]`` (nats).
    """

    def __init__(self, mean, cov):
        self.mean = _as_float64(mean).reshape(-1)
        cov = _as_float64(cov)
        d = self.mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"Gaussian: cov must be [{d}, {d}] for a mean of {d} values, "
                             f"got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("Gaussian: cov must be symmetric")
        self.eigvals, self.eigvecs = torch.linalg.eigh(cov)
        if self.eigvals.min() <= 0:
            raise ValueError("Gaussian: cov must be positive definite "
                             f"(smallest eigenvalue {self.eigvals.min():.3g})")
        self.cov = cov
        self.dim = d

    def _coords(self, x_flat: Tensor) -> Tensor:
        return (x_flat - self.mean.to(x_flat.device)) @ self.eigvecs.to(x_flat.device)

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        flat, a = _check_batch(z, logsnr, self.dim, "Gaussian")
        s = torch.sigmoid(a)[:, None]
        centred = flat - s.sqrt() * self.mean.to(flat.device)
        lam = self.eigvals.to(flat.device)
        gain = torch.sigmoid(-a)[:, None].sqrt() / (s * lam + torch.sigmoid(-a)[:, None])
        u = self.eigvecs.to(flat.device)
        eps_hat = ((centred @ u) * gain) @ u.T
        return eps_hat.reshape(z.shape).to(z.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        y = self._coords(flat)
        lam = self.eigvals.to(flat.device)
        return -0.5 * (self.dim * LOG_2PI + lam.log().sum() + (y.square() / lam).sum(1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        xi = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.mean + (xi * self.eigvals.sqrt()) @ self.eigvecs.T


# ----------------------------------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------------------------------


class GaussianMixture:
    """``x ~ sum_k w_k N(m_k, diag(v_k))`` with exact posterior-mean noise prediction and log-density.

    ``means`` ``[K, d]`` (or ``[K, *shape]``), ``variances`` ``[K]`` (isotropic) or ``[K, d]`` (diagonal),
    ``weights`` ``[K]`` (normalised here). Given z, component k has likelihood
    ``N(z; sqrt(s) m_k, s v_k + 1 - s)`` and noise posterior mean
    ``sqrt(1-s) (z - sqrt(s) m_k) / (s v_k + 1 - s)``; the prediction mixes these by the responsibilities.
    """

    def __init__(self, means, variances, weights):
        means = _as_float64(means)
        self.means = means.reshape(means.shape[0], -1)
        k, d = self.means.shape
        variances = _as_float64(variances)
        if variances.dim() == 1 and variances.shape[0] == k:
            variances = variances[:, None].expand(k, d)
        variances = variances.reshape(k, -1)
        if variances.shape != (k, d):
            raise ValueError(f"GaussianMixture: variances must be [{k}] or [{k}, {d}], "
                             f"got {tuple(variances.shape)}")
        if variances.min() <= 0:
            raise ValueError("GaussianMixture: variances must be positive")
        weights = _as_float64(weights).reshape(-1)
        if weights.shape[0] != k or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"GaussianMixture: weights must be {k} non-negative numbers with a positive sum")
        self.variances = variances.contiguous()
        self.log_weights = (weights / weights.sum()).log()
        self.dim = d

    @property
    def mean(self) -> Tensor:
        """Mixture mean ``sum_k w_k m_k`` ``[d]``."""
        return self.log_weights.exp() @ self.means

    @property
    def covariance(self) -> Tensor:
        """Mixture covariance ``sum_k w_k (diag(v_k) + m_k m_k^T) - mean mean^T`` ``[d, d]``."""
        w = self.log_weights.exp()
        second = torch.diag(w @ self.variances) + (self.means * w[:, None]).T @ self.means
        mu = self.mean
        return second - torch.outer(mu, mu)

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        flat, a = _check_batch(z, logsnr, self.dim, "GaussianMixture")
        dev = flat.device
        s = torch.sigmoid(a)[:, None, None]
        one_minus_s = torch.sigmoid(-a)[:, None, None]
        m, v = self.means.to(dev)[None], self.variances.to(dev)[None]  # [1, K, d]
        total_var = s * v + one_minus_s  # [B, K, d]
        resid = flat[:, None, :] - s.sqrt() * m  # [B, K, d]
        log_lik = -0.5 * (LOG_2PI + total_var.log() + resid.square() / total_var).sum(-1)
        resp = torch.softmax(_floor_log_weights(self.log_weights.to(dev) + log_lik, 1), dim=1)  # [B, K]
        eps_k = one_minus_s.sqrt() * resid / total_var
        eps_hat = (resp[:, :, None] * eps_k).sum(1)
        return eps_hat.reshape(z.shape).to(z.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        dev = flat.device
        v = self.variances.to(dev)
        log_comp = -0.5 * (LOG_2PI + v.log() + (flat[:, None, :] - self.means.to(dev)).square() / v).sum(-1)
        return torch.logsumexp(self.log_weights.to(dev) + log_comp, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        xi = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + xi * self.variances[comp].sqrt()


# ----------------------------------------------------------------------------------------------------
# Lattice
# ----------------------------------------------------------------------------------------------------


class Lattice:
    """A distribution on the grid ``low + delta * {0, ..., n-1}`` in every coordinate.

    ``P(x) = sum_k w_k prod_i P_k,i(x_i)``: a mixture of K components, each independent across the d
    coordinates with its own probability table ``probs[k, i, :]`` over the n grid values. Components make
    the coordinates dependent; independence within a component keeps the exact posterior cheap:
    for grid value v the noise that would explain z is ``e(v) = (z - sqrt(s) v) / sqrt(1-s)``, so
    ``P(x_i = v | z, k) ~ P_k,i(v) exp(-e(v)^2 / 2)`` and ``E[eps | z] = sum_k r_k sum_v P(v | z, k) e(v)``
    with responsibilities ``r_k ~ w_k prod_i sum_v P_k,i(v) exp(-e(v)^2 / 2)``.

    ``probs``: ``[d, n]`` or ``[K, d, n]`` non-negative (each row normalised here); ``weights``: ``[K]``.
    """

    def __init__(self, probs, delta: float, low: float, weights=None):
        probs = _as_float64(probs)
        if probs.dim() == 2:
            probs = probs[None]
        if probs.dim() != 3:
            raise ValueError(f"Lattice: probs must be [d, n] or [K, d, n], got shape {tuple(probs.shape)}")
        if probs.min() < 0 or (probs.sum(-1) <= 0).any():
            raise ValueError("Lattice: probs must be non-negative with a positive sum in every row")
        if not delta > 0:
            raise ValueError(f"Lattice: delta must be positive, got {delta}")
        k, d, n = probs.shape
        weights = torch.ones(k, dtype=torch.float64) if weights is None else _as_float64(weights).reshape(-1)
        if weights.shape[0] != k or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"Lattice: weights must be {k} non-negative numbers with a positive sum")
        self.log_probs = (probs / probs.sum(-1, keepdim=True)).log()  # [K, d, n]
        self.log_weights = (weights / weights.sum()).log()
        self.delta, self.low, self.num_values, self.dim = float(delta), float(low), n, d
        self.values = self.low + self.delta * torch.arange(n, dtype=torch.float64)

    @property
    def interval(self) -> tuple[float, float]:
        """``(low, high)``: the smallest and largest grid values (the ``xinterval`` of the estimators)."""
        return self.low, self.low + self.delta * (self.num_values - 1)

    @classmethod
    def discretize(cls, mixture: GaussianMixture, delta: float, low: float, high: float) -> Lattice:
        """The lattice with ``P_k,i(v) ~ N(v; m_k,i, v_k,i)`` on ``low + delta * k`` up to ``high``.

        Where the grid is fine and covers the mass, ``P(x) ~ p(x) delta^d``: ``-ln P ~ -ln p - d ln delta``.
        """
        n = int(round((high - low) / delta)) + 1
        values = low + delta * torch.arange(n, dtype=torch.float64)
        m, v = mixture.means[:, :, None], mixture.variances[:, :, None]
        log_p = -0.5 * (values - m).square() / v  # [K, d, n], normalised by the constructor
        probs = (log_p - log_p.amax(-1, keepdim=True)).exp()
        return cls(probs, delta, low, weights=mixture.log_weights.exp())

    def _indices(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Grid index of every coordinate and whether the point lies on the grid."""
        pos = (flat - self.low) / self.delta
        idx = pos.round()
        on_grid = ((pos - idx).abs() < 1e-6) & (idx >= 0) & (idx < self.num_values)
        return idx.clamp(0, self.num_values - 1).long(), on_grid.all(1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``ln P(x)`` in nats; ``-inf`` for points off the grid."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"Lattice.log_prob: x has {flat.shape[1]} dimensions, "
                             f"the lattice has {self.dim}")
        idx, on_grid = self._indices(flat)
        lp = self.log_probs.to(flat.device)  # [K, d, n]
        per_coord = lp[:, torch.arange(self.dim, device=flat.device)[None, :], idx]  # [K, B, d]
        log_p = torch.logsumexp(self.log_weights.to(flat.device)[:, None] + per_coord.sum(-1), dim=0)
        return torch.where(on_grid, log_p, torch.full_like(log_p, -math.inf))

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        flat, a = _check_batch(z, logsnr, self.dim, "Lattice")
        dev = flat.device
        s = torch.sigmoid(a)[:, None, None]
        noise_sd = torch.sigmoid(-a)[:, None, None].sqrt()
        e = (flat[:, :, None] - s.sqrt() * self.values.to(dev)) / noise_sd  # [B, d, n]
        log_joint = _floor_log_weights(self.log_probs.to(dev)[None] - 0.5 * e.square()[:, None], -1)
        # log_joint [B, K, d, n]: ln P_k,i(v) - e(v)^2 / 2
        log_marg = torch.logsumexp(log_joint, dim=-1)  # [B, K, d]
        resp = torch.softmax(_floor_log_weights(self.log_weights.to(dev) + log_marg.sum(-1), 1), dim=1)
        post = (log_joint - log_marg[..., None]).exp()  # P(v | z, k)
        eps_hat = torch.einsum("bk,bkdn,bdn->bd", resp, post, e)
        return eps_hat.reshape(z.shape).to(z.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        probs = self.log_probs.exp()[comp].reshape(n * self.dim, self.num_values)
        idx = torch.multinomial(probs, 1, generator=generator).reshape(n, self.dim)
        return self.values[idx]
