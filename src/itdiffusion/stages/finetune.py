"""Stage ``finetune``: train an IDDPM U-Net (or a DDPM's diffusers U-Net) on the IT bound (or on its own
IDDPM loss).

``python -m itdiffusion.stages.finetune model=iddpm_cifar10_vlb`` (the paper: IT loss, Adam, lr 2.5e-5,
global batch 32, 10 epochs, from the _vlb checkpoint)
``torchrun --nproc_per_node=8 -m itdiffusion.stages.finetune run_id=tune model=iddpm_cifar10_vlb``
``python -m itdiffusion.stages.finetune model=iddpm_tiny data=patches finetune=smoke_base`` (train the
tiny smoke model from scratch on IDDPM's loss)
``python -m itdiffusion.stages.finetune model=ddpm_cifar10 finetune=ddpm`` (ITD's DDPM(tune): IT loss,
Adam, lr 1e-4, batch 64, 10 epochs, from google/ddpm-cifar10-32; the DDPM family trains with ``it`` only)

Objectives (``finetune.objective``):

- ``it``: the continuous IT bound with one log-SNR per image, in nats per image,
  ``h_G + (1/2) w(a) [||eps - eps_hat(z, a)||^2 - mmse_G(a)]`` with ``a ~ q`` and ``w = 1/q``
  (:func:`itdiffusion.information.it_loss`; the Gaussian reference comes from the ``stats`` cache);
- ``iddpm``: the model's own IDDPM loss (:func:`itdiffusion.models.iddpm.iddpm_training_loss`);
- ``any_order``: masked-diffusion models (the masked-pixel family, e.g. ``model=masked_pixels_tiny``)
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

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, Subset

from itdiffusion import distributed
from itdiffusion.artifacts import LOSS_CURVE, checkpoint_provenance, write_export_provenance
from itdiffusion.config import FinetuneConfig, check_values, stage_config
from itdiffusion.data import load_images
from itdiffusion.errors import UserError
from itdiffusion.fsio import atomic_write_json
from itdiffusion.models.families import Family, family_of
from itdiffusion.models.objectives import Objective
from itdiffusion.models.weights import CheckpointError, file_sha256
from itdiffusion.stage_tracking import TRACKING_ID, log_model
from itdiffusion.stages import (
    CONFIG_DIR,
    cli_entry,
    config_dict,
    git_commit,
    launch,
    rank_zero_first,
    setup_device,
    value_rules,
)
from itdiffusion.stages.stats import load_or_compute_reference
from itdiffusion.tracking import Tracker, run_tags
from itdiffusion.training import Trainer, validate_config
from itdiffusion.training_state import EXPORTED_MODEL, LAST, load_training_state
from itdiffusion.trajectory import INIT_SHA256, differences, trajectory_settings

log = logging.getLogger(__name__)

SUMMARY = "finetune.json"


def finetune_settings(cfg: DictConfig) -> FinetuneConfig:
    """``cfg.finetune`` as a checked :class:`FinetuneConfig`."""
    check_values(cfg, rules=value_rules())  # the registered families' kinds and objectives too
    settings = OmegaConf.to_object(cfg.finetune)
    validate_config(settings)
    return settings


def finetune_run_dir(cfg: DictConfig) -> Path:
    """``<paths.checkpoint_dir>/finetune/<finetune.run_name>``: the checkpoints of this run."""
    return Path(cfg.paths.checkpoint_dir) / "finetune" / cfg.finetune.run_name


def load_initial_weights(cfg: DictConfig, family: Family, model: nn.Module) -> tuple[str, str | None]:
    """Load the starting weights named by ``finetune.init``; returns their description (path and sha256)
    and their sha256 (None from scratch)."""
    init = cfg.finetune.init
    if init is None and not family.has_own_weights(cfg.model):
        init = "scratch"  # e.g. masked-pixel models: no official weights
    if init == "scratch":
        return "scratch", None
    hint = "(finetune.init: null = the model's checkpoint, a path, or scratch)"
    if init and not Path(init).exists():
        raise UserError(f"finetune.init={init} does not exist {hint}")
    try:
        with rank_zero_first():  # one download under torchrun
            source, sha256 = family.load_weights(model, cfg.model, cfg.paths.checkpoint_dir,
                                                 Path(init) if init else None)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(f"{e} {hint}") from e
    return f"{source} (sha256 {sha256})", sha256


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


def build_objectives(cfg: DictConfig, family: Family, settings: FinetuneConfig, device: torch.device
                     ) -> tuple[nn.Module, Objective, Objective, int]:
    """(network, training loss, held-out loss in nats, dimensions per image) for ``cfg.model``."""
    train_cls = family.objective(cfg.model, settings.objective)
    heldout_cls = family.objectives[family.heldout_objective]
    model, diffusion = family.build(cfg.model)
    needs_reference = train_cls.needs_reference or heldout_cls.needs_reference
    reference = load_or_compute_reference(cfg, device) if needs_reference else None
    train = train_cls(family, cfg.model, diffusion, reference)
    heldout = heldout_cls(family, cfg.model, diffusion, reference)
    return model, train, heldout, family.dim(model, reference)


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
        family = family_of(cfg.model)
        model, train_objective, heldout_objective, dim = build_objectives(cfg, family, settings, device)
        init, init_sha256 = load_initial_weights(cfg, family, model)
        trajectory[INIT_SHA256] = init_sha256
        trainer = Trainer(
            model, train_objective, load_images(cfg.data, "train"), settings, ckpt_dir, device=device,
            dim=dim, train_loss_is_nll=train_objective.nll,
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
