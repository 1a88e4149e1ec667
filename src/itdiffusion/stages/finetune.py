"""Stage ``finetune``: train an IDDPM U-Net (or a DDPM's diffusers U-Net) on the IT bound (or on its own
IDDPM loss).

``python -m itdiffusion.stages.finetune model=iddpm_cifar10_vlb`` (the paper: IT loss, Adam, lr 2.5e-5,
global batch 32, 10 epochs, from the _vlb checkpoint)
``torchrun --nproc_per_node=8 -m itdiffusion.stages.finetune run_id=tune model=iddpm_cifar10_vlb``
``python -m itdiffusion.stages.finetune model=iddpm_tiny data=patches finetune=smoke_base`` (train the
tiny smoke model from scratch on IDDPM's loss)
``python -m itdiffusion.stages.finetune model=ddpm_cifar10 finetune=ddpm`` (ITD's DDPM(tune): IT loss,
Adam, lr 1e-4, batch 64, 10 epochs, from google/ddpm-cifar10-32; ``model.kind=ddpm`` trains with ``it`` only)

Objectives (``finetune.objective``):

- ``it``: the continuous IT bound with one log-SNR per image, in nats per image,
  ``h_G + (1/2) w(a) [||eps - eps_hat(z, a)||^2 - mmse_G(a)]`` with ``a ~ q`` and ``w = 1/q``
  (:func:`itdiffusion.information.it_loss`; the Gaussian reference comes from the ``stats`` cache);
- ``iddpm``: the model's own IDDPM loss (:func:`itdiffusion.models.iddpm.iddpm_training_loss`);
- ``any_order``: masked-diffusion models (``model.kind=masked_pixels``, e.g. ``model=masked_pixels_tiny``)
  only, and their only objective: the any-order (time-free I-MDCE) loss of
  :func:`itdiffusion.discrete.any_order_loss`, an upper bound on -log P(x) in nats per image (every
  sub-pixel a token), one random mask per image; the held-out curve is the same loss.
  ``python -m itdiffusion.stages.finetune model=masked_pixels_tiny finetune.objective=any_order
  finetune.init=scratch``

Starting weights (``finetune.init``): null = the model's checkpoint (``model.checkpoint``, else its
official URL, downloaded on first use; masked-pixel models without one start from scratch); a path;
or ``scratch`` (random initialisation, seed ``finetune.seed``).

Outputs in ``<paths.checkpoint_dir>/finetune/<finetune.run_name>/``: ``last.pt`` and
``epoch_XXX.pt`` (complete training states), ``model.pt`` (and ``ema.pt`` with EMA; plain U-Net
state_dicts, evaluated like an official checkpoint with ``model.checkpoint=<path>``) and
``loss_curve.json`` (train and held-out loss in nats and bits/dim). ``finetune.json`` in the Hydra run
dir summarizes the run.

Resuming: rerun the same command. The run continues from its newest readable checkpoint and ends
with the same weights as an uninterrupted run (bit for bit on CPU). SIGTERM saves a checkpoint and
exits with status 143; bad settings and non-finite losses exit with status 2 and one message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from itdiffusion import distributed
from itdiffusion.artifacts import LOSS_CURVE, checkpoint_provenance, write_export_provenance
from itdiffusion.checkpointing import EXPORTED_MODEL, LAST, load_training_state
from itdiffusion.config import FinetuneConfig, stage_config
from itdiffusion.dashboard import TRACKING_ID, log_model
from itdiffusion.data import load_images
from itdiffusion.discrete import any_order_loss, build_masked_pixel_model, images_to_tokens
from itdiffusion.errors import UserError
from itdiffusion.information import GaussianReference, it_loss
from itdiffusion.io import atomic_write_json
from itdiffusion.models.checkpoints import CheckpointError, file_sha256
from itdiffusion.models.ddpm import DDPMDenoiser, DDPMNetwork, build_unet, load_unet_weights, train_alpha_bar
from itdiffusion.models.iddpm import (
    IDDPMDenoiser,
    build_model_and_diffusion,
    iddpm_training_loss,
    load_checkpoint,
    resolve_checkpoint,
)
from itdiffusion.stages import (
    CONFIG_DIR,
    cli_entry,
    config_dict,
    git_commit,
    launch,
    rank_zero_first,
    setup_device,
)
from itdiffusion.stages.stats import load_or_compute_reference
from itdiffusion.tracking import Tracker, run_tags
from itdiffusion.training import LossFn, Trainer, validate_config
from itdiffusion.trajectory import INIT_SHA256, differences, trajectory_settings

log = logging.getLogger(__name__)

SUMMARY = "finetune.json"


def finetune_settings(cfg: DictConfig) -> FinetuneConfig:
    """``cfg.finetune`` as a checked :class:`FinetuneConfig`."""
    settings = OmegaConf.to_object(cfg.finetune)
    validate_config(settings)
    return settings


def finetune_run_dir(cfg: DictConfig) -> Path:
    """``<paths.checkpoint_dir>/finetune/<finetune.run_name>``: the checkpoints of this run."""
    return Path(cfg.paths.checkpoint_dir) / "finetune" / cfg.finetune.run_name


def load_initial_weights(cfg: DictConfig, model: nn.Module) -> tuple[str, str | None]:
    """Load the starting weights named by ``finetune.init``; returns their description (path and sha256)
    and their sha256 (None from scratch)."""
    init = cfg.finetune.init
    if init is None and cfg.model.kind == "masked_pixels" and not cfg.model.checkpoint:
        init = "scratch"  # masked-pixel models have no official weights
    if init == "scratch":
        return "scratch", None
    if cfg.model.kind == "ddpm":
        return load_ddpm_initial_weights(cfg, model)
    try:
        if init:
            path = Path(init)
            if not path.is_file():
                raise FileNotFoundError(f"finetune.init={init} does not exist")
        else:
            with rank_zero_first():  # one download under torchrun
                path = resolve_checkpoint(cfg.model, cfg.paths.checkpoint_dir)
        sha256 = load_checkpoint(model, path)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(f"{e} (finetune.init: null = the model's checkpoint, a path, or scratch)") from e
    return f"{path} (sha256 {sha256})", sha256


# The tables' names of the fine-tuning objectives (finetune.objective); "iddpm" is the model config's own
# loss (its training_objective, e.g. L_hybrid).
OBJECTIVE_LABELS = {"it": "IT", "any_order": "any-order (I-MDCE)"}


def objective_label(cfg: DictConfig, objective: str, init_sha256: str | None) -> str:
    """The training objective the tables show for this run's weights: the objective's name from scratch,
    else the starting weights' own label (their ``export.json`` when they come from a fine-tuning run, else
    the model config's ``training_objective``) ``+ <objective> fine-tuning``."""
    name = OBJECTIVE_LABELS.get(objective, objective)
    if objective == "iddpm":
        name = cfg.model.training_objective
    if init_sha256 is None:
        return name
    init = cfg.finetune.init or cfg.model.checkpoint
    found = checkpoint_provenance(str(init), init_sha256) if init else None
    base = found["training_objective"] if found else cfg.model.training_objective
    return f"{base} + {name} fine-tuning"


