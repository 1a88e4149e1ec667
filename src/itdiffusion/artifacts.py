"""What stages write for each other: names, units and format versions, with typed read and write helpers.

- ``per_image.npz`` (evaluate): per test image, every estimate (nats; the VLB in bits/dim) and the error
  curves behind the IT estimates (:class:`~itdiffusion.information.Curves`, eps units), so that an ensemble
  or a report can re-form estimates without a network. :class:`PerImage`.
- ``metrics.json`` (evaluate): dataset means in bits/dim with their standard errors, settings, provenance.
- ``loss_curve.json`` (finetune): the loss against optimizer steps.
- ``export.json`` (finetune, beside its exported weights): what produced them (the training objective's
  label, the objective, the starting weights, the steps) and the sha256 of each weights file it describes;
  an evaluation of those weights takes its training objective from here (:func:`checkpoint_provenance`).

An evaluate run dir is committed as a unit (:func:`commit_evaluation`): ``metrics.json`` is removed
first, ``per_image.npz`` written, and ``metrics.json`` written last carrying the sha256 of
``per_image.npz``. A reader
(:func:`read_evaluation`, :func:`is_complete`) accepts only a run whose two files agree, so a crash between
the writes can never pass half-old, half-new results on. Files of another format version are refused with
an error naming both versions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itdiffusion.errors import UserError
from itdiffusion.fsio import atomic_savez, atomic_write_json
from itdiffusion.information import Curves, LogSNRProposal
from itdiffusion.models.weights import file_sha256

PER_IMAGE = "per_image.npz"
METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.json"
EXPORT_PROVENANCE = "export.json"

PER_IMAGE_FORMAT, PER_IMAGE_VERSION = "itdiffusion.per_image", 2  # version 1: flat m{j}_* keys, no version
METRICS_FORMAT, METRICS_VERSION = "itdiffusion.metrics", 2  # version 1: no format key
LOSS_CURVE_FORMAT, LOSS_CURVE_VERSION = "itdiffusion.loss_curve", 1  # version 0: a bare list of points
EXPORT_FORMAT, EXPORT_VERSION = "itdiffusion.export", 1

# The estimates an evaluation reports, as metrics.json keys (bits/dim, each with _stderr and, for Monte
# Carlo estimates, _mc_stderr twins) and per_image.npz names (``<name>_nats`` / ``<name>_bpd`` per image).
IT_ESTIMATES = (
    "it_continuous",
    "it_continuous_itd_range",
    "it_discrete",
    "it_discrete_notails",
    "it_dequantized",
)
VLB_ESTIMATES = ("vlb", "vlb_continuous")
REPORTED_BPD = tuple(f"{name}_bpd" for name in VLB_ESTIMATES + IT_ESTIMATES)
MASKED_ESTIMATES = (
    "mdce_bpd",
    "mdce_timefree_bpd",
    "mdce_bottom_given_top_bpd",
    "mdce_corrupted_log_ratio_nats",
)

ENSEMBLE = "ensemble"  # the group name of an ensemble's estimates (members are "m0", "m1", ...)


class ArtifactError(UserError):
    """A stage's output that is missing, unreadable, incomplete or of another format version."""


