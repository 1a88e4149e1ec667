"""Stage ``evaluate``: bits/dim of one model, or of an ensemble, on the test set.

``python -m itdiffusion.stages.evaluate model=iddpm_cifar10_vlb estimator.npoints=1000 data.num_images=512``
``torchrun --nproc_per_node=8 -m itdiffusion.stages.evaluate run_id=base ...`` (images sharded over ranks)

Rank 0 commits ``per_image.npz`` and ``metrics.json`` (:mod:`itdiffusion.artifacts`) and records the
results row; the numbers come from :mod:`itdiffusion.evaluation`. Under ``estimator.budget=dataset`` the
realized stderr is checked after the main run and topped up (:func:`itdiffusion.stages.budget_pilot.top_up`).

Ensembles (``ensemble=[ckpt_a, ckpt_b, ...]``): every member sees the same points and noise, and per log-SNR
bin the estimate uses the member (or the Gaussian decoder) that is best on the pilot curves.
``ensemble_curves=[run_a, run_b, ...]`` builds the ensemble from the members' stored curves with no network
evaluation (:mod:`itdiffusion.ensemble`). Models that are no Gaussian denoiser (masked diffusion) go to
:mod:`itdiffusion.stages.evaluate_masked`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from itdiffusion import distributed, evaluation, stage_tracking
from itdiffusion.artifacts import REPORTED_BPD, PerImage
from itdiffusion.data import load_images
from itdiffusion.ensemble import curves_from_member_runs
from itdiffusion.members import load_members
from itdiffusion.models.families import family_of
from itdiffusion.stages import (
    CONFIG_DIR,
    budget_pilot,
    cli_entry,
    evaluate_masked,
    evaluation_frame,
    launch,
    rank_zero_first,
    setup_device,
)
from itdiffusion.stages.partial import Partial
from itdiffusion.stages.precision import select_fast_path
from itdiffusion.stages.stats import load_or_compute_reference
from itdiffusion.tracking import Tracker

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Evaluate ``cfg.model`` (or the ``cfg.ensemble``) on the test set; rank 0 writes the outputs."""
    if not family_of(cfg.model).gaussian:  # masked diffusion: I-MDCE instead of the IT and VLB estimates
        return evaluate_masked.run(cfg, run_dir)
    if evaluation_frame.skip_done(cfg, run_dir):
        return None
    evaluation.check_settings(cfg)
    started = time.time()
    device = setup_device(cfg)
    with stage_tracking.evaluation_tracker(cfg, run_dir) as tracker:  # live from the start (rank 0)
        return _evaluate(cfg, run_dir, device, tracker, started)


