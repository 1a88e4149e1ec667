"""Likelihood estimators for masked diffusion (I-MDCE / I-MDSE, Jeon et al. 2025), in nats.

Every estimator averages K weighted masked cross-entropies per sequence (see ``masking``):

    estimate = (1/K) sum_k w_k * sum_{i in M_k} -log p(x_i | x_{~M_k}),

unbiased for -log p(x) when the denoiser is exact and an upper bound in expectation otherwise. The
standard error is the sample standard deviation over the K terms / sqrt(K); with stratified sampling
this overestimates the true error (stratification only removes variance), so it is conservative.

Network evaluations are counted per sequence; masks with no masked position are never sent to the
network (their term is 0), so the time integral's count can be below K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..units import nats_to_bpd
from .masking import (
    check_tokens,
    image_generators,
    maskable_rows,
    subset_masks,
    time_integral_masks,
    vocab_size_of,
)

SCHEDULES = ("time_integral", "time_free")
# I-MDSE evaluates the score at sigma = -log(1 - lambda): keep lambda < 1 so sigma stays finite.
_MAX_LAMBDA = 1.0 - 1e-12


@dataclass
class MaskedEstimate:
    """Per-sequence estimates (float64 [B], nats), their standard errors and the work they cost.

    ``samples`` [B, K] holds the K weighted terms whose mean is ``nats``; ``network_evals`` [B] (long)
    counts the forward passes spent on each sequence.
    """

    nats: Tensor
    stderr: Tensor
    samples: Tensor
    network_evals: Tensor

    @classmethod
    def from_samples(cls, samples: Tensor, network_evals: Tensor) -> MaskedEstimate:
        k = samples.shape[1]
        stderr = samples.std(dim=1) / math.sqrt(k) if k > 1 else torch.full_like(samples[:, 0], math.nan)
        return cls(samples.mean(dim=1), stderr, samples, network_evals)

    def bpd(self, dim: int) -> tuple[Tensor, Tensor]:
        """(estimate, stderr) in bits per dimension for sequences of ``dim`` scored tokens."""
        return nats_to_bpd(self.nats, dim), nats_to_bpd(self.stderr, dim)


@dataclass
class _MaskPlan:
    masks: Tensor  # Bool [B, K, L] (CPU)
    weights: Tensor  # float64 [B, K]
    lam: Tensor | None  # float64 [B, K], time-integral plans only


def _plan(tokens: Tensor, maskable: Tensor | None, num_masks: int, schedule: str, *,
          lambda_power: float, stratified: bool, generator: torch.Generator | None,
          image_seeds: Sequence[int] | None) -> _MaskPlan:
    """Draw K masks and weights for every sequence from that sequence's own generator."""
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    batch, length = tokens.shape
    rows = maskable_rows(maskable, batch, length)
    gens = image_generators(batch, generator, image_seeds)
    masks, weights, lams = [], [], []
    for row, gen in zip(rows, gens, strict=True):
        if schedule == "time_integral":
            m, w, lam = time_integral_masks(row, num_masks, gen, power=lambda_power, stratified=stratified)
            lams.append(lam)
        elif schedule == "time_free":
            m, w = subset_masks(row, num_masks, gen, scheme="harmonic", stratified=stratified)
        else:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        masks.append(m)
        weights.append(w)
    return _MaskPlan(torch.stack(masks), torch.stack(weights), torch.stack(lams) if lams else None)


