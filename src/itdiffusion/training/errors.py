"""The fine-tuning loop's errors and its config check."""

from __future__ import annotations

import logging
from pathlib import Path

from itdiffusion import errors
from itdiffusion.config import FinetuneConfig, value_problems
from itdiffusion.errors import UserError

log = logging.getLogger(__name__)


class FinetuneError(UserError):
    """A run that cannot start or continue, with a message that says what to change (the stage exits 2)."""


class NonFiniteError(FinetuneError):
    """The loss or the gradient norm was NaN or infinite at ``step`` (1-based)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Preempted(errors.Preempted):
    """A stop signal arrived; a checkpoint at ``step`` was saved. Rerun the same command to resume."""

    def __init__(self, step: int, path: Path, signal_name: str = "SIGTERM"):
        super().__init__(f"{signal_name} received: saved step {step} to {path}; rerun the same command to "
                         "resume")
        self.step = step
        self.path = path


def validate_config(cfg: FinetuneConfig) -> None:
    """Reject settings that cannot train, with the key to change (the allowed values of every
    ``finetune.*`` key are :data:`itdiffusion.config.VALUE_RULES`)."""
    problems = value_problems(cfg, section="finetune")
    if problems:
        raise FinetuneError("invalid fine-tuning config: " + "; ".join(problems))
