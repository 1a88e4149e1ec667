"""The wandb tracker: offline by default, off for logger=none and non-zero ranks, never fatal."""

from __future__ import annotations

import logging
import time

import pytest
import wandb

from itdiffusion import distributed, tracking
from itdiffusion.tracking import Tracker


@pytest.fixture(autouse=True)
def _forget_online_failures(monkeypatch):
    """Each test starts as a fresh process: no remembered online failure."""
    monkeypatch.setattr(tracking, "_online_failure", None)


@pytest.fixture
def logger_cfg(make_cfg, tmp_path):
    def make(*overrides):
        return make_cfg("logger=wandb", f"logger.dir={tmp_path / 'wb'}", *overrides).logger

    return make


def offline_runs(tmp_path):
    return sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_offline_run_is_written_locally(logger_cfg, tmp_path):
    with Tracker(logger_cfg("logger.group=g1"), {"a": 1}, job_type="test", name="t") as tracker:
        assert tracker.active and tracker.run.group == "g1"
        tracker.log({"x": 1.0}, step=0)
        tracker.log_table("table", ["a", "b"], [[1, "x"], [2, "y"]])
        tracker.summary({"final": 2.0})
    runs = offline_runs(tmp_path)
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_none_backend_and_other_ranks_do_nothing(logger_cfg, make_cfg, monkeypatch, tmp_path):
    tracker = Tracker(make_cfg("logger=none").logger, {}, job_type="test")
    assert not tracker.active
    tracker.log({"x": 1})
    tracker.finish()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert not Tracker(logger_cfg(), {}, job_type="test").active
    assert not offline_runs(tmp_path)


def test_online_failure_falls_back_to_offline_with_one_warning(logger_cfg, monkeypatch, tmp_path, caplog):
    real_init = wandb.init
    modes = []

    def init(*args, mode=None, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("network unreachable")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING, logger="itdiffusion.tracking"):
        with Tracker(logger_cfg("logger.mode=online"), {}, job_type="test") as tracker:
            assert tracker.active
            tracker.log({"x": 1.0})
    assert modes == ["online", "offline"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "continuing offline" in warnings[0].getMessage()
    assert len(offline_runs(tmp_path)) == 1


def test_a_failing_log_call_switches_tracking_off(logger_cfg, caplog):
    tracker = Tracker(logger_cfg(), {}, job_type="test")
    run = tracker.run

    def broken(*args, **kwargs):
        raise OSError("disk full")

    tracker.run.log = broken
    with caplog.at_level(logging.WARNING, logger="itdiffusion.tracking"):
        tracker.log({"x": 1})
        tracker.log({"x": 2})  # no second warning: tracking is already off
    assert not tracker.active
    assert len([r for r in caplog.records if "disk full" in r.getMessage()]) == 1
    run.finish()


def test_online_failure_is_remembered_by_this_and_later_processes(logger_cfg, monkeypatch, tmp_path):
    real_init = wandb.init
    modes = []

    def init(*args, mode=None, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("stale API key")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(tracking, "_online_failure", None)
    for _ in range(2):
        with Tracker(logger_cfg("logger.mode=online"), {}, job_type="test") as tracker:
            assert tracker.active
    assert modes == ["online", "offline", "offline"]  # the second tracker did not wait for online again
    mark = tmp_path / "wb" / "wandb" / tracking.ONLINE_UNAVAILABLE
    assert "stale API key" in mark.read_text()

    monkeypatch.setattr(tracking, "_online_failure", None)  # a later stage: a new process, the same dir
    with Tracker(logger_cfg("logger.mode=online"), {}, job_type="test"):
        pass
    assert modes[3:] == ["offline"]
    mark.unlink()  # deleting the mark (or REMEMBER_S later) retries online
    monkeypatch.setattr(tracking, "_online_failure", None)
    with Tracker(logger_cfg("logger.mode=online"), {}, job_type="test"):
        pass
    assert modes[4:] == ["online", "offline"]


def test_console_output_is_captured_and_a_kept_id_resumes_the_run(logger_cfg, tmp_path):
    id_file = tmp_path / "run" / "wandb_run.json"
    with Tracker(logger_cfg(), {}, job_type="test", id_file=id_file) as tracker:
        print("a line on the console")
        first = tracker.run.id
    with Tracker(logger_cfg(), {}, job_type="test", id_file=id_file) as tracker:
        assert tracker.run.id == first  # the restart continues the same wandb run
    runs = offline_runs(tmp_path)
    assert len(runs) == 2 and all(f"-{first}" in r.name for r in runs)
    log_file = runs[0] / "files" / "output.log"
    for _ in range(100):  # wandb's service writes it after finish returns
        if log_file.exists() and "a line on the console" in log_file.read_text():
            break
        time.sleep(0.1)
    assert "a line on the console" in log_file.read_text()


def test_disabled_mode_makes_no_run(logger_cfg, tmp_path):
    assert not Tracker(logger_cfg("logger.mode=disabled"), {}, job_type="test").active
    assert not offline_runs(tmp_path)
