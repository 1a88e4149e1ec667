"""An evaluation whose model names no weights (``model=iddpm_tiny`` has none of its own): the exact
``model.checkpoint=...`` to add, looked up among the fine-tuning runs of ``scripts/reproduce.sh``.

The reproduce chain (``make smoke``) writes its models to ``<checkpoint_dir>/finetune/<chain id>-<step>/``
(:data:`CHAIN_STEPS`: ``-tune`` and ``-base`` for IDDPM, ``-ddpm-tune`` and ``-ddpm-base`` for DDPM,
``-masked`` for the masked model); a run's ``last.pt`` records the model it trained. The stages check this
at launch (:func:`itdiffusion.stages.check_launch`), and a sweep before its first job
(:class:`itdiffusion.sweeps.SweepReport`), so no job starts without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itdiffusion.errors import CheckpointError
from itdiffusion.training_state import EXPORTED_MODEL, LAST, load_training_state

# run-dir suffixes of the reproduce chain's trained models, per model kind, most wanted first
CHAIN_STEPS = {"iddpm": ("-tune", "-base"), "ddpm": ("-ddpm-tune", "-ddpm-base"),
               "masked_pixels": ("-masked",)}


def names_weights(model_cfg: Any) -> bool:
    """Whether the model config says where its weights are (a file, a URL, or a DDPM's hub id)."""
    return bool(model_cfg.get("checkpoint") or model_cfg.get("checkpoint_url") or model_cfg.get("pretrained"))


def chain_checkpoints(checkpoint_dir: str | Path, model_name: str, kind: str) -> list[Path]:
    """Exported weights (``model.pt``) of reproduce-chain runs that trained ``model_name``, newest first
    within each step of :data:`CHAIN_STEPS` (the fine-tuned model before the base model)."""
    found = []
    runs = Path(checkpoint_dir) / "finetune"
    for suffix in CHAIN_STEPS.get(kind, ()):
        step = [d / EXPORTED_MODEL for d in runs.glob(f"*{suffix}")
                if (d / EXPORTED_MODEL).is_file() and _trained(d, model_name)]
        found += sorted(step, key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def _trained(run_dir: Path, model_name: str) -> bool:
    try:
        return load_training_state(run_dir / LAST)["config"]["model"]["name"] == model_name
    except (CheckpointError, KeyError, TypeError):
        return False


def missing_weights(cfg: Any) -> str | None:
    """The problem, with the override to add, when an evaluation of ``cfg`` has no weights (None if it has:
    ``model`` names them, or ``ensemble`` lists the checkpoints)."""
    if cfg.get("ensemble") or names_weights(cfg.model):
        return None
    name = cfg.model.name
    found = chain_checkpoints(cfg.paths.checkpoint_dir, name, cfg.model.kind)
    if found:
        others = f"; others: {', '.join(str(p) for p in found[1:4])}" if len(found) > 1 else ""
        return (f"model {name} names no weights: add model.checkpoint={found[0]} (the newest "
                f"{name} that scripts/reproduce.sh trained{others})")
    runs = Path(cfg.paths.checkpoint_dir) / "finetune"
    return (f"model {name} names no weights: add model.checkpoint=<its weights file> (no {name} trained "
            f"by scripts/reproduce.sh in {runs}: `make smoke` trains one)")
