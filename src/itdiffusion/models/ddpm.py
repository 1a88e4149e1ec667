"""DDPM (Ho et al. 2020) through diffusers' ``UNet2DModel``, behind this project's interfaces.

Schedule: ``beta_i = linspace(1e-4, 0.02, T)`` (T = 1000, float64), ``abar_i = prod_{j<=i} (1 - beta_j)``; the
network's timestep i in 0..T-1 sees ``x_i = sqrt(abar_i) x + sqrt(1 - abar_i) eps`` and predicts eps.

- :class:`DDPMNetwork`: ``forward(x, timesteps) -> eps`` with timesteps on improved-diffusion's rescaled
  scale (1000 per process), so that improved-diffusion's ``GaussianDiffusion`` runs it unchanged.
- :class:`DDPMDenoiser`: ``(z, logsnr[B]) -> eps_hat``; a log-SNR a maps to the continuous step u of the
  model's own schedule (:func:`itdiffusion.models.schedules.tabulated_logsnr_to_step`): u = i where
  ``logit(abar_i) = a``, ``log abar`` linear between steps, ``abar_{-1} = 1``.
- :func:`build_vlb_diffusion`: the variational bound's chain of S = ``model.diffusion_steps`` steps, DDPM's
  betas rescaled by T/S (``linspace(1e-4 T/S, 0.02 T/S, S)``), fixed variance (``fixed_large``:
  sigma_t^2 = beta_t), KL loss, step t fed to the network as timestep ``t T / S``. S = 4000 is ITD's
  benchmark; S = T the model's own chain.

Weights (diffusers directories, hub ids, ``.pt`` state dicts): :mod:`itdiffusion.models.ddpm_weights`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from itdiffusion.errors import UserError
from itdiffusion.models.iddpm import _as_dict
from itdiffusion.models.schedules import linear_betas, tabulated_logsnr_to_step
from itdiffusion.models.upstream import improved_diffusion

__all__ = [
    "DDPMDenoiser",
    "DDPMNetwork",
    "build_network",
    "build_unet",
    "build_vlb_diffusion",
    "ddpm_settings",
    "train_alpha_bar",
]

# config key -> UNet2DModel argument (the config's image_size is the U-Net's sample_size)
ARCHITECTURE = {
    "image_size": "sample_size", "in_channels": "in_channels", "out_channels": "out_channels",
    "block_out_channels": "block_out_channels", "down_block_types": "down_block_types",
    "up_block_types": "up_block_types", "layers_per_block": "layers_per_block",
    "attention_head_dim": "attention_head_dim", "norm_num_groups": "norm_num_groups", "norm_eps": "norm_eps",
    "act_fn": "act_fn", "flip_sin_to_cos": "flip_sin_to_cos", "freq_shift": "freq_shift",
    "downsample_padding": "downsample_padding", "mid_block_scale_factor": "mid_block_scale_factor",
    "center_input_sample": "center_input_sample", "time_embedding_type": "time_embedding_type",
}
SCHEDULE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "variance_type")
VARIANCE_TYPES = {"fixed_large": "FIXED_LARGE", "fixed_small": "FIXED_SMALL"}


def ddpm_settings(model_cfg: Any) -> dict[str, Any]:
    """The config as a dict, checked: kind ddpm, DDPM's linear eps-predicting schedule, a fixed variance."""
    cfg = _as_dict(model_cfg)
    name = cfg.get("name")
    if cfg.get("kind") != "ddpm":
        raise ValueError(f"model {name!r} has kind={cfg.get('kind')!r}; the DDPM adapter needs kind=ddpm")
    missing = [k for k in (*ARCHITECTURE, *SCHEDULE, "diffusion_steps", "dropout") if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} lacks DDPM keys {missing}")
    checks = {
        "beta_schedule": (cfg["beta_schedule"] == "linear", "linear"),
        "prediction_type": (cfg["prediction_type"] == "epsilon", "epsilon"),
        "variance_type": (cfg["variance_type"] in VARIANCE_TYPES, " or ".join(VARIANCE_TYPES)),
        "noise_schedule": (cfg.get("noise_schedule", "linear") == "linear", "linear"),
    }
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise UserError(f"model.{key}={cfg[key]!r} (model {name}) is not supported: use {allowed}")
    linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], cfg["diffusion_steps"])
    return cfg


def train_alpha_bar(model_cfg: Any) -> np.ndarray:
    """``abar_i`` (float64, i = 0..T-1) of the T steps the network was trained on."""
    cfg = ddpm_settings(model_cfg)
    return np.cumprod(1.0 - linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]))


