"""The IT estimates from error curves: pure post-processing, no network (nats per image).

:func:`estimate` forms, from one :class:`~itdiffusion.information.curves.Curves`, every estimate the project
reports: continuous ``-ln p(x)``, discrete ``-ln P(x)`` with and without its tails, and dequantized; for a
single model or, when the curves hold several models, their ensemble (per log-SNR bin the cross-fitted best
model or the Gaussian decoder: ITD's pointwise minimum without its bias). The stage, the ensemble, the reuse
of stored curves and :func:`~itdiffusion.information.it_nll` all go through it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.information.bounds import (
    continuous_nll_from_curve,
    discrete_nll_from_curve,
    right_tail_bound,
)
from itdiffusion.information.crossfit import Decisions
from itdiffusion.information.curves import Curves
from itdiffusion.information.proposal import itd_range, resolving_logsnr
from itdiffusion.information.reference import GaussianReference

# estimate() warns when the discrete right-tail bound exceeds this many nats per dimension.
RIGHT_TAIL_WARN_NATS_PER_DIM = 1e-3

# per-image nats, ITEstimate fields (each with a ``<name>_stderr`` twin; discrete_notails shares discrete's)
ESTIMATES = ("continuous", "continuous_itd_range", "discrete", "discrete_notails", "dequantized")


@dataclass
class ITEstimate:
    """Per-image IT estimates in nats (float64, ``[B]``), their Monte Carlo standard errors, and the curves.

    ``discrete`` includes ``discrete_left_tail`` and ``discrete_right_tail``; ``discrete_notails`` is ITD's
    table convention without them. ``continuous_itd_range`` (+ ``_stderr``): the continuous estimate with
    the integral restricted to ITD's log-SNR range (:func:`itd_range`; the Gaussian decoder outside it), from
    the same curves: ITD's convention, beside ``continuous`` (the full, pilot-extended range).
    ``dequantized`` already includes ``d ln(1/delta)``: it is a discrete NLL.
    ``continuous_decisions``: the decoder (candidates: each model, then the Gaussian decoder) and the
    control-variate coefficient the continuous estimate used per image and log-SNR bin (the pixel maps
    integrate other points with them).
    The curve properties (``logsnr``, ``log_q``, ``mmse``, ...) are the curves' ``[B, K]`` arrays (``mmse``
    and its twins ``[M, B, K]`` when the curves hold several models).
    """

    continuous: Tensor
    continuous_stderr: Tensor
    curves: Curves
    discrete: Tensor | None = None
    discrete_stderr: Tensor | None = None
    discrete_notails: Tensor | None = None
    discrete_left_tail: Tensor | None = None
    discrete_right_tail: float | None = None
    dequantized: Tensor | None = None
    dequantized_stderr: Tensor | None = None
    continuous_itd_range: Tensor | None = None
    continuous_itd_range_stderr: Tensor | None = None
    # a decoder choice fitted on held-out draws (itdiffusion.budget.estimate_with_choice): per family
    # (continuous, discrete, dequantized) a [nbins] bool, True where the Gaussian reference's decoder
    # stands in for the network in that equal-probability log-SNR bin of the proposal; None: cross-fitted
    reference_bins: dict[str, Tensor] | None = None
    decoder_choice: object | None = None  # the itdiffusion.budget.DecoderChoice behind reference_bins
    continuous_integrand: Tensor | None = None  # [B, K]: the continuous estimate's per-point values
    continuous_decisions: Decisions | None = None

    @property
    def network_evals(self) -> int:
        """Denoiser calls per image, all models together."""
        return self.curves.network_evals * self.curves.num_models

    def per_image(self) -> dict[str, Tensor]:
        """``{name: nats [B], name + "_mc_stderr": nats [B]}`` of every estimate formed."""
        out = {}
        for name in ESTIMATES:
            value = getattr(self, name)
            if value is not None:
                stderr = getattr(self, name.removesuffix("_notails") + "_stderr")
                out[name], out[name + "_mc_stderr"] = value, stderr
        return out

    def _curve(self, name: str) -> Tensor | None:
        value = getattr(self.curves, name)
        return value[0] if value is not None and value.dim() == 3 and value.shape[0] == 1 else value

    logsnr = property(lambda self: self.curves.logsnr)
    log_q = property(lambda self: self.curves.log_q)
    mmse = property(lambda self: self._curve("mmse"))
    mmse_rounded = property(lambda self: self._curve("mmse_rounded"))
    mmse_dequantized = property(lambda self: self._curve("mmse_dequantized"))
    gaussian_mmse = property(lambda self: self.curves.gaussian_mmse)
    gaussian_errors = property(lambda self: self.curves.gaussian_errors)
    gaussian_errors_dequantized = property(lambda self: self.curves.gaussian_errors_dequantized)


def estimate(curves: Curves, reference: GaussianReference, *, clamp: bool = True,
             reference_mmse: Tensor | None = None) -> ITEstimate:
    """Every IT estimate of the model(s) in ``curves`` (nats per image, on the CPU).

    - ``continuous``: :func:`continuous_nll_from_curve` of ``mmse`` (M > 1: the models are candidates, the
      first the default), with the Gaussian decoder as a cross-fitted alternative if ``clamp``, the control
      variate if the curves hold ``gaussian_errors``, and the closed-form tails.
    - ``discrete`` (curves with ``delta``): :func:`discrete_nll_from_curve` with candidates, per model, the
      rounded x_hat (the default decoder) and the raw x_hat, chosen per bin by cross-fitting (ITD's
      ``min(mses, mses_round_xhat)``, unbiased), plus both tails; ``discrete_notails`` without them.
    - ``dequantized`` (curves with ``mmse_dequantized``): the continuous estimate at the dequantized images
      plus ``d ln(1/delta)``.

    ``mmse_G`` at the points (``B K d`` operations) is computed once here, or taken from ``reference_mmse``.
    """
    dev = reference.mean.device
    c = curves.to(dev)
    mmse_g = reference.mmse(c.logsnr) if reference_mmse is None else reference_mmse.to(dev, torch.float64)
    common = dict(proposal=c.proposal, sampling=c.sampling)
    log_q = c.log_q
    cont = continuous_nll_from_curve(c.mmse, c.logsnr, log_q, reference, clamp, gaussian_mmse=c.gaussian_mmse,
                                     gaussian_errors=c.gaussian_errors, tails=c.continuous_tail,
                                     reference_mmse=mmse_g, **common)
    est = ITEstimate(continuous=cont.nll, continuous_stderr=cont.stderr, curves=curves,
                     continuous_decisions=cont.decisions, continuous_integrand=cont.integrand)
    if c.continuous_tail_itd is not None:
        itd = continuous_nll_from_curve(c.mmse, c.logsnr, log_q, reference, clamp,
                                        gaussian_mmse=c.gaussian_mmse, gaussian_errors=c.gaussian_errors,
                                        tails=c.continuous_tail_itd, reference_mmse=mmse_g,
                                        within=itd_range(reference, c.proposal.bounds), **common)
        est.continuous_itd_range, est.continuous_itd_range_stderr = itd.nll, itd.stderr
    if c.delta is not None:
        # per model the rounded x_hat first (its error vanishes at high SNR, the raw one's does not)
        cands = torch.stack([curve for j in range(c.num_models)
                             for curve in ((c.mmse_rounded[j],) if c.mmse_rounded is not None else ())
                             + (c.mmse[j],)])
        disc = discrete_nll_from_curve(cands, c.logsnr, log_q, reference, c.delta, clamp,
                                       gaussian_mmse=c.gaussian_mmse, gaussian_errors=c.gaussian_errors,
                                       left_tail_nats=c.discrete_left_tail, **common)
        right = right_tail_bound(reference.dim, c.delta, c.proposal.bounds[1])
        est.discrete, est.discrete_stderr = disc.nll, disc.stderr
        est.discrete_notails = disc.nll - c.discrete_left_tail - right
        est.discrete_left_tail, est.discrete_right_tail = c.discrete_left_tail, right
        _warn_right_tail(right, reference.dim, c.delta, c.proposal.bounds[1])
    if c.mmse_dequantized is not None:
        deq = continuous_nll_from_curve(c.mmse_dequantized, c.logsnr, log_q, reference, clamp,
                                        gaussian_mmse=c.gaussian_mmse_dequantized,
                                        gaussian_errors=c.gaussian_errors_dequantized,
                                        tails=c.continuous_tail_dequantized, reference_mmse=mmse_g,
                                        **common)
        est.dequantized = deq.nll + reference.dim * math.log(1.0 / c.delta)
        est.dequantized_stderr = deq.stderr
    for name in ("continuous", "continuous_stderr", *ESTIMATES, "discrete_stderr", "dequantized_stderr",
                 "discrete_left_tail", "continuous_itd_range", "continuous_itd_range_stderr",
                 "continuous_integrand"):
        value = getattr(est, name)
        if isinstance(value, Tensor):
            setattr(est, name, value.cpu())
    return est


def _warn_right_tail(right: float, dim: int, delta: float, a_hi: float) -> None:
    if right > RIGHT_TAIL_WARN_NATS_PER_DIM * dim:
        warnings.warn(f"it_nll: the discrete right-tail bound is {right:.3g} nats ({right / dim:.2e} "
                      f"per dim): the log-SNR proposal ends at {a_hi:.2f}, short of "
                      f"{resolving_logsnr(delta):.1f} where the lattice is resolved; raise the proposal's "
                      "upper end, e.g. "
                      "LogSNRProposal.from_reference(reference, delta=delta)", stacklevel=3)
