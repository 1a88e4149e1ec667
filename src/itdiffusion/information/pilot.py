"""The log-SNR range of the continuous estimate, chosen by a pilot of the denoiser (eps units, nats).

Outside the sampled range the reference's Gaussian decoder stands in for the denoiser
(:func:`~itdiffusion.information.bounds.continuous_tails`), so the estimate is exact for an exact denoiser
only if the range covers every log-SNR where the denoiser beats that decoder. A range set from the
reference's eigenvalues alone misses structure finer (or coarser) than they show: components 100x narrower
than the data's spread, a diagonal reference of correlated data. The pilot measures it instead.

**Rule** (:func:`proposal_for`). From each end of the reference's core range ``[loc - clip s, loc + clip s]``
(upper end raised to :func:`resolving_logsnr` when ``delta`` is given), walk outwards in steps of
``step`` nats of log-SNR. At each point, on ``images`` pilot images with one noise draw each, measure the
paired gap ``g = err_G - err_net`` (the Gaussian decoder's and the network's errors on the same noisy input;
its mean is how much the network beats the decoder that would stand in there). Stop at the first point from
which ``patience`` consecutive points are *confidently negligible*: ``mean(g) + 2 stderr(g) < tol * d``
(one-sided: where the Gaussian decoder is better, standing in for the network only lowers the bound). The
range's new end is that point; the proposal gets flat tails out to it (:class:`LogSNRProposal`). The
residual bias beyond the end is about ``1/2 int g da`` over the decaying remainder, below ``tol * d`` nats
for an exponential decay of one nat.

Caps: ``max_extension`` nats beyond the core on either side; with a lattice spacing ``delta``, the upper end
stops at ``resolving_logsnr(delta)`` (or the core's end, if higher). For lattice data the continuous
density is degenerate: an exact lattice denoiser keeps beating the Gaussian decoder at every SNR, and the
continuous estimate keeps falling as the upper end grows, so that end is a convention (the SNR that
resolves the lattice). A network's high-SNR error tends to ``d`` like the Gaussian decoder's, so the walk
stops by itself.

Cost: at most ``images x (2 max_extension / step + 2)`` network evaluations once per evaluation (a few
hundred to a few thousand), independent of the number of images evaluated; the stage's 10,000 images x
1,000 points are 10^7.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel, x_from_eps
from itdiffusion.information.proposal import LogSNRProposal, resolving_logsnr
from itdiffusion.information.reference import GaussianReference

PILOT_IMAGES = 64  # images the pilot looks at (the first ones given)
PILOT_STEP = 1.0  # nats of log-SNR between pilot points
PILOT_TOL_PER_DIM = 1e-3  # eps units per dimension below which the network's advantage is negligible
PILOT_PATIENCE = 2  # consecutive negligible points that end the walk
PILOT_MAX_EXTENSION = 24.0  # nats beyond the core range, on either side
PILOT_SEED = 0
# Density of the flat tails, as a multiple of the core's mean density (its mass over its length): where the
# pilot finds the network beating the reference decoder, the data has structure as dense as in the core.
PILOT_TAIL_DENSITY = 1.0


def proposal_for(reference: GaussianReference, denoisers: Denoiser | Sequence[Denoiser] | None = None,
                 x: Tensor | None = None, *, clip: float = 4.0, delta: float | None = None,
                 xinterval: tuple[float, float] | None = None, images: int = PILOT_IMAGES,
                 step: float = PILOT_STEP, tol_per_dim: float = PILOT_TOL_PER_DIM,
                 patience: int = PILOT_PATIENCE, max_extension: float = PILOT_MAX_EXTENSION,
                 tail_density: float = PILOT_TAIL_DENSITY, seed: int = PILOT_SEED,
                 batch_size: int = 256) -> LogSNRProposal:
    """The log-SNR proposal for ``sample_curves``: the reference's (:meth:`LogSNRProposal.from_reference`,
    ``clip`` and ``delta`` as there) with its range extended by the pilot described in the module docstring.

    ``denoisers``: one model or several (an ensemble evaluated on shared points: the widest range wins);
    ``x`` ``[N, *shape]``: images, of which the first ``images`` are the pilot's. Without them, the
    reference's proposal unchanged. ``xinterval``: clamp x_hat to it as the curves do. Deterministic given
    ``seed`` (the pilot's noise is its own stream, not the curves').
    """
    base = LogSNRProposal.from_reference(reference, clip=clip, delta=delta)
    if denoisers is None or x is None:
        return base
    models = list(denoisers) if isinstance(denoisers, Sequence) else [denoisers]
    core_lo, core_hi = base.core_bounds
    cap_hi = core_hi + max_extension if delta is None else max(core_hi, resolving_logsnr(delta))
    walk = _Walk(models, x[:images].detach(), reference, xinterval, tol_per_dim * reference.dim, seed,
                 batch_size)
    sides = [walk.walk(core_lo, -step, core_lo - max_extension, patience),
             walk.walk(core_hi, step, cap_hi, patience)]
    s_lo, s_hi = base._core_sigmoids()
    ceiling = tail_density * (s_hi - s_lo) / (core_hi - core_lo)  # a multiple of the core's mean density
    cells = []
    for side, s_edge in zip(sides, (s_lo, s_hi), strict=True):
        edge = s_edge * (1 - s_edge) / base.scale  # the core's density at this edge
        r_edge = side[0][1]
        for (a0, r0), (a1, r1) in zip(side, side[1:], strict=False):
            rel = max(r0, r1) / r_edge if r_edge > 0 else math.inf
            cells.append((min(a0, a1), max(a0, a1), max(edge, min(ceiling, edge * rel))))
    return dataclasses.replace(base, tails=tuple(cells))


class _Walk:
    """Paired gaps ``err_G - err_net`` of the pilot images at one log-SNR, and the walk outwards."""

    def __init__(self, models, x, reference, xinterval, tol, seed, batch_size):
        self.models, self.x, self.xinterval, self.tol = models, x.to(torch.float64), xinterval, tol
        self.reference = reference.to(x.device)
        self.dtype, self.batch_size = x.dtype, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.evals = 0

    @torch.no_grad()
    def gap(self, logsnr: float) -> tuple[bool, float]:
        """Whether every model's mean gap at ``logsnr`` is below ``tol`` by 2 standard errors, and the
        largest root mean square gap over the models (eps units)."""
        eps = torch.randn(self.x.shape, dtype=torch.float64, generator=self.generator).to(self.x.device)
        a = torch.full((self.x.shape[0],), float(logsnr), dtype=torch.float64, device=self.x.device)
        z = noisy_channel(self.x, a, eps)
        gaussian = self.reference.decoder_errors(self.x, a, eps)
        negligible, rms = True, 0.0
        for model in self.models:
            net = torch.cat([self._errors(model, z[r], a[r], eps[r], self.x[r])
                             for r in torch.arange(z.shape[0]).split(self.batch_size)])
            self.evals += z.shape[0]
            gap = gaussian - net
            se = gap.std().item() / math.sqrt(gap.numel()) if gap.numel() > 1 else math.inf
            negligible = negligible and gap.mean().item() + 2 * se < self.tol
            rms = max(rms, gap.square().mean().sqrt().item())
        return negligible, rms

    def _errors(self, model, z, a, eps, x) -> Tensor:
        eps_hat = model(z.to(self.dtype), a.to(self.dtype)).to(torch.float64)
        if eps_hat.shape != z.shape:
            raise ValueError(f"it_nll: the denoiser returned shape {tuple(eps_hat.shape)} for inputs "
                             f"{tuple(z.shape)}; it must predict eps shaped like z")
        if self.xinterval is None:
            return (eps - eps_hat).flatten(1).square().sum(1)
        x_hat = x_from_eps(z, a, eps_hat).clamp(*self.xinterval)
        return a.exp() * (x - x_hat).flatten(1).square().sum(1)

    def walk(self, start: float, step: float, cap: float, patience: int) -> list[tuple[float, float]]:
        """``(a, rms gap)`` from ``start`` towards ``cap`` in steps of ``step``, up to the first point of the
        first run of ``patience`` negligible points (or ``cap``)."""
        run, a, points = 0, start, []
        while (cap - a) * math.copysign(1.0, step) > 1e-9:
            negligible, rms = self.gap(a)
            points.append((a, rms))
            run = run + 1 if negligible else 0
            if run == patience:
                return points[:len(points) - patience + 1]
            a += step
        return points + [(cap, self.gap(cap)[1])]
