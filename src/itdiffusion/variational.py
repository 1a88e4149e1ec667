"""IDDPM's variational bound, per image, in bits/dim, with its terms.

For data x_0 (pixels scaled to [-1, 1]) and a chain of T steps with ``abar_t = prod_{s<=t} (1 - beta_s)``
(t = 0..T-1, ``abar_{-1} = 1``),

    -log p(x_0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0,

    L_prior = KL(q(x_{T-1} | x_0) || N(0, I)),   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),
    L_t     = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),   x_t ~ q(x_t | x_0) (one draw per t),
    L_0     = -log p(x_0 | x_{t=0}): IDDPM's discretized Gaussian decoder (bins of 2/255, open-ended
              at -1 and 1), or with ``continuous_density=True`` the Gaussian density
              -log N(x_0; mu_theta, sigma_theta^2) (ITD's ``cont_density`` benchmark, a continuous NLL).

Terms are in bits/dim: nats summed over the d dimensions of an image, divided by d ln 2.

The posterior is ``q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, beta~_t)`` with
``c0_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``,
``ct_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)``,
``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (log-variance clipped at t = 0 to that of t = 1).
The model's mean is the same expression at ``x_0 = x_hat`` (from its eps or x_0 prediction, clipped to
[-1, 1] when ``clip_denoised``); its log-variance is IDDPM's (learned range between ``log beta~_t`` and
``log beta_t``, or fixed). This is ``GaussianDiffusion.calc_bpd_loop`` term for term (same noise
order), with several timesteps per forward pass and float64 arithmetic outside the network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.units import nats_to_bpd


@dataclass
class VLBResult:
    """Per-image bits/dim (float64). ``terms_bpd[:, t]`` is the term of step t: ``L_t`` for t >= 1 and
    the decoder ``L_0`` at t = 0 (``calc_bpd_loop``'s ``vb`` lists the same terms from t = T-1 down)."""

    total_bpd: Tensor  # [B] prior + sum of terms
    prior_bpd: Tensor  # [B]
    terms_bpd: Tensor  # [B, T]
    decoder_bpd: Tensor  # [B] = terms_bpd[:, 0]
    continuous_density: bool  # True: decoder is a density, total a continuous NLL
    discrete_decoder_bpd: Tensor  # [B] IDDPM's discretized Gaussian decoder, from the same pass
    continuous_decoder_bpd: Tensor  # [B] the Gaussian density of x_0, from the same pass

    def total(self, continuous_density: bool) -> Tensor:
        """The bound with either decoder (both come from one network pass at t = 0), bits/dim [B]."""
        decoder = self.continuous_decoder_bpd if continuous_density else self.discrete_decoder_bpd
        return self.prior_bpd + self.terms_bpd[:, 1:].sum(1) + decoder

    def mc_stderr(self, continuous_density: bool | None = None) -> Tensor:
        """Monte Carlo standard error of each image's total from the per-term noise, bits/dim ``[B]``.

        Each KL term ``L_t`` (t >= 1) comes from one noise draw, so its variance cannot be measured alone.
        Collapsed strata over adjacent steps: in each group of 4 consecutive terms the third difference
        ``D = L_t - 3 L_{t+1} + 3 L_{t+2} - L_{t+3}`` cancels a locally quadratic trend of the means, and with
        independent draws ``E[D^2] = 20 sigma^2``, so ``Var(group sum) ~ 4 D^2 / 20``; summed over groups
        (terms left over scale it up by ``T / (4 n)``). Pairs (first differences, as
        :func:`~itdiffusion.information.crossfit.mc_mean_and_stderr`) count the steep fall of the means at
        small t as noise (3x too large on a 50-step model); third differences matched the spread over 30
        seeds within 15% (``tests/test_variational.py``). The prior is exact; the decoder's own noise (one
        draw of x_1) is not included. The same for either decoder (``continuous_density`` is accepted for
        symmetry with :meth:`total`).
        """
        kl = self.terms_bpd[:, 1:]
        k = kl.shape[1]
        groups = k // VLB_STDERR_GROUP
        if groups == 0:
            return torch.full_like(self.total_bpd, math.nan)
        blocks = kl[:, :groups * VLB_STDERR_GROUP].reshape(kl.shape[0], groups, VLB_STDERR_GROUP)
        third = blocks @ blocks.new_tensor([-1.0, 3.0, -3.0, 1.0])
        var = (third.square() * (VLB_STDERR_GROUP / 20.0)).sum(1) * (k / (groups * VLB_STDERR_GROUP))
        return var.sqrt()


VLB_STDERR_GROUP = 4  # consecutive KL terms per collapsed stratum (third differences: E[D^2] = 20 sigma^2)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-log N(x; mean, e^logvar) elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


class _Chain:
    """The chain's per-step constants (float64 tensors indexed by step t) and the model's parametrization."""

    def __init__(self, diffusion: Any, device: torch.device):
        beta = np.asarray(diffusion.betas, dtype=np.float64)
        if len(beta) < 2:
            raise ValueError("the variational bound needs at least 2 diffusion steps")
        abar = np.cumprod(1.0 - beta)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))

        def tensor(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        self.sqrt_abar, self.sqrt_1m_abar = tensor(np.sqrt(abar)), tensor(np.sqrt(1.0 - abar))
        self.c0 = tensor(beta * np.sqrt(abar_prev) / (1.0 - abar))
        self.ct = tensor((1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar))
        self.post_logvar = tensor(post_logvar)
        self.log_beta = tensor(np.log(beta))
        self.fixed_large_logvar = tensor(np.log(np.append(post_var[1], beta[1:])))

        self.var_type = diffusion.model_var_type.name
        self.mean_type = diffusion.model_mean_type.name
        if self.mean_type not in ("EPSILON", "START_X"):
            raise NotImplementedError(f"model_mean_type {self.mean_type} (only EPSILON and START_X)")
        # The U-Net's timestep for step t, as improved-diffusion computes it (respacing included).
        step_map = getattr(diffusion, "timestep_map", None)
        self.step_map = tensor(np.asarray(step_map if step_map is not None else range(len(beta)), np.int64))
        self.original_steps = getattr(diffusion, "original_num_steps", len(beta))
        self.rescale_timesteps = diffusion.rescale_timesteps

    def model_timesteps(self, t: Tensor) -> Tensor:
        steps = self.step_map[t]
        return steps.float() * (1000.0 / self.original_steps) if self.rescale_timesteps else steps

    def model_logvar(self, t: Tensor, var_out: Tensor | None, like: Tensor) -> Tensor:
        """log-variance of p(x_{t-1} | x_t), shaped like ``like``."""
        if self.var_type == "LEARNED_RANGE":
            frac = (var_out + 1) / 2  # the network's [-1, 1] spans [log beta~_t, log beta_t]
            return frac * _col(self.log_beta[t], like) + (1 - frac) * _col(self.post_logvar[t], like)
        if self.var_type == "LEARNED":
            return var_out
        table = self.fixed_large_logvar if self.var_type == "FIXED_LARGE" else self.post_logvar
        return _col(table[t], like).expand_as(like)


def _col(v: Tensor, like: Tensor) -> Tensor:
    """A per-row value [N] as a column broadcasting against ``like`` [N, ...]."""
    return v.view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def vlb(model: nn.Module, diffusion: Any, x: Tensor, *, continuous_density: bool = False,
        clip_denoised: bool = True, steps_per_batch: int = 8, generator: torch.Generator | None = None,
        progress: bool = False) -> VLBResult:
    """IDDPM's variational bound of images ``x`` ([B, C, H, W] in [-1, 1]) in bits/dim.

    ``diffusion`` is improved-diffusion's (Spaced)GaussianDiffusion for the model (its betas,
    parametrization and timestep rescaling are used). One noise draw per step and image, drawn
    from ``generator`` (the global RNG if None) in ``calc_bpd_loop``'s order (t = T-1 down to 0,
    a [B, C, H, W] draw each in the dtype of ``x``, as ``calc_bpd_loop``'s ``randn_like(x)``), so the
    same seed gives ``calc_bpd_loop``'s noise for float32 and float64 images alike (the arithmetic here
    is float64, so float32 images agree to float32 rounding). ``steps_per_batch``
    timesteps share a forward pass (``B * steps_per_batch`` images). The model should be in eval
    mode (dropout off). ``clip_denoised`` clips x_hat to [-1, 1] as ``calc_bpd_loop`` does by default.
    ``continuous_density`` picks the decoder in ``terms_bpd`` and ``total_bpd``; both decoders are always
    returned (``VLBResult.total(continuous_density)``), so one call serves both variants.
    """
    if steps_per_batch < 1:
        raise ValueError(f"steps_per_batch must be >= 1, got {steps_per_batch}")
    chain = _Chain(diffusion, x.device)
    model_dtype = next(model.parameters()).dtype
    x0 = x.to(torch.float64)
    draw_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
    batch, dim = x0.shape[0], x0[0].numel()
    steps = torch.arange(diffusion.num_timesteps - 1, -1, -1, device=x.device)
    terms = x0.new_zeros(batch, len(steps))
    decoders = x0.new_zeros(batch, 2)  # [discrete, continuous] decoder bits/dim
    chunks = steps.split(steps_per_batch)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="VLB", unit="chunk")
    for chunk in chunks:
        t = chunk.repeat_interleave(batch)  # [K*B]: K steps, each for all B images
        x0_rep = x0.repeat(len(chunk), *([1] * (x0.ndim - 1)))
        noise = torch.cat([_randn(x0.shape, generator, x0.device, draw_dtype) for _ in chunk])
        nats, decoder_nats = _step_nats(model, chain, x0_rep, t, noise, model_dtype, clip_denoised)
        if decoder_nats is not None:  # rows of step 0 come image by image
            decoders = nats_to_bpd(decoder_nats, dim)
            nats[t == 0] = decoder_nats[:, int(continuous_density)]
        terms[:, chunk] = nats_to_bpd(nats, dim).view(len(chunk), batch).T
    prior = normal_kl(chain.sqrt_abar[-1] * x0, 2 * torch.log(chain.sqrt_1m_abar[-1]),
                      torch.zeros_like(x0), torch.zeros_like(x0))
    prior_bpd = nats_to_bpd(prior.flatten(1).sum(1), dim)
    return VLBResult(total_bpd=prior_bpd + terms.sum(1), prior_bpd=prior_bpd, terms_bpd=terms,
                     decoder_bpd=terms[:, 0], continuous_density=continuous_density,
                     discrete_decoder_bpd=decoders[:, 0], continuous_decoder_bpd=decoders[:, 1])


