"""The Gaussian reference ``N(mu, Sigma)`` that anchors the continuous IT estimate (nats, eps units).

``h_G = d/2 ln(2 pi e) + 1/2 sum_i ln lambda_i`` and ``mmse_G(a) = sum_i sigmoid(a + ln lambda_i)`` (Kong,
Brekelmans & Ver Steeg 2023); its linear (Bayes) decoder's error at a given image is known in closed form
(:meth:`GaussianReference.pointwise_mmse`), which makes the tails of the integral and the clamp exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI_E = math.log(2.0 * math.pi * math.e)


# Variance factor of the log-SNR proposal's scale, sqrt(1 + factor * var(ln lambda)). A logistic of scale s
# has variance s^2 pi^2 / 3, so 3 / pi^2 moment-matches a spread of variance var(ln lambda); ITD's code
# (kxh001/ITdiffusion, diffusionmodel.py, DiffusionModel.dataset_info) uses 3 / pi, a wider proposal.
ITD_VARIANCE_FACTOR = 3.0 / math.pi
MOMENT_VARIANCE_FACTOR = 3.0 / math.pi**2

# Eigenvalues of the data covariance below this (data units squared) are raised to it, so that ln lambda,
# the entropy and the proposal stay finite when N <= d or pixels are constant. For data on a lattice of
# spacing delta a natural floor is the quantisation variance delta^2 / 12 (pass min_eigval=...).
DEFAULT_MIN_EIGVAL = 1e-10

# Elements (values of a times eigenvalues) per chunk in :meth:`GaussianReference.mmse`: 2^22 float64 = 32 MB,
# so that no step holds an array that grows as images x points x d.
MMSE_CHUNK_ELEMENTS = 1 << 22


class GaussianReference:
    """The Gaussian ``N(mean, U diag(eigvals) U^T)`` that anchors the continuous estimate.

    Attributes: ``mean`` ``[d]`` (float64), ``eigvals`` ``[d]`` (floored at ``min_eigval``), ``eigvecs``
    ``[d, d]`` (columns; ``None`` for a diagonal reference, i.e. ``U = I``), ``shape`` (one sample's shape),
    ``dim`` (d).
    """

    def __init__(self, mean: Tensor, eigvals: Tensor, eigvecs: Tensor | None = None, shape=None,
                 min_eigval: float = DEFAULT_MIN_EIGVAL):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        d = self.mean.numel()
        eigvals = torch.as_tensor(eigvals, dtype=torch.float64, device=self.mean.device).reshape(-1)
        if eigvals.numel() != d:
            raise ValueError(f"GaussianReference: {eigvals.numel()} eigenvalues for a {d}-dimensional mean")
        self.eigvals = eigvals.clamp_min(min_eigval)
        self.eigvecs = None if eigvecs is None else torch.as_tensor(eigvecs, dtype=torch.float64,
                                                                    device=self.mean.device)
        if self.eigvecs is not None and self.eigvecs.shape != (d, d):
            raise ValueError(f"GaussianReference: eigvecs must be [{d}, {d}], "
                             f"got {tuple(self.eigvecs.shape)}")
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"GaussianReference: shape {self.shape} does not hold {d} values")
        self.min_eigval = float(min_eigval)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def log_eigvals(self) -> Tensor:
        return self.eigvals.log()

    @classmethod
    def from_data(cls, x: Tensor, diagonal: bool = False, min_eigval: float = DEFAULT_MIN_EIGVAL,
                  chunk_size: int = 4096) -> GaussianReference:
        """Mean and covariance spectrum of ``x`` ``[N, *shape]`` in float64.

        Full: ``eigh`` of the unbiased covariance ``Xc^T Xc / (N - 1)`` (accumulated over chunks of rows so
        N can be large); diagonal: per-coordinate variances (for large d where a d x d matrix is too much).
        """
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError("GaussianReference.from_data: need x of shape [N >= 2, *shape], "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        mean = flat.to(torch.float64).mean(0)
        if diagonal:
            var = sum((c.to(torch.float64) - mean).square().sum(0) for c in flat.split(chunk_size))
            return cls(mean, var / (n - 1), None, x.shape[1:], min_eigval)
        cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for c in flat.split(chunk_size):
            centred = c.to(torch.float64) - mean
            cov += centred.T @ centred
        eigvals, eigvecs = torch.linalg.eigh(cov / (n - 1))
        return cls(mean, eigvals, eigvecs, x.shape[1:], min_eigval)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, shape=None,
                     min_eigval: float = DEFAULT_MIN_EIGVAL) -> GaussianReference:
        """The reference with a given mean ``[d]`` and covariance ``[d, d]``."""
        eigvals, eigvecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
        return cls(mean, eigvals, eigvecs, shape, min_eigval)

    @property
    def entropy(self) -> float:
        """``h_G = d/2 ln(2 pi e) + 1/2 sum_i ln lambda_i`` (nats)."""
        return 0.5 * self.dim * LOG_2PI_E + 0.5 * self.log_eigvals.sum().item()

    def nll(self, x: Tensor) -> Tensor:
        """The reference's exact negative log-density at the images ``x`` ``[B, *shape]``, in nats ``[B]``:
        ``-ln N(x; mu, Sigma) = 1/2 [d ln(2 pi) + sum_i ln lambda_i + sum_i rho_i]`` with ``rho_i`` from
        :meth:`whiten_coords` (its mean over data with the reference's moments is :attr:`entropy`)."""
        const = 0.5 * self.dim * math.log(2.0 * math.pi) + 0.5 * self.log_eigvals.sum()
        return const + 0.5 * self.whiten_coords(x).sum(-1)

    def mmse(self, logsnr: Tensor) -> Tensor:
        """``mmse_G(a) = sum_i sigmoid(a + ln lambda_i)`` (eps units), elementwise over ``logsnr`` (any shape;
        evaluated in chunks, so memory does not grow with ``logsnr.numel() * d``)."""
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=self.mean.device)
        flat = a.reshape(-1)
        log_lam, counts = torch.unique(self.log_eigvals, return_counts=True)  # equal eigenvalues once
        counts = counts.to(torch.float64)
        step = max(1, MMSE_CHUNK_ELEMENTS // log_lam.numel())  # memory: step x d, whatever the count of a
        out = torch.cat([(torch.sigmoid(c[:, None] + log_lam) * counts).sum(-1) for c in flat.split(step)]) \
            if flat.numel() else flat.clone()
        return out.reshape(a.shape)

    def logsnr_loc_scale(self, variance_factor: float = ITD_VARIANCE_FACTOR) -> tuple[float, float]:
        """``loc = -mean(ln lambda)``, ``scale = sqrt(1 + variance_factor * var(ln lambda))``.

        Default: ITD's code (``3 / pi``); ``MOMENT_VARIANCE_FACTOR`` (``3 / pi^2``) moment-matches instead.
        The importance-sampled integral is unbiased either way; the wider default reaches the high log-SNRs
        where the discrete estimate's right tail becomes negligible (see :func:`right_tail_bound`).
        """
        log_lam = self.log_eigvals
        var = log_lam.var().item() if log_lam.numel() > 1 else 0.0
        return -log_lam.mean().item(), math.sqrt(1.0 + variance_factor * var)

    def whiten_coords(self, x: Tensor) -> Tensor:
        """``rho_i = (u_i^T (x - mean))^2 / lambda_i`` for every image ``x`` ``[B, *shape]`` -> ``[B, d]``."""
        flat = x.reshape(x.shape[0], -1).to(device=self.mean.device, dtype=torch.float64) - self.mean
        y = flat if self.eigvecs is None else flat @ self.eigvecs
        return y.square() / self.eigvals

    def pointwise_mmse(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """Expected eps-error of this reference's Bayes (linear) decoder at the image x, ``[B, K]``.

        With ``t_i = sigmoid(a + ln lambda_i)`` and ``rho_i`` from :meth:`whiten_coords`,
        ``E_eps ||eps - eps_hat_G||^2 = sum_i [rho_i t_i (1 - t_i) + t_i^2]``; its average over data with
        the reference's moments (``rho_i = 1``) is ``mmse_G(a)``.
        """
        rho = self.whiten_coords(x)  # [B, d]
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=self.mean.device).reshape(rho.shape[0], -1)
        out = torch.empty_like(a)
        for b in range(rho.shape[0]):  # one image at a time keeps memory at K x d
            t = torch.sigmoid(a[b, :, None] + self.log_eigvals)
            out[b] = (rho[b] * t * (1 - t) + t.square()).sum(-1)
        return out

    def decoder_errors(self, x: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
        """Eps-unit error of this reference's Bayes (linear) decoder on given samples ``[n]``.

        ``z = sqrt(s) x + sqrt(1 - s) eps`` with ``s = sigmoid(a)``; in the eigenbasis
        (``y = U^T (x - mean)``, ``e = U^T eps``) the decoder predicts
        ``eps_hat_i = (1 - t_i) (e^{a/2} y_i + e_i)`` with ``t_i = sigmoid(a + ln lambda_i)``, so
        ``||eps - eps_hat||^2 = sum_i (t_i e_i - (1 - t_i) e^{a/2} y_i)^2``.
        Its mean over eps is :meth:`pointwise_mmse`. ``x``, ``eps``: ``[n, *shape]``; ``logsnr``: ``[n]``.
        """
        dev = self.mean.device
        y = x.reshape(x.shape[0], -1).to(device=dev, dtype=torch.float64) - self.mean
        e = eps.reshape(eps.shape[0], -1).to(device=dev, dtype=torch.float64)
        if self.eigvecs is not None:
            y, e = y @ self.eigvecs, e @ self.eigvecs
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=dev).reshape(-1, 1)
        t = torch.sigmoid(a + self.log_eigvals)
        return (t * e - (1 - t) * (0.5 * a).exp() * y).square().sum(-1)

    def to(self, device) -> GaussianReference:
        return GaussianReference(self.mean.to(device), self.eigvals.to(device),
                                 None if self.eigvecs is None else self.eigvecs.to(device), self.shape,
                                 self.min_eigval)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "eigvals": self.eigvals.cpu(),
                "eigvecs": None if self.eigvecs is None else self.eigvecs.cpu(),
                "shape": list(self.shape), "min_eigval": self.min_eigval}

    @classmethod
    def from_state_dict(cls, state: dict) -> GaussianReference:
        missing = {"mean", "eigvals", "eigvecs", "shape"} - set(state)
        if missing:
            raise KeyError(f"GaussianReference.from_state_dict: missing {sorted(missing)}")
        return cls(state["mean"], state["eigvals"], state["eigvecs"], state["shape"],
                   state.get("min_eigval", DEFAULT_MIN_EIGVAL))

