"""Stopping a stage on a signal, then handing the job back to SLURM or submitit to continue it.

Signals that ask a running stage to stop: SIGTERM (SLURM's pre-emption, ``scontrol requeue``, ``scancel``,
and the requeue that scripts/slurm.sbatch makes before its time limit) and, under submitit
(``hydra/launcher=slurm``), submitit's own signal (USR2, or ``SUBMITIT_PREEMPT_SIGNAL``), which SLURM sends
``signal_delay_s`` before the time limit. The stage finishes the step or chunk in progress, saves it
(``last.pt``, evaluation chunks) and raises :class:`~itdiffusion.errors.Preempted`; :func:`exit_preempted`
then ends the process:

- outside submitit: exit status 143; rerunning the same command resumes;
- under submitit, after its signal: submitit's handler checkpoints the launcher's callable, requeues the job
  (``scontrol requeue``) and exits;
- under submitit, after SIGTERM: SLURM itself requeues the job (pre-emption, ``scontrol requeue``) or
  cancels it (``scancel``).

Under submitit the process never ends with a result (no ``result.pkl``): the sweep keeps waiting for the
requeued job, which resumes from what was saved, instead of reading a failed job at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from itdiffusion.errors import Preempted

SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's variable for its signal (default USR2)


class StopRequest:
    """Whether (and by which signal) the stage was asked to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"


_LAST = StopRequest()  # the request of the stage that raised Preempted (read by exit_preempted)
_SUBMITIT_HANDLER: list[Any] = [None]  # submitit's handler of its signal, while a stage holds it


def under_submitit() -> bool:
    """Whether this process runs a job submitted by submitit (which sets ``SUBMITIT_FOLDER``)."""
    return bool(os.environ.get("SUBMITIT_FOLDER"))


def submitit_signal() -> signal.Signals:
    """The signal submitit handles as "checkpoint and requeue" (``SIGUSR2`` unless configured)."""
    name = "SIG" + os.environ.get(SUBMITIT_SIGNAL_ENV, "USR2")
    return signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGUSR2


@contextlib.contextmanager
def stop_requested() -> Iterator[StopRequest]:
    """A :class:`StopRequest` that turns true when SIGTERM (or, under submitit, its signal) arrives.

    Handlers are installed only in the main thread (elsewhere the request never turns true) and the
    previous ones are restored on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, _frame: Any) -> None:
        request.signum = signum
        _LAST.signum = signum

    signums = [signal.SIGTERM] + ([submitit_signal()] if under_submitit() else [])
    previous = {s: signal.signal(s, handler) for s in signums}
    if under_submitit():
        _SUBMITIT_HANDLER[0] = previous[submitit_signal()]
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_preempted() -> None:
    """End the process of a stage that raised :class:`Preempted` (see the module docstring); never returns."""
    handler = _SUBMITIT_HANDLER[0]
    if under_submitit() and _LAST.signum == submitit_signal() and callable(handler):
        handler(_LAST.signum, None)  # rank 0: checkpoint, scontrol requeue, sys.exit; other ranks return
    # SystemExit is no Exception: neither Hydra's job wrapper nor submitit records it as the job's result
    raise SystemExit(Preempted.EXIT_STATUS)
