"""The IT bounds from error curves, per image in nats: the formulas, written once.

Pointwise I-MMSE (Kong, Brekelmans & Ver Steeg 2023, with the exact posterior mean, for every x):

- discrete x:    ``-ln P(x) = 1/2 int mmse(x, a) da``
- continuous x:  ``-ln p(x) = h_G + 1/2 int [mmse(x, a) - mmse_G(a)] da``

Inside the sampled range the integrals are importance-sampled
(:func:`itdiffusion.information.crossfit.integrate`); outside it the reference's Gaussian decoder
stands in, in closed form (:func:`continuous_tails`,
:func:`left_tail`), and above the discrete range a rounding decoder's bound (:func:`right_tail_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.information.crossfit import Decisions, chosen_integrand, integrate, mc_mean_and_stderr
from itdiffusion.information.proposal import LogSNRProposal
from itdiffusion.information.reference import GaussianReference


def continuous_tails(reference: GaussianReference, x: Tensor, bounds: tuple[float, float]) -> Tensor:
    """``1/2 int_{a outside [a_lo, a_hi]} [mmse_Gdec(x, a) - mmse_G(a)] da`` for the Gaussian decoder ``[B]``.

    With ``d t / d a = t (1 - t)`` the gap ``sum_i (rho_i - 1) t_i (1 - t_i)`` integrates in closed form:
    ``1/2 sum_i (rho_i - 1) [t_i(a_lo) + 1 - t_i(a_hi)]``. Zero on average over data with the reference's
    moments (which is why ITD can drop it), exact per image.
    """
    rho = reference.whiten_coords(x)
    lo, hi = bounds
    t_lo = torch.sigmoid(lo + reference.log_eigvals)
    t_hi = torch.sigmoid(hi + reference.log_eigvals)
    return 0.5 * ((rho - 1) * (t_lo + 1 - t_hi)).sum(-1)


def left_tail(reference: GaussianReference, x: Tensor, a_lo: float) -> Tensor:
    """``1/2 int_{-inf}^{a_lo} mmse_Gdec(x, a) da`` for the Gaussian decoder, in closed form ``[B]``.

    ``= 1/2 sum_i [ln(1 + e^{a_lo} lambda_i) + (rho_i - 1) t_i(a_lo)]``; its data average is ITD's left
    tail ``1/2 sum_i ln(1 + e^{a_lo} lambda_i)``.
    """
    rho = reference.whiten_coords(x)
    u = a_lo + reference.log_eigvals
    return 0.5 * (torch.nn.functional.softplus(u) + (rho - 1) * torch.sigmoid(u)).sum(-1)



def right_tail_bound(dim: int, delta: float, a_hi: float) -> float:
    """Upper bound on ``1/2 int_{a_hi}^inf mse(x, a) da`` for the decoder that rounds ``z / sqrt(s)``.

    ``z / sqrt(s) = x + n`` with ``n ~ N(0, e^-a)`` per coordinate. Rounding to the lattice errs only where
    ``|n| > delta/2``, and then ``|error| <= |n| + delta/2 < 2|n|``, so the eps-unit error per coordinate is
    at most ``4 e^a E[n^2; |n| > delta/2] = 8 [tau phi(tau) + Q(tau)]`` with ``tau = delta e^{a/2} / 2``
    (phi, Q: standard normal density and upper tail). With ``da = 2 dtau / tau`` and
    ``int_T^inf Q(tau) / tau dtau <= (phi(T) - T Q(T)) / T``:

        1/2 int_{a_hi}^inf mse da  <=  8 d phi(T) / T,      T = delta e^{a_hi / 2} / 2.

    Holds for every x (clamping to the data interval only lowers the error). ITD's code uses the looser
    ``8 n_bins^2 d exp(-e^{a_hi} delta^2 / 8)``. Negligible once T >~ 6 (:func:`resolving_logsnr`); large
    when the proposal stops short of the SNRs that resolve the lattice.
    """
    tau = 0.5 * delta * math.exp(0.5 * a_hi)
    return 8.0 * dim * math.exp(-0.5 * tau * tau) / (math.sqrt(2.0 * math.pi) * tau)



@dataclass
class CurveNLL:
    """Per-image estimate and its Monte Carlo standard error (nats); ``decisions``: the decoder and
    control-variate coefficient it used per image and log-SNR bin, and ``integrand`` ``[B, K]``: the per-point
    values (``f / q``, eps units, decoders and control variate applied) whose row mean, halved, is the
    estimate's sampled integral (continuous estimates)."""

    nll: Tensor
    stderr: Tensor
    decisions: Decisions | None = None
    integrand: Tensor | None = None