@dataclass
class PerImage:
    """The per-image content of an evaluation (``per_image.npz``), float64 CPU tensors.

    - ``index`` ``[B]``: test-set indices of the images.
    - ``groups``: names of the rows of ``estimates``: one per model (``m0``, ``m1``, ...) and, for an
      ensemble, ``ensemble`` last.
    - ``estimates``: per-image values ``[G, B]`` by name: IT estimates in nats (``it_continuous_nats``,
      ``it_continuous_mc_stderr_nats``, ...; :data:`IT_ESTIMATES`), masked models' I-MDCE values.
    - ``member_values``: per-model values ``[M, B]``: ``vlb_bpd``, ``vlb_continuous_bpd`` (bits/dim),
      ``network_evals``.
    - ``curves``: the IT error curves of the M models (None without IT estimates); ``reference_mmse``
      ``[B, K]``: the Gaussian reference's ``mmse_G(a)`` at every point (for figures).
    - ``pilot_curves``: the curves the decoder choice is fitted on (the pilot images' held-out draws,
      :func:`itdiffusion.stages.budget_pilot.choice_curves`), or None (then the choice is cross-fitted).
    - ``continuous_integrand`` ``[G, B, K]``: per group, the per-point values the continuous estimate
      averaged (:attr:`itdiffusion.information.ITEstimate.continuous_integrand`; for figures).
    - ``pixel_maps``: for the first few images, each pixel's share of the continuous estimate
      (:class:`itdiffusion.pixel_maps.PixelMaps` fields: ``index`` ``[P]``, ``images`` ``[P, *shape]``,
      ``nats``/``stderr``/``band`` ``[M, P, d]``, ``total_nats`` ``[M, P]``), or None.
    """

    index: Tensor
    groups: list[str] = field(default_factory=lambda: ["m0"])
    estimates: dict[str, Tensor] = field(default_factory=dict)
    member_values: dict[str, Tensor] = field(default_factory=dict)
    curves: Curves | None = None
    reference_mmse: Tensor | None = None
    pixel_maps: dict[str, Tensor] | None = None
    pilot_curves: Curves | None = None
    choices: dict = field(default_factory=dict)  # the decoder choice per group (metrics.json holds it)
    continuous_integrand: Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.index.numel())

    def group(self, name: str) -> dict[str, Tensor]:
        """The estimates of one group (``m0``, ..., ``ensemble``) as ``{name: [B]}``."""
        row = self.groups.index(name)
        return {k: v[row] for k, v in self.estimates.items()}

    @staticmethod
    def cat(parts: list[PerImage]) -> PerImage:
        """The images of several parts (same groups and settings), in order."""
        first = parts[0]

        def cat(name: str, dim: int) -> dict[str, Tensor]:
            return {k: torch.cat([getattr(p, name)[k] for p in parts], dim) for k in getattr(first, name)}

        return PerImage(
            index=torch.cat([p.index for p in parts]),
            groups=list(first.groups),
            estimates=cat("estimates", 1),
            member_values=cat("member_values", 1),
            curves=None if first.curves is None else Curves.cat([p.curves for p in parts]),
            reference_mmse=None
            if first.reference_mmse is None
            else torch.cat([p.reference_mmse for p in parts]),
        )


# ------------------------------------------------------------------------------------------------------
# per_image.npz
# ------------------------------------------------------------------------------------------------------


def write_per_image(path: str | os.PathLike, per_image: PerImage, *, exact: bool = False) -> Path:
    """Write ``per_image`` atomically (curves as float32, or with ``exact`` as float64 like every per-image
    value: the partial files of a resumable evaluation, whose estimates must not change on resume)."""
    arrays: dict[str, np.ndarray] = {"index": per_image.index.numpy().astype(np.int64)}
    meta: dict = {"format": PER_IMAGE_FORMAT, "version": PER_IMAGE_VERSION, "groups": per_image.groups}
    arrays.update({f"estimate__{k}": v.numpy() for k, v in per_image.estimates.items()})
    arrays.update({f"member__{k}": v.numpy() for k, v in per_image.member_values.items()})
    for name, c in (("curves", per_image.curves), ("pilot_curves", per_image.pilot_curves)):
        if c is None:
            continue
        meta[name] = {
            "proposal": dataclasses.asdict(c.proposal),
            "sampling": c.sampling,
            "delta": c.delta,
            "network_evals": c.network_evals,
        }
        # [B, K] and [M, B, K] curves in float32, [B] constants and the (small) pilot curves in float64
        short = name == "curves" and not exact
        for k, v in c.tensors().items():
            arrays[f"{name}__{k}"] = v.numpy().astype(np.float32) if short and v.dim() >= 2 else v.numpy()
    if per_image.reference_mmse is not None:
        arrays["reference_mmse"] = per_image.reference_mmse.numpy().astype(np.float32)
    if per_image.continuous_integrand is not None:
        integrand = per_image.continuous_integrand.numpy()
        arrays["continuous_integrand"] = integrand if exact else integrand.astype(np.float32)
    for k, v in (per_image.pixel_maps or {}).items():
        arrays[f"pixel__{k}"] = v.numpy()
    arrays["meta"] = np.array(json.dumps(meta))
    return atomic_savez(path, **arrays)


