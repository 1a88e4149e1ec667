"""Models under evaluation: the network, its diffusion (for the VLB), its denoiser and where the weights came
from, built from ``cfg.model`` (one checkpoint) or ``cfg.ensemble`` (several), whatever the model family.

A family (``model.kind``) is registered in :data:`FAMILIES` with two functions: ``load(model_cfg,
checkpoint_dir, path) -> (network, diffusion or None, source, sha256)`` (``path``: a given checkpoint, or
None for the model's own weights, downloaded when missing) and ``denoiser(network, model_cfg)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from itdiffusion.denoisers import Denoiser
from itdiffusion.errors import CheckpointError, UserError
from itdiffusion.models.acceleration import FastPath, accelerate
from itdiffusion.models.checkpoints import load_checkpoint

Loaded = tuple[nn.Module, Any, str, str]  # network, diffusion (or None), where the weights came from, sha256


@dataclass(frozen=True)
class Family:
    """How to load and wrap the models of one ``model.kind``."""

    load: Callable[[Any, str, Path | None], Loaded]
    denoiser: Callable[[nn.Module, Any], Denoiser]


def _from_file(build: Callable[[Any], tuple[nn.Module, Any]], resolve: Callable[[Any, str], Path]):
    """``load`` for families whose weights are one state-dict file (``resolve`` finds the model's own)."""

    def load(model_cfg: Any, checkpoint_dir: str, path: Path | None) -> Loaded:
        path = resolve(model_cfg, checkpoint_dir) if path is None else path
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
        network, diffusion = build(model_cfg)
        return network, diffusion, str(path), load_checkpoint(network, path)

    return load


def _iddpm() -> Family:
    from itdiffusion.models import iddpm

    return Family(_from_file(iddpm.build_model_and_diffusion, iddpm.resolve_checkpoint), iddpm.IDDPMDenoiser)


def _ddpm() -> Family:
    from itdiffusion.models import ddpm

    def load(model_cfg: Any, checkpoint_dir: str, path: Path | None) -> Loaded:
        if path is not None:  # a diffusers directory or a .pt state dict
            model_cfg = OmegaConf.merge(model_cfg, {"checkpoint": str(path)})
        parts = ddpm.load_ddpm(model_cfg, checkpoint_dir)
        return parts.network, parts.diffusion, parts.checkpoint, parts.sha256

    def denoiser(network: nn.Module, model_cfg: Any) -> Denoiser:  # network: maybe an accelerated one
        return ddpm.DDPMDenoiser(network, ddpm.train_alpha_bar(model_cfg))

    return Family(load, denoiser)


def _masked_pixels() -> Family:
    from itdiffusion.discrete import build_masked_pixel_model

    def resolve(model_cfg: Any, checkpoint_dir: str) -> Path:
        if not model_cfg.checkpoint:
            raise ValueError(f"model={model_cfg.name} has no official weights: set model.checkpoint=<path to "
                             "the finetune run's model.pt>")
        return Path(model_cfg.checkpoint)

    def no_denoiser(network: nn.Module, model_cfg: Any) -> Denoiser:
        raise TypeError("a masked-pixel model is not a Gaussian denoiser")

    return Family(_from_file(lambda cfg: (build_masked_pixel_model(cfg), None), resolve), no_denoiser)


FAMILIES: dict[str, Callable[[], Family]] = {"iddpm": _iddpm, "ddpm": _ddpm, "masked_pixels": _masked_pixels}


@dataclass
class Member:
    """One model under evaluation. ``network``: the ``nn.Module`` (``forward(x, timesteps)`` for the
    Gaussian families); ``diffusion``: the VLB's diffusion (improved-diffusion's ``GaussianDiffusion``) or
    None; ``denoiser``: ``eps_hat(z, logsnr)`` (None for masked models); ``checkpoint``, ``sha256``: where
    the weights came from."""

    network: nn.Module
    diffusion: Any
    denoiser: Denoiser | None
    checkpoint: str
    sha256: str
    model_cfg: Any = None

    def accelerated(self, fast: FastPath) -> Member:
        """The same weights running on ``fast`` (bf16 autocast, channels_last, torch.compile)."""
        network = accelerate(self.network, fast)
        return dataclasses.replace(self, network=network,
                                   denoiser=family(self.model_cfg).denoiser(network, self.model_cfg))


def family(model_cfg: Any) -> Family:
    kind = model_cfg.kind
    if kind not in FAMILIES:
        raise UserError(f"model.kind={kind!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[kind]()


def load_member(model_cfg: Any, checkpoint_dir: str, path: Path | None, device: torch.device) -> Member:
    """The model of ``model_cfg`` with the weights at ``path`` (None: its own), in eval mode on ``device``."""
    fam = family(model_cfg)
    try:
        network, diffusion, source, sha256 = fam.load(model_cfg, checkpoint_dir, path)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(str(e)) from e
    network.to(device).eval()
    denoiser = None if diffusion is None else fam.denoiser(network, model_cfg)
    return Member(network, diffusion, denoiser, source, sha256, model_cfg)


def load_members(cfg: Any, device: torch.device, resolve_first: Callable | None = None) -> list[Member]:
    """The model of ``cfg.model`` with its checkpoint, or one per ``cfg.ensemble`` checkpoint.

    ``resolve_first``: a context manager under which the weights are found (downloaded) and loaded: the
    stages pass ``rank_zero_first`` so that one torchrun rank downloads while the others wait.
    """
    if len(cfg.ensemble) == 1:
        raise UserError("ensemble= needs at least two checkpoints (leave it empty to evaluate "
                        "model.checkpoint)")
    paths = [Path(p) for p in cfg.ensemble] or [None]
    with resolve_first() if resolve_first else contextlib.nullcontext():
        return [load_member(cfg.model, cfg.paths.checkpoint_dir, path, device) for path in paths]
