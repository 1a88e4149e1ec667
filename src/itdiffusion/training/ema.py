"""The exponential moving average of the weights."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class EMA:
    """Exponential moving average of the floating-point state: ``avg <- decay avg + (1 - decay) w``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1.0 - self.decay)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state_dict with averaged floating-point entries."""
        return {k: self.shadow.get(k, v) for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
