"""The IDDPM U-Net (improved-diffusion) behind this project's interfaces.

- :func:`build_model_and_diffusion`: the U-Net and ``GaussianDiffusion`` from a model config whose
  keys are improved-diffusion's own flags (``image_size``, ``num_channels``, ..., ``use_kl``).
- :class:`IDDPMDenoiser`: the Denoiser protocol ``(z, logsnr[B]) -> eps_hat``. IDDPM's
  ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` is our channel at ``abar = sigmoid(logsnr)``, so a
  log-SNR maps to a (continuous) timestep of the schedule (:mod:`itdiffusion.models.schedules`).
- :func:`iddpm_training_loss`: the model's own training loss, for training small base models.
- Weights: :func:`resolve_checkpoint` (local path or official URL) and :func:`load_checkpoint` (from
  :mod:`itdiffusion.models.weights`).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itdiffusion.models.schedules import logsnr_to_step, step_to_logsnr
from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.models.weights import CheckpointError, fetch, load_checkpoint

__all__ = [
    "CheckpointError",
    "IDDPMDenoiser",
    "build_model_and_diffusion",
    "iddpm_flags",
    "iddpm_training_loss",
    "load_checkpoint",
    "logsnr_to_timestep",
    "resolve_checkpoint",
    "timestep_to_logsnr",
]


def _as_dict(model_cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(model_cfg) and not isinstance(model_cfg, type):
        return dataclasses.asdict(model_cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_cfg, DictConfig):
            return OmegaConf.to_container(model_cfg, resolve=True)
    except ImportError:  # omegaconf is a dependency; plain dicts work without it
        pass
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise TypeError(f"model config must be a dict, an OmegaConf node or a ModelConfig, got {type(model_cfg)}")


def iddpm_flags(model_cfg: Any) -> dict[str, Any]:
    """improved-diffusion's ``create_model_and_diffusion`` keyword arguments, taken from the config."""
    cfg = _as_dict(model_cfg)
    kind = cfg.get("kind", "iddpm")
    if kind != "iddpm":
        raise ValueError(f"model {cfg.get('name')!r} has kind={kind!r}; the IDDPM adapter needs kind=iddpm")
    names = list(improved_diffusion().script_util.model_and_diffusion_defaults())
    missing = [k for k in names if k not in cfg]
    if missing:
        raise ValueError(f"model config {cfg.get('name')!r} lacks improved-diffusion flags {missing}")
    return {k: cfg[k] for k in names}


def resolve_checkpoint(model_cfg: Any, checkpoint_dir: str | Path, *, progress: bool = True) -> Path:
    """Path of the model's weights: ``model.checkpoint`` if set (it must exist), else the file of
    ``model.checkpoint_url`` in ``<checkpoint_dir>/<model.kind>/`` (named ``model.checkpoint_file``, else
    as in the URL), downloaded first when missing and checked against ``model.checkpoint_sha256`` and
    ``model.checkpoint_bytes`` where set (:func:`itdiffusion.models.weights.fetch`).

    Concurrent callers (one per torchrun rank) are serialized by a lock file: one downloads, the
    others then find the finished file.
    """
    cfg = _as_dict(model_cfg)
    name, local, url = cfg.get("name"), cfg.get("checkpoint"), cfg.get("checkpoint_url")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            hint = f" Unset it to download {url} instead." if url else ""
            raise FileNotFoundError(f"model.checkpoint={local} (model {name}) does not exist.{hint}")
        return path
    if not url:
        raise ValueError(f"model {name} names no weights: set model.checkpoint=/path/to/weights.pt")
    file_name = cfg.get("checkpoint_file") or Path(urllib.parse.urlparse(url).path).name
    dest = Path(checkpoint_dir) / cfg.get("kind", "iddpm") / file_name
    return fetch(url, dest, sha256=cfg.get("checkpoint_sha256"), size=cfg.get("checkpoint_bytes"),
                 progress=progress)


def build_model_and_diffusion(model_cfg: Any) -> tuple[nn.Module, Any]:
    """``(UNetModel, SpacedDiffusion)`` exactly as improved-diffusion's ``create_model_and_diffusion``.

    The model is returned in eval mode (dropout off; call ``.train()`` to fine-tune). Run it in
    float32 (or under autocast): its GroupNorm layers compute in float32 by design, so it does
    not run as a float64 module.
    """
    model, diffusion = improved_diffusion().script_util.create_model_and_diffusion(**iddpm_flags(model_cfg))
    return model.eval(), diffusion


