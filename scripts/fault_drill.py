#!/usr/bin/env python
"""Fault drill: SIGKILL fine-tuning N times, resume each time, and compare with an uninterrupted run.

    python scripts/fault_drill.py --cycles 5
    python scripts/fault_drill.py --cycles 3 --workdir /tmp/drill -- finetune.batch_size=8

Runs the smoke fine-tuning (``model=iddpm_tiny data=patches finetune=smoke``, IT loss, from random
weights, on CPU) once without interruption, then again under the same settings in a fresh run
directory while killing it with SIGKILL N times: cycles alternate between a kill at a random moment
of a training step and a kill while a checkpoint is being written (as soon as its temporary file
appears). After every kill the same command is started again and must report that it resumed.
Finally the exported weights and loss curves of both runs are compared bit for bit.

Prints ``resumed N/N, identical weights: yes`` and exits 0 only when every restart resumed and the
weights are identical; otherwise prints what differed and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE = "itdiffusion.stages.finetune"
RESUMED_MARK = "resumed from "  # logged by itdiffusion.training on resume
SAVE_EVERY = 2


def drill_overrides(work: Path, extra: list[str]) -> list[str]:
    return ["model=iddpm_tiny", "data=patches", "finetune=smoke", "finetune.init=scratch",
            f"finetune.save_every_steps={SAVE_EVERY}", "finetune.heldout_images=16", "logger=none",
            "device=cpu", "data.num_workers=0", f"paths.output_dir={work / 'outputs'}",
            f"paths.checkpoint_dir={work / 'checkpoints'}", *extra]


def sized_overrides(work: Path, extra: list[str], needed: int) -> tuple[list[str], int]:
    """Overrides that make the configured run last exactly ``needed`` steps, read from the config the
    drill runs (its batch size and training set): ``finetune.max_steps`` and enough ``finetune.epochs``."""
    sys.path.insert(0, str(ROOT / "src"))
    from hydra import compose, initialize_config_dir

    from itdiffusion.data import load_images
    from itdiffusion.stages import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=drill_overrides(work, extra))
    steps_per_epoch = len(load_images(cfg.data, "train")) // cfg.finetune.batch_size  # one process
    if steps_per_epoch < 1:
        sys.exit(f"fault drill: the training set has fewer images than finetune.batch_size="
                 f"{cfg.finetune.batch_size}")
    epochs = -(-needed // steps_per_epoch)
    return [f"finetune.epochs={epochs}", f"finetune.max_steps={needed}"], steps_per_epoch


def stage_command(work: Path, run_name: str, sizing: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", STAGE, *drill_overrides(work, extra), *sizing,
            f"finetune.run_name={run_name}", f"run_id={run_name}",
            f"hydra.run.dir={work / 'hydra' / run_name}"]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=f, stderr=subprocess.STDOUT)


def run_to_end(cmd: list[str], log: Path, timeout: float) -> str:
    proc = start(cmd, log)
    if proc.wait(timeout=timeout) != 0:
        sys.exit(f"fault drill: {' '.join(cmd)} failed with status {proc.returncode}; see {log}:\n"
                 + log.read_text()[-3000:])
    return log.read_text()


def checkpoint_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def saved_step(run_dir: Path) -> int | None:
    try:
        return int(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"])
    except (FileNotFoundError, RuntimeError, KeyError):
        return None


def wait_for_new_checkpoint(proc: subprocess.Popen, last: Path, before, deadline: float) -> bool:
    """Block until ``last`` is replaced by a newer file (the run made progress); False if it ended."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        now = checkpoint_identity(last)
        if now is not None and now != before:
            return True
        time.sleep(0.005)
    raise TimeoutError("no checkpoint written in time")


