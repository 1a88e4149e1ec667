"""Ensembles from their members' stored curves: no network evaluation.

Every test image draws its log-SNR points and noise from its own seed, so each member's own evaluate run
already holds the curves the ensemble needs (:class:`~itdiffusion.information.Curves` in ``per_image.npz``).
:func:`curves_from_member_runs` stacks them after checking that they are exactly what this run would
evaluate; the ensemble's estimate then comes from :func:`itdiffusion.information.estimate` like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from itdiffusion import artifacts
from itdiffusion.artifacts import ArtifactError, PerImage
from itdiffusion.data import to_model_range
from itdiffusion.errors import UserError
from itdiffusion.information import Curves, GaussianReference, LogSNRProposal, image_draws
from itdiffusion.seeding import Stream, stream_seed

CURVE_SETTINGS = ("seed", "npoints", "logsnr_sampling", "clip", "rounding", "pilot_images")
REEVALUATE = "or drop ensemble_curves to evaluate the ensemble's networks here"


def curves_from_member_runs(
    runs: Sequence[str], members: Sequence, test, reference: GaussianReference, est_cfg, check_images: int = 4
) -> tuple[PerImage, list[str]]:
    """The ensemble's :class:`PerImage` (curves of every member, no estimates) from its members' runs.

    ``runs[j]``: member j's evaluate run dir (or its ``per_image.npz``). Each must be a complete evaluation
    (:func:`artifacts.read_evaluation`) of member j's checkpoint (sha256) with this run's
    :data:`CURVE_SETTINGS`, of the test images of ``test``, with the same log-SNR proposal and points in
    every run (evaluate the later members with ``estimator.logsnr_proposal_from=<first member's run>``); on
    ``check_images`` images spread over the set, the points (from the image seeds and the stored proposal)
    and the reference's errors at those images are recomputed here (another seed, reference or dataset
    fails). Anything else is a :class:`UserError`. Returns it and the ``per_image.npz`` paths.
    """
    if len(runs) != len(members):
        raise UserError(
            f"ensemble_curves has {len(runs)} runs for {len(members)} ensemble checkpoints: "
            "give one evaluate run per checkpoint, in the order of ensemble="
        )
    stored, pilots, sources = [], [], []
    for run, member in zip(runs, members, strict=True):
        npz = _checked_run(run, member, est_cfg)
        sources.append(str(npz))
        curves, pilot = _member_curves(npz, len(test), est_cfg)
        stored.append(curves)
        pilots.append(pilot)
    for npz, curves in zip(sources[1:], stored[1:], strict=True):
        if curves.proposal != stored[0].proposal:
            raise _refuse(
                npz,
                f"its log-SNR proposal differs from that of {sources[0]} (the pilot chose "
                f"another range: evaluate it with estimator.logsnr_proposal_from="
                f"{Path(sources[0]).parent})",
            )
        if not torch.equal(curves.logsnr, stored[0].logsnr):
            raise _refuse(npz, f"its log-SNR points differ from those of {sources[0]}")
    _check_draws(sources[0], stored[0], test, reference, est_cfg, check_images)
    curves = Curves.stack(stored)
    pilot = None
    if all(p is not None for p in pilots):  # the decoder choice's held-out draws (same seeds in every run)
        try:
            pilot = Curves.stack(pilots)
        except ValueError as e:
            raise _refuse(sources[-1], f"its pilot curves do not match those of {sources[0]} ({e})") from e
    evals = torch.zeros(len(members), len(test), dtype=torch.float64)
    return PerImage(
        index=torch.arange(len(test)),
        groups=[f"m{j}" for j in range(len(members))],
        member_values={"network_evals": evals},
        curves=curves,
        pilot_curves=pilot,
    ), sources


def proposal_of_run(run: str) -> LogSNRProposal:
    """The log-SNR proposal a complete evaluate run sampled its curves from
    (``estimator.logsnr_proposal_from``)."""
    path = Path(run)
    try:
        _, npz = artifacts.read_evaluation(path.parent if path.suffix == ".npz" else path)
        curves = artifacts.read_per_image(npz).curves
    except ArtifactError as e:
        raise UserError(f"estimator.logsnr_proposal_from={run}: {e}") from e
    if curves is None:
        raise UserError(
            f"estimator.logsnr_proposal_from={run}: that run has no IT curves (estimator.it=false)"
        )
    return curves.proposal


def _refuse(npz, what: str) -> UserError:
    return UserError(
        f"ensemble_curves: {npz} cannot be the ensemble's curves: {what}. Evaluate the member "
        f"with this run's settings, {REEVALUATE}"
    )


def _checked_run(run: str, member, est_cfg) -> Path:
    """The ``per_image.npz`` of one member's complete evaluate run, after checking (its ``metrics.json``)
    that it evaluated ``member``'s checkpoint with this run's :data:`CURVE_SETTINGS`."""
    path = Path(run)
    run_dir = path.parent if path.suffix == ".npz" else path
    try:
        metrics, npz = artifacts.read_evaluation(run_dir)
    except ArtifactError as e:
        raise UserError(
            f"ensemble_curves: {e}. Evaluate {member.checkpoint} first (stage evaluate "
            f"model.checkpoint={member.checkpoint} with this run's data and estimator settings), "
            f"{REEVALUATE}"
        ) from e
    if metrics.get("checkpoint_sha256") != member.sha256:
        raise UserError(
            f"ensemble_curves: {npz} evaluated {metrics.get('checkpoint')} (sha256 "
            f"{metrics.get('checkpoint_sha256')}), not the ensemble member {member.checkpoint} "
            f"(sha256 {member.sha256}): give the members' runs in the order of ensemble=, "
            f"{REEVALUATE}"
        )
    recorded = metrics.get("config", {}).get("estimator", {})
    differ = [
        f"estimator.{k}={recorded.get(k)} there, {getattr(est_cfg, k)} here"
        for k in CURVE_SETTINGS
        if recorded.get(k) != getattr(est_cfg, k)
    ]
    if differ:
        raise UserError(
            f"ensemble_curves: {npz} was evaluated with other settings ({'; '.join(differ)}): "
            f"evaluate the member with this run's settings, {REEVALUATE}"
        )
    return npz


def _member_curves(npz: Path, num_images: int, est_cfg) -> tuple[Curves, Curves | None]:
    try:
        per_image = artifacts.read_per_image(npz)
    except ArtifactError as e:
        raise _refuse(npz, str(e)) from e
    if per_image.curves is None or per_image.curves.num_models != 1:
        raise _refuse(npz, "it holds no single model's curves (this run needs estimator.it=true)")
    curves = per_image.curves
    if est_cfg.control_variate and curves.gaussian_errors is None:
        raise _refuse(npz, "it has no gaussian_errors (this run needs estimator.control_variate=true)")
    pilot = per_image.pilot_curves
    if not est_cfg.control_variate:  # this run does without the control variate
        curves = dataclasses.replace(curves, gaussian_errors=None, gaussian_errors_dequantized=None)
        if pilot is not None:
            pilot = dataclasses.replace(pilot, gaussian_errors=None, gaussian_errors_dequantized=None)
    if not np.array_equal(per_image.index.numpy(), np.arange(num_images)):
        raise _refuse(
            npz,
            f"it holds test images {_span(per_image.index.numpy())}, this run evaluates "
            f"{_span(np.arange(num_images))} (data.num_images={num_images})",
        )
    return curves, pilot


def _check_draws(
    npz: str,
    curves: Curves,
    test,
    reference: GaussianReference,
    est_cfg,
    check_images: int,
) -> None:
    """The stored points and Gaussian errors of a few images equal this run's (float32 storage; the first
    block of a dataset budget's topped-up draw)."""
    rows = np.unique(np.linspace(0, len(test) - 1, min(check_images, len(test))).round().astype(int))
    x = to_model_range(torch.stack([test[int(i)][0] for i in rows])).to(reference.mean.device, torch.float64)
    points = torch.stack(
        [
            image_draws(
                stream_seed(est_cfg.seed, int(i), Stream.POINTS),
                curves.proposal,
                est_cfg.npoints,
                est_cfg.logsnr_sampling,
                x.shape[1:],
            )[0]
            for i in rows
        ]
    )
    expected = {"logsnr": points, "gaussian_mmse": reference.pointwise_mmse(x, points).cpu()}
    first = curves.first_points(est_cfg.npoints)
    for key, values in expected.items():
        if not np.allclose(getattr(first, key)[rows].numpy(), values.numpy(), rtol=1e-5, atol=0):
            raise _refuse(
                npz,
                f"its {key} at test images {rows.tolist()} differ from this run's (another "
                "Gaussian reference, log-SNR proposal or dataset?)",
            )


def _span(indices) -> str:
    indices = np.asarray(indices)
    return f"{indices.min()}..{indices.max()} ({indices.size} images)" if indices.size else "no images"
