"""Masked (absorbing) diffusion: the denoiser protocol and the mask-sampling schemes.

Tokens are a LongTensor ``[B, L]`` over a vocabulary ``{0, ..., V-1}``; the mask id is ``V``.
A masked denoiser maps tokens to logits ``[B, L, V]`` whose log-softmax at a masked position i is
``log p(x_i = v | unmasked part)``; outputs at unmasked positions are ignored.

Every likelihood estimator in this package is an average over K masks M_k (a subset of the maskable
positions) of a weighted masked cross-entropy,

    value_k = w_k * sum_{i in M_k} -log p(x_i | x outside M_k),

and the schemes below differ only in how (M_k, w_k) are drawn. All of them rest on one identity. With
n maskable positions and each masked independently with probability lambda (I-MDCE),

    -log p(x) = int_0^1 (1/lambda) E_M[ sum_{i in M} -log p(x_i | x_{~M}) ] dlambda,

and integrating lambda out for a fixed subset S of size m gives its exact weight

    beta(S) = int_0^1 lambda^(m-1) (1-lambda)^(n-m) dlambda = B(m, n-m+1) = 1 / (m * C(n, m)),

so -log p(x) = sum_S beta(S) sum_{i in S} -log p(x_i | x_{~S}) (the any-order autoregressive NLL).

- Time integral: lambda = u^power with u ~ U(0, 1] (stratified over K), importance weight
  1/(lambda q(lambda)) = power / u. Uniform lambda (power = 1) is unbiased but has infinite variance:
  a mask of ~lambda*n tokens weighted 1/lambda has variance ~ n/lambda, not integrable at 0. Any
  power > 1 makes it finite; the default 2 gives a variance of order n^2/3 on independent tokens.
- Subset schemes: draw m ~ P(m), then a uniform subset of size m; weight beta(S)/P(S) = 1/(m P(m)).
  "harmonic": P(m) = (1/m)/H_n, weight H_n (the time-free I-MDCE, m = n included);
  "uniform": P(m) = 1/n, weight n/m (the any-order autoregressive training loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

SUBSET_SCHEMES = ("harmonic", "uniform")


@runtime_checkable
class MaskedDenoiser(Protocol):
    """``denoiser(tokens: Long[B, L] with mask id = vocab_size) -> logits [B, L, vocab_size]``."""

    vocab_size: int

    def __call__(self, tokens: Tensor) -> Tensor: ...


def vocab_size_of(denoiser) -> int:
    """The vocabulary size V (the mask id) of a denoiser, looking through a DDP wrapper's ``.module``."""
    for obj in (denoiser, getattr(denoiser, "module", None)):
        size = getattr(obj, "vocab_size", None)
        if isinstance(size, int):
            return size
    raise TypeError(
        f"{type(denoiser).__name__} has no integer `vocab_size` attribute: a masked denoiser must say "
        "its vocabulary size V (tokens are 0..V-1, the mask id is V)"
    )


def harmonic_number(n: int) -> float:
    """H_n = sum_{m=1}^n 1/m."""
    return math.fsum(1.0 / m for m in range(1, n + 1))


def check_tokens(tokens: Tensor, vocab_size: int) -> None:
    if tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError(f"tokens must be a LongTensor [B, L], got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"tokens must lie in [0, {vocab_size - 1}] (clean data, no mask id {vocab_size}); "
            f"got range [{tokens.min().item()}, {tokens.max().item()}]"
        )


def maskable_rows(maskable: Tensor | None, batch: int, length: int) -> Tensor:
    """Normalise ``maskable`` (None: every position; Bool[L] or Bool[B, L]) to Bool[B, L] on the CPU."""
    if maskable is None:
        return torch.ones(batch, length, dtype=torch.bool)
    if maskable.dtype != torch.bool or maskable.shape[-1] != length or maskable.dim() not in (1, 2):
        raise ValueError(f"maskable must be a BoolTensor [L] or [B, L] with L={length}, "
                         f"got {maskable.dtype} {tuple(maskable.shape)}")
    rows = maskable.cpu().expand(batch, length)
    if not rows.any(dim=1).all():
        raise ValueError("maskable has a row with no maskable position: nothing to estimate there")
    return rows


def image_generators(batch: int, generator: torch.Generator | None,
                     image_seeds: Sequence[int] | None) -> list[torch.Generator | None]:
    """One CPU generator per image: its own seed (results independent of batching) or a shared one."""
    if image_seeds is None:
        return [generator] * batch
    if len(image_seeds) != batch:
        raise ValueError(f"image_seeds has {len(image_seeds)} seeds for {batch} images")
    return [torch.Generator().manual_seed(int(seed)) for seed in image_seeds]


def _uniforms(k: int, generator: torch.Generator | None, stratified: bool) -> Tensor:
    """K values in (0, 1], float64; stratified: one in each interval ((j)/K, (j+1)/K]."""
    v = torch.rand(k, generator=generator, dtype=torch.float64)
    if stratified:
        return (torch.arange(k, dtype=torch.float64) + 1.0 - v) / k
    return 1.0 - v


def time_integral_masks(maskable: Tensor, k: int, generator: torch.Generator | None, *,
                        power: float = 2.0, stratified: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """K masks for one sequence: lambda = u^power, each maskable position masked w.p. lambda.

    Returns ``masks`` Bool[K, L], ``weights`` [K] = power/u = 1/(lambda q(lambda)) and ``lam`` [K].
    """
    if not power > 1.0:
        raise ValueError(f"lambda_power must be > 1 (power = 1, uniform lambda, has infinite variance), "
                         f"got {power}")
    u = _uniforms(k, generator, stratified)
    lam = u**power
    keys = torch.rand(k, maskable.numel(), generator=generator, dtype=torch.float64)
    masks = (keys < lam[:, None]) & maskable
    return masks, power / u, lam


def subset_size_pmf(n: int, scheme: str) -> Tensor:
    """P(m) for m = 1..n (index m-1), float64: "harmonic" (1/m)/H_n or "uniform" 1/n."""
    m = torch.arange(1, n + 1, dtype=torch.float64)
    if scheme == "harmonic":
        pmf = 1.0 / m
    elif scheme == "uniform":
        pmf = torch.ones_like(m)
    else:
        raise ValueError(f"unknown subset scheme {scheme!r}; expected one of {SUBSET_SCHEMES}")
    return pmf / pmf.sum()


def subset_masks(maskable: Tensor, k: int, generator: torch.Generator | None, *,
                 scheme: str = "harmonic", stratified: bool = True) -> tuple[Tensor, Tensor]:
    """K masks for one sequence: m ~ P(m), then a uniform subset of m maskable positions.

    Returns ``masks`` Bool[K, L] and ``weights`` [K] = 1/(m P(m)) (H_n for "harmonic").
    """
    n = int(maskable.sum())
    pmf = subset_size_pmf(n, scheme)
    cdf = pmf.cumsum(0)
    cdf[-1] = 1.0  # u <= 1 always finds a size, whatever the rounding of the cumulative sum
    m = torch.searchsorted(cdf, _uniforms(k, generator, stratified)) + 1
    keys = torch.rand(k, maskable.numel(), generator=generator, dtype=torch.float64)
    keys[:, ~maskable] = 2.0  # never among the m smallest
    rank = keys.argsort(dim=1).argsort(dim=1)
    masks = rank < m[:, None]
    return masks, 1.0 / (m * pmf[m - 1])