def _evaluate(cfg: DictConfig, run_dir: Path, device: torch.device, tracker: Tracker, started: float):
    est = cfg.estimator
    reference = load_or_compute_reference(cfg, device)
    with rank_zero_first():
        test = load_images(cfg.data, "test")
    members = load_members(cfg, device, resolve_first=rank_zero_first)
    if cfg.ensemble_curves:  # the members' stored curves: rank 0 reads them, no network runs anywhere
        budget, est, pilot = _budget(cfg, members, test, reference, None, device)  # the first member's plan
        found = distributed.on_main(
            lambda: curves_from_member_runs(cfg.ensemble_curves, members, test, reference, est)
        )
        per_image, sources = found or (None, None)
        proposal = None if per_image is None else per_image.curves.proposal
        pilot = None if per_image is None else per_image.pilot_curves
        precision = {"checked": False, "used": None, "reason": "ensemble_curves: no network evaluation"}
    else:
        proposal = distributed.broadcast_object(
            distributed.on_main(lambda: evaluation.choose_proposal(cfg, members, test, reference))
        )
        budget, est, pilot = _budget(cfg, members, test, reference, proposal, device)
        members, precision = select_fast_path(  # fp32 eager unless a fast path keeps the numbers
            members, est, device,
            lambda ms: evaluation.check_estimates(ms, test, reference, proposal, est, device, pilot),
        )
        chunk = max(1, est.batch_size // est.npoints) if est.it else max(1, est.batch_size)
        blocks = budget_pilot.blocks_of(budget)

        def running(parts):  # metrics.json's numbers on the images done so far (the same decoder choice)
            done = PerImage.cat(list(parts))
            done.pilot_curves = pilot
            return summary_of(done)

        def summary_of(done: PerImage) -> dict:  # metrics.json's numbers on these images
            estimated = evaluation.with_estimates(done, reference)
            return evaluation.summarize(estimated, members, reference, proposal)

        def draw(first: dict, last: dict, partial=None):
            return evaluation_frame.evaluate_sharded(
                cfg.label if partial else f"{cfg.label} top-up",
                test,
                max(1, chunk // max(1, last["npoints"] - first["npoints"])),
                lambda idx, images: evaluation.sample(
                    members, images, idx, reference, proposal, est, device,
                    it_blocks=range(first["npoints"], last["npoints"]),
                    vlb_blocks=range(first["vlb_steps"], last["vlb_steps"]),
                ),
                partial,
                stage_tracking.RunningLog(
                    tracker, running, evaluation_frame.rank_images(len(test), chunk),
                    cfg.logger.running_every_s, cfg.label,
                ) if partial else None,
            )

        none = dict.fromkeys(blocks, 0)
        per_image = draw(none, blocks, Partial(
            run_dir,
            evaluation_frame.fingerprint(cfg, members, proposal=proposal, fast_path=precision["used"]),
        ))
        if per_image is not None:
            per_image.pilot_curves = pilot
        if budget is not None:  # the realized stderr against the target; more blocks where it misses
            per_image = budget_pilot.top_up(per_image, budget, blocks, draw, summary_of,
                                            lambda r, entry: stage_tracking.log_top_up(tracker, r, entry))
        sources = None
    if not distributed.is_main():
        distributed.barrier()
        return None
    per_image.pilot_curves = pilot
    per_image, found = evaluation.estimate_groups(per_image, reference)
    evaluation_frame.check_finite(per_image, reference.dim, run_dir)
    maps = None
    if sources is None and len(members) == 1 and found:  # single models (an ensemble's maps: its members')
        maps = evaluation.add_pixel_maps(per_image, found[0], members[0], test, reference, est, device)
    metrics = {
        **evaluation.summarize(per_image, members, reference, proposal),
        **budget_pilot.decoder_choice_metrics(per_image),
        **({"budget": budget} if budget else {}),
        **({"pixel_maps": maps} if maps else {}),
        **evaluation_frame.provenance(cfg, members),
        "precision_check": precision,
        "elapsed_s": round(time.time() - started, 2),
    }
    if sources is not None:
        metrics["curves_from"] = sources
    metrics = evaluation_frame.finish(cfg, run_dir, per_image, metrics, REPORTED_BPD, tracker)
    distributed.barrier()
    return metrics


def _budget(cfg: DictConfig, members, test, reference, proposal, device):
    """The dataset budget's plan (None for ``estimator.budget=per_image``), the estimator settings the
    run uses (the plan's npoints and vlb_steps, also written into ``cfg`` so metrics.json's config says
    what was evaluated; the budget section keeps the full-cost settings), and on rank 0 the pilot curves
    the decoder choice is fitted on (both protocols; None with ``ensemble_curves``: the members' runs
    stored theirs)."""
    est = cfg.estimator

    def pilot_curves():
        if not est.it or cfg.ensemble_curves:
            return None
        return budget_pilot.choice_curves(members, test, reference, proposal, est, device)

    if est.budget != "dataset":
        return None, est, distributed.on_main(pilot_curves)
    source = est.budget_from or (cfg.ensemble_curves[0] if cfg.ensemble_curves else None)
    pilot = None
    if source is not None:
        budget = budget_pilot.plan_from_run(source)
        pilot = distributed.on_main(pilot_curves)
    else:
        found = distributed.on_main(
            lambda: budget_pilot.plan(members, test, reference, proposal, est, device)
        )
        budget = distributed.broadcast_object(None if found is None else found[0])
        pilot = None if found is None else found[1]
    log.info(
        "dataset budget: %s per image (full protocol: %s), network evaluations per image %s",
        budget["chosen"],
        budget["full"],
        budget.get("network_evals_per_image"),
    )
    for key in ("npoints", "vlb_steps"):
        if key in budget["chosen"]:
            cfg.estimator[key] = budget["chosen"][key]
    return budget, cfg.estimator, pilot



@cli_entry
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg)  # optimized_metric's value: an optimizing sweeper's objective


if __name__ == "__main__":
    main()
