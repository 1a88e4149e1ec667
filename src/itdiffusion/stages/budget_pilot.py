"""The evaluate stage's dataset budget (``estimator.budget=dataset``): the pilot and the plan it gives.

:func:`plan` runs the pilot (:mod:`itdiffusion.budget`) on the first ``estimator.pilot_images`` test images
with their own seeds (streams ``PILOT_POINTS`` / ``PILOT_VLB``, one per ladder rung, so the main run's draws
of the same images are independent of it), chooses the log-SNR points and VLB timesteps per image, and
returns the pilot's curves at :func:`~itdiffusion.budget.choice_points` points, on which the decoder choice
of both protocols is fitted (:func:`choice_curves` draws the same curves for ``estimator.budget=per_image``).
:func:`plan_from_run` reads the choice of an earlier run (``estimator.budget_from``; an ensemble reusing
stored curves must evaluate at its members' points). The plan is metrics.json's ``budget`` section;
:func:`effective` gives the estimator settings the main run uses. After the main run :func:`top_up` checks
the realized stderr against the targets and draws further blocks of points (:mod:`itdiffusion.topup`);
:func:`decoder_choice_metrics` is metrics.json's ``decoder_choice`` and ``it_reference_only``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from itdiffusion import artifacts, distributed, topup
from itdiffusion.artifacts import ArtifactError, PerImage
from itdiffusion.budget import IT_LADDER, VLB_LADDER, choice_points, choose_k, it_pilot, vlb_pilot
from itdiffusion.data import to_model_range
from itdiffusion.errors import UserError
from itdiffusion.information import Curves, pixel_curve_options, sample_curves
from itdiffusion.seeding import Stream, stream_seeds
from itdiffusion.variational import VLB_ALL_STEPS, vlb_sampled

log = logging.getLogger(__name__)


def _pilot_images(test, est, device) -> tuple[list[int], torch.Tensor]:
    idx = list(range(min(est.pilot_images, len(test))))
    if len(idx) < 2:
        raise UserError(f"the pilot needs at least 2 test images; the test set has {len(test)}")
    return idx, to_model_range(torch.stack([test[i][0] for i in idx])).to(device)


def _it_sampler(members, x, idx, reference, proposal, est):
    def sample(k: int):
        return sample_curves([m.denoiser for m in members], x, reference, npoints=k, proposal=proposal,
                             seeds=stream_seeds(est.seed, idx, Stream.PILOT_POINTS, k),
                             **pixel_curve_options(est))

    return sample


def choice_curves(members, test, reference, proposal, est, device):
    """The pilot images' curves the decoder choice is fitted on (the dataset budget's top rung): the first
    ``estimator.pilot_images`` test images at :func:`~itdiffusion.budget.choice_points` points, from their
    own seed stream (``PILOT_POINTS``), so the choice never sees the main run's draws."""
    idx, x = _pilot_images(test, est, device)
    return _it_sampler(members, x, idx, reference, proposal, est)(choice_points(est.npoints))


