"""Information-theoretic likelihood estimators for diffusion denoisers (nats per sample).

Conventions (see :mod:`itdiffusion.denoisers` for the channel): log-SNR ``a``,
``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps``; errors are in *eps units*,
``mse(x, a) = E||eps - eps_hat||^2 = e^a E||x - x_hat||^2``, summed over the d dimensions.
Integrals are over ``a`` (not SNR), which absorbs the Jacobian.

**Pointwise I-MMSE.** With the exact posterior mean, for every x (Kong, Brekelmans & Ver Steeg 2023; the
derivative of the pointwise information density in SNR is ``||x - x_hat||^2 / 2`` after Stein's lemma):

- discrete x:    ``-ln P(x) = 1/2 int mmse(x, a) da``
- continuous x:  ``-ln p(x) = h_G + 1/2 int [mmse(x, a) - mmse_G(a)] da``

for *any* Gaussian reference ``N(mu, Sigma)`` with entropy ``h_G`` and ``mmse_G(a) = sum_i sigmoid(a + ln
lambda_i)``. A worse denoiser can only raise the data average of these integrals, so with a network they are
upper bounds on the expected NLL (cross-entropy); per image they are estimates.

**Estimation.** ``a`` is importance-sampled from a logistic proposal truncated to ``[a_lo, a_hi]``
(:class:`LogSNRProposal`); outside that range the reference's linear (Gaussian) decoder is used, whose error
at a given x is known in closed form (:meth:`GaussianReference.pointwise_mmse`), so the tails cost no network
call and add no noise. Inside the range a *decoder choice* may replace the network where it is worse than an
alternative (the Gaussian decoder: the "clamp"; rounding x_hat to the lattice; another model: ensembles).
Choosing per log-SNR point by the smaller error *of the same sample* would be an oracle (biased low), and
clamping each image's own curve would bias it too (an image's pointwise error may exceed the average). So
the choice is cross-fitted: for image b and log-SNR bin j it is made on the *other* images' errors in bin j,
and the network is replaced only where an alternative is better by more than two standard errors
(:func:`cross_fitted_choice`). The choice is then independent of image b's noise: the estimate stays
unbiased for the bound of the decoders actually used, a valid bound whatever the choice, and exact for an
exact denoiser. Being made on the other images, the choices depend on which images are evaluated together.

**Layout.** The network work and the estimate are two calls: :func:`sample_curves` (``curves.py``: points,
noise, one denoiser call per (image, point), every decoder's error) returns :class:`Curves`, and
:func:`estimate` (``estimate.py``: pure post-processing) returns :class:`ITEstimate`; :func:`it_nll` is the
two in sequence. The formulas live once in ``bounds.py`` (bounds and tails) and ``crossfit.py`` (means,
standard errors, cross-fitted choices); ``reference.py`` holds the Gaussian reference, ``proposal.py`` the
log-SNR proposal.

Units: everything here returns nats per sample; convert with :mod:`itdiffusion.units`.
"""


from __future__ import annotations

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel
from itdiffusion.information.bounds import (
    CurveNLL,
    continuous_nll_from_curve,
    continuous_tails,
    discrete_nll_from_curve,
    left_tail,
    right_tail_bound,
)
from itdiffusion.information.crossfit import (
    DECISION_BINS,
    BinTable,
    Decisions,
    cross_fitted_choice,
    cross_fitted_coefficient,
    mc_mean_and_stderr,
)
from itdiffusion.information.curves import (
    ROUNDING_MODES,
    Curves,
    check_arguments,
    draw_seeds,
    image_draws,
    round_to_lattice,
    sample_curves,
)
from itdiffusion.information.estimate import ESTIMATES, ITEstimate, estimate
from itdiffusion.information.pilot import proposal_for
from itdiffusion.information.proposal import (
    ITD_CLIP,
    SAMPLING_MODES,
    LogSNRProposal,
    itd_range,
    resolving_logsnr,
)
from itdiffusion.information.reference import (
    DEFAULT_MIN_EIGVAL,
    ITD_VARIANCE_FACTOR,
    LOG_2PI_E,
    MOMENT_VARIANCE_FACTOR,
    GaussianReference,
)
from itdiffusion.units import PIXEL_BIN, XINTERVAL

__all__ = [
    "DECISION_BINS", "DEFAULT_MIN_EIGVAL", "ESTIMATES", "ITD_CLIP", "ITD_VARIANCE_FACTOR", "LOG_2PI_E",
    "MOMENT_VARIANCE_FACTOR", "ROUNDING_MODES", "SAMPLING_MODES", "CurveNLL", "Curves", "GaussianReference",
    "BinTable", "Decisions", "ITEstimate", "LogSNRProposal", "continuous_nll_from_curve", "continuous_tails",
    "cross_fitted_choice",
    "cross_fitted_coefficient", "discrete_nll_from_curve", "estimate", "image_draws", "it_loss", "it_nll",
    "itd_range", "left_tail", "mc_mean_and_stderr", "proposal_for", "resolving_logsnr", "right_tail_bound",
    "round_to_lattice", "sample_curves", "pixel_curve_options",
]


def pixel_curve_options(est) -> dict:
    """:func:`sample_curves`'s keyword arguments for images on the pixel lattice (spacing ``PIXEL_BIN`` in
    ``XINTERVAL``, with dequantized twins) from the estimator settings ``est`` (``cfg.estimator``)."""
    return dict(sampling=est.logsnr_sampling, delta=PIXEL_BIN, xinterval=XINTERVAL, rounding=est.rounding,
                dequantize=True, control_variate=est.control_variate, batch_size=est.batch_size)


