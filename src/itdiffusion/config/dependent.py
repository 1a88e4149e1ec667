"""Settings that only matter under another one (:data:`DEPENDENT_KEYS`), and the config groups each stage
reads (:data:`STAGE_GROUPS`).

A key given on the command line (or in a sweep job's
overrides) whose condition does not hold would be silently ignored, so the launch fails instead,
naming the key to add (dependency_problems, applied by itdiffusion.stages.launch to the groups the
stage reads). Keys set in config files are not checked: experiment=paper_full inherits paper's
dataset-budget settings on purpose and runs per image. Left out on purpose, because scripts/reproduce.sh
hands the same overrides to evaluations where they apply and to others where they cannot: the VLB keys
(vlb_steps, vlb_steps_per_batch; its ensemble steps run with estimator.vlb=false) and the masked-model
keys (num_masks, corrupt_fraction; its IDDPM and DDPM evaluations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from itdiffusion.config.rules import ABSENT, lookup


@dataclass(frozen=True)
class Needs:
    """``key`` applies only where ``other`` is one of ``values`` (with ``negate``: is none of them)."""

    key: str
    other: str
    values: tuple[Any, ...]
    negate: bool = False

    def holds(self, value: Any) -> bool:
        return (value in self.values) != self.negate

    def problem(self, value: Any) -> str:
        shown = "|".join(_yaml(v) for v in self.values)
        wanted = f"{self.other} other than {shown}" if self.negate else f"{self.other}={shown}"
        return (f"{self.key} applies only with {wanted} (here {self.other}={_yaml(value)}): "
                f"add that setting or drop {self.key}")


def _yaml(value: Any) -> str:
    """A value as an override writes it (null, true, false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


DATASET_BUDGET = ("estimator.budget", ("dataset",))
DEPENDENT_KEYS: tuple[Needs, ...] = (
    *(Needs(f"estimator.{k}", *DATASET_BUDGET)
      for k in ("target_stderr_bpd", "target_stderr_ratio", "pilot_images", "budget_from")),
    Needs("estimator.target_stderr_ratio", "estimator.target_stderr_bpd", (None,)),  # the bpd target wins
    *(Needs(f"estimator.{k}", "estimator.it", (True,))
      for k in ("npoints", "logsnr_sampling", "rounding", "clip", "control_variate", "pixel_maps",
                "pixel_map_points", "logsnr_proposal_from")),
    *(Needs(f"estimator.{k}", "estimator.precision", ("fp32",), negate=True)
      for k in ("precision_tolerance_bpd", "precision_check_images")),
    *(Needs(f"data.{k}", "data.name", ("cifar10",)) for k in ("download", "verify")),
    *(Needs(f"data.{k}", "data.name", ("patches",))
      for k in ("patches_per_photo", "patches_test_photos", "patch_photo_size")),
    Needs("finetune.max_skipped_steps", "finetune.skip_nonfinite", (True,)),
)


def dependency_problems(cfg: Any, given: set[str], groups: tuple[str, ...] | None = None) -> list[str]:
    """One message per key in ``given`` (dotted keys set by the command line) whose :data:`DEPENDENT_KEYS`
    condition fails in ``cfg``; with ``groups``, only keys of those config groups are checked."""
    problems = []
    for need in DEPENDENT_KEYS:
        if need.key not in given or (groups is not None and need.key.split(".")[0] not in groups):
            continue
        value = lookup(cfg, need.other)
        if value is not ABSENT and not need.holds(value):
            problems.append(need.problem(value))
    return problems


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that Hydra overrides (``a.b=1``, ``+a.b=1``, ``++a.b=1``, ``~a.b``) set."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


# The config groups each stage reads: its wandb config carries these (and the top-level keys) only, and
# only their keys are checked against DEPENDENT_KEYS (scripts/reproduce.sh hands its overrides to every
# stage).
GROUPS = ("paths", "data", "model", "estimator", "finetune", "logger", "report")
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "stats": ("paths", "data", "logger"),
    "evaluate": ("paths", "data", "model", "estimator", "logger"),
    "finetune": ("paths", "data", "model", "finetune", "logger"),
    "report": ("paths", "logger", "report"),
}


def stage_config(config: dict, stage: str) -> dict:
    """``config`` (a resolved config as a dict) without the groups that ``stage`` does not read."""
    used = STAGE_GROUPS[stage]
    return {k: v for k, v in config.items() if k not in GROUPS or k in used}
