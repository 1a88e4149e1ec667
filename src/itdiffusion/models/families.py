"""Model families: one registry entry per ``model.kind``, the one place a family is defined.

A :class:`Family` owns its config schema (a dataclass extending
:class:`itdiffusion.models.schemas.ModelConfig`, registered as ``/schema/model/<kind>`` for the YAML files
of ``conf/model/``), how to build its network and load weights into it (the evaluated model's and
fine-tuning's initial weights alike), its denoiser, its training objectives
(:mod:`itdiffusion.models.objectives`) and its VLB route (the diffusion of the variational bound, or
none). The stages ask the registry (:func:`family_of`), never ``model.kind``; the allowed kinds and
objectives are the registry's (:func:`allowed_values`).

Adding a family: subclass :class:`Family` and :func:`register` an instance, in this module or in a plug-in
module that the stages import before composing their config: a module named in ``ITDIFFUSION_PLUGINS``
(comma-separated importable modules) or an entry point of the group ``itdiffusion.families``
(:func:`load_plugins`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf
from torch import nn

from itdiffusion.denoisers import Denoiser
from itdiffusion.errors import UserError
from itdiffusion.models import ddpm, ddpm_weights, iddpm
from itdiffusion.models.masked_unet import build_masked_pixel_model
from itdiffusion.models.objectives import AnyOrderLoss, IDDPMLoss, ITLoss, Objective
from itdiffusion.models.schemas import DDPMModelConfig, MaskedPixelsModelConfig, ModelConfig
from itdiffusion.models.weights import load_checkpoint

PLUGINS_ENV = "ITDIFFUSION_PLUGINS"
ENTRY_POINT_GROUP = "itdiffusion.families"


class Family:
    """The models of one ``model.kind``. Subclasses set the class attributes and override what differs."""

    kind: ClassVar[str]
    schema: ClassVar[type] = ModelConfig  # the dataclass of ``model.*``
    objectives: ClassVar[Mapping[str, type[Objective]]]  # finetune.objective -> its loss
    heldout_objective: ClassVar[str] = "it"  # the held-out loss curve's objective (nats per image)
    gaussian: ClassVar[bool] = True  # a Gaussian denoiser (IT estimates); False: the masked evaluation
    vlb: ClassVar[bool] = True  # build() gives the diffusion of a variational bound (estimator.vlb)

    def build(self, model_cfg: Any) -> tuple[nn.Module, Any]:
        """(a randomly initialised trainable network from the global RNG, the diffusion of its VLB and of
        its own training loss, or None: no VLB)."""
        raise NotImplementedError

    def network(self, trained: nn.Module, model_cfg: Any) -> nn.Module:
        """The trained module as the VLB and the denoiser run it (``forward(x, timesteps)``)."""
        return trained

    def has_own_weights(self, model_cfg: Any) -> bool:
        """Whether the config names weights (``finetune.init=null`` starts from them, else from scratch)."""
        return True

    def load_weights(self, trained: nn.Module, model_cfg: Any, checkpoint_dir: str, path: Path | None
                     ) -> tuple[str, str]:
        """Load the weights at ``path`` (None: the model's own, downloaded when missing) into ``trained``;
        returns (where they came from, sha256 of the file). Raises FileNotFoundError, ValueError,
        CheckpointError or UserError."""
        path = self.own_checkpoint(model_cfg, checkpoint_dir) if path is None else path
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
        return str(path), load_checkpoint(trained, path)

    def own_checkpoint(self, model_cfg: Any, checkpoint_dir: str) -> Path:
        """The model's own state-dict file (downloaded when missing)."""
        raise NotImplementedError

    def denoiser(self, network: nn.Module, model_cfg: Any) -> Denoiser:
        """``eps_hat(z, logsnr)`` over :meth:`network` (maybe an accelerated one)."""
        raise TypeError(f"a {self.kind} model is not a Gaussian denoiser")

    def dim(self, trained: nn.Module, reference: Any) -> int:
        """Dimensions per image of the training loss (bits/dim = nats / (dim ln 2))."""
        return reference.dim

    def objective(self, model_cfg: Any, name: str) -> type[Objective]:
        """The loss class of ``finetune.objective=name``; a UserError naming the allowed ones otherwise."""
        if name not in self.objectives:
            allowed = " or ".join(self.objectives)
            raise UserError(f"model={model_cfg.name} (kind {self.kind}) cannot train with "
                            f"finetune.objective={name}; use finetune.objective={allowed}")
        return self.objectives[name]


class IDDPMFamily(Family):
    """improved-diffusion's U-Net and its ``SpacedDiffusion`` (:mod:`itdiffusion.models.iddpm`)."""

    kind = "iddpm"
    objectives = {"it": ITLoss, "iddpm": IDDPMLoss}

    def build(self, model_cfg: Any) -> tuple[nn.Module, Any]:
        return iddpm.build_model_and_diffusion(model_cfg)

    def own_checkpoint(self, model_cfg: Any, checkpoint_dir: str) -> Path:
        return iddpm.resolve_checkpoint(model_cfg, checkpoint_dir)

    def denoiser(self, network: nn.Module, model_cfg: Any) -> Denoiser:
        return iddpm.IDDPMDenoiser(network, model_cfg)


class DDPMFamily(Family):
    """A diffusers ``UNet2DModel`` with DDPM's schedule; the VLB's chain rescaled to
    ``model.diffusion_steps`` (:mod:`itdiffusion.models.ddpm`)."""

    kind = "ddpm"
    schema = DDPMModelConfig
    objectives = {"it": ITLoss}

    def build(self, model_cfg: Any) -> tuple[nn.Module, Any]:
        return ddpm.build_unet(model_cfg), ddpm.build_vlb_diffusion(model_cfg)

    def network(self, trained: nn.Module, model_cfg: Any) -> nn.Module:
        return ddpm.build_network(trained, model_cfg)

    def load_weights(self, trained: nn.Module, model_cfg: Any, checkpoint_dir: str, path: Path | None
                     ) -> tuple[str, str]:
        if path is not None:  # a diffusers directory or a .pt state dict
            model_cfg = OmegaConf.merge(model_cfg, {"checkpoint": str(path)})
        return ddpm_weights.load_unet_weights(trained, model_cfg, checkpoint_dir)

    def denoiser(self, network: nn.Module, model_cfg: Any) -> Denoiser:
        return ddpm.DDPMDenoiser(network, ddpm.train_alpha_bar(model_cfg))


class MaskedPixelsFamily(Family):
    """Masked (absorbing) diffusion over sub-pixels (:mod:`itdiffusion.models.masked_unet`): no Gaussian
    denoiser, no VLB; evaluated by I-MDCE, trained on the any-order loss."""

    kind = "masked_pixels"
    schema = MaskedPixelsModelConfig
    objectives = {"any_order": AnyOrderLoss}
    heldout_objective = "any_order"
    gaussian = False
    vlb = False

    def build(self, model_cfg: Any) -> tuple[nn.Module, Any]:
        return build_masked_pixel_model(model_cfg), None

    def has_own_weights(self, model_cfg: Any) -> bool:
        return bool(model_cfg.checkpoint)

    def own_checkpoint(self, model_cfg: Any, checkpoint_dir: str) -> Path:
        if not model_cfg.checkpoint:
            raise ValueError(f"model={model_cfg.name} has no official weights: set model.checkpoint=<path to "
                             "the finetune run's model.pt>")
        return Path(model_cfg.checkpoint)

    def dim(self, trained: nn.Module, reference: Any) -> int:
        return trained.length


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a kind registered twice is an error)."""
    if family.kind in FAMILIES and type(FAMILIES[family.kind]) is not type(family):
        raise ValueError(f"model.kind={family.kind!r} is registered twice")
    FAMILIES[family.kind] = family
    return family


for _family in (IDDPMFamily(), MaskedPixelsFamily(), DDPMFamily()):
    register(_family)


def family_of(model_cfg: Any) -> Family:
    """The registered family of ``model_cfg.kind`` (a UserError naming the registered kinds otherwise)."""
    kind = model_cfg.kind
    if kind not in FAMILIES:
        raise UserError(f"model.kind={kind!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def model_schemas() -> dict[str, type]:
    """``{kind: schema}`` for Hydra's ConfigStore (``/schema/model/<kind>``)."""
    return {kind: family.schema for kind, family in FAMILIES.items()}


def allowed_values() -> dict[str, tuple[str, ...]]:
    """The allowed ``model.kind`` and ``finetune.objective`` values: those of the registered families."""
    objectives = dict.fromkeys(name for family in FAMILIES.values() for name in family.objectives)
    return {"model.kind": tuple(FAMILIES), "finetune.objective": tuple(objectives)}


def load_plugins(env: Mapping[str, str] | None = None) -> list[str]:
    """Import the plug-in modules that register more families: those named in ``ITDIFFUSION_PLUGINS``
    (comma-separated) and the entry points of the group ``itdiffusion.families``; returns their names.
    A module that cannot be imported is a UserError naming it."""
    env = os.environ if env is None else env
    names = [n.strip() for n in env.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"{PLUGINS_ENV}: cannot import {name!r} ({e})") from e
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
        names.append(entry.value)
    return names