def _as_candidates(mmse: Tensor) -> Tensor:
    mmse = mmse.to(torch.float64)
    return mmse[None] if mmse.dim() == 2 else mmse



def _noise_control(gaussian_errors: Tensor | None, gaussian_mmse: Tensor, weight: Tensor) -> Tensor | None:
    """``(g - E_eps g) / q`` from the reference decoder's sampled errors g and their exact mean."""
    return None if gaussian_errors is None else (gaussian_errors.to(torch.float64) - gaussian_mmse) * weight


def continuous_nll_from_curve(mmse: Tensor, logsnr: Tensor, log_q: Tensor, reference: GaussianReference,
                              clamp: bool = True, *, x: Tensor | None = None,
                              gaussian_mmse: Tensor | None = None, tails: Tensor | None = None,
                              proposal: LogSNRProposal | None = None, sampling: str = "stratified",
                              gaussian_errors: Tensor | None = None,
                              within: tuple[float, float] | None = None,
                              reference_mmse: Tensor | None = None) -> CurveNLL:
    """``-ln p(x) = h_G + 1/2 E_q[(mmse(x, a) - mmse_G(a)) / q(a)]`` (+ tails), per image, in nats.

    ``mmse``: ``[B, K]`` eps-unit errors at the points ``logsnr`` ``[B, K]`` with proposal log-densities
    ``log_q`` ``[B, K]``; or ``[M, B, K]`` for M models evaluated on the same points and noise (an
    ensemble: ITD's pointwise minimum over models, made unbiased by :func:`cross_fitted_choice`; the first
    model is the default, another takes over in the bins where it is clearly better).
    ``clamp=True`` adds the reference's Gaussian decoder as a candidate (the test-time clamp where
    ``mmse > mmse_G``). Per image (exact): give ``x`` (the images, ``[B, *shape]``), or the two constants
    computed from it, ``gaussian_mmse`` ``[B, K]`` (:meth:`GaussianReference.pointwise_mmse`) and ``tails``
    ``[B]`` (:func:`continuous_tails`, the integral outside the sampled range). Without them the Gaussian
    decoder counts as its data average ``mmse_G(a)`` and the tails as zero (ITD's convention, right on
    average over data with the reference's moments). ``proposal``: the one the points were drawn from
    (default: the reference's); it defines the bins and the range. ``sampling``: how they were drawn, for
    the standard error (:func:`mc_mean_and_stderr`). ``gaussian_errors`` ``[B, K]`` (needs the per-image
    Gaussian error): the reference decoder's errors on the same points and noise
    (:meth:`GaussianReference.decoder_errors`); minus their exact mean they are a zero-mean control variate
    for the channel noise (:func:`~itdiffusion.information.crossfit.integrate`).
    ``reference_mmse`` ``[B, K]``: ``mmse_G`` at the points, when the caller has it already (it costs
    ``B K d`` operations).
    Differentiable in ``mmse`` (``it_loss`` uses it with K = 1 and no clamp).
    ``within = (lo, hi)`` (inside the sampled range): the integral restricted to it, the points outside
    counting zero (the Gaussian decoder there, whose integral outside ``within`` ``tails`` must then hold,
    e.g. ``continuous_tails(reference, x, within)``): ITD's range from the same curves.
    """
    proposal = proposal or LogSNRProposal.from_reference(reference)
    logsnr = logsnr.to(torch.float64)
    weight = torch.exp(-log_q.to(torch.float64))
    if x is not None:
        if gaussian_mmse is None and (clamp or gaussian_errors is not None):
            gaussian_mmse = reference.pointwise_mmse(x, logsnr)
        if tails is None:
            tails = continuous_tails(reference, x, proposal.bounds)
    if gaussian_errors is not None and gaussian_mmse is None:
        raise ValueError("continuous_nll_from_curve: gaussian_errors (the control variate) needs x or "
                         "gaussian_mmse")
    mmse_g = reference.mmse(logsnr) if reference_mmse is None else reference_mmse.to(torch.float64)
    candidates = [(_as_candidates(mmse) - mmse_g) * weight]
    if clamp:
        gap = torch.zeros_like(mmse_g) if gaussian_mmse is None else (gaussian_mmse - mmse_g) * weight
        candidates.append(gap)
    control = _noise_control(gaussian_errors, gaussian_mmse, weight)
    if within is not None:
        inside = ((logsnr >= within[0]) & (logsnr <= within[1])).to(weight.dtype)
        candidates = [c * inside for c in candidates]
        control = None if control is None else control * inside
    integrand, decisions = chosen_integrand(candidates, logsnr, proposal, control)
    mean, stderr = mc_mean_and_stderr(integrand, sampling)
    nll = reference.entropy + 0.5 * mean
    if tails is not None:
        nll = nll + tails
    return CurveNLL(nll, 0.5 * stderr, decisions, integrand)


