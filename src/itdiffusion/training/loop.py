"""The training loop: setup, steps (gradient accumulation, clipping, non-finite guards), stop signals.

See :mod:`itdiffusion.training` for the randomness, resume and fault policies."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from itdiffusion import distributed, preemption
from itdiffusion import training_state as ckpt
from itdiffusion.config import FinetuneConfig
from itdiffusion.data import to_model_range
from itdiffusion.loss_display import LossDisplay
from itdiffusion.models.weights import first_nonfinite
from itdiffusion.seeding import Stream, stream_seed_tensor
from itdiffusion.training.batches import IndexedImages, ResumableSampler, ignore_sigterm, random_hflip
from itdiffusion.training.curve import LossCurve
from itdiffusion.training.ema import EMA
from itdiffusion.training.errors import FinetuneError, NonFiniteError, Preempted, validate_config
from itdiffusion.training.saving import FinetuneResult, Progress, Saving

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``loss_fn(model, x [B,C,H,W] in [-1, 1], seeds int64 [B]) -> per-image loss [B]``."""


class Trainer(Saving, LossCurve):
    """Trains ``model`` on ``train_loss`` over ``train_set``, checkpointing into ``run_dir``.

    Args:
        model: the network (any device; moved to ``device``).
        train_loss: per-image training loss (:data:`LossFn`).
        train_set: dataset of uint8 images [C,H,W] (or tuples whose first entry is one).
        cfg: the ``finetune`` settings.
        run_dir: checkpoint folder of this run (``checkpoints/finetune/<run>``); reused to resume.
        device: this process's device.
        dim: dimensions per image, for bits/dim in the loss curve.
        train_loss_is_nll: whether ``train_loss`` is a negative log-likelihood in nats per image
            (the IT bound); otherwise its values are recorded as ``train_loss_<objective>``.
        heldout_set, heldout_loss: images and per-image loss in nats for the held-out curve.
        hflip: random horizontal flips of training images.
        num_workers: DataLoader workers.
        tracker: object with ``log(dict, step)`` (rank 0 logs; may be ``None``).
        run_config: the full resolved config, stored in every checkpoint.
        on_step_end: called with the step counter after every step (progress hooks, fault injection).
        trajectory: the settings that change the trajectory (:mod:`itdiffusion.trajectory`), stored in
            every checkpoint; resuming with different ones raises :class:`FinetuneError` naming them.
    """

    def __init__(self, model: nn.Module, train_loss: LossFn, train_set: Dataset, cfg: FinetuneConfig,
                 run_dir: str | Path, *, device: torch.device, dim: int, train_loss_is_nll: bool = True,
                 heldout_set: Dataset | None = None, heldout_loss: LossFn | None = None,
                 hflip: bool = False, num_workers: int = 0, tracker: Any = None,
                 run_config: dict[str, Any] | None = None,
                 on_step_end: Callable[[int], None] | None = None,
                 trajectory: dict[str, Any] | None = None):
        validate_config(cfg)
        self.cfg = cfg
        self.device = device
        self.run_dir = Path(run_dir)
        self.dim = dim
        self.train_loss = train_loss
        self.train_loss_is_nll = train_loss_is_nll
        self.heldout = IndexedImages(heldout_set) if heldout_set is not None and heldout_loss else None
        self.heldout_loss = heldout_loss
        self.hflip = hflip
        self.tracker = tracker
        self.run_config = run_config or {}
        self.on_step_end = on_step_end
        self.trajectory = dict(trajectory or {})

        self.train_set = IndexedImages(train_set)
        self.world = distributed.world_size()
        # finetune.batch_size is the global batch: each process takes its share of the same images per
        # step (the sampler's global order does not depend on the process count), in forward passes of
        # at most finetune.micro_batch_size images whose gradients are accumulated
        self.global_batch = cfg.batch_size
        if cfg.batch_size % self.world:
            near = self.world * max(1, round(cfg.batch_size / self.world))
            raise FinetuneError(
                f"finetune.batch_size={cfg.batch_size} (the global batch) is not a multiple of the "
                f"{self.world} processes: use a multiple of {self.world} (e.g. {near}); "
                "finetune.micro_batch_size bounds the images per forward pass")
        self.local_batch = cfg.batch_size // self.world
        self.micro_batch = min(cfg.micro_batch_size or self.local_batch, self.local_batch)
        if len(self.train_set) == 0:
            raise FinetuneError("the training set is empty: check data.root and data.train_split")
        self.sampler = ResumableSampler(self.train_set, seed=cfg.seed)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise FinetuneError(
                f"the training set has {len(self.train_set)} images, fewer than one global batch of "
                f"{cfg.batch_size} (finetune.batch_size)"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.loader = DataLoader(self.train_set, batch_size=self.local_batch, sampler=self.sampler,
                                 drop_last=True, num_workers=num_workers,
                                 worker_init_fn=ignore_sigterm if num_workers else None,
                                 # its own generator: creating an iterator must not draw from the
                                 # global RNG that dropout uses, or a resumed epoch would shift it
                                 generator=torch.Generator().manual_seed(cfg.seed),
                                 pin_memory=device.type == "cuda")

        self.model = model.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.progress = Progress()
        self.curve: list[dict[str, Any]] = []
        self._stop = preemption.StopRequest()
        self._saved_at_step = -1
        self._start_step = 0  # the step this process started (or resumed) at
        self._window_sum, self._window_count = 0.0, 0  # train loss since the last log line
        self._display = LossDisplay(self.total_steps, cfg.log_every_steps) if distributed.is_main() else None

    def run(self) -> FinetuneResult:
        """Train to ``total_steps`` (resuming from ``run_dir`` if it holds a checkpoint); export weights."""
        with contextlib.ExitStack() as stack:
            self._start(stack)
            self._stop = stack.enter_context(preemption.stop_requested())
            net = self._wrap()
            bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="finetune", unit="step",
                       disable=not distributed.is_main(), dynamic_ncols=True, mininterval=1.0)
            stack.callback(bar.close)
            if self._display is not None:
                self._display.bar = bar  # the running and held-out loss in its postfix
            while self.progress.step < self.total_steps:
                self._run_epoch(net, bar)
            return self._export()

    def _wrap(self) -> nn.Module:
        if not distributed.is_distributed():
            return self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _run_epoch(self, net: nn.Module, bar: tqdm) -> None:
        p = self.progress
        self.sampler.set_position(p.epoch, p.batch_in_epoch * self.local_batch)
        for images, indices in self.loader:
            stop_requested = self._step(net, images, indices)
            bar.update(1)
            if self.on_step_end is not None:
                self.on_step_end(p.step)
            epoch_done = p.batch_in_epoch == self.steps_per_epoch
            if epoch_done or p.step == self.total_steps:
                self._finish_epoch(epoch_done)
            elif self.cfg.save_every_steps and p.step % self.cfg.save_every_steps == 0:
                self._save()
            if stop_requested:
                if self._saved_at_step != p.step:
                    self._save()
                raise Preempted(p.step, self.run_dir / ckpt.LAST, self._stop.name)
            if epoch_done or p.step == self.total_steps:
                return

    def _step(self, net: nn.Module, images: Tensor, indices: Tensor) -> bool:
        """One update (or skip) on a batch; returns whether any process asked to stop (a stop signal)."""
        p, cfg = self.progress, self.cfg
        x = to_model_range(images)
        if self.hflip:
            x = random_hflip(x, cfg.seed, p.epoch, indices)
        x = x.to(self.device, non_blocking=True)
        seeds = stream_seed_tensor(cfg.seed, indices, Stream.TRAIN_LOSS, p.epoch)

        net.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._accumulate_gradients(net, x, seeds)
        loss = losses.mean()
        grad_norm = self._clip_grad_norm()

        # one collective per step: loss sum, image count, non-finite flag, stop request
        stats = torch.tensor([0.0, len(losses), 0.0, float(bool(self._stop))], dtype=torch.float64,
                             device=loss.device)
        stats[0] = losses.detach().double().sum()
        stats[2] = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).double()
        if distributed.is_distributed():
            dist.all_reduce(stats)
        loss_sum, count, n_bad, n_stop = stats.tolist()
        step = p.step + 1
        if n_bad:
            if not cfg.skip_nonfinite:
                raise NonFiniteError(self._nonfinite_message(step) + " Or set finetune.skip_nonfinite=true "
                                     "to skip such steps.", step)
            self.optimizer.zero_grad(set_to_none=True)
            p.skipped_steps += 1
            if p.skipped_steps > cfg.max_skipped_steps:
                raise NonFiniteError(
                    self._nonfinite_message(step) + f" {p.skipped_steps} steps were skipped, more than "
                    f"finetune.max_skipped_steps={cfg.max_skipped_steps}.", step)
            if distributed.is_main():
                warnings.warn(f"skipped step {step}: non-finite loss or gradient "
                              f"({p.skipped_steps} skipped so far)", stacklevel=2)
        else:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            p.epoch_loss_sum += loss_sum
            p.epoch_loss_count += int(count)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step
        self.scheduler.step()
        p.step = step
        p.batch_in_epoch += 1
        if not n_bad:
            self._window_sum += loss_sum
            self._window_count += int(count)
        if p.step % cfg.log_every_steps == 0 or p.step == self.total_steps:
            self._log(lr, grad_norm)
        return n_stop > 0

    def _nonfinite_message(self, step: int) -> str:
        """Where a non-finite loss or gradient appeared and its likely cause (nothing is saved)."""
        p = self.progress
        good = self.run_dir / ckpt.LAST
        where = (f"non-finite loss or gradient at step {step} (epoch {p.epoch}, batch {p.batch_in_epoch}). "
                 f"Nothing was saved; the last good checkpoint is "
                 f"{good if good.exists() else 'none (no checkpoint yet)'}.")
        bad = first_nonfinite(self.model.state_dict())
        if bad is not None:
            return (f"{where} The weights themselves are non-finite ({bad}): the starting weights "
                    "(finetune.init) or the checkpoint resumed from are broken, not the learning rate.")
        if p.step == self._start_step:
            return (f"{where} The weights are finite and no update has been made in this process yet, so "
                    "finetune.lr is not the cause: check the starting weights (finetune.init), the data "
                    "and the model flags.")
        return f"{where} Lower finetune.lr (or set finetune.grad_clip)."

    def _accumulate_gradients(self, net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        """Gradient of this process's mean loss, in forward passes of ``micro_batch`` images (each
        image's draws come from its seed, so the split does not change them); returns the losses [B].
        Under DDP, gradients are averaged over processes once, on the last pass."""
        parts = []
        starts = range(0, len(x), self.micro_batch)
        for k, start in enumerate(starts):
            last = k == len(starts) - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                    losses = self.train_loss(net, x[start:start + self.micro_batch],
                                             seeds[start:start + self.micro_batch])
                losses = losses.float()
                (losses.sum() / len(x)).backward()
            parts.append(losses.detach())
        return torch.cat(parts)

    def _clip_grad_norm(self) -> Tensor:
        """Total gradient 2-norm (before clipping); clips to ``grad_clip`` when set."""
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        if self.cfg.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
