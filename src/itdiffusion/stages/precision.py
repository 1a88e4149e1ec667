"""The evaluate stage's precision check: a fast U-Net path is used only where it keeps the numbers.

``estimator.precision`` (fp32 | bf16 | auto), ``estimator.channels_last`` and ``estimator.compile``
choose a :class:`~itdiffusion.models.acceleration.FastPath`. Unless that is plain fp32 eager,
:func:`select_fast_path` first estimates every reported quantity (bits/dim per image: IT continuous,
discrete, dequantized, VLB, ...) on the first ``estimator.precision_check_images`` test images twice,
on the fp32 eager model and on the fast one, with the same seeds, so the two runs share their log-SNR
points and noise and the per-image differences d_i hold the precision effect alone. The fast path is
kept if, for every estimate,

    |mean(d)| + 2 SE(d) <= estimator.precision_tolerance_bpd        (SE = std(d) / sqrt(n), bits/dim)

Otherwise ``precision=auto`` falls back to fp32 eager with one warning naming the estimate, and an
explicit fast setting (``bf16``, or fp32 with channels_last / compile) is a :class:`UserError`. The
record (per estimate: fp32 mean, fast mean, mean difference, its SE, the bound; the path used; the
TF32 switches, which decide whether "fp32" convolutions on a GPU are TF32) goes to ``metrics.json``
under ``precision_check``. Under torchrun every rank checks the same images and
rank 0's decision is broadcast, so all ranks run the same path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from itdiffusion import distributed
from itdiffusion.errors import UserError
from itdiffusion.members import Member
from itdiffusion.models.acceleration import FastPath, fast_path_from_config
from itdiffusion.units import mean_and_stderr

log = logging.getLogger(__name__)

__all__ = ["compare_estimates", "select_fast_path"]


def compare_estimates(fp32: dict[str, torch.Tensor], fast: dict[str, torch.Tensor],
                      tolerance_bpd: float) -> dict[str, dict]:
    """Paired comparison of per-image bits/dim (same images, same seeds), one entry per estimate.

    ``fp32_bpd`` and ``fast_bpd``: the dataset means; ``diff_bpd``: mean of d_i = fast_i - fp32_i;
    ``diff_stderr_bpd``: its standard error; ``bound_bpd = |diff| + 2 SE``; ``within``: bound <= tolerance.
    """
    out = {}
    for name, ref in fp32.items():
        diff, stderr = mean_and_stderr(fast[name] - ref)
        bound = abs(diff) + 2 * stderr
        out[name] = {
            "fp32_bpd": mean_and_stderr(ref)[0],
            "fast_bpd": mean_and_stderr(fast[name])[0],
            "diff_bpd": diff,
            "diff_stderr_bpd": stderr,
            "bound_bpd": bound,
            "within": bool(bound <= tolerance_bpd),  # False for a NaN bound
        }
    return out


def select_fast_path(
    members: Sequence[Member],
    est_cfg: Any,
    device: torch.device,
    estimate: Callable[[Sequence[Member]], dict[str, torch.Tensor]],
) -> tuple[list[Member], dict]:
    """The members to evaluate with (fast if the path passes the check, else the given ones), and the record.
    The settings are validated beforehand by :func:`itdiffusion.config.check_values` (the stage's launch).

    ``members``: the models under evaluation (fp32 U-Nets). ``estimate(members)``: per-image bits/dim of
    every reported estimate on the check images (same images and seeds at every call).
    """
    fast = fast_path_from_config(est_cfg, device)
    record: dict = {
        "requested": {"precision": est_cfg.precision, "channels_last": bool(est_cfg.channels_last),
                      "compile": est_cfg.compile},
        "fast_path": fast.describe(),
        "checked": False,
        "used": fast.describe(),
        # PyTorch's TF32 switches: cudnn.allow_tf32 (default True) runs "fp32" convolutions in TF32 on Ampere+
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
    }
    if fast.plain:
        return list(members), record
    candidates = [m.accelerated(fast) for m in members]
    started = time.time()
    reference = estimate(members)
    estimates = compare_estimates(reference, estimate(candidates), est_cfg.precision_tolerance_bpd)
    record.update(
        checked=True,
        images=int(next(iter(reference.values())).numel()),
        tolerance_bpd=est_cfg.precision_tolerance_bpd,
        estimates=estimates,
        check_s=round(time.time() - started, 2),
    )
    record = distributed.broadcast_object(record)  # every rank takes rank 0's decision
    failed = {k: v for k, v in record["estimates"].items() if not v["within"]}
    if not failed:
        if distributed.is_main():
            log.info("precision check passed on %d images: %s keeps every estimate within %g bits/dim "
                     "of fp32 (largest |diff| + 2 SE: %.2g)", record["images"], fast.describe(),
                     record["tolerance_bpd"], max(v["bound_bpd"] for v in record["estimates"].values()))
        return candidates, record
    name, worst = max(failed.items(), key=lambda kv: _nan_as_inf(kv[1]["bound_bpd"]))
    message = (f"precision check failed: {fast.describe()} moves {name} by {worst['diff_bpd']:+.5f} "
               f"± {worst['diff_stderr_bpd']:.5f} bits/dim against fp32 on {record['images']} test images "
               f"(|diff| + 2 SE = {worst['bound_bpd']:.5f} > estimator.precision_tolerance_bpd="
               f"{record['tolerance_bpd']})")
    if est_cfg.precision != "auto":
        raise UserError(f"{message}. Use estimator.precision=fp32 (plain: also estimator.channels_last=false "
                        "estimator.compile=none), or estimator.precision=auto to fall back automatically.")
    if distributed.is_main():
        log.warning("%s; evaluating in fp32 eager instead", message)
    record["used"] = FastPath().describe()
    return list(members), record


def _nan_as_inf(value: float) -> float:
    return float("inf") if value != value else value
