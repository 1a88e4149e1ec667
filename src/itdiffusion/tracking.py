"""Experiment tracking through Weights & Biases that can never stop a run.

- Offline by default (``logger.mode=offline``): the run is written under ``<logger.dir>/wandb/`` and
  needs no account or network; upload it later with ``wandb sync <logger.dir>/wandb/offline-run-*``.
- ``logger.mode=online`` logs live for users with an account. If wandb cannot be reached or is
  misconfigured (within ``logger.init_timeout`` seconds), the run falls back to offline with one
  warning, and the failure is remembered: later trackers of the same process, and processes writing
  to the same ``logger.dir`` within :data:`REMEMBER_S` (the other stages of a reproduction), go
  offline at once instead of waiting again. Delete ``<logger.dir>/wandb/.online_unavailable`` to retry.
- ``logger=none`` (``logger.backend=none``) or ``logger.mode=disabled`` disables tracking.
- wandb's own variables are honoured where the config gives no value of its own: ``logger.mode``,
  ``project``, ``entity`` and ``dir`` default to ``$WANDB_MODE``, ``$WANDB_PROJECT``, ``$WANDB_ENTITY``,
  ``$WANDB_DIR`` (else offline, itdiffusion, none, ``paths.output_dir``); an explicit override wins.
  ``$WANDB_TAGS`` (comma-separated) adds to ``logger.tags`` and to the stage's own tags.
- A run given an ``id_file`` keeps its wandb id there: a restart of the same run (a resumed fine-tune, a
  rerun of an evaluation) continues the same wandb run (``resume="allow"``) instead of adding one.
- Console output is captured (the run's ``output.log``) from the moment the run opens: stages open their
  run when they start, so it holds their whole console, and a run that ends with an exception is
  finished with a non-zero exit code (:func:`exit_code`) and keeps what was logged before.
- Only rank 0 logs; on other ranks every method is a no-op. Runs of one reproduction share
  ``logger.group``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
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
MODE_SYNONYMS = {"dryrun": "offline", "run": "online"}  # wandb's older names for the modes
MAX_TAG = 64  # wandb's limit on a tag's length


def env_tags() -> list[str]:
    """``$WANDB_TAGS`` as a list (comma-separated)."""
    return [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]


def run_tags(*values) -> list[str]:
    """Tags from stage values (experiment, model, paper row, objective), None and duplicates dropped."""
    out: list[str] = []
    for v in values:
        if v is None or v == "":
            continue
        tag = str(v)[:MAX_TAG]
        if tag not in out:
            out.append(tag)
    return out


def stored_run_id(id_file: Path | None) -> str | None:
    """The wandb id kept in ``id_file`` (None if there is none or it cannot be read)."""
    if id_file is None:
        return None
    try:
        return str(json.loads(Path(id_file).read_text())["wandb_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_run_id(id_file: Path, run_id: str) -> None:
    from itdiffusion.fsio import atomic_write_json

    try:
        Path(id_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(id_file, {"wandb_id": run_id})
    except OSError as e:
        log.warning("could not keep the wandb run id in %s (%s): a restart starts a new wandb run",
                    id_file, e)


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
        self,
        logger_cfg,
        run_cfg: Mapping | DictConfig | None,
        job_type: str,
        name: str | None = None,
        tags: Sequence[str] = (),
        id_file: str | Path | None = None,
    ):
        self.run = None
        self._wandb = None
        self.mode = MODE_SYNONYMS.get(str(logger_cfg.mode), str(logger_cfg.mode))
        if logger_cfg.backend == "none" or self.mode == "disabled" or not distributed.is_main():
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
        self.id_file = None if id_file is None else Path(id_file)
        self.tags = run_tags(*logger_cfg.tags, *env_tags(), *tags)
        self.run = self._init(logger_cfg, dict(config or {}), job_type, name)
        if self.run is not None and self.id_file is not None and stored_run_id(self.id_file) != self.run.id:
            _store_run_id(self.id_file, self.run.id)

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
            tags=self.tags,
            config=config,
            dir=str(wandb_dir),
            id=stored_run_id(self.id_file) or secrets.token_hex(4),
            resume="allow",
        )
        mode = self.mode
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
        return self._wandb.Settings(init_timeout=logger_cfg.init_timeout, console="wrap", silent=True,
                                    x_transaction_log_flush_interval=logger_cfg.flush_every_s)

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

    @property
    def offline(self) -> bool:
        return self.run is not None and bool(getattr(self.run, "offline", False))

    def config_update(self, values: Mapping[str, Any]) -> None:
        """Settings (not metrics): the run's config."""
        if self.run is not None:
            self._call("config", self.run.config.update, dict(values), allow_val_change=True)

    def log_line_plot(self, key: str, x: str, y: str, series: Mapping[str, tuple[Sequence, Sequence]],
                      title: str) -> None:
        """One line per series (name -> (xs, ys)): a long table ``key`` (columns x, series, y) and its line
        plot ``key + "_plot"``."""
        if self.run is None:
            return
        rows = [[float(a), name, float(b)]
                for name, (xs, ys) in series.items() for a, b in zip(xs, ys, strict=True)]

        def log_it():
            table = self._wandb.Table(columns=[x, "series", y], data=rows)
            plot = self._wandb.plot.line(table, x, y, stroke="series", title=title)
            self.run.log({key: table, f"{key}_plot": plot})

        self._call("log_line_plot", log_it)

    def log_histogram(self, key: str, values: Sequence[float]) -> None:
        if self.run is not None:
            self._call("log_histogram",
                       lambda: self.run.log({key: self._wandb.Histogram([float(v) for v in values])}))

    def log_scatter(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], x: str, y: str,
                    title: str) -> None:
        """A table ``key`` and the scatter plot of its columns ``x`` and ``y`` (``key + "_plot"``)."""
        if self.run is None:
            return

        def log_it():
            table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            self.run.log({key: table, f"{key}_plot": self._wandb.plot.scatter(table, x, y, title=title)})

        self._call("log_scatter", log_it)

    def log_artifact(self, name: str, kind: str, paths: Sequence[str | Path], metadata: Mapping | None = None,
                     aliases: Sequence[str] = ()) -> None:
        """Log files as the artifact ``name`` of type ``kind`` (a new version when their content changed)."""
        if self.run is None:
            return

        def log_it():
            artifact = self._wandb.Artifact(_artifact_name(name), type=kind, metadata=dict(metadata or {}))
            for p in paths:
                artifact.add_file(str(p))
            self.run.log_artifact(artifact, aliases=["latest", *aliases])

        self._call("log_artifact", log_it)

    def use_artifact(self, name: str, kind: str, alias: str = "latest") -> None:
        """Declare the artifact ``name:alias`` an input of this run (lineage). Online only (wandb cannot
        resolve artifacts offline): offline runs record it in their config as ``inputs`` instead, so the
        link survives ``wandb sync`` as metadata."""
        if self.run is None:
            return
        ref = f"{_artifact_name(name)}:{alias}"
        if not self.offline:
            try:
                self.run.use_artifact(ref, type=kind)
            except Exception as e:  # noqa: BLE001 - not logged yet, or unreachable: keep the link as metadata
                log.info("wandb use_artifact(%s) failed (%s); recording it as metadata", ref, e)
            else:
                return
        inputs = list(self.run.config.get("inputs", []) or [])
        self.config_update({"inputs": [*inputs, {"artifact": ref, "type": kind}]})

    def add_tags(self, tags: Sequence[str]) -> None:
        """Add tags (known only once the work is done, e.g. from the metrics) to the open run."""
        if self.run is not None:
            new = [t for t in run_tags(*tags) if t not in self.tags]
            if new:
                self.tags = [*self.tags, *new]
                self._call("tags", setattr, self.run, "tags", tuple(self.tags))

    def finish(self, exit_code: int | None = None) -> None:
        """Close the run; ``exit_code`` (non-zero) marks it failed."""
        if self.run is not None:
            self._call("finish", self.run.finish, exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code(exc))


def exit_code(exc: BaseException | None) -> int | None:
    """The exit status a stage ends with on ``exc`` (None: no exception): a user error 2, SIGTERM's
    pre-emption its own status, ``SystemExit`` its code, anything else 1."""
    from itdiffusion.errors import Preempted, UserError

    if exc is None:
        return None
    if isinstance(exc, UserError):
        return 2
    if isinstance(exc, Preempted):
        return Preempted.EXIT_STATUS
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 1


def _artifact_name(name: str) -> str:
    """wandb artifact names: letters, digits, dashes, underscores and dots."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)[:128]
