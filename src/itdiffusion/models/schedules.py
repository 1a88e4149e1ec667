"""IDDPM noise schedules as maps between log-SNR and a continuous step index.

IDDPM's discrete step ``i`` in ``0..T-1`` has ``x_i = sqrt(abar_i) x + sqrt(1 - abar_i) eps``, the
same channel as ours at log-SNR ``a_i = log(abar_i / (1 - abar_i))`` (so ``abar = sigmoid(a)``).
Both maps here work on a *continuous step index* ``u``: ``u = i`` reproduces ``abar_i`` exactly,
and ``u = -1`` is the clean end (``abar = 1``).

cosine: ``abar_i = f((i + 1) / T) / f(0)`` with ``f(tau) = cos((tau + s) / (1 + s) * pi / 2)^2``,
``s = 0.008`` (IDDPM's ``betas_for_alpha_bar``; exact except the last step, whose beta IDDPM clips
at 0.999). Inverting, with ``c = pi/2 * s / (1 + s)``::

    theta = acos(sqrt(abar) cos c),   tau = theta * 2 (1 + s) / pi - s,   u = T tau - 1.

ITD's code feeds the U-Net ``1000 tau``; the ``- 1`` here (``-1000/T`` on the 1000 scale, a quarter
of a unit at T = 4000) aligns the continuous map with the steps the network was trained on.

linear (and any tabulated schedule): ``log abar`` is interpolated piecewise linearly in ``u``
between the discrete steps (and ``abar_{-1} = 1``); log-SNRs below the last step map to ``T - 1``.
:func:`tabulated_logsnr_to_step` and :func:`tabulated_step_to_logsnr` do this for any table of
``abar_i`` (DDPM's, :mod:`itdiffusion.models.ddpm`); the linear schedule is the table of IDDPM's betas.

DDPM's linear betas (Ho et al. 2020; :func:`linear_betas`): ``beta_i = linspace(beta_start, beta_end, T)``
in float64 for the T steps the network was trained on, and for a chain of S steps over the same
process IDDPM's rescaling ``linspace(beta_start T/S, beta_end T/S, S)`` (improved-diffusion's
``get_named_beta_schedule("linear", S)`` with T = 1000).

Everything is computed in float64 and returned in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from itdiffusion.models.upstream import improved_diffusion

COSINE_S = 0.008
_C = math.pi / 2 * COSINE_S / (1 + COSINE_S)  # angle of the cosine schedule at tau = 0

SCHEDULES = ("cosine", "linear")


def _check(noise_schedule: str, num_steps: int) -> None:
    if noise_schedule not in SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {noise_schedule!r}")
    if num_steps < 2:
        raise ValueError(f"diffusion_steps must be at least 2, got {num_steps}")


def discrete_alpha_bar(noise_schedule: str, num_steps: int) -> np.ndarray:
    """IDDPM's ``alphas_cumprod`` (float64, length T) from its own beta schedule."""
    _check(noise_schedule, num_steps)
    betas = improved_diffusion().gaussian_diffusion.get_named_beta_schedule(noise_schedule, num_steps)
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (like ``np.interp``: ``xp`` increasing, clamped at the ends)."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def linear_betas(beta_start: float, beta_end: float, train_steps: int, num_steps: int | None = None
                 ) -> np.ndarray:
    """DDPM's linear betas (float64, length S = ``num_steps``, default ``train_steps``).

    ``linspace(beta_start, beta_end, T)`` for the T = ``train_steps`` steps of training; a chain of S
    steps rescales both ends by T/S (IDDPM's rule, so that the chain discretises the same process).
    """
    num_steps = train_steps if num_steps is None else num_steps
    if num_steps < 2:
        raise ValueError(f"diffusion_steps must be at least 2, got {num_steps}")
    scale = train_steps / num_steps
    if not 0 < beta_start * scale <= beta_end * scale < 1:
        raise ValueError(f"linear betas {beta_start}..{beta_end} over {train_steps} steps, rescaled to "
                         f"{num_steps} steps, give betas up to {beta_end * scale:g}: they must lie in (0, 1) "
                         f"(use more steps)")
    return np.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=np.float64)


