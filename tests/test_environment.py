"""A hostile environment (full disk, read-only folder, a file where a folder belongs) gives one line and exit
status 2, before the work where that can be checked; the results files change all together or not at all.

Read-only folders and full disks are real mounts (a read-only bind mount, a 1 MiB tmpfs: root only, skipped
elsewhere); write failures in the middle of a commit are injected."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import TINY, path_overrides, run_cli
from itdiffusion import fsio
from itdiffusion.errors import UserError
from itdiffusion.results import record_run, results_paths
from itdiffusion.stages.output_dirs import check_writable_dir


@contextlib.contextmanager
def mounted(folder: Path, kind: str):
    """``folder`` as a read-only bind mount (``kind="ro"``) or a full 1 MiB tmpfs (``kind="full"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        commands = [["mount", "--bind", str(folder), str(folder)],
                    ["mount", "-o", "remount,ro,bind", str(folder)]]
    else:
        commands = [["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]]
    done = 0
    try:
        for command in commands:
            if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
                pytest.skip("needs root and mount (a read-only bind mount, a tmpfs)")
            done += 1
        if kind == "full":
            with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
                f.write(b"\0" * 2**21)  # ENOSPC: the disk is full
        yield folder
    finally:
        if done:
            subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_or_full_folder_is_refused_in_process(tmp_path):
    with mounted(tmp_path / "ro", "ro") as ro:
        with pytest.raises(UserError, match=r"/ro/results cannot be created: .*/ro is not writable"):
            check_writable_dir(ro / "results", "paths.results_dir")
    with mounted(tmp_path / "full", "full") as full:
        with pytest.raises(UserError, match=r"paths.results_dir: .*/full: only 0.0 MiB free on its disk"):
            check_writable_dir(full, "paths.results_dir")


def _assert_one_line(proc, *texts):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(t in lines[0] for t in texts), lines
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("kind", "key", "texts"), [
    ("ro", "paths.output_dir", ["paths.output_dir (the run dir): ", "is not writable"]),
    ("full", "paths.output_dir", ["paths.output_dir (the run dir): ", "MiB free on its disk"]),
    ("ro", "paths.results_dir", ["paths.results_dir: ", "is not writable"]),
    ("full", "paths.results_dir", ["paths.results_dir: ", "MiB free on its disk"]),
    ("file", "paths.output_dir", ["paths.output_dir (the run dir): ", "is not a directory"]),
])
def test_an_unwritable_output_or_results_folder_fails_at_launch(tmp_path, kind, key, texts):
    folder = tmp_path / "target"
    overrides = [*path_overrides(tmp_path), "logger=none", "run_id=r", f"{key}={folder}"]
    if kind == "file":
        folder.write_text("a file")
        proc = run_cli("report", *overrides, cwd=tmp_path, timeout=120)
        _assert_one_line(proc, *texts)
        assert folder.read_text() == "a file"
        return
    with mounted(folder, kind):
        before = sorted(p.name for p in folder.iterdir())
        proc = run_cli("report", *overrides, cwd=tmp_path, timeout=120)
        _assert_one_line(proc, *texts)
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing created
    assert not (tmp_path / "outputs" / "report").exists()


@pytest.mark.parametrize(("kind", "text"), [("ro", "Read-only file system"),
                                            ("full", "No space left on device")])
def test_a_cache_that_cannot_be_written_after_the_launch_is_one_line(tmp_path, tiny_checkpoints, kind, text):
    """evaluate checks no cache at launch (a read-only cache holding the reference is fine): the write of the
    reference it had to compute fails, and that is one line too, with no run dir left."""
    with mounted(tmp_path / "cache", kind) as cache:
        proc = run_cli("evaluate", *TINY, *path_overrides(tmp_path), f"paths.cache_dir={cache}", "run_id=r",
                       "model=iddpm_tiny", f"model.checkpoint={tiny_checkpoints[0]}", cwd=tmp_path,
                       timeout=300)
        _assert_one_line(proc, text, str(cache), "then rerun")
    assert not (tmp_path / "outputs" / "evaluate" / "r").exists()


def test_results_files_are_replaced_all_together_or_not_at_all(tmp_path, monkeypatch):
    record_run(tmp_path, {"run_id": "a", "label": "a", "vlb_bpd": 3.0})
    paths = results_paths(tmp_path)
    before = {k: paths[k].read_bytes() for k in ("json", "csv", "md")}
    real_mkstemp, calls = tempfile.mkstemp, []

    def mkstemp_then_full(*args, **kwargs):  # the disk fills up while the second temporary file is made
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(fsio.tempfile, "mkstemp", mkstemp_then_full)
    with pytest.raises(OSError, match="No space left"):
        record_run(tmp_path, {"run_id": "b", "label": "b", "vlb_bpd": 3.1})
    assert {k: paths[k].read_bytes() for k in ("json", "csv", "md")} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    def replace_fails_late(src, dst):  # a rename cannot fail for lack of space; any other failure: none moved
        raise OSError(errno.EIO, "Input/output error", dst)

    monkeypatch.setattr(fsio.tempfile, "mkstemp", real_mkstemp)
    monkeypatch.setattr(fsio.os, "replace", replace_fails_late)
    with pytest.raises(OSError):
        record_run(tmp_path, {"run_id": "b", "label": "b", "vlb_bpd": 3.1})
    assert {k: paths[k].read_bytes() for k in ("json", "csv", "md")} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    record_run(tmp_path, {"run_id": "b", "label": "b", "vlb_bpd": 3.1})
    assert "| b |" in paths["md"].read_text() and "\nb," in paths["csv"].read_text()
