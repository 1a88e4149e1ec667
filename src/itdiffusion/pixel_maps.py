"""Per-pixel information maps: the continuous IT estimate of one image split over its pixels (nats).

The pointwise I-MMSE relation is a sum over coordinates. With ``e_i(x, a)`` the squared eps-error of
pixel i, ``mmse(x, a) = sum_i e_i(x, a)``, and splitting the Gaussian reference's terms over pixels too
(``h_G = sum_i h_i``, ``mmse_G(a) = sum_i g_i(a)``), the continuous estimate

    -ln p(x) = h_G + 1/2 int [mmse(x, a) - mmse_G(a)] da   (+ the closed-form tails)

is the sum over pixels of ``tau_i = h_i + 1/2 int [e_i(x, a) - g_i(a)] da + tail_i``. For data with
independent coordinates, an exact denoiser and a diagonal reference, ``tau_i = -ln p_i(x_i)`` exactly
(the one-dimensional identity for each coordinate).

**How the Gaussian terms are split.** Every Gaussian quantity is a sum over the reference's
eigen-directions ``u_k`` (entropy ``1/2 ln(2 pi e lambda_k)``, ``mmse_G``'s ``sigmoid(a + ln lambda_k)``,
the linear decoder's error at x, the tails). Direction k's term is given to pixel i in proportion to
``U_ik^2`` (its squared loading; ``sum_i U_ik^2 = 1``), so the shares sum to the totals. For a diagonal
reference (U = I) this is the exact per-pixel split; with a full covariance it is a convention (the
linear decoder's per-pixel error has cross terms between directions, which this split leaves out).

**The maps' own points.** A map is estimated on ``estimator.pixel_map_points`` log-SNR points and noises
of its own (:data:`itdiffusion.seeding.Stream.PIXEL_MAP`), not on the few points an image gets under a
dataset budget, with the decoders the reported estimate used: per log-SNR bin the candidate (the network
or the Gaussian decoder) and the control-variate coefficient of its
:attr:`~itdiffusion.information.ITEstimate.continuous_decisions` (cross-fitted on the other images, or the
dataset budget's pilot choice), so the map estimates the same quantity as the reported number.

**A map sums to the reported estimate.** The own-point shares ``s_i`` (Monte Carlo variance ``v_i``) sum
to ``S``, which differs from the image's reported continuous estimate ``E`` (``per_image.npz``) by Monte
Carlo noise: both are unbiased for ``sum_i tau_i``, on independent draws. The map is the least-squares
adjustment of the shares to that total (minimise ``sum_i (m_i - s_i)^2 / v_i`` subject to
``sum_i m_i = E``):

    m_i = s_i + w_i (E - S),      w_i = v_i / sum_j v_j,

so the residual ``E - S`` (``residual_nats``) goes to the pixels whose shares are least certain. ``m_i``
stays unbiased for ``tau_i`` (up to the weights being estimated from the same points, an O(1/K) effect),
and its standard error counts both parts: that of ``s_i - w_i S`` over the map's points and ``w_i`` times
the reported estimate's Monte Carlo standard error. Cost: one network pass over ``pixel_map_points``
points for each mapped image and model.

**Log-SNR band.** For each pixel, the centroid of log-SNR weighted by the error the model saves on it
relative to the Gaussian decoder, ``max(e_i^G - e_i, 0) / q``: where its information comes from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel, x_from_eps
from itdiffusion.information import LOG_2PI_E, GaussianReference, ITEstimate, mc_mean_and_stderr

# A map must sum to the reported estimate of its image to this many nats (float64 rounding is ~1e-12).
SUM_TOLERANCE_NATS = 1e-6
FIELDS = ("index", "images", "nats", "stderr", "band", "total_nats", "residual_nats")


class PixelMapError(RuntimeError):
    """A map that does not sum to the reported estimate of its image."""


@dataclass
class PixelMaps:
    """Per-pixel shares of the continuous estimate, float64 CPU.

    ``index`` ``[P]`` test indices; ``images`` ``[P, *shape]`` the images (model range [-1, 1]);
    ``nats`` ``[M, P, d]`` each pixel's share (nats) for each model; ``stderr`` ``[M, P, d]`` its Monte
    Carlo standard error; ``band`` ``[M, P, d]`` the log-SNR centroid of the pixel's information;
    ``total_nats`` ``[M, P]`` the sum of a map (= the image's reported continuous estimate);
    ``residual_nats`` ``[M, P]`` the reported estimate minus the sum of the own-point shares (the part
    spread over the pixels in proportion to their variance).
    """

    index: Tensor
    images: Tensor
    nats: Tensor
    stderr: Tensor
    band: Tensor
    total_nats: Tensor
    residual_nats: Tensor

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in FIELDS}

    @staticmethod
    def from_tensors(values: dict[str, Tensor]) -> PixelMaps:
        return PixelMaps(**{k: values[k] for k in FIELDS})

    def check_sums(self, reported: Tensor, tolerance: float = SUM_TOLERANCE_NATS) -> float:
        """The largest difference (nats) between a map's sum and ``reported`` ``[M, P]``, the reported
        continuous estimates of the mapped images as stored; :class:`PixelMapError` above ``tolerance``."""
        gap = (self.nats.sum(-1) - reported.to(torch.float64)).abs()
        if not bool((gap <= tolerance).all()):
            m, p = divmod(int(gap.argmax()), gap.shape[1])
            raise PixelMapError(
                f"pixel maps: the map of test image {int(self.index[p])} (model {m}) sums to "
                f"{float(self.nats[m, p].sum()):.9g} nats, not the reported continuous estimate "
                f"{float(reported[m, p]):.9g} (difference {float(gap[m, p]):.3g} > {tolerance:g} nats)"
            )
        return float(gap.max())

    def summary(self, npoints: int, sum_gap_nats: float) -> dict:
        """metrics.json's ``pixel_maps``: images, points, the per-pixel standard error (bits), the residuals
        and the sum check (nats: :meth:`check_sums`)."""
        stderr_bits = to_bits(self.stderr).flatten()
        return {
            "images": int(self.index.numel()),
            "points": int(npoints),
            "stderr_bits_median": float(stderr_bits.median()),
            "stderr_bits_max": float(stderr_bits.max()),
            "residual_nats_mean_abs": float(self.residual_nats.abs().mean()),
            "sum_check_max_abs_nats": float(sum_gap_nats),
        }


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
def pixel_maps(denoisers: Sequence[Denoiser], x: Tensor, rows: Sequence[int], estimates: Sequence[ITEstimate],
               reference: GaussianReference, seeds: Sequence[int], *, npoints: int,
               xinterval: tuple[float, float] | None = None, batch_size: int = 256) -> PixelMaps:
    """The per-pixel shares of the reported continuous estimate of the images ``x`` ``[P, *shape]`` (model
    range), which are the rows ``rows`` of ``estimates`` (one single-model
    :class:`~itdiffusion.information.ITEstimate` per model of ``denoisers``, in order, as reported).

    ``seeds``: the maps' own seed per image (``npoints`` log-SNR points from the estimate's proposal and
    sampling, then the channel noise, from one generator); ``xinterval``: as given to ``sample_curves``
    (x_hat clamped to it). Every map sums to its image's ``estimates[m].continuous`` (module docstring).
    """
    device = reference.mean.device
    split = _Split(reference, device)
    num, shape, d = x.shape[0], tuple(x.shape[1:]), reference.dim
    out_nats = torch.zeros(len(denoisers), num, d, dtype=torch.float64)
    out_err, out_band = torch.zeros_like(out_nats), torch.zeros_like(out_nats)
    residuals = torch.zeros(len(denoisers), num, dtype=torch.float64)
    h_pix = split.to_pixels(0.5 * (LOG_2PI_E + split.log_lam))  # [d]
    for m, (denoiser, est) in enumerate(zip(denoisers, estimates, strict=True)):
        decisions, proposal, sampling = est.continuous_decisions, est.curves.proposal, est.curves.sampling
        if decisions is None or est.curves.num_models != 1:
            raise ValueError("pixel maps: need a single model's estimate with its continuous_decisions")
        lo, hi = proposal.bounds
        for p, b in enumerate(rows):
            gen = torch.Generator().manual_seed(int(seeds[p]))
            a = proposal.points(npoints, sampling, gen)
            eps = torch.randn((npoints,) + shape, dtype=torch.float64, generator=gen).to(device)
            a = a.to(device)
            xb = x[p].to(device=device, dtype=torch.float64)
            err = _pixel_errors(denoiser, xb, a, eps, x.dtype, xinterval, batch_size)
            coef = None if decisions.coefficient is None else decisions.coefficient.at(proposal, a, b)
            values, band = _pixel_integrand(split, xb, a, eps, err, proposal.log_prob(a),
                                            decisions.candidate.at(proposal, a, b), coef)
            own = h_pix + split.to_pixels(_tails_per_direction(split, xb, lo, hi)) + 0.5 * values.mean(0)
            var = (0.5 * mc_mean_and_stderr(values.T, sampling)[1]).square()  # [d]
            total_var = var.sum()
            weight = var / total_var if bool(total_var > 0) else torch.full_like(var, 1.0 / d)
            residual = est.continuous[b].to(device, torch.float64) - own.sum()
            share = own + weight * residual
            # m_i = const + 1/2 mean_k [values_ki - w_i sum_j values_kj] + w_i E: both parts' errors
            _, part = mc_mean_and_stderr((values - weight * values.sum(1, keepdim=True)).T, sampling)
            stderr = ((0.5 * part).square() + (weight * float(est.continuous_stderr[b])).square()).sqrt()
            out_nats[m, p], out_err[m, p], out_band[m, p] = share.cpu(), stderr.cpu(), band.cpu()
            residuals[m, p] = residual.cpu()
    return PixelMaps(index=torch.as_tensor(list(rows), dtype=torch.long), images=x.detach().double().cpu(),
                     nats=out_nats, stderr=out_err, band=out_band, total_nats=out_nats.sum(-1),
                     residual_nats=residuals)


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
