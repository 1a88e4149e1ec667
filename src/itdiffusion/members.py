"""Models under evaluation: the network, its diffusion (for the VLB), its denoiser and where the weights came
from, built from ``cfg.model`` (one checkpoint) or ``cfg.ensemble`` (several), whatever the model family.

The family of each model (``model.kind``) says how (:mod:`itdiffusion.models.families`).

Ensembles across families (``ensemble_models=[iddpm_cifar10_vlb,ddpm_cifar10]`` beside ``ensemble=[a,b]``):
member j is ``ensemble[j]`` loaded as the model config ``ensemble_models[j]`` (:func:`member_configs`): the
run's ``model`` (with its overrides) where the name is ``model.name``, else that config group file as
shipped (Hydra's ``model=<name>``). Members need only the Denoiser protocol (and a diffusion for the VLB).
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

from itdiffusion.config import CONFIG_DIR
from itdiffusion.denoisers import Denoiser
from itdiffusion.errors import CheckpointError, UserError
from itdiffusion.models.acceleration import FastPath, accelerate
from itdiffusion.models.families import family_of


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
                                   denoiser=family_of(self.model_cfg).denoiser(network, self.model_cfg))


def load_member(model_cfg: Any, checkpoint_dir: str, path: Path | None, device: torch.device) -> Member:
    """The model of ``model_cfg`` with the weights at ``path`` (None: its own), in eval mode on ``device``."""
    family = family_of(model_cfg)
    trained, diffusion = family.build(model_cfg)
    try:
        source, sha256 = family.load_weights(trained, model_cfg, checkpoint_dir, path)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(str(e)) from e
    network = family.network(trained, model_cfg).to(device).eval()
    denoiser = family.denoiser(network, model_cfg) if family.gaussian else None
    return Member(network, diffusion, denoiser, source, sha256, model_cfg)


def load_members(cfg: Any, device: torch.device, resolve_first: Callable | None = None) -> list[Member]:
    """The model of ``cfg.model`` with its checkpoint, or one per ``cfg.ensemble`` checkpoint (each loaded as
    its entry of ``cfg.ensemble_models``, if given: :func:`member_configs`).

    ``resolve_first``: a context manager under which the weights are found (downloaded) and loaded: the
    stages pass ``rank_zero_first`` so that one torchrun rank downloads while the others wait.
    """
    check_ensemble(cfg)
    paths = [Path(p) for p in cfg.ensemble] or [None]
    configs = member_configs(cfg)
    with resolve_first() if resolve_first else contextlib.nullcontext():
        return [load_member(model_cfg, cfg.paths.checkpoint_dir, path, device)
                for model_cfg, path in zip(configs, paths, strict=True)]


def model_names() -> list[str]:
    """The model configs shipped in ``conf/model/`` (the names ``model=`` and ``ensemble_models`` take)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def check_ensemble(cfg: Any) -> None:
    """``ensemble`` and ``ensemble_models`` make sense together (raises one :class:`UserError` otherwise):
    at least two checkpoints; ``ensemble_models`` empty, or one known Gaussian model config per checkpoint."""
    if len(cfg.ensemble) == 1:
        raise UserError("ensemble= needs at least two checkpoints (leave it empty to evaluate "
                        "model.checkpoint)")
    names = list(cfg.get("ensemble_models") or [])
    if not names:
        return
    if len(names) != len(cfg.ensemble):
        raise UserError(f"ensemble_models has {len(names)} model config(s) for {len(cfg.ensemble)} "
                        "ensemble checkpoint(s): give one per entry of ensemble=, in the same order (e.g. "
                        "ensemble=[a.pt,ddpm_dir] ensemble_models=[iddpm_cifar10_vlb,ddpm_cifar10])")
    known = model_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"ensemble_models: {', '.join(map(repr, unknown))} is no model config; choose from "
                        f"{', '.join(known)}")
    kinds = {n: m.kind for n, m in zip(names, member_configs(cfg), strict=True) if not family_of(m).gaussian}
    if kinds:
        raise UserError("ensemble_models: " + ", ".join(f"{n} is no Gaussian denoiser (model.kind={k})"
                                                        for n, k in kinds.items())
                        + ": an ensemble combines MMSE curves")


def member_configs(cfg: Any) -> list[Any]:
    """One model config per member: ``cfg.model`` for each checkpoint of ``cfg.ensemble`` (or the one
    model), or per ``cfg.ensemble_models`` entry ``cfg.model`` where the name is ``cfg.model.name`` and the
    config group file ``conf/model/<name>.yaml`` otherwise (:func:`model_config`)."""
    names = list(cfg.get("ensemble_models") or [])
    if not names:
        return [cfg.model] * max(1, len(cfg.ensemble))
    return [cfg.model if name == cfg.model.name else model_config(name) for name in names]


def model_config(name: str) -> Any:
    """The model config ``name`` as Hydra composes ``model=<name>`` (its schema and defaults list)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a stage (hydra.main): its config search path
        return compose(config_name="config", overrides=[f"model={name}"]).model
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={name}"]).model
