"""Experiment tracking through Weights & Biases that can never stop a run.

- Offline by default (``logger.mode=offline``): the run is written under ``<logger.dir>/wandb/`` and
  needs no account or network; upload it later with ``wandb sync <logger.dir>/wandb/offline-run-*``.
- ``logger.mode=online`` logs live for users with an account. If wandb cannot be reached or is
  misconfigured (within ``logger.init_timeout`` seconds), the run falls back to offline with one
  warning, and the failure is remembered: later trackers of the same process, and processes writing
  to the same ``logger.dir`` within :data:`REMEMBER_S` (the other stages of a reproduction), go
  offline at once instead of waiting again. Delete ``<logger.dir>/wandb/.online_unavailable`` to retry.
- ``logger=none`` (``logger.backend=none``) disables tracking.
- Only rank 0 logs; on other ranks every method is a no-op. Runs of one reproduction share
  ``logger.group``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from itdiffusion import distributed

log = logging.getLogger(__name__)

REMEMBER_S = 6 * 3600.0  # how long a failed online start sends later processes straight to offline
ONLINE_UNAVAILABLE = ".online_unavailable"  # in <logger.dir>/wandb/: why online failed, and when
_online_failure: str | None = None  # this process's failed online start, if any


def _known_online_failure(wandb_dir: Path) -> str | None:
    """Why online wandb failed earlier in this process, or (within REMEMBER_S) in another one."""
    if _online_failure is not None:
        return _online_failure
    mark = wandb_dir / "wandb" / ONLINE_UNAVAILABLE
    try:
        if time.time() - mark.stat().st_mtime < REMEMBER_S:
            return mark.read_text().strip() or "an earlier failure"
    except OSError:
        pass
    return None


def _remember_online_failure(wandb_dir: Path, reason: str) -> None:
    global _online_failure
    _online_failure = reason
    try:
        (wandb_dir / "wandb").mkdir(parents=True, exist_ok=True)
        (wandb_dir / "wandb" / ONLINE_UNAVAILABLE).write_text(reason + "\n")
    except OSError:
        pass


class Tracker:
    """A wandb run (or nothing): ``log``, ``log_table``, ``log_image``, ``summary``, ``finish``.

    Every call swallows wandb's exceptions: after the first failure a warning is logged and
    tracking is switched off for the rest of the run.
    """

    def __init__(
        self, logger_cfg, run_cfg: Mapping | DictConfig | None, job_type: str, name: str | None = None
    ):
        self.run = None
        self._wandb = None
        if logger_cfg.backend == "none" or not distributed.is_main():
            return
        if logger_cfg.backend != "wandb":
            log.warning("logger.backend=%r is unknown (wandb | none); tracking is off", logger_cfg.backend)
            return
        try:
            import wandb
        except ImportError as e:
            log.warning("wandb is not importable (%s); tracking is off", e)
            return
        self._wandb = wandb
        config = OmegaConf.to_container(run_cfg, resolve=True) if isinstance(run_cfg, DictConfig) else run_cfg
        self.run = self._init(logger_cfg, dict(config or {}), job_type, name)

    @property
    def active(self) -> bool:
        return self.run is not None

    def _init(self, logger_cfg, config: dict, job_type: str, name: str | None):
        wandb_dir = Path(logger_cfg.dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            job_type=job_type,
            name=name,
            tags=list(logger_cfg.tags),
            config=config,
            dir=str(wandb_dir),
        )
        mode = logger_cfg.mode
        known = _known_online_failure(wandb_dir) if mode == "online" else None
        if known is not None:
            log.warning("wandb online failed earlier (%s); continuing offline without retrying (delete %s "
                        "to retry). Upload later with `wandb sync %s/wandb/offline-run-*`.",
                        known, wandb_dir / "wandb" / ONLINE_UNAVAILABLE, wandb_dir)
            mode = None  # straight to the offline start below
        try:
            if mode is not None:
                return self._wandb.init(mode=mode, settings=self._settings(logger_cfg), **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; none may stop the run
            if mode != "online":
                log.warning(
                    "wandb.init failed in mode %r (%s: %s); tracking is off for this run",
                    mode,
                    type(e).__name__,
                    e,
                )
                return None
            _remember_online_failure(wandb_dir, f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {type(e).__name__}: "
                                                f"{str(e)[:200]}")
            log.warning(
                "wandb could not start online (%s: %s); continuing offline. Upload later with "
                "`wandb sync %s/wandb/offline-run-*`.",
                type(e).__name__,
                e,
                wandb_dir,
            )
        try:
            return self._wandb.init(mode="offline", settings=self._settings(logger_cfg), **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb.init failed offline too (%s: %s); tracking is off", type(e).__name__, e)
            return None

    def _settings(self, logger_cfg):
        return self._wandb.Settings(init_timeout=logger_cfg.init_timeout, console="off", silent=True)

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning(
                "wandb %s failed (%s: %s); tracking is off for the rest of this run",
                what,
                type(e).__name__,
                e,
            )
            self.run = None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self._call("log", self.run.log, dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self._call("summary", self.run.summary.update, dict(values))

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.run is not None:
            self._call(
                "log_table",
                lambda: self.run.log(
                    {key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
                ),
            )

    def log_image(self, key: str, path: str | Path, caption: str | None = None) -> None:
        if self.run is not None:
            self._call(
                "log_image", lambda: self.run.log({key: self._wandb.Image(str(path), caption=caption)})
            )

    def finish(self) -> None:
        if self.run is not None:
            self._call("finish", self.run.finish)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
