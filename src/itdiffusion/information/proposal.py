"""The log-SNR proposal: a logistic truncated to ``[a_lo, a_hi]``, and the log-SNR that resolves a lattice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.information.reference import ITD_VARIANCE_FACTOR, GaussianReference

SAMPLING_MODES = ("stratified", "random", "grid")
ITD_CLIP = 4.0  # ITD's code truncates its logistic proposal at 4 scales


def itd_range(reference: GaussianReference, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """The log-SNR range ITD's code integrates over: its logistic (ITD's variance factor) clipped at
    ``ITD_CLIP`` scales; intersected with ``bounds`` (a sampled range) if given."""
    lo, hi = LogSNRProposal.from_reference(reference, clip=ITD_CLIP).core_bounds
    return (lo, hi) if bounds is None else (max(lo, bounds[0]), min(hi, bounds[1]))


@dataclass(frozen=True)
class LogSNRProposal:
    """Logistic(loc, scale) on the core ``[loc - clip * scale, high]`` (``high`` defaults to
    ``loc + clip * scale``; a higher end lets the discrete estimate reach the SNRs that resolve a lattice),
    optionally extended by flat ``tails``.

    Density ``q(a) = f(a) / Z``: ``f(a) = sigmoid(u) sigmoid(-u) / scale``, ``u = (a - loc) / scale``, on the
    core; ``tails`` is a tuple of cells ``(start, end, density)`` outside the core, contiguous with it, on
    which f is constant; Z is the total mass (``tanh(clip/2)`` when symmetric without tails). The tails put
    points where the data has structure that the reference's eigenvalues do not show (narrow components, a
    diagonal reference of correlated data) with bounded weights ``1/q``; they come from a pilot
    (:func:`itdiffusion.information.pilot.proposal_for`). Points come from the quantile function at ``p``
    in [0, 1): ``random`` i.i.d. uniform p; ``stratified`` one uniform p in each of K equal-probability
    strata, ``p_k = (k + U_k) / K`` (unbiased, lower variance); ``grid`` the midpoints ``(k + 1/2) / K``
    (deterministic points; quadrature error O(1/K^2) is not in the standard error).
    """

    loc: float
    scale: float
    clip: float = 4.0
    high: float | None = None
    tails: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self):
        if not (self.scale > 0 and self.clip > 0):
            raise ValueError(f"LogSNRProposal: scale and clip must be positive, "
                             f"got {self.scale}, {self.clip}")
        if self.high is not None and not self.high > self.loc - self.clip * self.scale:
            raise ValueError(f"LogSNRProposal: high={self.high} is below the lower end {self.bounds[0]}")
        object.__setattr__(self, "tails", tuple(sorted(tuple(float(v) for v in c) for c in self.tails)))
        edges = [(c[0], c[1]) for c in self.tails if c[1] <= self.core_bounds[0]] + [self.core_bounds] \
            + [(c[0], c[1]) for c in self.tails if c[0] >= self.core_bounds[1]]
        if len(edges) != len(self.tails) + 1 or any(not (c[1] > c[0] and c[2] > 0) for c in self.tails) \
                or any(abs(e0[1] - e1[0]) > 1e-9 for e0, e1 in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"LogSNRProposal: tails {self.tails} must be cells (start, end, density > 0) "
                             f"outside the core {self.core_bounds}, contiguous with it")

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
    def core_bounds(self) -> tuple[float, float]:
        """``(core_lo, core_hi)``: where q is the truncated logistic."""
        high = self.loc + self.clip * self.scale if self.high is None else self.high
        return self.loc - self.clip * self.scale, high

    @property
    def bounds(self) -> tuple[float, float]:
        """``(a_lo, a_hi)``: the sampled log-SNR range, tails included."""
        lo, hi = self.core_bounds
        return min([lo] + [c[0] for c in self.tails]), max([hi] + [c[1] for c in self.tails])

    def _core_sigmoids(self) -> tuple[float, float]:
        core_hi = self.core_bounds[1]
        return 1.0 / (1.0 + math.exp(self.clip)), 1.0 / (1.0 + math.exp(-(core_hi - self.loc) / self.scale))

    def _mass_below(self, a: Tensor) -> Tensor:
        """Unnormalized mass ``int_{-inf}^a f``."""
        core_lo, core_hi = self.core_bounds
        s_lo, _ = self._core_sigmoids()
        mass = torch.sigmoid((a.clamp(core_lo, core_hi) - self.loc) / self.scale) - s_lo
        for start, end, density in self.tails:
            mass = mass + density * (a.clamp(start, end) - start)
        return mass

    @property
    def _total(self) -> float:
        s_lo, s_hi = self._core_sigmoids()
        return (s_hi - s_lo) + sum(d * (e - s) for s, e, d in self.tails)

    def quantile(self, p: Tensor) -> Tensor:
        m = p.to(torch.float64) * self._total  # unnormalized mass below the point
        core_lo, core_hi = self.core_bounds
        s_lo, s_hi = self._core_sigmoids()
        m_core = sum(d * (e - s) for s, e, d in self.tails if e <= core_lo)  # mass below the core
        out = self.loc + self.scale * torch.logit((s_lo + (m - m_core)).clamp(s_lo, s_hi))
        m0 = 0.0
        for start, end, density in self.tails:  # sorted: the left cells, then the right ones
            if start >= core_hi and m0 < m_core + (s_hi - s_lo):
                m0 = m_core + (s_hi - s_lo)
            inside = (m >= m0) & (m < m0 + density * (end - start))
            out = torch.where(inside, start + (m - m0) / density, out)
            m0 += density * (end - start)
        return out if not self.tails else out.clamp(*self.bounds)

    def cdf(self, a: Tensor) -> Tensor:
        """Probability of the proposal below ``a``, in [0, 1]."""
        return (self._mass_below(torch.as_tensor(a, dtype=torch.float64)) / self._total).clamp(0.0, 1.0)

    def log_prob(self, a: Tensor) -> Tensor:
        """``ln q(a)`` inside the range, ``-inf`` outside."""
        a = torch.as_tensor(a, dtype=torch.float64)
        u = (a - self.loc) / self.scale
        log_total = math.log(self._total)
        log_q = torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u) \
            - math.log(self.scale) - log_total
        core_lo, core_hi = self.core_bounds
        log_q = torch.where((a >= core_lo) & (a <= core_hi), log_q, torch.full_like(log_q, -math.inf))
        for start, end, density in self.tails:
            cell = (a >= start) & (a <= end) & ((a < core_lo) | (a > core_hi))
            log_q = torch.where(cell, torch.full_like(log_q, math.log(density) - log_total), log_q)
        return log_q

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

