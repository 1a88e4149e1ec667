"""The log-SNR proposal: a logistic truncated to ``[a_lo, a_hi]``, and the log-SNR that resolves a lattice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.information.reference import ITD_VARIANCE_FACTOR, GaussianReference

SAMPLING_MODES = ("stratified", "random", "grid")


@dataclass(frozen=True)
class LogSNRProposal:
    """Logistic(loc, scale) truncated to ``[loc - clip * scale, high]`` (``high`` defaults to
    ``loc + clip * scale``; a higher end lets the discrete estimate reach the SNRs that resolve a lattice).

    Density ``q(a) = sigmoid(u) sigmoid(-u) / (scale * mass)`` with ``u = (a - loc) / scale`` and
    ``mass = sigmoid(u_hi) - sigmoid(u_lo)`` the kept probability (``tanh(clip/2)`` when symmetric). Points
    come from the quantile function at ``p`` in [0, 1): ``random`` i.i.d. uniform p; ``stratified`` one
    uniform p in each of K equal-probability strata, ``p_k = (k + U_k) / K`` (unbiased, lower variance);
    ``grid`` the midpoints ``(k + 1/2) / K`` (deterministic points; quadrature error O(1/K^2) is not in
    the standard error).
    """

    loc: float
    scale: float
    clip: float = 4.0
    high: float | None = None

    def __post_init__(self):
        if not (self.scale > 0 and self.clip > 0):
            raise ValueError(f"LogSNRProposal: scale and clip must be positive, "
                             f"got {self.scale}, {self.clip}")
        if self.high is not None and not self.high > self.loc - self.clip * self.scale:
            raise ValueError(f"LogSNRProposal: high={self.high} is below the lower end {self.bounds[0]}")

    @classmethod
    def from_reference(cls, reference: GaussianReference, clip: float = 4.0,
                       variance_factor: float = ITD_VARIANCE_FACTOR,
                       delta: float | None = None) -> LogSNRProposal:
        """The reference's proposal; with a lattice spacing ``delta``, its upper end is raised (if needed)
        to :func:`resolving_logsnr`, where the discrete estimate's right tail is negligible."""
        loc, scale = reference.logsnr_loc_scale(variance_factor)
        high = None
        if delta is not None and resolving_logsnr(delta) > loc + clip * scale:
            high = resolving_logsnr(delta)
        return cls(loc, scale, clip, high)

    @property
    def bounds(self) -> tuple[float, float]:
        """``(a_lo, a_hi)``: the sampled log-SNR range."""
        high = self.loc + self.clip * self.scale if self.high is None else self.high
        return self.loc - self.clip * self.scale, high

    def _sigmoid_bounds(self) -> tuple[float, float]:
        lo, hi = self.bounds
        return 1.0 / (1.0 + math.exp(self.clip)), 1.0 / (1.0 + math.exp(-(hi - self.loc) / self.scale))

    def quantile(self, p: Tensor) -> Tensor:
        s_lo, s_hi = self._sigmoid_bounds()
        return self.loc + self.scale * torch.logit(s_lo + (s_hi - s_lo) * p.to(torch.float64))

    def cdf(self, a: Tensor) -> Tensor:
        """Probability of the truncated proposal below ``a``, in [0, 1]."""
        u = (torch.as_tensor(a, dtype=torch.float64) - self.loc) / self.scale
        s_lo, s_hi = self._sigmoid_bounds()
        return ((torch.sigmoid(u) - s_lo) / (s_hi - s_lo)).clamp(0.0, 1.0)

    def log_prob(self, a: Tensor) -> Tensor:
        """``ln q(a)`` inside the range, ``-inf`` outside."""
        a = torch.as_tensor(a, dtype=torch.float64)
        u = (a - self.loc) / self.scale
        s_lo, s_hi = self._sigmoid_bounds()
        log_q = torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u) \
            - math.log(self.scale * (s_hi - s_lo))
        lo, hi = self.bounds
        return torch.where((a >= lo) & (a <= hi), log_q, torch.full_like(log_q, -math.inf))

    def points(self, npoints: int, mode: str = "stratified",
               generator: torch.Generator | None = None) -> Tensor:
        """``npoints`` log-SNRs (float64, CPU), ordered by stratum for ``stratified`` and ``grid``."""
        k = torch.arange(npoints, dtype=torch.float64)
        if mode == "random":
            p = torch.rand(npoints, dtype=torch.float64, generator=generator)
        elif mode == "stratified":
            p = (k + torch.rand(npoints, dtype=torch.float64, generator=generator)) / npoints
        elif mode == "grid":
            p = (k + 0.5) / npoints
        else:
            raise ValueError(f"logsnr sampling must be one of {SAMPLING_MODES}, got {mode!r}")
        return self.quantile(p)

    def bins(self, a: Tensor, nbins: int) -> Tensor:
        """Index of the equal-probability bin (stratum) holding each log-SNR, in ``0 .. nbins - 1``."""
        return (self.cdf(a) * nbins).floor().long().clamp(0, nbins - 1)



def resolving_logsnr(delta: float, tau: float = 7.0) -> float:
    """The log-SNR where the channel noise ``e^{-a/2}`` is ``delta / (2 tau)``: ``2 ln(2 tau / delta)``.

    Above it the discrete integrand is negligible: :func:`right_tail_bound` is ``8 d phi(7) / 7 ~ 1e-11 d``
    nats. For CIFAR-10 (``delta = 2/255``) it is 16.2.
    """
    return 2.0 * math.log(2.0 * tau / delta)

