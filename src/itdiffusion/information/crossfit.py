"""Monte Carlo means with standard errors, and the cross-fitted choices that keep them unbiased.

A *decoder choice* may replace the network where it is worse than an alternative (the Gaussian decoder: the
"clamp"; rounding x_hat to the lattice; another model: ensembles). Choosing per log-SNR point by the smaller
error *of the same sample* would be an oracle (biased low), and clamping each image's own curve would bias it
too. So the choice is cross-fitted: for image b and log-SNR bin j it is made on the *other* images' errors in
bin j, and the network is replaced only where an alternative is better by more than two standard errors
(:func:`cross_fitted_choice`). The estimate then stays unbiased for the bound of the decoders actually used, a
valid bound whatever the choice, and exact for an exact denoiser. Control-variate coefficients are
cross-fitted the same way (:func:`cross_fitted_coefficient`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.information.proposal import SAMPLING_MODES, LogSNRProposal

# Decoder choices (clamp, rounding, ensembles) are made per log-SNR bin: this many equal-probability bins
# of the proposal (or K if fewer points). Wider bins pool more of the other images' errors, so the choice is
# less noisy; narrower bins follow the error curves more closely.
DECISION_BINS = 32


def mc_mean_and_stderr(values: Tensor, sampling: str) -> tuple[Tensor, Tensor]:
    """Per-row mean of ``values`` ``[B, K]`` and its standard error for the sampling mode used.

    ``random`` (i.i.d. points): ``std / sqrt(K)``. ``stratified`` and ``grid`` (column k = stratum k): the
    collapsed-strata estimator, ``Var(mean) = (1/K^2) sum_groups n_g s_g^2`` over groups of two adjacent
    strata (the last group holds three when K is odd); slightly conservative, since differences between
    neighbouring strata means count as noise. K < 2 gives ``nan``.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"logsnr sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    k = values.shape[-1]
    mean = values.mean(-1)
    if k < 2:
        return mean, torch.full_like(mean, math.nan)
    if sampling == "random":
        return mean, values.std(-1) / math.sqrt(k)
    npairs = k // 2 - (k % 2)  # pairs before the (possible) final triple
    paired = values[..., : 2 * npairs]
    total = (paired[..., 0::2] - paired[..., 1::2]).square().sum(-1)  # n s^2 = (v1 - v2)^2 for a pair
    if k % 2:
        total = total + 3 * values[..., 2 * npairs:].var(-1)
    return mean, total.sqrt() / k


def cross_fitted_choice(integrands: Tensor, bins: Tensor, nbins: int, z_threshold: float = 2.0) -> Tensor:
    """Per image and point, the integrand of the decoder that is best *on the other images*.

    ``integrands`` ``[C, B, K]`` holds C candidate decoders' integrands on the same points; ``bins``
    ``[B, K]`` the log-SNR bin of every point. Candidate 0 (the network) is the default. For image b and
    bin j, candidate c replaces it when, over the points of the *other* images in bin j, the mean paired
    difference ``integrand_c - integrand_0`` is below ``-z_threshold`` standard errors; among several such
    candidates the one with the lowest mean wins. Image b's own errors never enter its choice, so its
    estimate stays unbiased for the decoder it uses; the threshold keeps noise from switching away from a
    network that is in fact better (which would bias the bound upwards).
    """
    chosen = _cross_fitted_index(integrands, bins, nbins, z_threshold).gather(1, bins)  # [B, K]
    return integrands.gather(0, chosen[None]).squeeze(0)


def _cross_fitted_index(integrands: Tensor, bins: Tensor, nbins: int, z_threshold: float = 2.0) -> Tensor:
    """The candidate index :func:`cross_fitted_choice` uses for each image and bin ``[B, nbins]``."""
    c, b, k = integrands.shape
    if c == 1:
        return torch.zeros(b, nbins, dtype=torch.long, device=integrands.device)
    diff = integrands[1:] - integrands[:1]  # [C-1, B, K]
    idx = bins.expand(c - 1, b, k)

    def others(values: Tensor) -> Tensor:  # sum over the other images' points of each bin: [C-1, B, nbins]
        own = values.new_zeros(values.shape[0], b, nbins).scatter_add_(2, idx, values)
        return own.sum(1, keepdim=True) - own

    n = others(torch.ones_like(diff))
    mean = others(diff) / n.clamp_min(1)
    var = (others(diff.square()) / n.clamp_min(1) - mean.square()).clamp_min(0) * n / (n - 1).clamp_min(1)
    significant = (n > 1) & (mean < -z_threshold * (var / n.clamp_min(1)).sqrt())
    score = torch.where(significant, mean, torch.zeros_like(mean))
    best = score.min(0)  # lowest significant mean, 0 when none
    return torch.where(best.values < 0, best.indices + 1, torch.zeros_like(best.indices))  # [B, nbins]


