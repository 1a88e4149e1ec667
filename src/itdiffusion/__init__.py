"""itdiffusion: information-theoretic diffusion density estimation on CIFAR-10.

Units: every estimator works in nats per sample internally; conversion to bits/dim happens
once, at the edge, through :mod:`itdiffusion.units`.
"""

__version__ = "0.1.0"