def _table_knots(alpha_bar: np.ndarray | Tensor, device) -> tuple[Tensor, Tensor]:
    """(u, log abar) at u = -1, 0, ..., T-1 for a table ``alpha_bar[i]`` of the steps i = 0..T-1."""
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64, device=device)
    valid = abar.ndim == 1 and len(abar) >= 2 and bool((abar > 0).all() and (abar < 1).all())
    if not (valid and bool((abar.diff() < 0).all())):
        raise ValueError("alpha_bar must be a decreasing table of at least 2 values in (0, 1)")
    log_abar = torch.cat([abar.new_zeros(1), torch.log(abar)])
    u = torch.arange(-1, len(abar), dtype=torch.float64, device=device)
    return u, log_abar


def tabulated_logsnr_to_step(logsnr: Tensor, alpha_bar: np.ndarray | Tensor) -> Tensor:
    """Continuous step index ``u`` in [-1, T-1] (float64) whose ``abar`` equals ``sigmoid(logsnr)``, for a
    discrete schedule given by its table ``alpha_bar`` (steps 0..T-1): exact at the steps, ``log abar``
    linear in ``u`` between them and from ``abar_{-1} = 1``; below the last step, ``T - 1``."""
    a = torch.as_tensor(logsnr).to(torch.float64)
    u, log_abar = _table_knots(alpha_bar, a.device)
    # log abar = log sigmoid(a) decreases along u; interpolate on the reversed (increasing) knots.
    return _interp(torch.nn.functional.logsigmoid(a), log_abar.flip(0), u.flip(0))


def tabulated_step_to_logsnr(step: Tensor, alpha_bar: np.ndarray | Tensor) -> Tensor:
    """Inverse of :func:`tabulated_logsnr_to_step`: log-SNR (float64) at step ``u`` in [-1, T-1]."""
    u = torch.as_tensor(step).to(torch.float64)
    knots_u, log_abar = _table_knots(alpha_bar, u.device)
    la = _interp(u, knots_u, log_abar)
    return la - torch.log(-torch.expm1(la))


def logsnr_to_step(logsnr: Tensor, noise_schedule: str, num_steps: int) -> Tensor:
    """Continuous step index ``u`` (float64) whose ``abar`` equals ``sigmoid(logsnr)``."""
    _check(noise_schedule, num_steps)
    a = torch.as_tensor(logsnr).to(torch.float64)
    if noise_schedule == "cosine":
        # theta = acos(sqrt(abar) cos c), written with atan2 so it stays accurate as abar -> 1:
        # 1 - abar cos^2 c = sin^2 c + (1 - abar) cos^2 c.
        cos_theta = torch.sigmoid(a).sqrt() * math.cos(_C)
        sin_theta = (math.sin(_C) ** 2 + torch.sigmoid(-a) * math.cos(_C) ** 2).sqrt()
        tau = torch.atan2(sin_theta, cos_theta) * 2 * (1 + COSINE_S) / math.pi - COSINE_S
        return num_steps * tau - 1
    return tabulated_logsnr_to_step(a, discrete_alpha_bar("linear", num_steps))


def step_to_logsnr(step: Tensor, noise_schedule: str, num_steps: int) -> Tensor:
    """Inverse of :func:`logsnr_to_step`: log-SNR (float64) at continuous step index ``u`` in [-1, T-1]."""
    _check(noise_schedule, num_steps)
    u = torch.as_tensor(step).to(torch.float64)
    if noise_schedule == "cosine":
        # abar = cos^2 theta / cos^2 c,  1 - abar = sin(theta - c) sin(theta + c) / cos^2 c.
        theta = ((u + 1) / num_steps + COSINE_S) / (1 + COSINE_S) * (math.pi / 2)
        return 2 * torch.log(torch.cos(theta)) - torch.log(torch.sin(theta - _C) * torch.sin(theta + _C))
    return tabulated_step_to_logsnr(u, discrete_alpha_bar("linear", num_steps))