def kill_during_write(proc: subprocess.Popen, run_dir: Path, deadline: float) -> bool:
    """SIGKILL as soon as a checkpoint's temporary file exists; False if none appeared in time."""
    while time.monotonic() < deadline and proc.poll() is None:
        if any(run_dir.glob(".*.pt.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    return False


def load_weights(run_dir: Path) -> tuple[dict, list]:
    return (torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True),
            json.loads((run_dir / "loss_curve.json").read_text()))


def compare(a: Path, b: Path) -> list[str]:
    (wa, ca), (wb, cb) = load_weights(a), load_weights(b)
    diffs = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    if ca != cb:
        diffs.append("loss_curve.json")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5, help="number of SIGKILLs (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per process")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the fine-tuning stage")
    args = parser.parse_args()
    if args.cycles < 1:
        parser.error("--cycles must be >= 1")
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="itd-fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    # a cycle advances by at most 3 checkpoint intervals: leave work for every cycle and the last restart
    steps = 3 * SAVE_EVERY * args.cycles + 2 * SAVE_EVERY
    sizing, steps_per_epoch = sized_overrides(work, args.overrides, steps)

    print(f"fault drill in {work}: {args.cycles} SIGKILL cycles, {steps} steps ({steps_per_epoch} per "
          f"epoch: {' '.join(sizing)})", flush=True)
    t0 = time.monotonic()
    run_to_end(stage_command(work, "reference", sizing, args.overrides), work / "logs" / "reference.log",
               args.timeout)
    reference_steps = saved_step(work / "checkpoints" / "finetune" / "reference")
    if reference_steps != steps:
        sys.exit(f"fault drill: the reference run stopped at step {reference_steps}, not {steps}")
    print(f"uninterrupted reference run done ({time.monotonic() - t0:.1f} s)", flush=True)

    run_dir = work / "checkpoints" / "finetune" / "drill"
    cmd = stage_command(work, "drill", sizing, args.overrides)
    resumed = 0
    for cycle in range(1, args.cycles + 1):
        log = work / "logs" / f"cycle{cycle}.log"
        before = checkpoint_identity(run_dir / "last.pt")
        proc = start(cmd, log)
        deadline = time.monotonic() + args.timeout
        if not wait_for_new_checkpoint(proc, run_dir / "last.pt", before, deadline):
            print(f"cycle {cycle}: the run finished before it could be killed; use fewer cycles or more "
                  f"steps (log: {log})", flush=True)
            break
        during_write = cycle % 2 == 0 and kill_during_write(proc, run_dir, deadline)
        if not during_write:
            # time one checkpoint interval, then kill at a random moment of the next one
            t1, mark = time.monotonic(), checkpoint_identity(run_dir / "last.pt")
            if not wait_for_new_checkpoint(proc, run_dir / "last.pt", mark, deadline):
                print(f"cycle {cycle}: the run finished before it could be killed; use fewer cycles "
                      f"(log: {log})", flush=True)
                break
            time.sleep(rng.uniform(0.0, time.monotonic() - t1))
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = log.read_text()
        if cycle > 1 and RESUMED_MARK in text:
            resumed += 1
        elif cycle > 1:
            print(f"cycle {cycle}: the restart did not resume (log: {log})", flush=True)
        where = "while writing a checkpoint" if during_write else "mid-training"
        print(f"cycle {cycle}: SIGKILL {where}; newest checkpoint at step {saved_step(run_dir)}", flush=True)

    final_log = work / "logs" / "final.log"
    text = run_to_end(cmd, final_log, args.timeout)
    if RESUMED_MARK in text:
        resumed += 1
    else:
        print(f"final restart did not resume (log: {final_log})", flush=True)
    diffs = compare(work / "checkpoints" / "finetune" / "reference", run_dir)
    identical = not diffs
    print(f"resumed {resumed}/{args.cycles}, identical weights: {'yes' if identical else 'no'}", flush=True)
    if diffs:
        print(f"differences: {', '.join(diffs[:10])}", flush=True)
    return 0 if identical and resumed == args.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
