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

from itdiffusion.training.errors import FinetuneError, NonFiniteError, Preempted, validate_config
from itdiffusion.training.loop import LossFn, Trainer
from itdiffusion.training.saving import FinetuneResult

__all__ = [
    "FinetuneError", "FinetuneResult", "LossFn", "NonFiniteError", "Preempted", "Trainer", "validate_config",
]
