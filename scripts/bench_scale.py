"""The evaluate stage's scaling: time linear in images x points, memory O(N K + batch d), and the projected
peak memory of ``experiment=paper`` on rank 0.

1. ``sample_curves`` (the network work) with an exact Gaussian denoiser (d = 64) at 200 x 200 and 400 x 400
   images x points, side by side: the time ratio should be about 4 (4x the work), not 16 (before the curve
   buffers were preallocated, every denoiser batch re-created a full [N, K] tensor: quadratic).
2. ``estimate`` (rank 0's post-processing of the gathered curves) at d = 3,072 on two sizes of N x K, each in
   a fresh process (its peak RSS is its own); the rise per image-point gives the projection to the paper run
   (10,000 test images x 1,000 points, the full-cost protocol's K; the budgeted run uses fewer points) for a
   single model and for the two-member ensemble.

``python scripts/bench_scale.py`` (``make bench``); a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, SRC)

from itdiffusion.denoisers import Gaussian  # noqa: E402
from itdiffusion.information import GaussianReference, LogSNRProposal, sample_curves  # noqa: E402

PAPER_IMAGES, PAPER_POINTS, CIFAR_DIM = 10_000, 1_000, 3072

ESTIMATE = r"""
import json, resource, sys, torch
from itdiffusion.information import Curves, GaussianReference, LogSNRProposal, estimate
N, K, M, d = (int(v) for v in sys.argv[1:5])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
eig = torch.logspace(-4, 0, 16, dtype=torch.float64).repeat_interleave(d // 16)
ref = GaussianReference(torch.zeros(d, dtype=torch.float64), eig, None, (3, 32, 32))
prop = LogSNRProposal.from_reference(ref, delta=2 / 255)
logsnr = prop.points(N * K, "random", g).reshape(N, K)
def curve(scale, *lead):
    return ref.mmse(logsnr) * (scale + 0.2 * torch.rand(*lead, N, K, generator=g, dtype=torch.float64))
zeros = torch.zeros(N, dtype=torch.float64)
curves = Curves(logsnr=logsnr, mmse=curve(0.8, M), gaussian_mmse=curve(1.0), continuous_tail=zeros,
                proposal=prop, sampling="random", network_evals=K, delta=2 / 255, mmse_rounded=curve(0.7, M),
                discrete_left_tail=zeros, gaussian_errors=curve(1.0), mmse_dequantized=curve(0.8, M),
                gaussian_mmse_dequantized=curve(1.0), gaussian_errors_dequantized=curve(1.0),
                continuous_tail_dequantized=zeros, continuous_tail_itd=zeros)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = True
for group in [[j] for j in range(M)] + ([list(range(M))] if M > 1 else []):
    est = estimate(curves.models(group), ref)
    finite &= all(bool(torch.isfinite(v).all()) for v in est.per_image().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_gb": before / 2**20, "peak_gb": peak / 2**20, "finite": finite}))
"""


def time_sampling(num: int, npoints: int, dim: int = 64, repeats: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    dist = Gaussian(torch.zeros(dim, dtype=torch.float64), cov)
    x = dist.sample(num, generator=g)
    reference = GaussianReference.from_data(dist.sample(4 * dim, generator=g))
    proposal = LogSNRProposal.from_reference(reference)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sample_curves(
            dist, x, reference, npoints=npoints, seeds=range(num), proposal=proposal, batch_size=4096
        )
        best = min(best, time.perf_counter() - start)
    return best


def estimate_peak(num: int, npoints: int, models: int) -> dict:
    """Peak RSS (GB) of ``estimate`` on synthetic curves of ``num`` x ``npoints`` image-points of ``models``
    models at d = 3,072, in a fresh process (``tests/test_information_scale.py`` asserts it at 2M points)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", ESTIMATE, str(num), str(npoints), str(models), str(CIFAR_DIM)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} (2-core machine; times are the best of 3)")
    small, large = time_sampling(200, 200), time_sampling(400, 400)
    print(
        f"sample_curves, exact Gaussian denoiser (d = 64): 200 x 200 image-points {small:.2f} s, "
        f"400 x 400 {large:.2f} s: ratio {large / small:.2f} for 4x the work (linear: 4, quadratic: 16)"
    )
    sizes = [(200, 500), (400, 1000)]
    for models in (1, 2):
        runs = [estimate_peak(n, k, models) for n, k in sizes]
        points = [n * k for n, k in sizes]
        slope = (runs[1]["peak_gb"] - runs[0]["peak_gb"]) / (points[1] - points[0])  # GB per image-point
        base = runs[0]["peak_gb"] - slope * points[0]
        paper = base + slope * PAPER_IMAGES * PAPER_POINTS
        measured = ", ".join(
            f"{n} x {k}: {r['peak_gb']:.2f} GB" for (n, k), r in zip(sizes, runs, strict=True)
        )
        what = "single model" if models == 1 else "ensemble of 2 (members and ensemble)"
        print(
            f"estimate at d = {CIFAR_DIM}, {what}: peak RSS {measured}; {slope * 2**30:.0f} bytes per "
            f"image-point -> projected for experiment=paper ({PAPER_IMAGES} x {PAPER_POINTS}) on rank 0: "
            f"{paper:.1f} GB (an images x points x d array would be "
            f"{PAPER_IMAGES * PAPER_POINTS * CIFAR_DIM * 8 / 2**30:.0f} GB)"
        )


if __name__ == "__main__":
    main()