def check_finished_run(ckpt_dir: Path, settings: dict) -> None:
    """``skip_done`` on a finished run: refuse when its last checkpoint was trained with other settings
    (the starting weights' sha256 is not compared here: they are not loaded when skipping)."""
    path = ckpt_dir / LAST
    if not path.is_file():
        return
    try:
        saved = load_training_state(path).get("trajectory")
    except CheckpointError as e:
        raise UserError(f"skip_done: cannot read {path} to check its settings ({e})") from e
    if saved is None:
        return
    saved = {k: v for k, v in saved.items() if k != INIT_SHA256}
    changed = differences(saved, settings)
    if changed:
        raise UserError(f"skip_done: {ckpt_dir} holds a finished run with other settings "
                        f"({'; '.join(changed)}). Use the same settings, or set finetune.run_name to a new "
                        "name.")


def load_ddpm_initial_weights(cfg: DictConfig, unet: nn.Module) -> tuple[str, str]:
    """``finetune.init`` for a DDPM (a path: a diffusers directory or a ``.pt``; null: the model's weights,
    :func:`itdiffusion.models.ddpm.load_unet_weights`); returns their description and sha256."""
    model_cfg = cfg.model
    if cfg.finetune.init:
        if not Path(cfg.finetune.init).exists():
            raise UserError(f"finetune.init={cfg.finetune.init} does not exist "
                            f"(finetune.init: null = the model's checkpoint, a path, or scratch)")
        model_cfg = OmegaConf.merge(cfg.model, {"checkpoint": str(cfg.finetune.init)})
    try:
        with rank_zero_first():  # one download under torchrun
            source, sha256 = load_unet_weights(unet, model_cfg, cfg.paths.checkpoint_dir)
    except CheckpointError as e:
        raise UserError(f"{e} (finetune.init: null = the model's checkpoint, a path, or scratch)") from e
    return f"{source} (sha256 {sha256})", sha256


