"""The fine-tuning loop: DistributedDataParallel, exact resume, EMA, non-finite guards, pre-emption.

The loop is model-agnostic. It trains ``model`` on a per-image loss

    loss_fn(model, x, seeds) -> Tensor[B]

where ``x`` is a batch scaled to [-1, 1] and ``seeds`` (int64 [B]) gives each image its own random
stream (log-SNR, noise, timestep). Seeds are a hash of (``finetune.seed``, stream, epoch, dataset
index), so the randomness of an image never depends on which process or batch position it lands
in: ``finetune.batch_size`` is the global batch, N processes each take batch_size / N images of the
same global batches (in passes of ``finetune.micro_batch_size``, gradients accumulated) with the same
noise as one process, and a resumed run draws exactly what an uninterrupted one would. Horizontal flips
are drawn from the same hash. The only global RNG the loop leaves to torch is dropout's, one stream
per process, which every checkpoint records.

Resuming. Every checkpoint (:mod:`itdiffusion.training_state`) holds the model, optimizer, LR
schedule, EMA, every process's RNG states, the epoch, the number of batches of that epoch already
consumed, the step counter, skip counter, the partial epoch loss and the loss curve. The data
order of an epoch is a pure function of (seed, epoch) (``DistributedSampler``), so restarting the
same command continues mid-epoch with the same batches, bit for bit on CPU.

Faults. SIGTERM (SLURM pre-emption) or, under submitit, its signal (:mod:`itdiffusion.preemption`) makes
every process finish its current step, save, and raise :class:`Preempted`. A non-finite loss or
gradient norm raises :class:`NonFiniteError` naming the step, before anything is written, so the last
good checkpoint stays the newest; with ``skip_nonfinite`` the step is skipped instead (no update) and
counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from itdiffusion import distributed, errors, preemption
from itdiffusion import training_state as ckpt
from itdiffusion.artifacts import LOSS_CURVE, write_loss_curve
from itdiffusion.config import FinetuneConfig, value_problems
from itdiffusion.data import to_model_range
from itdiffusion.errors import UserError
from itdiffusion.loss_display import LossDisplay
from itdiffusion.models.weights import first_nonfinite
from itdiffusion.seeding import Stream, stream_seed, stream_seed_tensor
from itdiffusion.trajectory import RESUME_INVARIANT, differences
from itdiffusion.units import ABSURD_BPD, nats_to_bpd

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``loss_fn(model, x [B,C,H,W] in [-1, 1], seeds int64 [B]) -> per-image loss [B]``."""




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


# ----------------------------------------------------------------------------------------------
# Per-image randomness (itdiffusion.seeding: one hash for evaluation and training)
# ----------------------------------------------------------------------------------------------
def random_hflip(x: Tensor, seed: int, epoch: int, indices: Tensor) -> Tensor:
    """Flip each image left-right with probability 1/2, decided by its own seed."""
    flip = (stream_seed_tensor(seed, indices, Stream.TRAIN_FLIP, epoch) & 1).bool().to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class IndexedImages(Dataset):
    """``(uint8 image [C,H,W], index)`` pairs from a dataset of images (or of ``(image, ...)`` tuples)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.images[index]
        image = item[0] if isinstance(item, tuple | list) else item
        image = torch.as_tensor(image)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise FinetuneError(
                f"training image {index} is {image.dtype} of shape {tuple(image.shape)}; "
                "expected uint8 [channels, height, width]"
            )
        return image, index


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch) that can start partway into an epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        super().__init__(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                         shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Iterate epoch ``epoch`` of this process's order, leaving out its first ``skip`` indices."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _ignore_sigterm(_worker_id: int) -> None:
    # Data workers leave SIGTERM to the main process, which saves and then shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------
def validate_config(cfg: FinetuneConfig) -> None:
    """Reject settings that cannot train, with the key to change (the allowed values of every
    ``finetune.*`` key are :data:`itdiffusion.config.VALUE_RULES`)."""
    problems = value_problems(cfg, section="finetune")
    if problems:
        raise FinetuneError("invalid fine-tuning config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
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


class Trainer:
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
                                 worker_init_fn=_ignore_sigterm if num_workers else None,
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

    # ------------------------------------------------------------------ public
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

    # ------------------------------------------------------------------ setup and resume
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

    def _wrap(self) -> nn.Module:
        if not distributed.is_distributed():
            return self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    # ------------------------------------------------------------------ training
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
        """One update (or skip) on a batch; returns whether any process asked to stop (SIGTERM)."""
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

    # ------------------------------------------------------------------ epochs, held-out loss, saving
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
