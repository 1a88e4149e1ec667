"""The trainer's loss log lines (tqdm, wandb) and its loss curve: train and held-out loss (nats and bits/dim)
at every epoch end."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from itdiffusion import distributed
from itdiffusion.data import to_model_range
from itdiffusion.seeding import Stream, stream_seed_tensor
from itdiffusion.units import nats_to_bpd


class LossCurve:
    """:class:`~itdiffusion.training.loop.Trainer`'s loss log lines and loss curve (train and held-out
    loss per epoch)."""

    def _log(self, lr: float, grad_norm: Tensor) -> None:
        """Log the mean train loss since the last log line (rank 0), with lr, gradient norm and skips."""
        p = self.progress
        loss = self._window_sum / self._window_count if self._window_count else None
        self._window_sum, self._window_count = 0.0, 0
        if loss is not None and self._display is not None:
            self._display.train(p.step, self._loss_fields("train/loss", loss), lr)
        if self.tracker is None or not distributed.is_main():
            return
        row: dict[str, Any] = {"train/epoch": p.step / self.steps_per_epoch,
                               "train/skipped_steps": p.skipped_steps,
                               "train/lr": lr,
                               "train/grad_norm": grad_norm.item()}
        if loss is not None:
            row.update(self._loss_fields("train/loss", loss))
        self.tracker.log(row, step=p.step)

    def _loss_fields(self, name: str, value: float) -> dict[str, float]:
        if self.train_loss_is_nll:
            return {f"{name}_nats": value, f"{name}_bpd": float(nats_to_bpd(value, self.dim))}
        return {f"{name}_{self.cfg.objective}": value}

    def _finish_epoch(self, epoch_done: bool) -> None:
        p = self.progress
        train_loss = p.epoch_loss_sum / p.epoch_loss_count if p.epoch_loss_count else None
        self._append_curve_point(train_loss)
        finished = p.epoch if epoch_done else None
        if epoch_done:
            p.epoch += 1
            p.batch_in_epoch = 0
            p.epoch_loss_sum, p.epoch_loss_count = 0.0, 0
        self._save(epoch_end=finished)

    def _append_curve_point(self, train_loss: float | None) -> None:
        p = self.progress
        heldout = self._heldout_loss()
        point: dict[str, Any] = {
            "step": p.step,
            "epoch": p.step / self.steps_per_epoch,
            "train_loss_nats": None, "train_loss_bpd": None,
            **({} if self.train_loss_is_nll else {f"train_loss_{self.cfg.objective}": None}),
            "heldout_loss_nats": heldout,
            "heldout_loss_bpd": None if heldout is None else float(nats_to_bpd(heldout, self.dim)),
        }
        if train_loss is not None:
            point.update(self._loss_fields("train_loss", train_loss))
        if heldout is not None and not math.isfinite(heldout):
            # JSON has no NaN: the values become null (fsio.atomic_write_json) and this flag says why
            point["heldout_loss_nonfinite"] = True
            if distributed.is_main():
                warnings.warn(f"the held-out loss at step {p.step} is {heldout}", stacklevel=2)
        self.curve.append(point)
        if self._display is not None and heldout is not None:
            self._display.heldout(p.step, {"heldout/loss_bpd": point["heldout_loss_bpd"]})
        if self.tracker is not None and distributed.is_main() and heldout is not None:
            self.tracker.log({"heldout/loss_nats": point["heldout_loss_nats"],
                              "heldout/loss_bpd": point["heldout_loss_bpd"]}, step=p.step)

    @torch.no_grad()
    def _heldout_loss(self) -> float | None:
        """Mean held-out loss (nats per image) with fixed per-image seeds, sharded over processes."""
        if self.heldout is None or len(self.heldout) == 0:
            return None
        self.model.eval()
        mine = list(distributed.shard_indices(len(self.heldout)))
        parts = [torch.zeros(0, dtype=torch.float64, device=self.device)]
        for start in range(0, len(mine), self.micro_batch):
            chunk = mine[start:start + self.micro_batch]
            images = torch.stack([self.heldout[i][0] for i in chunk])
            indices = torch.tensor(chunk, dtype=torch.int64)
            x = to_model_range(images).to(self.device)
            seeds = stream_seed_tensor(self.cfg.seed, indices, Stream.HELDOUT, 0)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                parts.append(self.heldout_loss(self.model, x, seeds).double())
        losses = distributed.all_gather_concat(torch.cat(parts))
        self.model.train()
        return losses.mean().item()