def read_per_image(path: str | os.PathLike) -> PerImage:
    """The :class:`PerImage` of a ``per_image.npz`` (float64); :class:`ArtifactError` if it is missing,
    unreadable or of another format version."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} not found") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(
            f"{path} cannot be read ({type(e).__name__}: {e}); rerun the stage that wrote it"
        ) from e
    meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {"version": 1}
    _check_version(
        path, meta.get("format", PER_IMAGE_FORMAT), meta.get("version"), PER_IMAGE_FORMAT, PER_IMAGE_VERSION
    )

    def section(prefix: str) -> dict[str, Tensor]:
        return {
            k.removeprefix(prefix): torch.from_numpy(v).to(torch.float64)
            for k, v in arrays.items()
            if k.startswith(prefix)
        }

    def curves_of(name: str) -> Curves | None:
        if name not in meta:
            return None
        return Curves(
            proposal=LogSNRProposal(**meta[name]["proposal"]),
            sampling=meta[name]["sampling"],
            delta=meta[name]["delta"],
            network_evals=meta[name]["network_evals"],
            **section(f"{name}__"),
        )
    reference_mmse = arrays.get("reference_mmse")
    integrand = arrays.get("continuous_integrand")
    return PerImage(
        index=torch.from_numpy(arrays["index"]).long(),
        groups=list(meta["groups"]),
        estimates=section("estimate__"),
        member_values=section("member__"),
        curves=curves_of("curves"),
        reference_mmse=None if reference_mmse is None else torch.from_numpy(reference_mmse).double(),
        pixel_maps=section("pixel__") or None,
        pilot_curves=curves_of("pilot_curves"),
        continuous_integrand=None if integrand is None else torch.from_numpy(integrand).double(),
    )


# ------------------------------------------------------------------------------------------------------
# metrics.json and the evaluate run dir as a unit
# ------------------------------------------------------------------------------------------------------


def commit_evaluation(run_dir: str | os.PathLike, per_image: PerImage, metrics: dict) -> dict:
    """Write an evaluate run dir as a unit: drop the old ``metrics.json``, write ``per_image.npz``, then
    ``metrics.json`` (with the format version and ``per_image_sha256``). Returns the metrics written."""
    run_dir = Path(run_dir)
    (run_dir / METRICS).unlink(missing_ok=True)  # from here until the end the run dir reads as incomplete
    for name in (PER_IMAGE, METRICS):  # temporary files of a commit that was killed (io.atomic_write's names)
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    write_per_image(run_dir / PER_IMAGE, per_image)
    metrics = {
        "format": METRICS_FORMAT,
        "format_version": METRICS_VERSION,
        **metrics,
        "per_image_sha256": file_sha256(run_dir / PER_IMAGE),
    }
    atomic_write_json(run_dir / METRICS, metrics)
    return metrics


def read_metrics(path: str | os.PathLike) -> dict:
    """A ``metrics.json`` of the current format; :class:`ArtifactError` otherwise."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} not found") from e
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read ({e}); rerun the stage that wrote it") from e
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path} does not hold a metrics object; rerun the stage that wrote it")
    _check_version(
        path,
        metrics.get("format", METRICS_FORMAT),
        metrics.get("format_version", 1),
        METRICS_FORMAT,
        METRICS_VERSION,
    )
    return metrics


