"""Log-SNR proposals beyond the logistic: a piecewise-constant density fitted to measured error curves.

Every proposal here has the interface :func:`itdiffusion.information.it_nll` and the ``*_from_curve``
functions use: ``bounds`` (the sampled range), ``quantile(p)``, ``cdf(a)``, ``log_prob(a)`` (natural log
of the density in 1/log-SNR units), ``points(K, mode, generator)`` and ``bins(a, nbins)``
(equal-probability bins). :class:`QuantileSampling` supplies the last two from the first ones.

**Why fit.** The IT estimate of one image is ``1/2 int f(x, a) da`` (eps units times log-SNR), sampled as
``f(x, a) / q(a)`` at points ``a ~ q``. Its Monte Carlo variance has two parts: the spread of ``f / q``
over ``a`` (the proposal's mismatch to the integrand's shape) and the noise of ``f`` at a fixed ``a`` (the
channel noise). For a trained network the first part dominates with the logistic proposal: the discrete
integrand (the rounded x_hat's error) rises over ~15 nats of log-SNR and then drops to zero within a few,
a shape no logistic follows. For i.i.d. points the proposal that minimises ``sum_e w_e Var_e`` over
several estimates ``e`` sharing the points is (Cauchy-Schwarz)

    q*(a)  proportional to  sqrt( sum_e w_e E_x,eps[f_e(x, a)^2] ),

and :meth:`PiecewiseProposal.fit` estimates it cell by cell from a *pilot*: error curves of a few images
measured with an independent seed at points of a base proposal. With ``w_e = 1 / (int sqrt(E f_e^2) da)^2``
every estimate counts on its own scale (the smallest variance it could reach alone). A defensive mixture
with the base keeps ``q >= defensive * base`` everywhere, so the importance weights stay bounded where the
pilot saw little. The estimate stays unbiased for ANY fixed ``q`` chosen without the evaluated images' own
noise; only its variance depends on the fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SAMPLING_MODES = ("stratified", "random", "grid")


def unit_points(npoints: int, mode: str = "stratified", generator: torch.Generator | None = None) -> Tensor:
    """Probabilities in [0, 1) (float64) that a quantile function turns into log-SNRs.

    ``random``: i.i.d. uniform; ``stratified``: one uniform in each of K equal strata, ``(k + U_k) / K``
    (unbiased, lower variance); ``grid``: the midpoints ``(k + 1/2) / K`` (deterministic; the quadrature
    error is then not in the standard error). Stratified and grid points come ordered by stratum.
    """
    k = torch.arange(npoints, dtype=torch.float64)
    if mode == "random":
        return torch.rand(npoints, dtype=torch.float64, generator=generator)
    if mode == "stratified":
        return (k + torch.rand(npoints, dtype=torch.float64, generator=generator)) / npoints
    if mode == "grid":
        return (k + 0.5) / npoints
    raise ValueError(f"logsnr sampling must be one of {SAMPLING_MODES}, got {mode!r}")


class QuantileSampling:
    """``points`` and ``bins`` of a proposal that defines ``quantile`` and ``cdf``."""

    def points(self, npoints: int, mode: str = "stratified",
               generator: torch.Generator | None = None) -> Tensor:
        """``npoints`` log-SNRs (float64, CPU) drawn by :func:`unit_points`."""
        return self.quantile(unit_points(npoints, mode, generator))

    def bins(self, a: Tensor, nbins: int) -> Tensor:
        """Index of the equal-probability bin (stratum) holding each log-SNR, in ``0 .. nbins - 1``."""
        return (self.cdf(a) * nbins).floor().long().clamp(0, nbins - 1)


@dataclass(frozen=True)
class PiecewiseProposal(QuantileSampling):
    """Density constant on each cell ``[edges[j], edges[j + 1])``, holding probability ``probs[j]``.

    ``q(a) = probs[j] / (edges[j + 1] - edges[j])`` on cell j, zero outside ``[edges[0], edges[-1]]``.
    Plain tuples, so the proposal is hashable and goes into a results file as it is (:meth:`to_dict`).
    """

    edges: tuple[float, ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        edges = torch.tensor(self.edges, dtype=torch.float64)
        probs = torch.tensor(self.probs, dtype=torch.float64)
        if edges.dim() != 1 or edges.numel() < 2 or probs.numel() != edges.numel() - 1:
            raise ValueError(f"PiecewiseProposal: need n + 1 edges for n cells, got {edges.numel()} edges "
                             f"and {probs.numel()} probabilities")
        if not bool((edges.diff() > 0).all()) or not bool(torch.isfinite(edges).all()):
            raise ValueError("PiecewiseProposal: edges must be finite and strictly increasing")
        if not bool((probs > 0).all()) or abs(probs.sum().item() - 1.0) > 1e-9:
            raise ValueError("PiecewiseProposal: cell probabilities must be positive and sum to 1, "
                             f"got sum {probs.sum().item()} and minimum {probs.min().item()}")

    @property
    def bounds(self) -> tuple[float, float]:
        return self.edges[0], self.edges[-1]

    def _tables(self) -> tuple[Tensor, Tensor, Tensor]:
        edges = torch.tensor(self.edges, dtype=torch.float64)
        probs = torch.tensor(self.probs, dtype=torch.float64)
        cum = torch.cat([probs.new_zeros(1), probs.cumsum(0)])
        cum[-1] = 1.0
        return edges, probs, cum

    def quantile(self, p: Tensor) -> Tensor:
        edges, probs, cum = self._tables()
        p = torch.as_tensor(p, dtype=torch.float64)
        j = (torch.searchsorted(cum, p.cpu(), right=True) - 1).clamp(0, probs.numel() - 1)
        frac = ((p.cpu() - cum[j]) / probs[j]).clamp(0.0, 1.0)
        return (edges[j] + frac * (edges[j + 1] - edges[j])).to(p.device)

    def cdf(self, a: Tensor) -> Tensor:
        """Probability of the proposal below ``a``, in [0, 1]."""
        edges, probs, cum = self._tables()
        a = torch.as_tensor(a, dtype=torch.float64)
        flat = a.cpu().reshape(-1)
        j = (torch.searchsorted(edges, flat, right=True) - 1).clamp(0, probs.numel() - 1)
        frac = ((flat - edges[j]) / (edges[j + 1] - edges[j])).clamp(0.0, 1.0)
        out = (cum[j] + frac * probs[j]).clamp(0.0, 1.0)
        return out.reshape(a.shape).to(a.device)

    def log_prob(self, a: Tensor) -> Tensor:
        """``ln q(a)`` inside the range, ``-inf`` outside."""
        edges, probs, _ = self._tables()
        a = torch.as_tensor(a, dtype=torch.float64)
        flat = a.cpu().reshape(-1)
        j = (torch.searchsorted(edges, flat, right=True) - 1).clamp(0, probs.numel() - 1)
        log_q = (probs / edges.diff()).log()[j]
        inside = (flat >= edges[0]) & (flat <= edges[-1])
        log_q = torch.where(inside, log_q, torch.full_like(log_q, -math.inf))
        return log_q.reshape(a.shape).to(a.device)

    def to_dict(self) -> dict:
        return {"kind": "piecewise", "edges": list(self.edges), "probs": list(self.probs)}

    @classmethod
    def fit(cls, base, logsnr: Tensor, integrands: Sequence[Tensor], ncells: int = 32,
            defensive: float = 0.1) -> PiecewiseProposal:
        """The proposal ``q*`` of the module docstring, estimated from a pilot.

        ``base``: the proposal the pilot points came from (its range is kept; its equal-probability bins
        are the cells); ``logsnr`` ``[B, K]``: the pilot's points; ``integrands``: one ``[B, K]`` tensor per
        estimate ``e``, the integrand ``f_e(x, a)`` in eps units *without* the ``1 / q`` weight (e.g. the
        rounded x_hat's error for the discrete estimate, ``mse - mmse_G`` for the continuous one).
        Per cell j: ``s_ej = mean f_e^2`` over the pilot points in it; ``q*`` on cell j is proportional to
        ``sqrt(sum_e s_ej / I_e^2)`` with ``I_e = sum_j sqrt(s_ej) width_j``; cell probabilities
        ``(1 - defensive) q*_j + defensive / ncells`` (the base gives every cell ``1 / ncells``). A cell the
        pilot missed gets only the defensive share. Non-finite pilot values are an error.
        """
        if not 0.0 < defensive <= 1.0:
            raise ValueError(f"PiecewiseProposal.fit: defensive must be in (0, 1], got {defensive}")
        if ncells < 1:
            raise ValueError(f"PiecewiseProposal.fit: ncells must be positive, got {ncells}")
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64).cpu()
        edges = base.quantile(torch.arange(ncells + 1, dtype=torch.float64) / ncells).cpu()
        edges[0], edges[-1] = base.bounds  # exactly the base's range
        cells = base.bins(logsnr, ncells).cpu().reshape(-1)
        counts = torch.zeros(ncells, dtype=torch.float64).scatter_add_(0, cells, torch.ones_like(cells,
                                                                                                dtype=torch.float64))
        widths = edges.diff()
        target = torch.zeros(ncells, dtype=torch.float64)
        for f in integrands:
            f = torch.as_tensor(f, dtype=torch.float64).cpu().reshape(-1)
            if f.numel() != cells.numel():
                raise ValueError(f"PiecewiseProposal.fit: an integrand has {f.numel()} values for "
                                 f"{cells.numel()} pilot points")
            if not bool(torch.isfinite(f).all()):
                raise ValueError("PiecewiseProposal.fit: the pilot's error curves hold non-finite values")
            second = torch.zeros(ncells, dtype=torch.float64).scatter_add_(0, cells, f.square())
            rms = (second / counts.clamp_min(1)).sqrt()
            scale = (rms * widths).sum()
            if scale > 0:
                target += (rms / scale).square()
        shape = target.sqrt() * widths
        if not shape.sum() > 0:  # nothing measured: keep the base's cell masses
            probs = torch.full((ncells,), 1.0 / ncells, dtype=torch.float64)
        else:
            probs = (1.0 - defensive) * shape / shape.sum() + defensive / ncells
        probs = probs / probs.sum()
        return cls(tuple(edges.tolist()), tuple(probs.tolist()))