def ddpm_it_objective(model_cfg: Any, reference: GaussianReference) -> LossFn:
    """The IT bound of a DDPM's ``UNet2DModel`` (through :class:`DDPMDenoiser`), seeded per image."""
    alpha_bar = train_alpha_bar(model_cfg)

    def loss(net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return it_loss(DDPMDenoiser(DDPMNetwork(net, alpha_bar)), x, reference, image_seeds=seeds)
    return loss


def it_objective(model_cfg: Any, reference: GaussianReference) -> LossFn:
    """The IT bound with one log-SNR per image (nats per image), seeded per image."""
    def loss(net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return it_loss(IDDPMDenoiser(net, model_cfg), x, reference, image_seeds=seeds)
    return loss


def iddpm_objective(diffusion: Any) -> LossFn:
    """IDDPM's own training loss (one timestep per image), seeded per image."""
    def loss(net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return iddpm_training_loss(net, diffusion, x, image_seeds=seeds)
    return loss


def model_range_to_tokens(x: Tensor) -> Tensor:
    """Images in [-1, 1] (``x = p / 127.5 - 1``) -> their sub-pixel tokens Long[B, 3 s^2] (exact inverse)."""
    pixels = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images_to_tokens(pixels)


def any_order_objective() -> LossFn:
    """The any-order loss of a masked-pixel model (nats per image), one mask per image from its seed."""
    def loss(net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return any_order_loss(net, model_range_to_tokens(x), image_seeds=seeds.tolist())
    return loss


def check_objective(cfg: DictConfig, objective: str) -> None:
    """Masked-diffusion models train with ``any_order`` only, IDDPM models never; DDPMs with ``it`` only."""
    if cfg.model.kind == "ddpm" and objective != "it":
        raise UserError(f"model={cfg.model.name} (kind ddpm) cannot train with "
                        f"finetune.objective={objective}; use finetune.objective=it")
    masked = cfg.model.kind == "masked_pixels"
    if masked != (objective == "any_order"):
        need = "finetune.objective=any_order" if masked else "finetune.objective=it or iddpm"
        raise UserError(f"model={cfg.model.name} (kind {cfg.model.kind}) cannot train with "
                        f"finetune.objective={objective}; use {need}")


def build_objectives(cfg: DictConfig, settings: FinetuneConfig, device: torch.device
                     ) -> tuple[nn.Module, LossFn, LossFn, int]:
    """(network, training loss, held-out loss in nats, dimensions per image) for ``cfg.model``."""
    check_objective(cfg, settings.objective)
    if cfg.model.kind == "masked_pixels":
        model = build_masked_pixel_model(cfg.model)
        objective = any_order_objective()
        return model, objective, objective, model.length
    if cfg.model.kind == "ddpm":
        reference = load_or_compute_reference(cfg, device)
        objective = ddpm_it_objective(cfg.model, reference)
        return build_unet(cfg.model), objective, objective, reference.dim
    model, diffusion = build_model_and_diffusion(cfg.model)
    reference = load_or_compute_reference(cfg, device)
    train_objective = it_objective(cfg.model, reference) if settings.objective == "it" else \
        iddpm_objective(diffusion)
    return model, train_objective, it_objective(cfg.model, reference), reference.dim


def heldout_images(cfg: DictConfig, count: int) -> Dataset | None:
    """The first ``count`` test images (None when ``count`` is 0)."""
    if count == 0:
        return None
    test = load_images(cfg.data, "test")
    return Subset(test, range(min(count, len(test))))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Fine-tune ``cfg.model`` as ``cfg.finetune`` says; returns (and writes) the run summary."""
    device = setup_device(cfg)
    settings = finetune_settings(cfg)
    ckpt_dir = finetune_run_dir(cfg)
    trajectory = trajectory_settings(cfg)
    if cfg.skip_done and (ckpt_dir / EXPORTED_MODEL).is_file():
        check_finished_run(ckpt_dir, trajectory)
        log.info("skip_done: %s exists, nothing to do", ckpt_dir / EXPORTED_MODEL)
        return {"run_name": settings.run_name, "model_path": str(ckpt_dir / EXPORTED_MODEL), "skipped": True}

    with Tracker(cfg.logger, stage_config(config_dict(cfg), "finetune"), job_type="finetune",
                 name=f"finetune-{cfg.run_id}",
                 tags=run_tags(cfg.experiment, cfg.model.name, cfg.paper_row, settings.objective),
                 id_file=ckpt_dir / TRACKING_ID) as tracker:  # live from the start; a restart resumes it
        torch.manual_seed(settings.seed)  # the initial weights when training from scratch
        model, train_objective, heldout_objective, dim = build_objectives(cfg, settings, device)
        init, init_sha256 = load_initial_weights(cfg, model)
        trajectory[INIT_SHA256] = init_sha256
        trainer = Trainer(
            model, train_objective, load_images(cfg.data, "train"), settings, ckpt_dir, device=device,
            dim=dim, train_loss_is_nll=settings.objective in ("it", "any_order"),
            heldout_set=heldout_images(cfg, settings.heldout_images),
            heldout_loss=heldout_objective, hflip=cfg.data.hflip,
            num_workers=cfg.data.num_workers, tracker=tracker, run_config=config_dict(cfg),
            trajectory=trajectory,
        )
        log.info("fine-tuning %s (%s objective, init %s): %d steps of %d images (%d process(es) x %d, "
                 "passes of %d); checkpoints in %s", cfg.model.name, settings.objective, init,
                 trainer.total_steps, settings.batch_size, distributed.world_size(), trainer.local_batch,
                 trainer.micro_batch, ckpt_dir)
        result = trainer.run()
        last = result.curve[-1]
        summary = {
            "run_id": cfg.run_id, "run_name": settings.run_name, "objective": settings.objective,
            "init": init, "checkpoint_dir": str(ckpt_dir), "model_path": str(result.model_path),
            "ema_path": str(result.ema_path) if result.ema_path else None,
            "loss_curve": str(ckpt_dir / LOSS_CURVE), "steps": result.steps,
            "skipped_steps": result.skipped_steps, "world_size": distributed.world_size(),
            "final_heldout_loss_bpd": last["heldout_loss_bpd"],
            "final_train_loss_bpd": last["train_loss_bpd"],
            "git_commit": git_commit(), "config": config_dict(cfg),
        }
        if distributed.is_main():
            weights = [Path(result.model_path)] + ([Path(result.ema_path)] if result.ema_path else [])
            write_export_provenance(
                ckpt_dir, weights, training_objective=objective_label(cfg, settings.objective, init_sha256),
                objective=settings.objective, init=init, steps=result.steps, model=cfg.model.name,
                run_id=cfg.run_id, git_commit=summary["git_commit"])
            atomic_write_json(run_dir / SUMMARY, summary)
            tracker.summary({k: v for k, v in summary.items() if k != "config"})
            log_model(tracker, settings.run_name, Path(result.model_path), file_sha256(result.model_path),
                      {"run_id": cfg.run_id, "objective": settings.objective, "steps": result.steps,
                       "init": init, "final_heldout_loss_bpd": last["heldout_loss_bpd"]})
    log.info("done: %d steps (%d skipped); weights %s", result.steps, result.skipped_steps, result.model_path)
    return summary


@cli_entry
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg)  # optimized_metric's value: an optimizing sweeper's objective


if __name__ == "__main__":
    main()