def _masked_sums(term_fn: Callable[[Tensor, Tensor, Tensor], Tensor], tokens: Tensor, plan: _MaskPlan,
                 mask_id: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """sum_{i in M_bk} term_fn(noisy, targets, rows)[i] for every (b, k) with a non-empty mask.

    ``term_fn(noisy Long[n, L], targets Long[n, L], rows Long[n]) -> per-token terms [n, L]`` where
    ``rows`` indexes the flattened (b, k) pairs. Returns sums float64 [B, K] and network evals [B].
    """
    batch, k, length = plan.masks.shape
    flat = plan.masks.reshape(batch * k, length)
    active = flat.any(dim=1).nonzero().squeeze(1)
    sums = torch.zeros(batch * k, dtype=torch.float64, device=tokens.device)
    for rows in active.split(batch_size):
        mask = flat[rows].to(tokens.device)
        rows = rows.to(tokens.device)
        targets = tokens[rows // k]
        terms = term_fn(targets.masked_fill(mask, mask_id), targets, rows)
        sums[rows] = torch.where(mask, terms, 0.0).sum(dim=1, dtype=torch.float64)
    evals = flat.any(dim=1).reshape(batch, k).sum(dim=1)
    return sums.reshape(batch, k), evals


def _log_probs(logits: Tensor) -> Tensor:
    """log-softmax over the vocabulary in at least float32 (half-precision logits under autocast)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _cross_entropy_fn(denoiser) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Per-token -log p(x_i | unmasked) from a masked denoiser's logits."""
    def term(noisy: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
        logp = _log_probs(denoiser(noisy))
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return term


def _weighted_cross_entropy(denoiser, tokens: Tensor, plan: _MaskPlan, batch_size: int) -> MaskedEstimate:
    mask_id = vocab_size_of(denoiser)
    sums, evals = _masked_sums(_cross_entropy_fn(denoiser), tokens, plan, mask_id, batch_size)
    return MaskedEstimate.from_samples(plan.weights.to(sums.device) * sums, evals.to(sums.device))


@torch.no_grad()
def time_integral_nll(denoiser, tokens: Tensor, *, num_masks: int, maskable: Tensor | None = None,
                      lambda_power: float = 2.0, stratified: bool = True, batch_size: int = 256,
                      generator: torch.Generator | None = None,
                      image_seeds: Sequence[int] | None = None) -> MaskedEstimate:
    """I-MDCE time integral: -log p(x) = int_0^1 (1/lambda) E[sum_{masked i} -log p(x_i|x_{~M})] dlambda.

    Each maskable position is masked independently with probability lambda; lambda = u^lambda_power
    with u stratified over (0, 1] and importance weight lambda_power/u (finite variance for
    lambda_power > 1). With ``maskable`` (Bool[L] or [B, L]) only those positions are masked and the
    result is -log p(x_maskable | x_rest). Nats per sequence; call ``denoiser.eval()`` first.
    """
    check_tokens(tokens, vocab_size_of(denoiser))
    plan = _plan(tokens, maskable, num_masks, "time_integral", lambda_power=lambda_power,
                 stratified=stratified, generator=generator, image_seeds=image_seeds)
    return _weighted_cross_entropy(denoiser, tokens, plan, batch_size)


@torch.no_grad()
def time_free_nll(denoiser, tokens: Tensor, *, num_masks: int, maskable: Tensor | None = None,
                  stratified: bool = True, batch_size: int = 256, generator: torch.Generator | None = None,
                  image_seeds: Sequence[int] | None = None) -> MaskedEstimate:
    """Time-free I-MDCE: -log p(x) = H_n E_{m, S}[ sum_{i in S} -log p(x_i | x_{~S}) ].

    m in {1..n} with P(m) = (1/m)/H_n (m = n included; stratified inverse-CDF draws), S a uniform
    subset of m of the n maskable positions. ``maskable`` as in ``time_integral_nll``. Nats per sequence.
    """
    check_tokens(tokens, vocab_size_of(denoiser))
    plan = _plan(tokens, maskable, num_masks, "time_free", lambda_power=2.0, stratified=stratified,
                 generator=generator, image_seeds=image_seeds)
    return _weighted_cross_entropy(denoiser, tokens, plan, batch_size)


def masked_nll(denoiser, tokens: Tensor, *, schedule: str = "time_free", **kwargs) -> MaskedEstimate:
    """``time_integral_nll`` or ``time_free_nll`` by name (``schedule``), other arguments passed on."""
    if schedule == "time_integral":
        return time_integral_nll(denoiser, tokens, **kwargs)
    if schedule == "time_free":
        return time_free_nll(denoiser, tokens, **kwargs)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def conditional_nll(denoiser, tokens: Tensor, response: Tensor, *, schedule: str = "time_free",
                    **kwargs) -> MaskedEstimate:
    """-log p(x_response | x_prompt) in nats: only ``response`` positions (Bool[L] or [B, L]) are masked."""
    return masked_nll(denoiser, tokens, schedule=schedule, maskable=response, **kwargs)


@torch.no_grad()
def coupled_log_ratio(denoiser, x: Tensor, y: Tensor, *, num_masks: int, schedule: str = "time_free",
                      maskable: Tensor | None = None, lambda_power: float = 2.0, stratified: bool = True,
                      batch_size: int = 256, generator: torch.Generator | None = None,
                      image_seeds: Sequence[int] | None = None) -> MaskedEstimate:
    """log p(y) - log p(x) in nats, with the same masks and weights for x and y.

    Each term is w_k [sum_{i in M_k} -log p(x_i | x_{~M_k}) - sum_{i in M_k} -log p(y_i | y_{~M_k})];
    where x and y agree, the two sums largely cancel, so the variance is far below that of two
    independent estimates. ``network_evals`` counts both sequences (2 per non-empty mask).
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    vocab = vocab_size_of(denoiser)
    check_tokens(x, vocab)
    check_tokens(y, vocab)
    plan = _plan(x, maskable, num_masks, schedule, lambda_power=lambda_power, stratified=stratified,
                 generator=generator, image_seeds=image_seeds)
    nll_x = _weighted_cross_entropy(denoiser, x, plan, batch_size)
    nll_y = _weighted_cross_entropy(denoiser, y, plan, batch_size)
    return MaskedEstimate.from_samples(nll_x.samples - nll_y.samples,
                                       nll_x.network_evals + nll_y.network_evals)


def _score_entropy_fn(score_model, lam: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Per-token (1/r) * denoising score entropy from log concrete scores at mask rate ``lam[rows]``."""
    sigma = -torch.log1p(-lam)
    log_r = torch.log1p(-lam) - torch.log(lam)  # r = e^-sigma / (1 - e^-sigma) = (1 - lam) / lam

    def term(noisy: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
        log_c = score_model(noisy, sigma[rows]).to(torch.float64) - log_r[rows, None, None]
        return log_c.exp().sum(dim=-1) - log_c.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - 1.0
    return term


@torch.no_grad()
def imdse_nll(score_model, tokens: Tensor, *, num_masks: int, maskable: Tensor | None = None,
              lambda_power: float = 2.0, stratified: bool = True, batch_size: int = 256,
              generator: torch.Generator | None = None,
              image_seeds: Sequence[int] | None = None) -> MaskedEstimate:
    """I-MDSE: -log p(x) = int_0^inf E[ sum_{masked i} DSE_i(sigma) ] dsigma, for a concrete-score model.

    Absorbing process in SEDD's total noise sigma: each token is masked with probability
    lambda = 1 - e^-sigma. ``score_model(tokens, sigma: float64[B]) -> log s [B, L, V]`` estimates the
    log concrete score log p_sigma(x^{i<-v}) / p_sigma(x) at masked positions i. The denoising score
    entropy of a masked position with clean value x_i (SEDD's loss, target ratio r on x_i, 0 elsewhere)

        DSE_i = sum_v s_v - r log s_{x_i} + r (log r - 1),   r = e^-sigma / (1 - e^-sigma),

    is minimised by the exact score s_v = r p(v | x_unmasked), where it equals r (-log p(x_i | ...));
    with dsigma = dlambda/(1 - lambda) the integral becomes the I-MDCE one. Writing c = s/r,
    (dsigma/dlambda) DSE_i = (1/lambda)(sum_v c_v - log c_{x_i} - 1), which is what is summed (stable at
    lambda -> 1), over lambda = u^lambda_power as in ``time_integral_nll``. An inexact score gives a
    larger value in expectation: sum_v c_v - 1 >= log sum_v c_v.
    """
    check_tokens(tokens, vocab_size_of(score_model))
    plan = _plan(tokens, maskable, num_masks, "time_integral", lambda_power=lambda_power,
                 stratified=stratified, generator=generator, image_seeds=image_seeds)
    lam = plan.lam.clamp(max=_MAX_LAMBDA).flatten().to(tokens.device)
    term = _score_entropy_fn(score_model, lam)
    sums, evals = _masked_sums(term, tokens, plan, vocab_size_of(score_model), batch_size)
    return MaskedEstimate.from_samples(plan.weights.to(sums.device) * sums, evals.to(sums.device))


def any_order_loss(denoiser, tokens: Tensor, *, scheme: str = "uniform",
                   generator: torch.Generator | None = None,
                   image_seeds: Sequence[int] | None = None) -> Tensor:
    """Training loss (differentiable), nats per sequence, one mask per sequence.

    The time-free I-MDCE with a chosen mask-size proposal: m ~ P(m), a uniform subset S of size m,
    loss = sum_{i in S} -log p(x_i | x_{~S}) / (m P(m)). "uniform" (default) is the any-order
    autoregressive loss, weight L/m, which trains every context size equally; "harmonic" is the
    evaluation form, weight H_L. Both have expectation sum_S beta(S) (...) >= -log p(x).
    With ``image_seeds`` each sequence draws its mask from its own seed (independent of batching).
    """
    vocab = vocab_size_of(denoiser)
    check_tokens(tokens, vocab)
    batch, length = tokens.shape
    gens = image_generators(batch, generator, image_seeds)
    masks, weights = zip(*(subset_masks(torch.ones(length, dtype=torch.bool), 1, gen, scheme=scheme,
                                        stratified=False) for gen in gens), strict=True)
    mask = torch.cat(masks).to(tokens.device)
    logp = _log_probs(denoiser(tokens.masked_fill(mask, vocab)))
    nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    weight = torch.cat(weights).to(device=tokens.device, dtype=logp.dtype)
    return weight * torch.where(mask, nll, 0.0).sum(dim=1)
