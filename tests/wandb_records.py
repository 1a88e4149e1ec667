"""Read an offline wandb run back from its ``run-<id>.wandb`` file (tests only).

The file is wandb's record log (the LevelDB log format with wandb's own header): a 7-byte file header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32c,
length, type: 1 full, 2 first, 3 middle, 4 last); a chunk never crosses a block boundary (a block tail
shorter than a header is zero padding). Each reassembled record is a ``wandb_internal_pb2.Record``.
wandb >= 0.20 no longer ships a Python reader (``wandb.sdk.internal.datastore``), hence this one.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a wandb run file"
    out, pos, parts = [], HEADER, []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # padding up to the block end
            pos += room
            continue
        if pos + HEADER + length > len(data):  # a record still being written (or cut by a kill): the end
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
            parts = []
    return out


@dataclass
class OfflineRun:
    """What an offline run holds: its id, name, tags, job type, config, logged rows, summary, artifacts."""

    path: Path
    id: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    job_type: str = ""
    group: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)

    @property
    def files(self) -> Path:
        return self.path.parent / "files"

    def logged_keys(self) -> set[str]:
        """Logged keys; a media object (table, histogram, plot) as its own key with its ``_type``."""
        return {k.removesuffix("/_type") if k.endswith("/_type") else k
                for row in self.history for k in row if not _media_field(k, row)}

    def media_type(self, key: str) -> str | None:
        return next((row[f"{key}/_type"] for row in self.history if f"{key}/_type" in row), None)

    def media(self, key: str) -> dict:
        """The JSON a ``wandb.Table`` logged under ``key`` was written to."""
        for row in self.history:
            if f"{key}/path" in row:
                return json.loads((self.files / row[f"{key}/path"]).read_text())
        raise KeyError(key)


def _media_field(key: str, row: dict) -> bool:
    """A field of a media object (``<key>/path``, ``<key>/sha256``, ...) other than its ``_type``."""
    head, _, tail = key.rpartition("/")
    return bool(head) and tail != "_type" and f"{head}/_type" in row


def read_run(path: str | Path, wait_s: float = 20) -> OfflineRun:
    """An :class:`OfflineRun` from a ``run-<id>.wandb`` file or its ``offline-run-*`` folder (waiting up to
    ``wait_s`` for the run's exit record: 0 for a killed run, which has none)."""
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = OfflineRun(path)
    found = records(path)
    deadline = time.time() + wait_s  # wandb's service may still be writing the end of the file
    while not any(r.WhichOneof("record_type") == "exit" for r in found) and time.time() < deadline:
        time.sleep(0.2)
        found = records(path)
    for rec in found:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.tags, run.job_type = r.run_id, r.display_name, list(r.tags), r.job_type
            run.group, run.project = r.run_group, r.project
            for item in r.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            run.artifacts.append(rec.artifact)
    return run


def offline_runs(wandb_parent: str | Path, wait_s: float = 20) -> list[OfflineRun]:
    """Every offline run under ``<wandb_parent>/wandb/``, oldest first."""
    return [read_run(p, wait_s) for p in sorted(Path(wandb_parent, "wandb").glob("offline-run-*"))]