def cross_fitted_coefficient(integrand: Tensor, control: Tensor, bins: Tensor, nbins: int) -> Tensor:
    """Regression coefficient of ``integrand`` on ``control`` (both ``[..., B, K]``) per image and bin,
    fitted on the *other* images' points of the bin: ``Cov / Var`` -> ``[..., B, nbins]`` (0 where the other
    images have fewer than two points in the bin or no spread). Image b's own values never enter, so a
    control variate with this coefficient leaves its estimate unbiased."""
    idx = bins.expand_as(integrand)

    def others(values: Tensor) -> Tensor:
        own = values.new_zeros(*values.shape[:-1], nbins).scatter_add_(-1, idx, values)
        return own.sum(-2, keepdim=True) - own

    control = control.expand_as(integrand)
    n = others(torch.ones_like(integrand))
    mean_f, mean_g = others(integrand) / n.clamp_min(1), others(control) / n.clamp_min(1)
    cov = others(integrand * control) / n.clamp_min(1) - mean_f * mean_g
    var = others(control.square()) / n.clamp_min(1) - mean_g.square()
    ok = (n > 1) & (var > 1e-12 * others(control.square()) / n.clamp_min(1))
    return torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), torch.zeros_like(var))



@dataclass
class BinTable:
    """A value per image and equal-probability log-SNR bin of the proposal: ``values`` ``[B, nbins]``."""

    nbins: int
    values: Tensor

    def at(self, proposal: LogSNRProposal, logsnr: Tensor, row: int) -> Tensor:
        """Image ``row``'s value at each of the log-SNR points ``logsnr`` ``[K]`` (any points: a function of
        the bin alone)."""
        return self.values[row].to(logsnr.device)[proposal.bins(logsnr, self.nbins)]


@dataclass
class Decisions:
    """What an integral used per image and log-SNR bin: ``candidate`` (the index of the candidate decoder
    among the integral's candidates) and ``coefficient`` (the control variate's; None without one)."""

    candidate: BinTable
    coefficient: BinTable | None = None


def integrate(candidates: list[Tensor], logsnr: Tensor, proposal: LogSNRProposal, sampling: str,
              control: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mean_k`` of the chosen integrand per image, and its standard error (the integrand's units).

    ``candidates``: ``[B, K]`` or ``[C, B, K]`` tensors, integrands ``f_c / q`` of the candidate decoders
    on the same points and noise; per image and log-SNR bin the cross-fitted choice
    (:func:`cross_fitted_choice`) picks one. ``control`` ``[B, K]`` (optional): ``(g - E_eps g) / q``, the
    reference decoder's error on the same noise minus its exact mean at that (x, a), so zero-mean at every
    point. It enters as ``f_c / q - beta control`` with ``beta`` per image and bin fitted on the other
    images (:func:`cross_fitted_coefficient`): unbiased (beta and the choice never see the image's own
    noise), and it removes the part of the channel-noise fluctuation the two decoders share.
    """
    values, _ = chosen_integrand(candidates, logsnr, proposal, control)
    return mc_mean_and_stderr(values, sampling)


def chosen_integrand(candidates: list[Tensor], logsnr: Tensor, proposal: LogSNRProposal,
                     control: Tensor | None = None) -> tuple[Tensor, Decisions]:
    """The per-point values ``[B, K]`` whose row means :func:`integrate` reports (the cross-fitted choice's
    integrand, minus the control variate's part), and the :class:`Decisions` behind them."""
    stacked = torch.cat([t if t.dim() == 3 else t[None] for t in candidates])
    nbins = min(logsnr.shape[1], DECISION_BINS)
    bins = proposal.bins(logsnr, nbins).to(stacked.device)
    index = _cross_fitted_index(stacked, bins, nbins)  # [B, nbins]
    values = stacked.gather(0, index.gather(1, bins)[None]).squeeze(0)
    decisions = Decisions(BinTable(nbins, index.cpu()))
    if control is not None:
        coef = cross_fitted_coefficient(stacked, control[None], bins, nbins)  # [C, B, nbins]
        chosen_coef = coef.gather(0, index[None]).squeeze(0)  # [B, nbins]
        values = values - chosen_coef.gather(1, bins) * control
        decisions.coefficient = BinTable(nbins, chosen_coef.cpu())
    return values, decisions
