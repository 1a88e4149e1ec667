"""What makes two fine-tuning runs the same run: the settings that change the training trajectory.

A fine-tuning run directory (``checkpoints/finetune/<run_name>``) may only be resumed by a command
that would have produced the same trajectory. :func:`trajectory_settings` lists those settings as a
flat mapping ``"group.key" -> value``:

- every ``model.*`` flag (the network and diffusion; ``model.training_objective`` is a report label),
- the data selection and augmentation: ``data.*`` except ``download``, ``verify``, ``num_workers``
  and ``num_images`` (which only affect how the files are read, or evaluation),
- ``finetune.*`` settings in :data:`FINETUNE_KEYS` (objective, optimizer, seed, starting weights).

Left out on purpose: ``finetune.epochs`` / ``max_steps`` (a run may be extended), checkpoint and
logging cadence, ``finetune.heldout_images``, and ``skip_nonfinite`` / ``max_skipped_steps`` (the way
to continue a run that met a non-finite step). The sha256 of the starting weights is added by the
stage (:func:`itdiffusion.stages.finetune.run`) once they are loaded.

The default run name ``${model.name}_${finetune.objective}_${itd_settings_hash:}`` carries a short
hash of these settings (resolver ``itd_settings_hash``, registered by :mod:`itdiffusion.config`), so
runs with different settings never share a directory by default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# finetune settings a resumed run must share with its checkpoint to continue the same run (training)
RESUME_INVARIANT = ("objective", "batch_size", "lr", "weight_decay", "grad_clip", "bf16", "ema_decay",
                    "warmup_steps", "seed")
# the finetune settings that change the trajectory: those plus the starting weights
FINETUNE_KEYS = ("init", *RESUME_INVARIANT)
MODEL_EXCLUDED = ("training_objective",)
DATA_EXCLUDED = ("download", "verify", "num_workers", "num_images")
INIT_SHA256 = "finetune.init_sha256"
HASH_CHARS = 8


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists and dicts (JSON-comparable)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def trajectory_settings(cfg: Any) -> dict[str, Any]:
    """``{"model.<k>": ..., "data.<k>": ..., "finetune.<k>": ...}`` of a full config (DictConfig or dict)."""
    out: dict[str, Any] = {}
    for group, excluded in (("model", MODEL_EXCLUDED), ("data", DATA_EXCLUDED)):
        node = cfg[group]
        for key in node:
            if key not in excluded:
                out[f"{group}.{key}"] = _plain(node[key])
    finetune = cfg["finetune"]
    for key in FINETUNE_KEYS:
        if key in finetune:
            out[f"finetune.{key}"] = _plain(finetune[key])
    return out


def settings_hash(settings: Mapping[str, Any]) -> str:
    """First :data:`HASH_CHARS` hex digits of the sha256 of the settings as canonical JSON."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def settings_hash_resolver(*, _root_: Any) -> str:
    """OmegaConf resolver ``${itd_settings_hash:}``: the hash of the root config's trajectory settings."""
    return settings_hash(trajectory_settings(_root_))


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (a key missing on one side is ``None``)."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if _plain(saved.get(k)) != _plain(current.get(k))]