def logsnr_to_timestep(logsnr: Tensor, model_cfg: Any) -> Tensor:
    """The timestep the U-Net takes (float64) for a log-SNR.

    Continuous step index ``u`` of the schedule (``u = i`` at discrete step i, see
    :mod:`itdiffusion.models.schedules`), times ``1000 / diffusion_steps`` when rescale_timesteps.
    """
    flags = iddpm_flags(model_cfg)
    return _timestep(logsnr, flags["noise_schedule"], flags["diffusion_steps"], flags["rescale_timesteps"])


def _timestep(logsnr: Tensor, noise_schedule: str, steps: int, rescale: bool) -> Tensor:
    u = logsnr_to_step(logsnr, noise_schedule, steps)
    return u * (1000.0 / steps) if rescale else u


def timestep_to_logsnr(timestep: Tensor, model_cfg: Any) -> Tensor:
    """Inverse of :func:`logsnr_to_timestep` (float64)."""
    flags = iddpm_flags(model_cfg)
    steps = flags["diffusion_steps"]
    t = torch.as_tensor(timestep, dtype=torch.float64)
    u = t * (steps / 1000.0) if flags["rescale_timesteps"] else t
    return step_to_logsnr(u, flags["noise_schedule"], steps)


class IDDPMDenoiser(nn.Module):
    """Denoiser protocol over an IDDPM U-Net: ``eps_hat = denoiser(z, logsnr)``.

    ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps``; the U-Net sees ``z`` at the timestep of
    :func:`logsnr_to_timestep`. With learn_sigma the U-Net returns ``2C`` channels, of which the first
    ``C`` predict eps (the rest parametrize the variance). With predict_xstart it predicts x, and
    ``eps_hat = (z - sqrt(sigmoid(a)) x_hat) / sqrt(sigmoid(-a))``.

    ``z`` is cast to the U-Net's dtype and ``eps_hat`` returned in ``z``'s dtype. The U-Net is a
    submodule (``denoiser.model``): save ``denoiser.model.state_dict()`` to keep the official key names.
    """

    def __init__(self, model: nn.Module, model_cfg: Any):
        super().__init__()
        self.model = model
        flags = iddpm_flags(model_cfg)
        self.noise_schedule = flags["noise_schedule"]
        self.diffusion_steps = flags["diffusion_steps"]
        self.rescale_timesteps = flags["rescale_timesteps"]
        self.learn_sigma = flags["learn_sigma"]
        self.predict_xstart = flags["predict_xstart"]

    def timestep(self, logsnr: Tensor) -> Tensor:
        """The U-Net's timestep for each log-SNR (see :func:`logsnr_to_timestep`)."""
        return _timestep(logsnr, self.noise_schedule, self.diffusion_steps, self.rescale_timesteps)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        if logsnr.ndim != 1 or logsnr.shape[0] != z.shape[0]:
            raise ValueError(f"logsnr must have shape [B] = [{z.shape[0]}], got {tuple(logsnr.shape)}")
        dtype = next(self.model.parameters()).dtype
        out = self.model(z.to(dtype), self.timestep(logsnr).to(z.device))
        channels = z.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(f"U-Net returned {out.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={self.learn_sigma}, {channels} input channels)")
        pred = out[:, :channels].to(z.dtype)
        if not self.predict_xstart:
            return pred
        a = logsnr.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
        return (z - torch.sigmoid(a).sqrt() * pred) / torch.sigmoid(-a).sqrt()


def iddpm_training_loss(model: nn.Module, diffusion: Any, x: Tensor, generator: torch.Generator | None = None,
                        image_seeds: Tensor | None = None) -> Tensor:
    """IDDPM's own per-sample training loss ``diffusion.training_losses(...)["loss"]`` (Tensor[B]).

    One timestep per image, uniform on ``0..T-1`` (IDDPM's UniformSampler), and eps ~ N(0, I), both
    from ``generator`` (the global RNG if None), or with ``image_seeds`` (one int per image) from a
    generator per image, so that an image's loss does not depend on the batch it is in (fine-tuning
    under DDP). Units are IDDPM's: with use_kl the rescaled VLB term (bits/dim times T); otherwise
    the eps MSE per dim plus, with learn_sigma, the variance's VLB term times T/1000 (L_hybrid).
    """
    if image_seeds is not None:
        seeds = torch.as_tensor(image_seeds).reshape(-1).tolist()
        if len(seeds) != x.shape[0]:
            raise ValueError(f"image_seeds has {len(seeds)} entries for {x.shape[0]} images")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        t = torch.cat([torch.randint(0, diffusion.num_timesteps, (1,), generator=g) for g in gens])
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])
    else:
        device = generator.device if generator is not None else x.device
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=generator, device=device)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return diffusion.training_losses(model, x, t.to(x.device), noise=noise.to(x.device))["loss"]
