"""The evaluate stage's dataset budget (``estimator.budget=dataset``): the pilot and the plan it gives.

:func:`plan` runs the pilot (:mod:`itdiffusion.budget`) on the first ``estimator.pilot_images`` test images
with their own seeds (streams ``PILOT_POINTS`` / ``PILOT_VLB``, one per ladder rung, so the main run's draws
of the same images are independent of it), chooses the log-SNR points and VLB timesteps per image, and
fits the decoder choice. :func:`plan_from_run` reads the choice of an earlier run (``estimator.budget_from``;
an ensemble reusing stored curves must evaluate at its members' points). The plan is metrics.json's
``budget`` section; :func:`effective` gives the estimator settings the main run uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from itdiffusion import artifacts
from itdiffusion.artifacts import ArtifactError
from itdiffusion.budget import IT_LADDER, VLB_LADDER, choose_k, it_pilot, vlb_pilot
from itdiffusion.data import to_model_range
from itdiffusion.errors import UserError
from itdiffusion.information import pixel_curve_options, sample_curves
from itdiffusion.seeding import Stream, stream_seeds
from itdiffusion.variational import VLB_ALL_STEPS, vlb_sampled


def plan(members, test, reference, proposal, est, device) -> dict:
    """The pilot's figures and the budget chosen from them (metrics.json's ``budget``)."""
    idx = list(range(min(est.pilot_images, len(test))))
    if len(idx) < 2:
        raise UserError("estimator.budget=dataset needs at least 2 test images for its pilot")
    x = to_model_range(torch.stack([test[i][0] for i in idx])).to(device)
    n = len(test)
    target = dict(target_stderr_bpd=est.target_stderr_bpd,
                  target_ratio=None if est.target_stderr_bpd is not None else est.target_stderr_ratio)
    out: dict = {"mode": "dataset", "num_images": n, "target_stderr_bpd": est.target_stderr_bpd,
                 "target_stderr_ratio": target["target_ratio"],
                 "full": {"npoints": est.npoints if est.it else None, "vlb_steps": str(est.vlb_steps)},
                 "pilot": {"images": len(idx)}, "chosen": {}, "predicted_stderr_bpd": {},
                 "full_protocol_stderr_bpd": {}, "target_reached": {}}
    evals_budget = evals_full = pilot_evals = 0
    if est.it:
        def sample(k: int):
            return sample_curves([m.denoiser for m in members], x, reference, npoints=k, proposal=proposal,
                                 seeds=stream_seeds(est.seed, idx, Stream.PILOT_POINTS, k),
                                 **pixel_curve_options(est))

        ladder = [k for k in IT_LADDER if k <= est.npoints] or [est.npoints]
        stats, choice, spent = it_pilot(sample, reference, ladder)
        found = choose_k(stats, n, est.npoints, **target)
        passes = 2 * len(members)  # the image and its dequantized twin, per model
        out["chosen"]["npoints"] = found.k
        out["decoder_choice"] = choice.to_dict()
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
        per_model = steps if chosen == VLB_ALL_STEPS else int(chosen) + 1
        evals_budget += per_model * len(members)
        evals_full += (steps if full_steps >= steps - 1 else full_steps + 1) * len(members)
        pilot_evals += spent
    out["pilot"]["network_evals"] = pilot_evals * len(idx)
    out["network_evals_per_image"] = {"budgeted": evals_budget, "full": evals_full,
                                      "ratio": round(evals_full / max(evals_budget, 1), 2)}
    return out


def _record(out: dict, found, what: str) -> None:
    out["predicted_stderr_bpd"].update(found.predicted_stderr)
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
    return {**{k: v for k, v in found.items() if k != "decoder_choice"}, "from_run": str(metrics_path)}


def effective(est, budget: dict | None):
    """A copy of the estimator settings with the plan's npoints and vlb_steps."""
    out = OmegaConf.create(OmegaConf.to_container(est, resolve=True))
    if budget:
        for key in ("npoints", "vlb_steps"):
            if key in budget.get("chosen", {}):
                out[key] = budget["chosen"][key]
    return out
