"""The fine-tuning loop (:class:`~itdiffusion.training.loop.Trainer`)."""

from itdiffusion.training.loop import FinetuneError, NonFiniteError, Preempted, Trainer, validate_config

__all__ = ["FinetuneError", "NonFiniteError", "Preempted", "Trainer", "validate_config"]
