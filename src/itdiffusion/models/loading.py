"""Models under evaluation: the network, its diffusion (for the VLB), its denoiser and where the weights came
from, built from ``cfg.model`` (one checkpoint) or ``cfg.ensemble`` (several), whatever the model family.

A family (``model.kind``) is registered in :data:`FAMILIES` with two functions: ``build(model_cfg) ->
(network, diffusion or None)`` and ``denoiser(network, model_cfg) -> Denoiser``; its checkpoint is resolved
by ``resolve(model_cfg, checkpoint_dir) -> Path`` (download of official weights included).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itdiffusion.denoisers import Denoiser
from itdiffusion.errors import CheckpointError, UserError
from itdiffusion.models.acceleration import FastPath, accelerate
from itdiffusion.models.checkpoints import load_checkpoint


@dataclass(frozen=True)
class Family:
    """How to build, resolve and wrap the models of one ``model.kind``."""

    build: Callable[[Any], tuple[nn.Module, Any]]
    denoiser: Callable[[nn.Module, Any], Denoiser]
    resolve: Callable[[Any, str], Path]


def _iddpm() -> Family:
    from itdiffusion.models import iddpm

    return Family(iddpm.build_model_and_diffusion, iddpm.IDDPMDenoiser, iddpm.resolve_checkpoint)


def _masked_pixels() -> Family:
    from itdiffusion.discrete import build_masked_pixel_model

    def resolve(model_cfg: Any, checkpoint_dir: str) -> Path:
        if not model_cfg.checkpoint:
            raise ValueError(
                f"model={model_cfg.name} has no official weights: set model.checkpoint=<path to "
                "the finetune run's model.pt>"
            )
        return Path(model_cfg.checkpoint)

    def no_denoiser(network: nn.Module, model_cfg: Any) -> Denoiser:
        raise TypeError("a masked-pixel model is not a Gaussian denoiser")

    return Family(lambda model_cfg: (build_masked_pixel_model(model_cfg), None), no_denoiser, resolve)


FAMILIES: dict[str, Callable[[], Family]] = {"iddpm": _iddpm, "masked_pixels": _masked_pixels}


@dataclass
class Member:
    """One model under evaluation. ``network``: the ``nn.Module`` (``forward(x, timesteps)`` for the
    Gaussian families); ``diffusion``: the VLB's diffusion (improved-diffusion's ``GaussianDiffusion``) or
    None; ``denoiser``: ``eps_hat(z, logsnr)``; ``checkpoint``, ``sha256``: the weights' file."""

    network: nn.Module
    diffusion: Any
    denoiser: Denoiser | None
    checkpoint: str
    sha256: str
    model_cfg: Any = None

    def accelerated(self, fast: FastPath) -> Member:
        """The same weights running on ``fast`` (bf16 autocast, channels_last, torch.compile)."""
        network = accelerate(self.network, fast)
        return dataclasses.replace(
            self, network=network, denoiser=family(self.model_cfg).denoiser(network, self.model_cfg)
        )


def family(model_cfg: Any) -> Family:
    kind = model_cfg.kind
    if kind not in FAMILIES:
        raise UserError(f"model.kind={kind!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[kind]()


def load_member(model_cfg: Any, path: Path, device: torch.device) -> Member:
    """The model of ``model_cfg`` with the weights at ``path``, in eval mode on ``device``."""
    fam = family(model_cfg)
    try:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
        network, diffusion = fam.build(model_cfg)
        sha256 = load_checkpoint(network, path)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(str(e)) from e
    network.to(device).eval()
    denoiser = None if diffusion is None else fam.denoiser(network, model_cfg)
    return Member(network, diffusion, denoiser, str(path), sha256, model_cfg)


def load_members(cfg: Any, device: torch.device, resolve_first: Callable | None = None) -> list[Member]:
    """The model of ``cfg.model`` with its checkpoint, or one per ``cfg.ensemble`` checkpoint.

    ``resolve_first``: a context manager under which the official checkpoint is resolved (downloaded): the
    stages pass ``rank_zero_first`` so that one torchrun rank downloads while the others wait.
    """
    if len(cfg.ensemble) == 1:
        raise UserError(
            "ensemble= needs at least two checkpoints (leave it empty to evaluate model.checkpoint)"
        )
    fam = family(cfg.model)
    if cfg.ensemble:
        paths = [Path(p) for p in cfg.ensemble]
    else:
        try:
            with resolve_first() if resolve_first else contextlib.nullcontext():
                paths = [fam.resolve(cfg.model, cfg.paths.checkpoint_dir)]
        except (FileNotFoundError, ValueError, CheckpointError) as e:
            raise UserError(str(e)) from e
    return [load_member(cfg.model, path, device) for path in paths]