def plan(members, test, reference, proposal, est, device) -> tuple[dict, object]:
    """The pilot's figures and the budget chosen from them (metrics.json's ``budget``), and the pilot's
    curves the decoder choice is fitted on (None without IT estimates)."""
    idx, x = _pilot_images(test, est, device)
    n = len(test)
    target = dict(target_stderr_bpd=est.target_stderr_bpd,
                  target_ratio=None if est.target_stderr_bpd is not None else est.target_stderr_ratio)
    out: dict = {"mode": "dataset", "num_images": n, "target_stderr_bpd": est.target_stderr_bpd,
                 "target_stderr_ratio": target["target_ratio"],
                 "full": {"npoints": est.npoints if est.it else None, "vlb_steps": str(est.vlb_steps)},
                 "pilot": {"images": len(idx)}, "chosen": {}, "predicted_stderr_bpd": {},
                 "full_protocol_stderr_bpd": {}, "target_stderr_bpd_by_estimate": {}, "target_reached": {},
                 "max_blocks": {}}
    evals_budget = evals_full = pilot_evals = 0
    top = None
    if est.it:
        ladder = [k for k in IT_LADDER if k <= est.npoints] or [est.npoints]
        stats, _, spent, top = it_pilot(_it_sampler(members, x, idx, reference, proposal, est), reference,
                                        ladder)
        found = choose_k(stats, n, est.npoints, **target)
        passes = 2 * len(members)  # the image and its dequantized twin, per model
        out["chosen"]["npoints"] = found.k
        out["max_blocks"]["npoints"] = max(1, est.npoints // found.k)
        out["pilot"]["it"] = {k: s.to_dict() for k, s in stats.items()}
        _record(out, found, "npoints")
        evals_budget += passes * found.k
        evals_full += passes * est.npoints
        pilot_evals += spent
    if est.vlb:
        steps = members[0].diffusion.num_timesteps
        full_steps = steps - 1 if str(est.vlb_steps) == VLB_ALL_STEPS else min(int(est.vlb_steps), steps - 1)
        ladder = [k for k in VLB_LADDER if k < min(full_steps, steps - 1)]
        stats, spent = {}, 0
        if len(ladder) >= 1:
            for j, m in enumerate(members):
                found_j, spent_j = vlb_pilot(
                    lambda k, m=m: vlb_sampled(m.network, m.diffusion, x,
                                               stream_seeds(est.seed, idx, Stream.PILOT_VLB, k), k,
                                               batch_size=est.batch_size), ladder)
                stats.update({(name if len(members) == 1 else f"m{j}_{name}"): s
                              for name, s in found_j.items()})
                spent += spent_j
            found = choose_k(stats, n, full_steps, **target)
            chosen = VLB_ALL_STEPS if found.k >= steps - 1 else found.k
            out["pilot"]["vlb"] = {k: s.to_dict() for k, s in stats.items()}
            _record(out, found, "vlb_steps")
        else:  # too short a chain to sample: the exact sum
            chosen = VLB_ALL_STEPS if str(est.vlb_steps) == VLB_ALL_STEPS else est.vlb_steps
        out["chosen"]["vlb_steps"] = str(chosen)
        out["max_blocks"]["vlb_steps"] = 1 if chosen == VLB_ALL_STEPS else max(1, full_steps // int(chosen))
        per_model = steps if chosen == VLB_ALL_STEPS else int(chosen) + 1
        evals_budget += per_model * len(members)
        evals_full += (steps if full_steps >= steps - 1 else full_steps + 1) * len(members)
        pilot_evals += spent
    out["pilot"]["network_evals"] = pilot_evals * len(idx)
    out["network_evals_per_image"] = {"budgeted": evals_budget, "full": evals_full,
                                      "ratio": round(evals_full / max(evals_budget, 1), 2)}
    return out, top


def _record(out: dict, found, what: str) -> None:
    out["predicted_stderr_bpd"].update(found.predicted_stderr)
    out["target_stderr_bpd_by_estimate"].update(found.target)
    out["full_protocol_stderr_bpd"].update(found.full_stderr)
    out["target_reached"][what] = found.reached


def plan_from_run(run: str) -> dict:
    """The ``budget`` section of an earlier evaluate run (its dir or ``metrics.json``), for its chosen
    npoints / vlb_steps (the decoder choice is not reused: members of an ensemble differ)."""
    path = Path(run)
    metrics_path = path if path.suffix == ".json" else path / artifacts.METRICS
    try:
        metrics = artifacts.read_metrics(metrics_path)
    except (ArtifactError, OSError) as e:
        raise UserError(f"estimator.budget_from: cannot read {metrics_path} ({e})") from e
    found = metrics.get("budget")
    if not found or found.get("mode") != "dataset":
        raise UserError(f"estimator.budget_from: {metrics_path} was not evaluated with "
                        "estimator.budget=dataset")
    measured = ("decoder_choice", "top_ups", "stderr_check", "realized_stderr_bpd", "target_met")
    return {**{k: v for k, v in found.items() if k not in measured}, "from_run": str(metrics_path)}


def effective(est, budget: dict | None):
    """A copy of the estimator settings with the plan's npoints and vlb_steps."""
    out = OmegaConf.create(OmegaConf.to_container(est, resolve=True))
    if budget:
        for key in ("npoints", "vlb_steps"):
            if key in budget.get("chosen", {}):
                out[key] = budget["chosen"][key]
    return out


def blocks_of(budget: dict | None) -> dict[str, int]:
    """Blocks per image the main run draws: ``{"npoints": R, "vlb_steps": R'}`` (1 and 1 unless the plan
    comes from a topped-up run, ``estimator.budget_from``)."""
    chosen = (budget or {}).get("chosen", {})
    return {"npoints": int(chosen.get("it_blocks", 1)), "vlb_steps": int(chosen.get("vlb_blocks", 1))}


def top_up(per_image: PerImage | None, budget: dict, blocks: dict[str, int],
           draw: Callable[[dict, dict], PerImage | None], summarize: Callable[[PerImage], dict],
           on_round: Callable[[int, dict], None] | None = None):
    """Every rank: check the realized stderr of every estimate with a target (:func:`itdiffusion.topup.check`
    on rank 0's ``summarize(per_image)``) and, while one misses it, draw more blocks for every image
    (``draw(first, last)``: blocks ``first .. last - 1``, sharded like the main run), at most
    :data:`~itdiffusion.topup.MAX_TOP_UPS` times and up to the full protocol's points. Records in
    ``budget`` the blocks used, the predicted and realized stderrs and whether every target was met (a
    loud warning if not). Each check is logged as it is made (an INFO line, and on rank 0
    ``on_round(round, entry)`` with the entry ``budget["top_ups"]`` records). Returns rank 0's merged
    per-image values (None elsewhere)."""
    rounds = []
    for round_ in range(topup.MAX_TOP_UPS + 1):
        def decide(per_image=per_image, blocks=blocks):
            checks = topup.check(summarize(per_image), budget)
            want = dict(blocks)
            for name, found in checks.items():
                what = "npoints" if name.startswith("it_") else "vlb_steps"
                if what in budget["max_blocks"]:
                    want[what] = max(want[what], topup.blocks_needed(found, blocks[what],
                                                                     budget["max_blocks"][what]))
            return {n: c.to_dict() for n, c in checks.items()}, want

        checks, want = distributed.broadcast_object(distributed.on_main(decide))
        rounds.append({"blocks": dict(blocks), "stderr_check": checks})
        if distributed.is_main():
            _log_round(round_, rounds[-1], want)
            if on_round is not None:
                on_round(round_, rounds[-1])
        if want == blocks or round_ == topup.MAX_TOP_UPS:
            break
        extra = draw(blocks, want)
        if per_image is not None:
            per_image = merge_blocks(per_image, extra, blocks, want)
        blocks = want
    met = all(c["met"] for c in checks.values())
    budget["chosen"].update(it_blocks=blocks["npoints"], vlb_blocks=blocks["vlb_steps"])
    budget["top_ups"] = rounds
    budget["stderr_check"] = checks
    budget["realized_stderr_bpd"] = {n: c["realized"] for n, c in checks.items()}
    budget["target_met"] = met
    if per_image is not None:
        measured = per_image.member_values["network_evals"].sum(0).mean().item()
        evals = budget["network_evals_per_image"]
        evals.update(planned=evals.get("planned", evals["budgeted"]), budgeted=round(measured, 2),
                     ratio=round(evals["full"] / max(measured, 1), 2))
        if not met:
            missed = {n: f"{c['realized']:.4g} > {c['target']:.4g}" for n, c in checks.items()
                      if not c["met"]}
            log.warning("DATASET BUDGET TARGET MISSED after %d top-ups (stderr, bits/dim): %s; the spread "
                        "between images exceeds the target, or the full protocol's points were reached: "
                        "raise data.num_images or the target", len(rounds) - 1, missed)
    return per_image


def _log_round(round_: int, entry: dict, want: dict[str, int]) -> None:
    stderrs = ", ".join(f"{n} {c['realized']:.4g}/{c['target']:.4g}{'' if c['met'] else ' MISSED'}"
                        for n, c in entry["stderr_check"].items())
    after = "" if want == entry["blocks"] else f"; drawing blocks up to {want}"
    log.info("dataset budget check %d: blocks per image %s; stderr/target (bits/dim): %s%s",
             round_, entry["blocks"], stderrs, after)


def merge_blocks(old: PerImage, new: PerImage, before: dict[str, int], after: dict[str, int]) -> PerImage:
    """Rank 0: the per-image values of blocks ``0 .. after - 1`` from those of ``0 .. before - 1`` (``old``)
    and ``before .. after - 1`` (``new``): curves concatenated along the points (exactly what one draw of
    all blocks gives), sampled VLBs averaged with their block counts, network evaluations added."""
    values = dict(old.member_values)
    r0, r1 = before["vlb_steps"], after["vlb_steps"] - before["vlb_steps"]
    if r1 > 0:
        for key in ("vlb_bpd", "vlb_continuous_bpd"):
            values[key] = (r0 * old.member_values[key] + r1 * new.member_values[key]) / (r0 + r1)
            se0, se1 = old.member_values[key + "_mc_stderr"], new.member_values[key + "_mc_stderr"]
            values[key + "_mc_stderr"] = ((r0 * se0).square() + (r1 * se1).square()).sqrt() / (r0 + r1)
    values["network_evals"] = old.member_values["network_evals"] + new.member_values["network_evals"]
    curves = old.curves if new.curves is None else Curves.cat_points([old.curves, new.curves])
    return PerImage(index=old.index, groups=list(old.groups), member_values=values, curves=curves,
                    pilot_curves=old.pilot_curves)


def decoder_choice_metrics(per_image: PerImage) -> dict:
    """metrics.json's ``decoder_choice`` (per group: the decoder each log-SNR bin used, fitted on the pilot
    images' held-out draws) and ``it_reference_only`` (per IT estimate of the reported group: True when the
    Gaussian reference's decoder is used in every bin, so that the estimate is the reference's bound and
    says nothing about the network); logged loudly in that case."""
    choices = per_image.choices
    if not choices:
        return {"decoder_choice": {"rule": "cross_fitted"}} if per_image.curves is not None else {}
    pilot = per_image.pilot_curves
    main = choices.get(artifacts.ENSEMBLE) or choices["m0"]
    only = {f"it_{family}": flag for family, flag in main.reference_only().items()}
    only["it_discrete_notails"] = only.get("it_discrete", False)
    only["it_continuous_itd_range"] = only["it_continuous"]
    for name, flag in only.items():
        if flag:
            log.warning(
                "%s: the Gaussian reference's decoder is chosen in every log-SNR bin: this is the "
                "reference's bound, the network does not enter it", name
            )
    return {
        "decoder_choice": {
            "rule": "pilot",
            "pilot_images": pilot.num_images,
            "points_per_image": pilot.num_points,
            # network evaluations of the pilot curves (drawn once, by the run that evaluated the networks)
            "network_evals": pilot.network_evals * pilot.num_models * pilot.num_images,
            "groups": {g: c.to_dict() for g, c in choices.items()},
        },
        "it_reference_only": only,
    }