def it_nll(denoiser: Denoiser, x: Tensor, reference: GaussianReference, *, npoints: int,
           delta: float | None = None, xinterval: tuple[float, float] | None = None, rounding: str = "soft",
           dequantize: bool = False, clamp: bool = True, logsnr_sampling: str = "stratified",
           proposal: LogSNRProposal | None = None, image_seeds=None, generator: torch.Generator | None = None,
           batch_size: int = 256, control_variate: bool = False) -> ITEstimate:
    """Information-theoretic NLL estimates of the images ``x`` ``[B, *shape]`` under ``denoiser`` (nats):
    :func:`sample_curves` then :func:`estimate`, the same two calls the evaluate stage makes.

    For each image, ``npoints`` log-SNRs are drawn from ``proposal`` (default: :func:`proposal_for`, the
    reference's truncated logistic reaching :func:`resolving_logsnr` when ``delta`` is given, its range
    extended by a pilot of ``denoiser`` on the first images until the denoiser no longer beats the
    reference's decoder; the stage makes the same call) with
    ``logsnr_sampling`` (``stratified``, ``random``, ``grid``), one noise draw per point, and ONE denoiser
    call per (image, point) gives x_hat for every estimate:

    - ``continuous``: the raw error curve (x_hat clamped to ``xinterval`` if given), the Gaussian decoder
      as a cross-fitted alternative if ``clamp``.
    - ``discrete`` (``delta`` given; ``xinterval = (low, high)`` is required and fixes the lattice
      ``low + delta k``): candidates, unless ``rounding="none"``, the rounded x_hat
      (:func:`round_to_lattice`, ``hard`` or ``soft``; the default decoder) and the raw x_hat, chosen per
      bin by cross-fitting. For the exact Bayes denoiser the raw posterior mean already satisfies the
      pointwise I-MMSE identity exactly; rounding it gives another decoder (never better on average), so
      ground truth is checked with ``rounding="none"``. For networks rounding removes the non-vanishing
      high-SNR error of a continuous x_hat and is what makes the integral finite.
    - ``dequantized`` (``dequantize=True``): a second pass on ``x + delta (U - 1/2)`` (same points and
      noise), its continuous estimate plus ``d ln(1/delta)``.

    Standard errors are Monte Carlo errors over log-SNR points and noise for each image (images fixed).
    ``image_seeds`` (one int per image) seeds each image's points, noise and dequantisation noise, so
    results do not depend on batching or sharding (except the cross-fitted choices, which by design look at
    the other images). Without it, per-image seeds are drawn from ``generator``. ``batch_size``: denoiser
    inputs per call. ``control_variate=True``: the reference's linear decoder, applied to the same z (no
    network call), gives errors whose mean over the noise is known exactly; minus that mean they are a
    zero-mean control variate (see ``scripts/bench_estimator_efficiency.py``).
    """
    if proposal is None:  # arguments checked first: the pilot runs the denoiser
        check_arguments(x, reference, npoints, logsnr_sampling, rounding, delta, xinterval, dequantize,
                        batch_size)
        proposal = proposal_for(reference, denoiser, x, delta=delta, xinterval=xinterval)
    curves = sample_curves(denoiser, x, reference, npoints=npoints, seeds=draw_seeds(x.shape[0], image_seeds,
                                                                                      generator),
                           proposal=proposal, sampling=logsnr_sampling, delta=delta, xinterval=xinterval,
                           rounding=rounding, dequantize=dequantize, control_variate=control_variate,
                           batch_size=batch_size)
    return estimate(curves, reference, clamp=clamp)


def it_loss(denoiser: Denoiser, x: Tensor, reference: GaussianReference,
            generator: torch.Generator | None = None, proposal: LogSNRProposal | None = None,
            image_seeds=None) -> Tensor:
    """Training loss: the continuous estimate with ONE random log-SNR per image, no clamp ``[B]`` (nats).

    ``h_G + 1/2 (||eps - eps_hat||^2 - mmse_G(a)) / q(a)`` + the closed-form tails: an unbiased single-sample
    estimate of the unclamped continuous estimate of :func:`it_nll`, differentiable in the denoiser.
    The log-SNRs and noise come from ``generator``, or with ``image_seeds`` (one int per image) image i's
    from a generator seeded with ``image_seeds[i]``, so an image's loss does not depend on its batch.
    """
    proposal = proposal or LogSNRProposal.from_reference(reference)
    num = x.shape[0]
    if image_seeds is None:
        logsnr = proposal.points(num, "random", generator)
        eps = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    else:
        gens = [torch.Generator().manual_seed(s) for s in draw_seeds(num, image_seeds)]
        logsnr = torch.cat([proposal.points(1, "random", g) for g in gens])
        eps = torch.stack([torch.randn(x.shape[1:], dtype=torch.float64, generator=g) for g in gens])
    logsnr, eps = logsnr.to(x.device), eps.to(x.device)
    z = noisy_channel(x.detach().to(torch.float64), logsnr, eps)
    eps_hat = denoiser(z.to(x.dtype), logsnr.to(x.dtype))
    mse = (eps - eps_hat.to(torch.float64)).flatten(1).square().sum(1)
    log_q = proposal.log_prob(logsnr)[:, None]
    curve = continuous_nll_from_curve(mse[:, None], logsnr[:, None], log_q, reference.to(x.device),
                                      clamp=False, x=x.detach(), proposal=proposal, sampling="random")
    return curve.nll
