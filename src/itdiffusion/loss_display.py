"""The fine-tuning loss where a user looks while it trains (rank 0): the progress bar's postfix and
periodic lines in the stage's log (``finetune.log`` and the console).

The train loss shown is the mean over the steps since the previous tracker row (``finetune.log_every_steps``,
the same number logged to wandb as ``train/loss_*``); the held-out loss whenever it is computed. Bits/dim
for the likelihood objectives (``it``, ``any_order``), the objective's own units otherwise (``iddpm``).
A log line is written every :func:`line_every` steps (about :data:`LOG_LINES` per run) and at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

LOG_LINES = 50  # about this many train-loss lines per run in the log


def line_every(total_steps: int, log_every_steps: int) -> int:
    """Steps between two train-loss log lines: a multiple of ``log_every_steps`` (when the loss is formed)
    giving about :data:`LOG_LINES` lines over ``total_steps``."""
    return log_every_steps * max(1, math.ceil(total_steps / (LOG_LINES * log_every_steps)))


def loss_text(fields: Mapping[str, float], prefix: str) -> tuple[str, str]:
    """(value, unit) of a loss from its logged fields ``<prefix>_bpd`` (bits/dim), else ``<prefix>_<x>``."""
    if f"{prefix}_bpd" in fields:
        return f"{fields[f'{prefix}_bpd']:.4f}", "bits/dim"
    key = next(k for k in fields if k.startswith(prefix + "_") and not k.endswith("_nats"))
    return f"{fields[key]:.5g}", key.removeprefix(prefix + "_")


class LossDisplay:
    """The running train loss and the held-out loss on ``bar`` (a tqdm bar, or None) and in log lines."""

    def __init__(self, total_steps: int, log_every_steps: int, bar: Any = None):
        self.total_steps, self.every = total_steps, line_every(total_steps, log_every_steps)
        self.bar = bar
        self.postfix: dict[str, str] = {}

    def train(self, step: int, fields: Mapping[str, float], lr: float) -> None:
        """The train loss over the last window (``fields``: the ``train/loss_*`` values logged)."""
        value, unit = loss_text(fields, "train/loss")
        self._show("loss", value)
        if step % self.every == 0 or step == self.total_steps:
            log.info("step %d/%d: train loss %s %s, lr %.3g", step, self.total_steps, value, unit, lr)

    def heldout(self, step: int, fields: Mapping[str, float]) -> None:
        """The held-out loss at ``step`` (``fields``: ``heldout/loss_*``)."""
        value, unit = loss_text(fields, "heldout/loss")
        self._show("heldout", value)
        log.info("step %d/%d: held-out loss %s %s", step, self.total_steps, value, unit)

    def _show(self, key: str, value: str) -> None:
        self.postfix[key] = value
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
