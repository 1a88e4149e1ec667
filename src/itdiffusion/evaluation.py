"""The evaluation library behind :mod:`itdiffusion.stages.evaluate`: the log-SNR proposal, the network
work per chunk of images (:func:`sample`), the estimates (:func:`with_estimates`), the pixel maps, and
metrics.json's numbers (:func:`summarize`).

Per test image (nats inside, bits/dim in the outputs): IDDPM's variational bound with its discretized
decoder (``vlb``) and with the Gaussian density of x_0 (``vlb_continuous``),
:func:`itdiffusion.variational.vlb_per_image`; and the IT bounds, continuous, discrete (with and without the
tails) and dequantized, from the error curves of :func:`itdiffusion.information.sample_curves` turned into
estimates by :func:`itdiffusion.information.estimate`: the same two calls the exact-likelihood tests run.

Every image draws its log-SNR points, noise and dequantization noise from its own seeds
(:mod:`itdiffusion.seeding`), so the curves do not depend on batching or on the number of processes. The
decoder choices inside the estimate (clamp, rounding, ensemble member) are made per log-SNR bin on held-out
draws of the first test images (the pilot curves, stored in ``per_image.npz``; the same rule under both
``estimator.budget`` protocols, :mod:`itdiffusion.budget`), and the control variate's coefficients are
cross-fitted over the other images, so rank 0 forms every estimate from the gathered curves: one process and
many give the same per-image numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from itdiffusion import summary
from itdiffusion.artifacts import ENSEMBLE, PerImage
from itdiffusion.budget import estimate_with_choice, fit_decoder_choice
from itdiffusion.data import to_model_range
from itdiffusion.ensemble import REEVALUATE, proposal_of_run
from itdiffusion.errors import UserError
from itdiffusion.information import (
    Curves,
    GaussianReference,
    ITEstimate,
    LogSNRProposal,
    estimate,
    pixel_curve_options,
    proposal_for,
    sample_curves,
)
from itdiffusion.information.pilot import PILOT_IMAGES
from itdiffusion.members import Member, check_ensemble, member_configs
from itdiffusion.models.families import family_of
from itdiffusion.pixel_maps import pixel_maps
from itdiffusion.seeding import Stream, stream_seeds
from itdiffusion.units import PIXEL_BIN, XINTERVAL, nats_to_bpd
from itdiffusion.variational import VLB_ALL_STEPS, vlb_per_image, vlb_sampled

log = logging.getLogger(__name__)


def choose_proposal(cfg: DictConfig, members: Sequence[Member], test, reference: GaussianReference):
    """The log-SNR proposal of this run: the one stored in ``estimator.logsnr_proposal_from`` (an evaluate
    run whose curves an ensemble will combine with this run's), else the reference's extended by the pilot
    of :func:`itdiffusion.information.proposal_for` on the first test images (the range covers every
    log-SNR where the models beat the Gaussian decoder; the upper end reaches the log-SNR that resolves the
    pixel lattice)."""
    est = cfg.estimator
    if est.logsnr_proposal_from:
        return proposal_of_run(est.logsnr_proposal_from)
    if not est.it:
        return LogSNRProposal.from_reference(reference, clip=est.clip, delta=PIXEL_BIN)
    idx = range(min(PILOT_IMAGES, len(test)))
    x = to_model_range(torch.stack([test[i][0] for i in idx])).to(reference.mean.device)
    return proposal_for(
        reference,
        [m.denoiser for m in members],
        x,
        clip=est.clip,
        delta=PIXEL_BIN,
        xinterval=XINTERVAL,
        batch_size=est.batch_size,
    )


@torch.no_grad()
def sample(
    members: Sequence[Member],
    images: torch.Tensor,
    indices: Sequence[int],
    reference: GaussianReference,
    proposal: LogSNRProposal,
    est,
    device: torch.device,
    it_blocks: range = range(1),
    vlb_blocks: range = range(1),
) -> PerImage:
    """The network work on uint8 ``images`` with test indices ``indices``: every member's IT error curves
    (shared points and noise) and VLBs, and the network evaluations per image; no estimate yet.

    ``it_blocks`` / ``vlb_blocks``: which blocks of ``estimator.npoints`` points / ``vlb_steps`` sampled
    steps each image draws (block r from its seed stream with coordinate r; block 0 is the per-image
    protocol's draw): the dataset budget's top-up draws blocks beyond the first (:mod:`itdiffusion.topup`).
    The curves of several blocks are concatenated; the sampled VLB is their mean."""
    x = to_model_range(images).to(device)
    out = PerImage(
        index=torch.as_tensor(list(indices), dtype=torch.long), groups=[f"m{j}" for j in range(len(members))]
    )
    evals = torch.zeros(len(members), len(indices), dtype=torch.float64)
    if est.it and len(it_blocks):
        first = stream_seeds(est.seed, indices, Stream.POINTS)
        out.curves = Curves.cat_points([
            sample_curves(
                [m.denoiser for m in members],
                x,
                reference,
                npoints=est.npoints,
                proposal=proposal,
                seeds=stream_seeds(est.seed, indices, Stream.POINTS, r),
                uniform_seeds=None if r == 0 else first,  # one dequantized image for every block
                **pixel_curve_options(est),
            )
            for r in it_blocks
        ])
        evals += out.curves.network_evals
    if est.vlb and str(est.vlb_steps) != VLB_ALL_STEPS and len(vlb_blocks):  # sampled steps, an MC stderr
        results = [
            [
                vlb_sampled(m.network, m.diffusion, x, stream_seeds(est.seed, indices, Stream.VLB, r),
                            int(est.vlb_steps), batch_size=est.batch_size)
                for r in vlb_blocks
            ]
            for m in members
        ]
        n = len(vlb_blocks)  # the blocks' mean, and its Monte Carlo stderr
        for key, continuous in (("vlb_bpd", False), ("vlb_continuous_bpd", True)):
            out.member_values[key] = torch.stack([sum(r.total(continuous) for r in rs) / n for rs in results])
            out.member_values[key + "_mc_stderr"] = torch.stack(
                [sum(r.mc_stderr_bpd.square() for r in rs).sqrt() / n for rs in results]
            )
        evals += torch.tensor([[sum(r.network_evals for r in rs)] for rs in results], dtype=torch.float64)
    elif est.vlb and len(vlb_blocks) and str(est.vlb_steps) == VLB_ALL_STEPS:  # one pass: both decoders
        seeds = stream_seeds(est.seed, indices, Stream.VLB)
        results = [
            vlb_per_image(m.network, m.diffusion, x, seeds, steps_per_batch=est.vlb_steps_per_batch)
            for m in members
        ]
        out.member_values["vlb_bpd"] = torch.stack([r.total(False).cpu() for r in results])
        out.member_values["vlb_continuous_bpd"] = torch.stack([r.total(True).cpu() for r in results])
        for key, continuous in (("vlb_bpd_mc_stderr", False), ("vlb_continuous_bpd_mc_stderr", True)):
            out.member_values[key] = torch.stack([r.mc_stderr(continuous).cpu() for r in results])
        evals += torch.tensor([[r.terms_bpd.shape[1]] for r in results], dtype=torch.float64)
    out.member_values["network_evals"] = evals
    return out


def with_estimates(per_image: PerImage, reference: GaussianReference, choice=None) -> PerImage:
    """``per_image`` with the IT estimates (nats, ``[G, B]``) of every member and, for several members,
    of their ensemble (group ``ensemble``). With ``per_image.pilot_curves`` (both protocols of the stage),
    each group's decoder choice is fitted on them (:func:`itdiffusion.budget.fit_decoder_choice`) and
    applied per log-SNR bin (:func:`itdiffusion.budget.estimate_with_choice`; ``per_image.choices``);
    without them (the precision check's paired estimates), cross-fitted
    (:func:`itdiffusion.information.estimate`). A given ``choice`` (a
    :class:`~itdiffusion.budget.DecoderChoice`) is used instead for the groups of its number of models."""
    return estimate_groups(per_image, reference, choice)[0]


def estimate_groups(
    per_image: PerImage, reference: GaussianReference, given=None
) -> tuple[PerImage, list[ITEstimate]]:
    """:func:`with_estimates`, and the :class:`~itdiffusion.information.ITEstimate` of each group (in
    ``per_image.groups`` order; empty without curves): what the pixel maps decompose (the decoder choice
    per bin: ``ITEstimate.reference_bins``)."""
    curves = per_image.curves
    if curves is None:
        return per_image, []
    groups = [[j] for j in range(curves.num_models)]
    if curves.num_models > 1:
        groups.append(list(range(curves.num_models)))
    mmse_g = reference.mmse(curves.logsnr.to(reference.mean.device))  # B K d operations: once for all groups
    pilot = per_image.pilot_curves
    found, per_image.choices = [], {}
    for g in groups:
        if pilot is None and (given is None or len(g) != given.num_models):
            found.append(estimate(curves.models(g), reference, reference_mmse=mmse_g))
            continue
        choice = given if given is not None and len(g) == given.num_models else fit_decoder_choice(
            [pilot.models(g)])
        per_image.choices[f"m{g[0]}" if len(g) == 1 else ENSEMBLE] = choice
        found.append(estimate_with_choice(curves.models(g), reference, choice))
    values = [f.per_image() for f in found]
    per_image.groups = [f"m{g[0]}" for g in groups[: curves.num_models]] + [ENSEMBLE] * (len(groups) > 1)
    per_image.estimates = {f"it_{name}_nats": torch.stack([v[name] for v in values]) for name in values[0]}
    per_image.continuous_integrand = torch.stack([f.continuous_integrand for f in found])
    per_image.reference_mmse = mmse_g.cpu()
    return per_image, found


def add_pixel_maps(
    per_image: PerImage,
    found: ITEstimate,
    member: Member,
    test,
    reference: GaussianReference,
    est,
    device: torch.device,
) -> dict | None:
    """Rank 0: ``per_image.pixel_maps`` for the first ``estimator.pixel_maps`` evaluated images, each pixel's
    share of the single model's reported continuous estimate ``found`` (:func:`itdiffusion.pixel_maps.
    pixel_maps` on ``estimator.pixel_map_points`` points of their own per image). Every map must sum to
    the image's ``it_continuous_nats`` as stored (:class:`~itdiffusion.pixel_maps.PixelMapError` if not).
    Returns metrics.json's ``pixel_maps`` summary (None without maps)."""
    count = min(est.pixel_maps, per_image.num_images)
    if not est.it or count == 0 or per_image.curves is None:
        return None
    indices = per_image.index[:count].tolist()
    x = to_model_range(torch.stack([test[i][0] for i in indices])).to(device)
    maps = pixel_maps(
        [member.denoiser],
        x,
        list(range(count)),
        [found],
        reference,
        stream_seeds(est.seed, indices, Stream.PIXEL_MAP),
        npoints=est.pixel_map_points,
        xinterval=XINTERVAL,
        batch_size=est.batch_size,
    )
    gap = maps.check_sums(per_image.group("m0")["it_continuous_nats"][:count][None])
    per_image.pixel_maps = maps.tensors()
    return maps.summary(est.pixel_map_points, gap)


def summarize(
    per_image: PerImage,
    members: Sequence[Member],
    reference: GaussianReference,
    proposal: LogSNRProposal,
) -> dict:
    """metrics.json's numbers (:func:`itdiffusion.summary.summarize`, the function the report checks them
    with), the reference's entropy, the log-SNR range and, for ensembles, each member's model and weights."""
    dim = reference.dim
    metrics: dict = {
        **summary.summarize(per_image, dim),
        "dim": dim,
        "gaussian_entropy_bpd": float(nats_to_bpd(float(reference.entropy), dim)),
        "logsnr_range": list(proposal.bounds),
        "logsnr_core_range": list(proposal.core_bounds),
        "logsnr_proposal": dataclasses.asdict(proposal),
    }
    if len(members) > 1:
        metrics["members"] = [
            {"model": m.model_cfg.name, "checkpoint": m.checkpoint, "checkpoint_sha256": m.sha256, **values}
            for m, values in zip(members, metrics["members"], strict=True)
        ]
    return metrics


def check_estimates(
    members: Sequence[Member],
    test,
    reference: GaussianReference,
    proposal: LogSNRProposal,
    est,
    device: torch.device,
    pilot: Curves | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of every reported estimate on the first ``estimator.precision_check_images``
    test images, from the same seeds at every call (the paired check of :mod:`~itdiffusion.stages.precision`),
    with the run's decoder choice (fitted on the ``pilot`` curves; cross-fitted without them).
    Keys as in metrics.json (``it_continuous_bpd``, ``vlb_bpd``, ...); ensembles: ``<group>_<key>``."""
    idx = list(range(min(est.precision_check_images, len(test))))
    per_image = sample(members, torch.stack([test[i][0] for i in idx]), idx, reference, proposal, est, device)
    per_image.pilot_curves = pilot
    per_image = with_estimates(per_image, reference)
    single = len(members) == 1
    out = {}
    for row, group in enumerate(per_image.groups):
        prefix = "" if single else f"{group}_"
        for name, values in per_image.estimates.items():
            if "_mc_stderr" not in name:
                out[prefix + name.removesuffix("_nats") + "_bpd"] = nats_to_bpd(values[row], reference.dim)
    for key in ("vlb_bpd", "vlb_continuous_bpd"):
        for j, values in enumerate(per_image.member_values.get(key, [])):
            out[("" if single else f"m{j}_") + key] = values
    return out


def check_settings(cfg: DictConfig) -> None:
    """The estimator settings' combinations (one :class:`~itdiffusion.errors.UserError` before any work)."""
    est = cfg.estimator  # values are checked at launch (config.check_values); here the combinations
    if not (est.it or est.vlb):
        raise UserError("nothing to evaluate: estimator.it and estimator.vlb are both false")
    source = est.logsnr_proposal_from
    if (
        source
        and not (Path(source) / "metrics.json").is_file()
        and not Path(source).with_name("metrics.json").is_file()
    ):
        raise UserError(
            f"estimator.logsnr_proposal_from={source}: no evaluate run there (its metrics.json "
            "is missing): evaluate that run first, or leave the key unset to run the pilot"
        )
    check_ensemble(cfg)  # ensemble= and ensemble_models= together (one UserError before any work)
    no_vlb = [m.name for m in member_configs(cfg) if not family_of(m).vlb]
    if est.vlb and no_vlb:
        raise UserError(f"model={no_vlb[0]} has no variational bound (its family has no diffusion): set "
                        "estimator.vlb=false")
    if cfg.ensemble and not est.it:
        raise UserError("an ensemble combines MMSE curves: it needs estimator.it=true")
    if cfg.ensemble_curves and not cfg.ensemble:
        raise UserError(
            "ensemble_curves reuses the curves of an ensemble's members: give their checkpoints "
            "in ensemble= too (same order)"
        )
    if cfg.ensemble_curves and est.vlb:
        raise UserError(
            "ensemble_curves reuses the members' MMSE curves and runs no network, so it cannot "
            "give a VLB (the VLB is per model, in the members' runs): set estimator.vlb=false, "
            f"{REEVALUATE}"
        )