def vlb_per_image(model: nn.Module, diffusion: Any, x: Tensor, seeds: list[int], *,
                  steps_per_batch: int = 8) -> VLBResult:
    """:func:`vlb` of each image with its noise from its own seed (``seeds[b]`` seeds a generator on
    ``x``'s device), so an image's bound does not depend on its batch or on the number of processes."""
    results = [vlb(model, diffusion, x[b:b + 1], steps_per_batch=steps_per_batch,
                   generator=torch.Generator(device=x.device).manual_seed(int(seed)))
               for b, seed in enumerate(seeds)]
    return VLBResult(**{f.name: results[0].continuous_density if f.name == "continuous_density"
                        else torch.cat([getattr(r, f.name) for r in results])
                        for f in dataclasses.fields(VLBResult)})


def _step_nats(model: nn.Module, chain: _Chain, x0: Tensor, t: Tensor, noise: Tensor,
               model_dtype: torch.dtype, clip_denoised: bool) -> tuple[Tensor, Tensor | None]:
    """The KL term L_t (nats per image) of step ``t[i]`` for row i, and, for the rows with t = 0, both
    decoders -log p(x_0 | x_1) as ``[n, 2]`` (discretized Gaussian, Gaussian density); None if no such row."""
    xt = _col(chain.sqrt_abar[t], x0) * x0 + _col(chain.sqrt_1m_abar[t], x0) * noise
    out = model(xt.to(model_dtype), chain.model_timesteps(t)).to(torch.float64)
    channels = x0.shape[1]
    learned = chain.var_type in ("LEARNED", "LEARNED_RANGE")
    if out.shape[1] != (2 if learned else 1) * channels:
        raise ValueError(f"the model returned {out.shape[1]} channels for {channels}-channel images with "
                         f"{chain.var_type} variances: check learn_sigma")
    pred, var_out = (out[:, :channels], out[:, channels:]) if learned else (out, None)
    if chain.mean_type == "EPSILON":
        x_hat = (xt - _col(chain.sqrt_1m_abar[t], xt) * pred) / _col(chain.sqrt_abar[t], xt)
    else:
        x_hat = pred
    if clip_denoised:
        x_hat = x_hat.clamp(-1, 1)
    mean_p = _col(chain.c0[t], xt) * x_hat + _col(chain.ct[t], xt) * xt
    logvar_p = chain.model_logvar(t, var_out, xt)
    mean_q = _col(chain.c0[t], xt) * x0 + _col(chain.ct[t], xt) * xt
    nats = normal_kl(mean_q, _col(chain.post_logvar[t], xt), mean_p, logvar_p).flatten(1).sum(1)
    last = t == 0
    if not last.any():
        return nats, None
    decoders = torch.stack([_decoder_nll(x0[last], mean_p[last], logvar_p[last], density)
                            for density in (False, True)], dim=1)
    return nats, decoders