def discrete_nll_from_curve(mmse: Tensor, logsnr: Tensor, log_q: Tensor, reference: GaussianReference,
                            delta: float, clamp: bool = True, *, x: Tensor | None = None,
                            gaussian_mmse: Tensor | None = None, left_tail_nats: Tensor | None = None,
                            proposal: LogSNRProposal | None = None, sampling: str = "stratified",
                            gaussian_errors: Tensor | None = None) -> CurveNLL:
    """``-ln P(x) = 1/2 int mse(x, a) da`` for data on a lattice of spacing ``delta``, per image, in nats.

    ``mmse``: ``[C, B, K]`` (or ``[B, K]``) eps-unit errors of C candidate decoders on the same points
    (e.g. the rounded and the raw x_hat of one network evaluation); per bin the cross-fitted best is used,
    plus the Gaussian decoder if ``clamp``. The first candidate is the default where the other images give
    too little evidence (put the rounded x_hat first: its error vanishes at high SNR, the raw one's does
    not). Inside the sampled range: ``1/2 E_q[mse / q]``; below it the Gaussian decoder
    (:func:`left_tail`); above it the rounding decoder (:func:`right_tail_bound`). Give the images ``x``, or
    the constants computed from them: ``gaussian_mmse`` ``[B, K]`` (when ``clamp`` or a control variate) and
    ``left_tail_nats`` ``[B]``. ``gaussian_errors`` ``[B, K]``: the reference decoder's errors on the same
    points and noise, a zero-mean control variate once their exact mean is subtracted (its fitted
    coefficient is near 0 at high SNR, where a rounded x_hat's error vanishes and the Gaussian's does not).
    """
    proposal = proposal or LogSNRProposal.from_reference(reference, delta=delta)
    logsnr = logsnr.to(torch.float64)
    weight = torch.exp(-log_q.to(torch.float64))
    a_lo, a_hi = proposal.bounds
    if x is not None:
        if gaussian_mmse is None and (clamp or gaussian_errors is not None):
            gaussian_mmse = reference.pointwise_mmse(x, logsnr)
        if left_tail_nats is None:
            left_tail_nats = left_tail(reference, x, a_lo)
    if left_tail_nats is None or (gaussian_mmse is None and (clamp or gaussian_errors is not None)):
        raise ValueError("discrete_nll_from_curve: give the images x (or gaussian_mmse and left_tail_nats)")
    candidates = [_as_candidates(mmse) * weight] + ([gaussian_mmse * weight] if clamp else [])
    mean, stderr = integrate(candidates, logsnr, proposal, sampling,
                             _noise_control(gaussian_errors, gaussian_mmse, weight))
    tails = left_tail_nats + right_tail_bound(reference.dim, delta, a_hi)
    return CurveNLL(0.5 * mean + tails, 0.5 * stderr)
