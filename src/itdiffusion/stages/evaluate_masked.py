"""The evaluate stage for masked-diffusion models (the masked-pixel family): I-MDCE bits/dim.

``python -m itdiffusion.stages.evaluate model=masked_pixels_tiny model.checkpoint=<finetune run>/model.pt``

I-MDCE estimates of the discrete -log P(x) with ``estimator.num_masks`` masks per image, each image's masks
from its own seed: ``mdce_bpd`` (time integral) and ``mdce_timefree_bpd`` (time free), and two examples,
``mdce_bottom_given_top_bpd`` (bits/dim of the bottom half of the image given the top half) and
``mdce_corrupted_log_ratio_nats`` (log p(y) - log p(x) with y the image with a random
``estimator.corrupt_fraction`` of sub-pixels replaced by uniform values; coupled masks). Same frame as the
Gaussian models (:mod:`itdiffusion.stages.evaluation_frame`); the Gaussian reference and the
``estimator.it`` / ``vlb`` switches do not apply.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from itdiffusion import distributed, stage_tracking, summary
from itdiffusion.artifacts import MASKED_ESTIMATES, PerImage
from itdiffusion.data import load_images
from itdiffusion.discrete import bottom_given_top_nll, corrupted_log_ratio, masked_pixel_metrics
from itdiffusion.errors import UserError
from itdiffusion.members import load_members
from itdiffusion.seeding import Stream, stream_seeds
from itdiffusion.stages import evaluation_frame, rank_zero_first, setup_device
from itdiffusion.stages.partial import Partial
from itdiffusion.tracking import Tracker


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """I-MDCE bits/dim of ``cfg.model`` on the test set and the two examples; rank 0 writes the outputs."""
    if evaluation_frame.skip_done(cfg, run_dir):
        return None
    _check_settings(cfg)
    started = time.time()
    device = setup_device(cfg)
    with stage_tracking.evaluation_tracker(cfg, run_dir) as tracker:  # live from the start (rank 0)
        return _evaluate(cfg, run_dir, device, tracker, started)


def _evaluate(cfg: DictConfig, run_dir: Path, device, tracker: Tracker, started: float) -> dict | None:
    est = cfg.estimator
    with rank_zero_first():
        test = load_images(cfg.data, "test")
    member = load_members(cfg, device)[0]
    chunk = max(1, est.batch_size // est.num_masks)
    dim = member.network.length
    per_image = evaluation_frame.evaluate_sharded(
        cfg.label,
        test,
        chunk,
        lambda idx, images: sample(member.network, images, idx, est),
        Partial(run_dir, evaluation_frame.fingerprint(cfg, [member])),
        stage_tracking.RunningLog(
            tracker,
            lambda parts: summarize(PerImage.cat(list(parts)), est, dim),
            evaluation_frame.rank_images(len(test), chunk),
            cfg.logger.running_every_s,
            cfg.label,
        ),
    )
    if not distributed.is_main():
        distributed.barrier()
        return None
    evaluation_frame.check_finite(per_image, dim, run_dir)
    metrics = summarize(per_image, est, dim)
    metrics.update(evaluation_frame.provenance(cfg, [member]), elapsed_s=round(time.time() - started, 2))
    metrics = evaluation_frame.finish(cfg, run_dir, per_image, metrics, MASKED_ESTIMATES, tracker)
    distributed.barrier()
    return metrics


def summarize(per_image: PerImage, est, dim: int) -> dict:
    """metrics.json's numbers (:func:`itdiffusion.summary.summarize`, the function the report checks them
    with): the dataset mean of each I-MDCE estimate (bits/dim) with its standard error."""
    return {**summary.summarize(per_image, dim), "num_masks": est.num_masks, "dim": dim}


@torch.no_grad()
def sample(model, images: torch.Tensor, indices: Sequence[int], est) -> PerImage:
    """Per-image I-MDCE estimates of uint8 ``images`` with test indices ``indices`` (float64 CPU):
    ``mdce{,_timefree}_{nats,bpd}`` (+ ``_stderr``, Monte Carlo over the masks), the conditional example
    ``mdce_bottom_given_top_{nats,bpd}`` (+ ``_stderr``), the coupled example
    ``mdce_corrupted_log_ratio_nats`` (+ ``_stderr``), and the network evaluations per image."""

    def seeds(stream: Stream) -> list[int]:
        return stream_seeds(est.seed, indices, stream)

    common = dict(num_masks=est.num_masks, batch_size=est.batch_size)
    out = dict(masked_pixel_metrics(model, images, image_seeds=seeds(Stream.MASKS), **common))
    evals = out.pop("mdce_network_evals") + out.pop("mdce_timefree_network_evals")
    cond, dim = bottom_given_top_nll(model, images, image_seeds=seeds(Stream.CONDITIONAL), **common)
    bpd, bpd_stderr = cond.bpd(dim)
    out.update(
        mdce_bottom_given_top_nats=cond.nats,
        mdce_bottom_given_top_nats_stderr=cond.stderr,
        mdce_bottom_given_top_bpd=bpd,
        mdce_bottom_given_top_bpd_stderr=bpd_stderr,
    )
    evals = evals + cond.network_evals.cpu()
    ratios = []
    for b, seed in enumerate(seeds(Stream.CORRUPT)):  # one image at a time: corruption, masks from its seed
        _, ratio = corrupted_log_ratio(
            model,
            images[b : b + 1],
            fraction=est.corrupt_fraction,
            generator=torch.Generator().manual_seed(seed),
            **common,
        )
        ratios.append(ratio)
    out["mdce_corrupted_log_ratio_nats"] = torch.cat([r.nats.cpu() for r in ratios])
    out["mdce_corrupted_log_ratio_nats_stderr"] = torch.cat([r.stderr.cpu() for r in ratios])
    evals = evals + torch.cat([r.network_evals.cpu() for r in ratios])
    return PerImage(
        index=torch.as_tensor(list(indices), dtype=torch.long),
        groups=["m0"],
        estimates={k: _cpu(v)[None] for k, v in out.items()},
        member_values={"network_evals": _cpu(evals)[None]},
    )


def _check_settings(cfg: DictConfig) -> None:
    """The combinations that do not apply to masked models (values are checked at launch)."""
    if cfg.ensemble or cfg.ensemble_curves:
        raise UserError("ensemble= (and ensemble_curves=) combine Gaussian MMSE curves; they do not apply to "
                        "masked_pixels models")


def _cpu(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float64)