def _decoder_nll(x0: Tensor, mean: Tensor, logvar: Tensor, continuous_density: bool) -> Tensor:
    """-log p(x_0 | x_1) summed over dims (nats): discretized Gaussian (IDDPM) or Gaussian density."""
    if continuous_density:
        nll = gaussian_nll(x0, mean, logvar)
    else:
        nll = -improved_diffusion().losses.discretized_gaussian_log_likelihood(
            x0, means=mean, log_scales=0.5 * logvar)
    return nll.flatten(1).sum(1)


def _randn(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normal draws in ``dtype`` (the images', as ``calc_bpd_loop``), returned as float64."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=draw_on).to(device, torch.float64)


# ----------------------------------------------------------------------------------------------
# The sampled-timestep bound: prior and decoder exact, the T-1 middle terms from K geometric strata.
# ----------------------------------------------------------------------------------------------
VLB_ALL_STEPS = "all"  # estimator.vlb_steps: the exact T-step sum (vlb_per_image)


@dataclass
class SampledVLB:
    """Per-image unbiased estimates of the bound (bits/dim, float64 ``[B]``) from K sampled middle steps.

    ``discrete_bpd`` / ``continuous_bpd``: prior + estimated ``sum_{t=1}^{T-1} L_t`` + the decoder (IDDPM's
    discretized Gaussian, or the Gaussian density of x_0); ``mc_stderr_bpd``: the Monte Carlo standard
    error of the middle sum (the same for both, the other terms are exact); ``edges``: the strata
    ``[edges[j], edges[j+1])`` over t; ``network_evals``: forward passes per image (K strata + the decoder).
    """

    discrete_bpd: Tensor
    continuous_bpd: Tensor
    mc_stderr_bpd: Tensor
    prior_bpd: Tensor
    middle_bpd: Tensor
    edges: Tensor
    network_evals: int

    def total(self, continuous_density: bool) -> Tensor:
        return self.continuous_bpd if continuous_density else self.discrete_bpd


def geometric_strata(num_steps: int, nstrata: int) -> Tensor:
    """Edges ``[S + 1]`` (int64) of ``S = nstrata`` strata covering the middle steps ``t = 1 .. T-1``.

    Edge j is near ``T^(j/S)`` (geometric in t: the terms ``L_t`` fall roughly like 1/t, so each stratum
    then holds a similar share of the sum), at least one step wide; the first strata are single steps
    (exact) when S is large. ``S`` must be in ``[1, T - 1]``.
    """
    if not 1 <= nstrata <= num_steps - 1:
        raise ValueError(f"nstrata must be in [1, {num_steps - 1}], got {nstrata}")
    edges = [1]
    for j in range(1, nstrata):
        target = round(num_steps ** (j / nstrata))
        edges.append(min(max(edges[-1] + 1, target), num_steps - (nstrata - j)))
    edges.append(num_steps)
    return torch.tensor(edges, dtype=torch.long)


@torch.no_grad()
def vlb_sampled(model: nn.Module, diffusion: Any, x: Tensor, seeds: list[int], nsteps: int, *,
                clip_denoised: bool = True, batch_size: int = 256) -> SampledVLB:
    """An unbiased estimate of :func:`vlb`'s bound of each image from ``nsteps`` network evaluations of the
    middle terms (plus one for the decoder), with its Monte Carlo standard error.

    The middle sum ``sum_{t=1}^{T-1} L_t`` is split into ``nsteps`` :func:`geometric_strata`; in stratum j
    (``n_j`` steps) one step ``t_j`` is drawn uniformly with one noise draw, and ``n_j L_{t_j}`` is unbiased
    for the stratum's sum (over steps and noise, the quantity the full sum also estimates with one noise
    draw per step). The prior is closed form and the decoder ``L_0`` is evaluated as in :func:`vlb` (one
    pass, both decoders). Standard error: single-step strata are exact; over the others, the collapsed-strata
    estimator of :func:`~itdiffusion.information.mc_mean_and_stderr` (adjacent strata paired; slightly
    conservative). Image b's steps and noise come from a generator seeded with ``seeds[b]`` (on the CPU), so
    results do not depend on batching. ``batch_size``: network inputs per forward pass.
    """
    from itdiffusion.information.crossfit import mc_mean_and_stderr

    num_steps = diffusion.num_timesteps
    chain = _Chain(diffusion, x.device)
    edges = geometric_strata(num_steps, nsteps)
    sizes = (edges[1:] - edges[:-1]).to(torch.float64)
    model_dtype = next(model.parameters()).dtype
    x0 = x.to(torch.float64)
    batch, dim = x0.shape[0], x0[0].numel()
    steps, noise = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        offsets = (torch.rand(nsteps, dtype=torch.float64, generator=g) * sizes).long()
        steps.append(torch.cat([torch.zeros(1, dtype=torch.long), edges[:-1] + offsets]))
        noise.append(torch.randn((nsteps + 1, *x0.shape[1:]), dtype=torch.float64, generator=g))
    t_all = torch.stack(steps).flatten().to(x.device)  # [B * (S + 1)], image-major; column 0 is t = 0
    noise_all = torch.cat(noise).to(x.device)
    rows = torch.arange(batch, device=x.device).repeat_interleave(nsteps + 1)
    nats = x0.new_zeros(t_all.shape[0])
    decoders = x0.new_zeros(batch, 2)
    for chunk in torch.arange(t_all.shape[0], device=x.device).split(batch_size):
        out, dec = _step_nats(model, chain, x0[rows[chunk]], t_all[chunk], noise_all[chunk], model_dtype,
                              clip_denoised)
        nats[chunk] = out
        if dec is not None:
            decoders[rows[chunk][t_all[chunk] == 0]] = dec
    nats = nats.view(batch, nsteps + 1)
    values = nats[:, 1:] * sizes.to(x.device)  # [B, S]: each stratum's sum, estimated
    exact = sizes == 1
    middle = values.sum(1)
    random_cols = values[:, ~exact.to(x.device)]
    if random_cols.shape[1] >= 2:
        mean, stderr = mc_mean_and_stderr(random_cols, "stratified")
        stderr = stderr * random_cols.shape[1]
    elif random_cols.shape[1] == 1:  # one random stratum: pair it with its exact neighbours (conservative)
        stderr = mc_mean_and_stderr(values, "stratified")[1] * nsteps
    else:
        stderr = torch.zeros_like(middle)
    prior = normal_kl(chain.sqrt_abar[-1] * x0, 2 * torch.log(chain.sqrt_1m_abar[-1]),
                      torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)
    to_bpd = lambda v: nats_to_bpd(v, dim).cpu()  # noqa: E731
    return SampledVLB(discrete_bpd=to_bpd(prior + middle + decoders[:, 0]),
                      continuous_bpd=to_bpd(prior + middle + decoders[:, 1]), mc_stderr_bpd=to_bpd(stderr),
                      prior_bpd=to_bpd(prior), middle_bpd=to_bpd(middle), edges=edges,
                      network_evals=nsteps + 1)
