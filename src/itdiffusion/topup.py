"""The dataset budget's check after the main run: the realized stderr of every reported estimate against its
target, and how many more blocks of points per image meet it (bits/dim).

A budgeted run draws each image's log-SNR points (and sampled VLB timesteps) in *blocks*: block r is the
stratified draw of the chosen K points from the image's seed stream with coordinate r
(:func:`itdiffusion.seeding.stream_seeds` ``(..., Stream.POINTS, r)``; block 0 is the per-image protocol's
draw). Blocks are independent, so R blocks have ``1/R`` of one block's Monte Carlo variance, and adding
blocks R..R'-1 to a run of R blocks gives exactly the curves of a run drawn with R' blocks at once (the
estimate is formed from the concatenated curves: :meth:`itdiffusion.information.Curves.cat_points`).

With ``s`` the dataset mean's realized total stderr and ``m`` its Monte Carlo part (metrics.json's
``<name>_bpd_stderr`` and ``<name>_bpd_mc_stderr``), ``R'`` blocks give about ``s^2 - m^2 + m^2 R / R'``:
:func:`blocks_needed` solves that for the target (with :data:`SAFETY` to spare). When the spread between
images alone exceeds the target, no number of points reaches it: the run stops adding at the full-cost
protocol's points and says so (:func:`check`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TOP_UPS = 3  # rounds of top-up after the main run before the run reports a missed target
SAFETY = 1.25  # blocks are planned for a variance this much below the target's
TOLERANCE = 1.0  # a realized stderr up to this times the target meets it


@dataclass
class Check:
    """One estimate's realized stderr against its target (bits/dim)."""

    name: str
    target: float
    realized: float
    mc: float
    predicted: float | None

    @property
    def met(self) -> bool:
        return self.realized <= TOLERANCE * self.target

    def to_dict(self) -> dict:
        return {"target": self.target, "realized": self.realized, "realized_mc": self.mc,
                "predicted": self.predicted, "met": self.met}


def check(metrics: Mapping, budget: Mapping) -> dict[str, Check]:
    """Every estimate with a target in ``budget`` (the plan: ``target_stderr_bpd_by_estimate``) whose
    realized stderr is in ``metrics`` (summarize's numbers; ensemble members' VLB as ``m<j>_vlb``)."""
    out = {}
    for name, target in budget.get("target_stderr_bpd_by_estimate", {}).items():
        found = _lookup(metrics, name)
        if found is not None:
            out[name] = Check(name, target, found[0], found[1], budget["predicted_stderr_bpd"].get(name))
    return out


def _lookup(metrics: Mapping, name: str) -> tuple[float, float] | None:
    source, key = metrics, name
    if name.startswith("m") and "_" in name and name[1:name.index("_")].isdigit():  # an ensemble member's
        j, key = int(name[1:name.index("_")]), name[name.index("_") + 1:]
        source = metrics["members"][j]
    stderr, mc = source.get(f"{key}_bpd_stderr"), source.get(f"{key}_bpd_mc_stderr")
    return None if stderr is None or mc is None else (float(stderr), float(mc))


def blocks_needed(found: Check, blocks: int, max_blocks: int) -> int:
    """The blocks per image at which ``found`` should meet its target (at most ``max_blocks``; more than
    ``blocks`` when it misses it now)."""
    if found.met or blocks >= max_blocks:
        return blocks
    between = max(found.realized**2 - found.mc**2, 0.0)
    room = found.target**2 / SAFETY - between
    if room <= 0:
        return max_blocks
    return max(blocks + 1, min(max_blocks, math.ceil(blocks * found.mc**2 / room)))
