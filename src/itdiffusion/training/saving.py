"""The trainer's start (fresh, or resumed from the newest checkpoint), its checkpoints and the exported
weights. A resume must share the trajectory settings (:mod:`itdiffusion.trajectory`) with its checkpoint."""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from itdiffusion import distributed
from itdiffusion import training_state as ckpt
from itdiffusion.artifacts import LOSS_CURVE, write_loss_curve
from itdiffusion.models.weights import first_nonfinite
from itdiffusion.seeding import Stream, stream_seed
from itdiffusion.training.errors import FinetuneError
from itdiffusion.trajectory import RESUME_INVARIANT, differences
from itdiffusion.units import ABSURD_BPD

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run stands; ``step`` counts batches consumed (updates plus skipped steps)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    epoch_loss_sum: float = 0.0  # sum of per-image losses over this epoch's applied steps, all processes
    epoch_loss_count: int = 0


@dataclass
class FinetuneResult:
    steps: int
    skipped_steps: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    model_path: Path | None = None
    ema_path: Path | None = None


class Saving:
    """:class:`~itdiffusion.training.loop.Trainer`'s start (fresh or resumed from its checkpoint), its
    checkpoints and the exported weights."""

    def _start(self, stack: contextlib.ExitStack) -> None:
        """Lock the run dir and find the checkpoint (rank 0), share the verdict, resume or start fresh."""
        verdict: list[Any] = [None, None]  # [checkpoint path or None, error message or None]
        if distributed.is_main():
            try:
                stack.enter_context(ckpt.exclusive_run_dir(self.run_dir))
                stale = ckpt.remove_stale_temporaries(self.run_dir)
                if stale:
                    warnings.warn(f"removed {len(stale)} partial file(s) left by an interrupted write in "
                                  f"{self.run_dir}", stacklevel=2)
                found = ckpt.find_resume_checkpoint(self.run_dir)
                verdict[0] = str(found[0]) if found else None
            except ckpt.CheckpointError as e:
                verdict[1] = str(e)
        if distributed.is_distributed():
            dist.broadcast_object_list(verdict, src=0)
        if verdict[1] is not None:
            raise FinetuneError(verdict[1])
        if verdict[0] is None:
            self._seed_process_rngs(step=0)
            self._append_curve_point(train_loss=None)  # held-out loss of the initial weights
        else:
            self._resume(Path(verdict[0]))

    def _seed_process_rngs(self, step: int) -> None:
        s = stream_seed(self.cfg.seed, distributed.rank(), Stream.DROPOUT, step)
        torch.manual_seed(s)
        np.random.seed(s & 0xFFFFFFFF)  # noqa: NPY002 (the legacy global stream library code uses)
        random.seed(s)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_training_state(path)
        saved_cfg = state["config"].get("finetune", {})
        changed = [f"{k}: {saved_cfg[k]!r} -> {getattr(self.cfg, k)!r}"
                   for k in RESUME_INVARIANT if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        saved_trajectory = state.get("trajectory")
        if saved_trajectory is not None and self.trajectory:
            changed += differences(saved_trajectory, self.trajectory)
        elif self.trajectory:
            warnings.warn(f"{path} records no trajectory settings (written by an older version): only "
                          "finetune settings are compared", stacklevel=2)
        if changed:
            raise FinetuneError(
                f"cannot resume {path}: settings differ from the checkpoint ({'; '.join(changed)}). "
                "Use the same settings, or set finetune.run_name to start a new run."
            )
        progress = Progress(**state["progress"])
        if progress.batch_in_epoch and (state["global_batch"] != self.global_batch
                                        or state["steps_per_epoch"] != self.steps_per_epoch):
            raise FinetuneError(
                f"cannot resume {path} mid-epoch with a different global batch or training set size "
                f"(checkpoint: {state['global_batch']} images x {state['steps_per_epoch']} steps per epoch; "
                f"now: {self.global_batch} x {self.steps_per_epoch})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress = progress
        self.curve = list(state["curve"])
        if state["world_size"] == self.world:
            ckpt.restore_rng_state(state["rng"][distributed.rank()], self.device)
        else:
            warnings.warn(f"resuming with {self.world} process(es) instead of {state['world_size']}: dropout "
                          "RNG streams are re-seeded, so this run will not match an uninterrupted one bit "
                          "for bit", stacklevel=2)
            self._seed_process_rngs(step=progress.step)
        self._saved_at_step = progress.step
        self._start_step = progress.step
        if distributed.is_main():
            log.info("resumed from %s at step %d/%d (epoch %d, batch %d)", path, progress.step,
                     self.total_steps, progress.epoch, progress.batch_in_epoch)

    def _save(self, epoch_end: int | None = None) -> None:
        """Checkpoint (collective: gathers every process's RNG state; rank 0 writes)."""
        rng = ckpt.capture_rng_state(self.device)
        rngs = [rng]
        if distributed.is_distributed():
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        if distributed.is_main():
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": rngs,
                "progress": asdict(self.progress),
                "curve": self.curve,
                "world_size": self.world,
                "global_batch": self.global_batch,
                "steps_per_epoch": self.steps_per_epoch,
                "config": {**self.run_config, "finetune": asdict(self.cfg)},
                "trajectory": self.trajectory,
            }
            ckpt.save_training_state(self.run_dir, ckpt.serialize(state), epoch_end=epoch_end,
                                    keep_epochs=self.cfg.keep_epochs)
            write_loss_curve(self.run_dir / LOSS_CURVE, self.curve, objective=self.cfg.objective)
        self._saved_at_step = self.progress.step
        distributed.barrier()

    def _check_converged(self) -> None:
        """FinetuneError (nothing exported) when the run diverged: the final held-out loss is non-finite or
        absurd (> :data:`~itdiffusion.units.ABSURD_BPD`), or every step was skipped as non-finite (the weights
        were never updated)."""
        p, last = self.progress, (self.curve[-1] if self.curve else {})
        bpd = last.get("heldout_loss_bpd")
        if last.get("heldout_loss_nonfinite") or (bpd is not None and bpd > ABSURD_BPD):
            value = "not finite" if bpd is None else f"{bpd:.3g} bits/dim"
            raise FinetuneError(
                f"the held-out loss of the trained weights is {value} (step {last.get('step')}): the run "
                f"diverged ({p.skipped_steps} step(s) skipped); nothing was exported to {self.run_dir}. "
                "Lower finetune.lr (or set finetune.grad_clip), then start a new run (another run name)")
        if p.step > 0 and p.skipped_steps >= p.step:
            raise FinetuneError(
                f"all {p.step} steps were skipped (non-finite loss or gradient): the weights were never "
                f"updated; nothing was exported to {self.run_dir}. Lower finetune.lr and start a new run "
                "(another finetune.run_name)")

    def _export(self) -> FinetuneResult:
        """Write the final weights as plain state_dicts (rank 0) and summarize the run."""
        model_path = self.run_dir / ckpt.EXPORTED_MODEL
        ema_path = self.run_dir / ckpt.EXPORTED_EMA if self.ema is not None else None
        for what, weights in (("weights", self.model.state_dict()),
                              ("EMA weights", self.ema.averaged_state_dict(self.model) if self.ema else {})):
            bad = first_nonfinite(weights)
            if bad is not None:
                raise FinetuneError(f"the trained {what} are non-finite ({bad}); nothing was exported to "
                                    f"{self.run_dir}. Lower finetune.lr, or start a new run.")
        self._check_converged()
        if distributed.is_main():
            ckpt.export_state_dict(model_path, self.model.state_dict())
            if self.ema is not None:
                ckpt.export_state_dict(ema_path, self.ema.averaged_state_dict(self.model))
            write_loss_curve(self.run_dir / LOSS_CURVE, self.curve, objective=self.cfg.objective)
        distributed.barrier()
        return FinetuneResult(steps=self.progress.step, skipped_steps=self.progress.skipped_steps,
                              curve=self.curve, model_path=model_path, ema_path=ema_path)

