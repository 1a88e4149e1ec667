"""Per-pixel information maps: the continuous IT estimate of one image split over its pixels (nats).

The pointwise I-MMSE relation is a sum over coordinates. With ``e_i(x, a)`` the squared eps-error of
pixel i, ``mmse(x, a) = sum_i e_i(x, a)``, and splitting the Gaussian reference's terms over pixels too
(``h_G = sum_i h_i``, ``mmse_G(a) = sum_i g_i(a)``), the continuous estimate

    -ln p(x) = h_G + 1/2 int [mmse(x, a) - mmse_G(a)] da   (+ the closed-form tails)

is the sum over pixels of ``share_i = h_i + 1/2 int [e_i(x, a) - g_i(a)] da + tail_i``. For data with
independent coordinates, an exact denoiser and a diagonal reference, ``share_i = -ln p_i(x_i)`` exactly
(the one-dimensional identity for each coordinate).

**How the Gaussian terms are split.** Every Gaussian quantity is a sum over the reference's
eigen-directions ``u_k`` (entropy ``1/2 ln(2 pi e lambda_k)``, ``mmse_G``'s ``sigmoid(a + ln lambda_k)``,
the linear decoder's error at x, the tails). Direction k's term is given to pixel i in proportion to
``U_ik^2`` (its squared loading; ``sum_i U_ik^2 = 1``), so the shares sum to the totals. For a diagonal
reference (U = I) this is the exact per-pixel split; with a full covariance it is a convention (the
linear decoder's per-pixel error has cross terms between directions, which this split leaves out).

**Same numbers as the estimate.** The maps are computed from the points and noise the stored curves
were drawn with (:func:`itdiffusion.information.image_draws` from the image's seed), with the estimate's
own per-bin decoder choice (network or the Gaussian decoder, cross-fitted on the other images) and
control-variate coefficient, so a map sums to the image's continuous estimate (checked: a warning if
not). Cost: one network pass over ``npoints`` points for each mapped image and model.

**Log-SNR band.** For each pixel, the centroid of log-SNR weighted by the error the model saves on it
relative to the Gaussian decoder, ``max(e_i^G - e_i, 0) / q``: where its information comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel, x_from_eps
from itdiffusion.information import (
    DECISION_BINS,
    LOG_2PI_E,
    Curves,
    GaussianReference,
    cross_fitted_coefficient,
    estimate,
    image_draws,
    mc_mean_and_stderr,
)
from itdiffusion.information import crossfit as _crossfit

log = logging.getLogger(__name__)

# A map's sum may differ from the stored estimate by float noise (the network runs in other batches).
SUM_TOLERANCE_NATS_PER_DIM = 1e-4
FIELDS = ("index", "images", "nats", "stderr", "band", "total_nats")


@dataclass
class PixelMaps:
    """Per-pixel shares of the continuous estimate, float64 CPU.

    ``index`` ``[P]`` test indices; ``images`` ``[P, *shape]`` the images (model range [-1, 1]);
    ``nats`` ``[M, P, d]`` each pixel's share (nats) for each model; ``stderr`` ``[M, P, d]`` its Monte
    Carlo standard error; ``band`` ``[M, P, d]`` the log-SNR centroid of the pixel's information;
    ``total_nats`` ``[M, P]`` the sum of a map (= the image's continuous estimate).
    """

    index: Tensor
    images: Tensor
    nats: Tensor
    stderr: Tensor
    band: Tensor
    total_nats: Tensor

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in FIELDS}

    @staticmethod
    def from_tensors(values: dict[str, Tensor]) -> PixelMaps:
        return PixelMaps(**{k: values[k] for k in FIELDS})


def decisions(curves: Curves, reference: GaussianReference) -> tuple[Tensor, Tensor | None]:
    """The continuous estimate's choices for one model's curves: per image and point, which candidate
    is used (0: the network, 1: the Gaussian decoder) ``[B, K]``, and the control-variate coefficient
    ``[B, K]`` (None without a control variate); as :func:`itdiffusion.information.crossfit.chosen_integrand`
    makes them (the clamp on)."""
    c = curves.to(reference.mean.device)
    weight = torch.exp(-c.log_q)
    mmse_g = reference.mmse(c.logsnr)
    stacked = torch.cat([(c.mmse[:1] - mmse_g) * weight, ((c.gaussian_mmse - mmse_g) * weight)[None]])
    nbins = min(c.num_points, DECISION_BINS)
    bins = c.proposal.bins(c.logsnr, nbins).to(stacked.device)
    index = _crossfit._cross_fitted_index(stacked, bins, nbins)  # [B, nbins]
    chosen = index.gather(1, bins)
    coef = None
    if c.gaussian_errors is not None:
        control = (c.gaussian_errors - c.gaussian_mmse) * weight
        per_bin = cross_fitted_coefficient(stacked, control[None], bins, nbins)  # [C, B, nbins]
        coef = per_bin.gather(0, index[None]).squeeze(0).gather(1, bins)
    return chosen.cpu(), None if coef is None else coef.cpu()


def _reconstructed_estimate(curves: Curves, reference: GaussianReference, chosen: Tensor,
                            coef: Tensor | None) -> Tensor:
    """The continuous estimate [B] rebuilt from :func:`decisions` (the self-check of the split)."""
    c = curves.to("cpu")
    weight = torch.exp(-c.log_q)
    mmse_g = reference.to("cpu").mmse(c.logsnr)
    values = torch.where(chosen == 0, c.mmse[0], c.gaussian_mmse)
    values = (values - mmse_g) * weight
    if coef is not None:
        values = values - coef * (c.gaussian_errors - c.gaussian_mmse) * weight
    mean, _ = mc_mean_and_stderr(values, c.sampling)
    return reference.entropy + 0.5 * mean + c.continuous_tail


class _Split:
    """The reference's per-direction quantities and their split over pixels (``U_ik^2``)."""

    def __init__(self, reference: GaussianReference, device):
        self.ref = reference.to(device)
        u = self.ref.eigvecs
        self.loadings = None if u is None else u.square()  # [d pixels, d directions]
        self.log_lam = self.ref.log_eigvals

    def to_pixels(self, per_direction: Tensor) -> Tensor:
        """``[..., d directions]`` -> ``[..., d pixels]``."""
        return per_direction if self.loadings is None else per_direction @ self.loadings.T

    def coords(self, v: Tensor) -> Tensor:
        """Coordinates in the eigenbasis of vectors ``[n, d]`` (pixels)."""
        return v if self.ref.eigvecs is None else v @ self.ref.eigvecs


@torch.no_grad()
def pixel_maps(denoisers: Sequence[Denoiser], x: Tensor, rows: Sequence[int], curves: Curves,
               reference: GaussianReference, seeds: Sequence[int], *,
               xinterval: tuple[float, float] | None = None, batch_size: int = 256) -> PixelMaps:
    """The per-pixel shares of the continuous estimate of the images ``x`` ``[P, *shape]`` (model range),
    which are the rows ``rows`` of ``curves`` (the curves of ALL evaluated images: the decoder choices
    look at the other images), for each model of ``denoisers`` (the models of ``curves``, in order).

    ``seeds``: the images' seeds (the ones ``sample_curves`` drew their points and noise from);
    ``xinterval``: as given to ``sample_curves`` (x_hat clamped to it). The denoisers run on the same
    points and noise as the curves; a point set that differs from the stored one is a ValueError.
    """
    device = reference.mean.device
    split = _Split(reference, device)
    num, shape, d = x.shape[0], tuple(x.shape[1:]), reference.dim
    k = curves.num_points
    out_nats = torch.zeros(len(denoisers), num, d, dtype=torch.float64)
    out_err, out_band = torch.zeros_like(out_nats), torch.zeros_like(out_nats)
    totals = torch.zeros(len(denoisers), num, dtype=torch.float64)
    h_pix = split.to_pixels(0.5 * (LOG_2PI_E + split.log_lam))  # [d]
    lo, hi = curves.proposal.bounds
    for m, denoiser in enumerate(denoisers):
        model_curves = curves.models([m])
        chosen, coef = decisions(model_curves, reference)
        rebuilt = _reconstructed_estimate(model_curves, reference, chosen, coef)
        stored = estimate(model_curves, reference).continuous
        if not torch.allclose(rebuilt, stored, rtol=0, atol=SUM_TOLERANCE_NATS_PER_DIM * d):
            log.warning("pixel maps: the estimator's decoder choices could not be reproduced (largest "
                        "difference %.3g nats); the maps may not sum to the estimates",
                        float((rebuilt - stored).abs().max()))
        for p, b in enumerate(rows):
            a, _, noise_seed = image_draws(int(seeds[p]), curves.proposal, k, curves.sampling, shape)
            if not torch.allclose(a, curves.logsnr[b].cpu(), rtol=0, atol=1e-9):
                raise ValueError(f"pixel maps: image row {b}'s seed does not give its stored log-SNR points")
            noise = torch.Generator().manual_seed(noise_seed)
            eps = torch.randn((k,) + shape, dtype=torch.float64, generator=noise)
            xb = x[p].to(device=device, dtype=torch.float64)
            err = _pixel_errors(denoiser, xb, a.to(device), eps.to(device), x.dtype, xinterval, batch_size)
            values, band = _pixel_integrand(
                split, xb, a.to(device), eps.to(device), err, curves.proposal.log_prob(a).to(device),
                chosen[b].to(device), None if coef is None else coef[b].to(device))
            mean, stderr = mc_mean_and_stderr(values.T, curves.sampling)  # [d]
            tails = split.to_pixels(_tails_per_direction(split, xb, lo, hi))
            share = h_pix + tails + 0.5 * mean
            out_nats[m, p], out_err[m, p], out_band[m, p] = share.cpu(), 0.5 * stderr.cpu(), band.cpu()
            totals[m, p] = share.sum().cpu()
    return PixelMaps(index=torch.as_tensor(list(rows), dtype=torch.long), images=x.detach().double().cpu(),
                     nats=out_nats, stderr=out_err, band=out_band, total_nats=totals)


def _pixel_errors(denoiser: Denoiser, x: Tensor, a: Tensor, eps: Tensor, dtype, xinterval,
                  batch_size: int) -> Tensor:
    """Per-pixel eps-unit squared errors ``[K, d]`` of the network at (x, a_k, eps_k), as ``sample_curves``
    computes their sum (x_hat clamped to ``xinterval`` when given)."""
    xs = x.expand((a.shape[0],) + tuple(x.shape))
    z = noisy_channel(xs, a, eps)
    parts = []
    for rows in torch.arange(a.shape[0]).split(batch_size):
        eps_hat = denoiser(z[rows].to(dtype), a[rows].to(dtype)).to(torch.float64)
        if xinterval is None:
            parts.append((eps[rows] - eps_hat).flatten(1).square())
        else:
            x_hat = x_from_eps(z[rows], a[rows], eps_hat).clamp(*xinterval)
            parts.append(a[rows].exp()[:, None] * (xs[rows] - x_hat).flatten(1).square())
    return torch.cat(parts)


def _pixel_integrand(split: _Split, x: Tensor, a: Tensor, eps: Tensor, err: Tensor, log_q: Tensor,
                     chosen: Tensor, coef: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per point and pixel, the integrand the estimate averages ``[K, d]``, and each pixel's band ``[d]``."""
    ref = split.ref
    y = split.coords(x.reshape(1, -1) - ref.mean)[0]  # [d] eigen-coordinates of x - mean
    t = torch.sigmoid(a[:, None] + split.log_lam)  # [K, d]
    rho = y.square() / ref.eigvals
    gauss_dir = rho * t * (1 - t) + t.square()  # the linear decoder's expected error per direction
    gauss = split.to_pixels(gauss_dir)
    mmse_g = split.to_pixels(t)
    weight = torch.exp(-log_q)[:, None]
    used = torch.where(chosen[:, None] == 0, err, gauss)
    values = (used - mmse_g) * weight
    if coef is not None:
        e = split.coords(eps.reshape(eps.shape[0], -1))
        sampled = (t * e - (1 - t) * (0.5 * a[:, None]).exp() * y).square()  # the decoder on this noise
        values = values - coef[:, None] * (split.to_pixels(sampled) - gauss) * weight
    saved = (gauss - err).clamp_min(0) * weight  # [K, d]
    total = saved.sum(0)
    band = torch.where(total > 0, (a[:, None] * saved).sum(0) / total.clamp_min(1e-300), a.mean())
    return values, band


def _tails_per_direction(split: _Split, x: Tensor, lo: float, hi: float) -> Tensor:
    """The continuous tails per eigen-direction ``[d]`` (:func:`~itdiffusion.information.continuous_tails`
    before its sum)."""
    rho = split.ref.whiten_coords(x.reshape((1,) + tuple(split.ref.shape)))[0]
    t_lo = torch.sigmoid(lo + split.log_lam)
    t_hi = torch.sigmoid(hi + split.log_lam)
    return 0.5 * (rho - 1) * (t_lo + 1 - t_hi)


def to_bits(nats: Tensor) -> Tensor:
    """Nats -> bits (the maps are shown in bits per pixel-channel)."""
    return nats / math.log(2.0)
