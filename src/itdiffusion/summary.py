"""An evaluation's summary: the dataset means of ``metrics.json`` from its ``per_image.npz``, and their check.

:func:`summarize` is the one function that turns per-image values into the numbers of the results tables
(means in bits/dim with standard errors over images, Monte Carlo standard errors, image count, log-SNR
points and network evaluations; per member and for the ensemble; the reference's closed-form NLL of the
images). The evaluate stages write its output into ``metrics.json``; the report recomputes it from
``per_image.npz`` (whose sha256 ``metrics.json`` carries) and refuses a run whose numbers differ
(:func:`summary_problems`, :func:`verified_evaluation`), so a table never shows a number that its per-image
file does not give.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from itdiffusion import artifacts
from itdiffusion.artifacts import ENSEMBLE, IT_ESTIMATES, MASKED_ESTIMATES, ArtifactError, PerImage
from itdiffusion.units import mean_and_stderr, nats_to_bpd

# Recomputed and stored values agree to rounding (a GPU's and a CPU's float64 sums may differ in the last
# bits); an edited number differs by far more.
RELATIVE_TOLERANCE = 1e-9
# The metrics.json keys derived from per_image.npz: these names and everything starting with an estimate's
# name (``it_continuous_bpd``, ``..._stderr``, ``..._mc_stderr``, ``vlb_bpd``, ``mdce_bpd``, ...).
COUNTS = ("num_images", "npoints", "network_evals")
ESTIMATE_PREFIXES = tuple(f"{n}_" for n in IT_ESTIMATES) + ("vlb_", "mdce_", "gaussian_nll_")


def summarize(per_image: PerImage, dim: int) -> dict:
    """metrics.json's numbers from ``per_image``: dataset means in bits/dim with their standard errors
    (over images, which includes each image's Monte Carlo noise) and Monte Carlo standard errors; for an
    ensemble, a ``members`` list with each member's numbers and the ensemble's numbers at the top level.
    ``dim``: values per image (bits/dim = nats / (dim ln 2))."""
    out: dict = {
        "num_images": per_image.num_images,
        "npoints": None if per_image.curves is None else per_image.curves.num_points,  # all blocks drawn
    }
    if per_image.curves is not None and per_image.curves.gaussian_nll is not None:  # closed form, per image
        gaussian = nats_to_bpd(per_image.curves.gaussian_nll, dim)
        out["gaussian_nll_bpd"], out["gaussian_nll_bpd_stderr"] = mean_and_stderr(gaussian)
    members = [g for g in per_image.groups if g != ENSEMBLE]
    per_member = [_group(per_image, f"m{j}", j, dim) for j in range(len(members))]
    if len(members) == 1:
        return {**out, **per_member[0]}
    ensemble = _group(per_image, ENSEMBLE, None, dim)
    return {**out, "members": per_member, **ensemble,
            "network_evals": sum(m["network_evals"] for m in per_member)}


def _group(per_image: PerImage, group: str, member: int | None, dim: int) -> dict:
    out: dict = {}
    if group in per_image.groups and per_image.estimates:
        values = per_image.group(group)
        for name in (n for n in IT_ESTIMATES if f"{n}_nats" in values):
            bpd = nats_to_bpd(values[f"{name}_nats"], dim)
            out[f"{name}_bpd"], out[f"{name}_bpd_stderr"] = mean_and_stderr(bpd)
            mc = nats_to_bpd(values[f"{name}_mc_stderr_nats"], dim)
            out[f"{name}_bpd_mc_stderr"] = float(mc.square().sum().sqrt() / mc.numel())  # MC noise alone
        for key in (k for k in MASKED_ESTIMATES if k in values):  # masked models: already in their units
            out[key], out[f"{key}_stderr"] = mean_and_stderr(values[key])
    if member is not None:
        for key, rows in per_image.member_values.items():
            if key == "network_evals":
                out[key] = int(rows[member].sum().item())
            elif key.endswith("_mc_stderr"):  # the Monte Carlo noise of the mean alone
                out[key] = float(rows[member].square().sum().sqrt() / rows[member].numel())
            else:
                out[key], out[f"{key}_stderr"] = mean_and_stderr(rows[member])
    return out


def summary_problems(metrics: dict, per_image: PerImage) -> list[str]:
    """``key: stored vs recomputed`` for each number of ``metrics`` that :func:`summarize` of ``per_image``
    does not give (edited, added or removed); empty when they all agree."""
    dim = metrics.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        return [f"dim: {dim!r} is not a positive whole number"]
    expected = summarize(per_image, dim)
    problems = _compare(metrics, expected, "")
    stored_members, expected_members = metrics.get("members") or [], expected.get("members") or []
    if len(stored_members) != len(expected_members):
        problems.append(f"members: {len(stored_members)} stored, {len(expected_members)} recomputed")
    else:
        for j, (stored, want) in enumerate(zip(stored_members, expected_members, strict=True)):
            problems += _compare(stored if isinstance(stored, dict) else {}, want, f"members[{j}].")
    return problems


def _compare(stored: dict, expected: dict, where: str) -> list[str]:
    keys = {k for k in stored if _is_summary_key(k) and stored[k] is not None}
    keys |= {k for k in expected if k != "members"}
    problems = []
    for key in sorted(keys):
        if not _same(stored.get(key), expected.get(key)):
            problems.append(f"{where}{key}: {stored.get(key)!r} stored, {expected.get(key)!r} recomputed")
    return problems


def _is_summary_key(key: str) -> bool:
    return key in COUNTS or key.startswith(ESTIMATE_PREFIXES)


def _same(stored, expected) -> bool:
    """Equal numbers (NaN and None alike: metrics.json stores a non-finite value as null)."""
    if expected is None or (isinstance(expected, float) and not math.isfinite(expected)):
        return stored is None or (isinstance(stored, float) and not math.isfinite(stored))
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return False
    return math.isclose(stored, expected, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)


def verified_evaluation(run_dir: str | os.PathLike) -> tuple[dict, PerImage]:
    """The metrics and per-image values of a complete evaluate run whose every number :func:`summarize`
    gives again from its ``per_image.npz``; :class:`~itdiffusion.artifacts.ArtifactError` otherwise."""
    metrics, npz = artifacts.read_evaluation(run_dir)
    per_image = artifacts.read_per_image(npz)
    problems = summary_problems(metrics, per_image)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ArtifactError(
            f"{Path(run_dir) / artifacts.METRICS} does not match its {artifacts.PER_IMAGE} ({shown}): "
            "rerun the evaluation"
        )
    return metrics, per_image