def read_evaluation(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """The metrics of a complete evaluate run and the path of its ``per_image.npz`` (checked to be the one
    its ``metrics.json`` was written with); :class:`ArtifactError` for anything else."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / METRICS)
    npz = run_dir / PER_IMAGE
    if not npz.is_file() or file_sha256(npz) != metrics.get("per_image_sha256"):
        raise ArtifactError(
            f"{run_dir} is an incomplete evaluation ({PER_IMAGE} is missing or is not the one "
            f"{METRICS} was written with): rerun the evaluation"
        )
    return metrics, npz


def is_complete(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a complete evaluation (see :func:`read_evaluation`)."""
    try:
        read_evaluation(run_dir)
    except ArtifactError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------
# loss_curve.json
# ------------------------------------------------------------------------------------------------------


def write_loss_curve(path: str | os.PathLike, points: list[dict], objective: str | None = None) -> Path:
    """Points ``{step, epoch, train_loss_<unit>, heldout_loss_<unit>, ...}`` (``<unit>``: ``bpd`` and
    ``nats`` for the IT loss, the objective's name otherwise); ``objective``: the training objective
    (``it``, ``iddpm``, ``any_order``: what the bits/dim are bits of)."""
    data = {"format": LOSS_CURVE_FORMAT, "version": LOSS_CURVE_VERSION, "points": points}
    if objective is not None:
        data["objective"] = objective
    return atomic_write_json(path, data)


def loss_curve_objective(path: str | os.PathLike) -> str | None:
    """The training objective a ``loss_curve.json`` records (None: not recorded, or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data.get("objective") if isinstance(data, dict) else None


def read_loss_curve(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read ({e})") from e
    if isinstance(data, list):
        _check_version(path, LOSS_CURVE_FORMAT, 0, LOSS_CURVE_FORMAT, LOSS_CURVE_VERSION)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a loss curve")
    _check_version(path, data.get("format"), data.get("version"), LOSS_CURVE_FORMAT, LOSS_CURVE_VERSION)
    return list(data["points"])


# ------------------------------------------------------------------------------------------------------
# export.json: the provenance of a fine-tuning run's exported weights
# ------------------------------------------------------------------------------------------------------


def write_export_provenance(folder: str | os.PathLike, weights: list[Path], **fields) -> Path:
    """``<folder>/export.json``: ``fields`` (``training_objective``: the label the tables show, ``objective``,
    ``init``, ``steps``, ...) for the weights files ``weights`` (each recorded with its sha256)."""
    data = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "weights": {Path(w).name: file_sha256(w) for w in weights}, **fields}
    return atomic_write_json(Path(folder) / EXPORT_PROVENANCE, data)


def checkpoint_provenance(checkpoint: str | os.PathLike, sha256: str | None) -> dict | None:
    """The ``export.json`` beside ``checkpoint`` when it describes these very weights (it records
    ``sha256`` for that file name), else None (official weights, another run's file, unreadable)."""
    path = Path(checkpoint).parent / EXPORT_PROVENANCE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        return None
    if data.get("version") != EXPORT_VERSION:
        return None
    if sha256 is None or (data.get("weights") or {}).get(Path(checkpoint).name) != sha256:
        return None
    return data


# ------------------------------------------------------------------------------------------------------


def _check_version(path: Path, fmt, version, want_format: str, want_version: int) -> None:
    if fmt != want_format or version != want_version:
        raise ArtifactError(
            f"{path} is {fmt} format version {version}; this itdiffusion reads {want_format} "
            f"version {want_version}: rerun the stage that wrote it"
        )


__all__ = [
    "ENSEMBLE",
    "EXPORT_PROVENANCE",
    "IT_ESTIMATES",
    "LOSS_CURVE",
    "MASKED_ESTIMATES",
    "METRICS",
    "PER_IMAGE",
    "REPORTED_BPD",
    "VLB_ESTIMATES",
    "ArtifactError",
    "PerImage",
    "checkpoint_provenance",
    "commit_evaluation",
    "file_sha256",
    "is_complete",
    "loss_curve_objective",
    "read_evaluation",
    "read_loss_curve",
    "read_metrics",
    "read_per_image",
    "write_export_provenance",
    "write_loss_curve",
    "write_per_image",
]
