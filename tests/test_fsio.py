"""Atomic writes: all-or-nothing replacement, no leftovers on failure, normal permissions, locking."""

import errno
import json
import multiprocessing as mp
import os
import stat

import pytest

from itdiffusion.fsio import atomic_write, atomic_write_json, file_lock


def test_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "results.md"
    target.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_permissions_follow_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def _append_under_lock(path, lock, n):
    for i in range(n):
        with file_lock(lock):
            rows = json.loads(path.read_text()) if path.exists() else []
            rows.append(i)
            atomic_write_json(path, rows)


def test_file_lock_serialises_read_modify_write(tmp_path):
    path, lock = tmp_path / "rows.json", tmp_path / "rows.lock"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_under_lock, args=(path, lock, 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(json.loads(path.read_text())) == 75


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_file_lock_falls_back_with_one_warning_where_flock_is_unsupported(tmp_path, monkeypatch, recwarn):
    import itdiffusion.fsio as io_module

    monkeypatch.setattr(io_module.fcntl, "flock", _no_flock)
    monkeypatch.setattr(io_module, "_warned_no_flock", False)
    path, lock = tmp_path / "rows.json", tmp_path / "rows.lock"
    _append_under_lock(path, lock, 3)
    assert sum("flock is not supported" in str(w.message) for w in recwarn) == 1
    ctx = mp.get_context("fork")  # the fallback still serialises processes
    procs = [ctx.Process(target=_append_under_lock, args=(path, lock, 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(json.loads(path.read_text())) == 3 + 45
    assert not (tmp_path / "rows.lock.soft").exists()  # released


def test_other_lock_errors_are_not_hidden(tmp_path, monkeypatch):
    import itdiffusion.fsio as io_module

    def broken(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(io_module.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"), file_lock(tmp_path / "x.lock"):
        pass