def unet_kwargs(model_cfg: Any) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments from the config."""
    cfg = ddpm_settings(model_cfg)
    kwargs = {arg: cfg[key] for key, arg in ARCHITECTURE.items()}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        kwargs[key] = tuple(kwargs[key])
    return {**kwargs, "dropout": cfg["dropout"]}


def build_unet(model_cfg: Any) -> nn.Module:
    """A randomly initialised ``UNet2DModel`` from the config (the global RNG), in eval mode."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_kwargs(model_cfg)).eval()


class DDPMNetwork(nn.Module):
    """``forward(x, timesteps) -> eps`` over a ``UNet2DModel`` (``self.unet``), improved-diffusion style.

    ``timesteps`` are on improved-diffusion's rescaled scale (``t * 1000 / S`` for step t of an S-step
    chain, ``rescale_timesteps=True``) and reach the U-Net as ``timesteps * T / 1000`` for a network
    trained on T steps (the identity for DDPM's T = 1000). ``x`` is cast to the U-Net's dtype; the
    output has the U-Net's dtype and ``x``'s shape (eps only: fixed variances).
    """

    def __init__(self, unet: nn.Module, alpha_bar: np.ndarray):
        super().__init__()
        self.unet = unet
        self.alpha_bar = np.asarray(alpha_bar, dtype=np.float64)  # the training schedule (not a weight)
        self.num_train_timesteps = len(self.alpha_bar)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        scale = self.num_train_timesteps / 1000.0
        t = torch.as_tensor(timesteps, device=x.device).to(torch.float64) * scale
        return self.unet(x.to(dtype), t.to(torch.float32), return_dict=False)[0]


def build_network(unet: nn.Module, model_cfg: Any) -> DDPMNetwork:
    """:class:`DDPMNetwork` over ``unet`` with the config's training schedule."""
    return DDPMNetwork(unet, train_alpha_bar(model_cfg))


class DDPMDenoiser(nn.Module):
    """Denoiser protocol over a :class:`DDPMNetwork`: ``eps_hat = denoiser(z, logsnr)``.

    ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` is DDPM's ``x_u`` at the continuous step
    ``u = tabulated_logsnr_to_step(a, abar)`` of the network's own schedule (exact at the training
    steps; module docstring). ``eps_hat`` is returned in ``z``'s dtype.
    """

    def __init__(self, network: nn.Module, alpha_bar: np.ndarray | None = None):
        super().__init__()
        self.network = network  # a DDPMNetwork, or one wrapped by models.acceleration (pass alpha_bar then)
        self.alpha_bar = np.asarray(network.alpha_bar if alpha_bar is None else alpha_bar, dtype=np.float64)

    def timestep(self, logsnr: Tensor) -> Tensor:
        """The U-Net's own timestep (float64, in [-1, T-1]) for each log-SNR."""
        return tabulated_logsnr_to_step(logsnr, self.alpha_bar)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        if logsnr.ndim != 1 or logsnr.shape[0] != z.shape[0]:
            raise ValueError(f"logsnr must have shape [B] = [{z.shape[0]}], got {tuple(logsnr.shape)}")
        scale = 1000.0 / len(self.alpha_bar)  # DDPMNetwork takes the rescaled timestep
        out = self.network(z, self.timestep(logsnr).to(z.device) * scale)
        if out.shape != z.shape:
            raise ValueError(f"the U-Net returned shape {tuple(out.shape)} for inputs {tuple(z.shape)}")
        return out.to(z.dtype)


def build_vlb_diffusion(model_cfg: Any) -> Any:
    """improved-diffusion's ``GaussianDiffusion`` of the variational bound (module docstring).

    S = ``model.diffusion_steps`` steps of DDPM's betas rescaled by T/S, ``ModelMeanType.EPSILON``, the
    config's fixed ``ModelVarType`` (FIXED_LARGE: sigma_t^2 = beta_t, DDPM's CIFAR-10 and ITD's choice),
    ``LossType.KL``, ``rescale_timesteps=True`` (step t reaches :class:`DDPMNetwork` as ``t * 1000 / S``).
    """
    cfg = ddpm_settings(model_cfg)
    gd = improved_diffusion().gaussian_diffusion
    betas = linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"],
                         cfg["diffusion_steps"])
    return gd.GaussianDiffusion(
        betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=getattr(gd.ModelVarType, VARIANCE_TYPES[cfg["variance_type"]]),
        loss_type=gd.LossType.KL, rescale_timesteps=True)


# ---------------------------------------------------------------------------------------------- weights
