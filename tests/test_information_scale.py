"""The estimate at the paper's scale fits in memory: no step holds an images x points x d array.

At N = 10,000 test images, K = 1,000 points and d = 3,072 such an array is ~250 GB; here N x K = 2 million
with d = 3,072 must stay below 3 GB of peak RSS, in a fresh process so that the measurement is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO
from itdiffusion.information import GaussianReference

SCALE = r"""
import json, resource, sys, torch
from itdiffusion.information import Curves, GaussianReference, LogSNRProposal, estimate
N, K, d = 2000, 1000, 3072
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
# a spectrum of 16 distinct eigenvalues over 4 decades (equal eigenvalues are summed once)
eig = torch.logspace(-4, 0, 16, dtype=torch.float64).repeat_interleave(d // 16)
ref = GaussianReference(torch.zeros(d, dtype=torch.float64), eig, None, (3, 32, 32))
prop = LogSNRProposal.from_reference(ref, delta=2 / 255)
logsnr = prop.points(N * K, "random", g).reshape(N, K)
def curve(scale):  # a plausible error curve: the reference's, perturbed per point
    return ref.mmse(logsnr) * (scale + 0.2 * torch.rand(N, K, generator=g, dtype=torch.float64))
zeros = torch.zeros(N, dtype=torch.float64)
curves = Curves(logsnr=logsnr, mmse=curve(0.8)[None], gaussian_mmse=curve(1.0), continuous_tail=zeros,
                proposal=prop, sampling="random", network_evals=K, delta=2 / 255,
                mmse_rounded=curve(0.7)[None],
                discrete_left_tail=zeros, gaussian_errors=curve(1.0), mmse_dequantized=curve(0.8)[None],
                gaussian_mmse_dequantized=curve(1.0), gaussian_errors_dequantized=curve(1.0),
                continuous_tail_dequantized=zeros, continuous_tail_itd=zeros)
est = estimate(curves, ref)
print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "finite": bool(torch.isfinite(est.continuous).all() and torch.isfinite(est.discrete).all()
                                 and torch.isfinite(est.dequantized).all())}))
"""


def test_the_estimate_of_two_million_image_points_at_d_3072_stays_below_3_gb():
    proc = subprocess.run(
        [sys.executable, "-c", SCALE],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["peak_gb"] < 3.0, result


def test_the_chunked_reference_mmse_is_the_direct_sum():
    """mmse_G in chunks of values, with equal eigenvalues summed once, is sum_i sigmoid(a + ln lambda_i)."""
    g = torch.Generator().manual_seed(1)
    eig = torch.cat(
        [torch.rand(50, generator=g, dtype=torch.float64), torch.full((30,), 0.25, dtype=torch.float64)]
    )
    ref = GaussianReference(torch.zeros(80, dtype=torch.float64), eig)
    a = torch.randn(7, 300, generator=g, dtype=torch.float64) * 6
    direct = torch.sigmoid(a[..., None] + eig.log()).sum(-1)
    torch.testing.assert_close(ref.mmse(a), direct, rtol=1e-13, atol=1e-12)
    assert ref.mmse(torch.tensor(2.0)).shape == ()
