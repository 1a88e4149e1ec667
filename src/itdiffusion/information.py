"""Information-theoretic likelihood estimators for diffusion denoisers (nats per sample).

Conventions (see :mod:`itdiffusion.denoisers` for the channel): log-SNR ``a``,
``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps``; errors are in *eps units*,
``mse(x, a) = E||eps - eps_hat||^2 = e^a E||x - x_hat||^2``, summed over the d dimensions.
Integrals are over ``a`` (not SNR), which absorbs the Jacobian.

**Pointwise I-MMSE.** With the exact posterior mean, for every x (Kong, Brekelmans & Ver Steeg 2023; the
derivative of the pointwise information density in SNR is ``||x - x_hat||^2 / 2`` after Stein's lemma):

- discrete x:    ``-ln P(x) = 1/2 int mmse(x, a) da``
- continuous x:  ``-ln p(x) = h_G + 1/2 int [mmse(x, a) - mmse_G(a)] da``

for *any* Gaussian reference ``N(mu, Sigma)`` with entropy ``h_G`` and ``mmse_G(a) = sum_i sigmoid(a + ln
lambda_i)``. A worse denoiser can only raise the data average of these integrals, so with a network they are
upper bounds on the expected NLL (cross-entropy); per image they are estimates.

**Estimation.** ``a`` is importance-sampled from a logistic proposal truncated to ``[a_lo, a_hi]``
(:class:`LogSNRProposal`); outside that range the reference's linear (Gaussian) decoder is used, whose error
at a given x is known in closed form (:meth:`GaussianReference.pointwise_mmse`), so the tails cost no network
call and add no noise. Inside the range a *decoder choice* may replace the network where it is worse than an
alternative (the Gaussian decoder: the "clamp"; rounding x_hat to the lattice; another model: ensembles).
Choosing per log-SNR point by the smaller error *of the same sample* would be an oracle (biased low), and
clamping each image's own curve would bias it too (an image's pointwise error may exceed the average). So
the choice is cross-fitted: for image b and log-SNR bin j it is made on the *other* images' errors in bin j,
and the network is replaced only where an alternative is better by more than two standard errors
(:func:`cross_fitted_choice`). The choice is then independent of image b's noise: the estimate stays
unbiased for the bound of the decoders actually used, a valid bound whatever the choice, and exact for an
exact denoiser. Being made on the other images, the choices depend on which images are evaluated together.

Units: everything here returns nats per sample; convert with :mod:`itdiffusion.units`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel, x_from_eps

LOG_2PI_E = math.log(2.0 * math.pi * math.e)

# Variance factor of the log-SNR proposal's scale, sqrt(1 + factor * var(ln lambda)). A logistic of scale s
# has variance s^2 pi^2 / 3, so 3 / pi^2 moment-matches a spread of variance var(ln lambda); ITD's code
# (kxh001/ITdiffusion, diffusionmodel.py, DiffusionModel.dataset_info) uses 3 / pi, a wider proposal.
ITD_VARIANCE_FACTOR = 3.0 / math.pi
MOMENT_VARIANCE_FACTOR = 3.0 / math.pi**2

# Eigenvalues of the data covariance below this (data units squared) are raised to it, so that ln lambda,
# the entropy and the proposal stay finite when N <= d or pixels are constant. For data on a lattice of
# spacing delta a natural floor is the quantisation variance delta^2 / 12 (pass min_eigval=...).
DEFAULT_MIN_EIGVAL = 1e-10

# Decoder choices (clamp, rounding, ensembles) are made per log-SNR bin: this many equal-probability bins
# of the proposal (or K if fewer points). Wider bins pool more of the other images' errors, so the choice is
# less noisy; narrower bins follow the error curves more closely.
DECISION_BINS = 32

# it_nll warns when the discrete right-tail bound exceeds this many nats per dimension.
RIGHT_TAIL_WARN_NATS_PER_DIM = 1e-3

SAMPLING_MODES = ("stratified", "random", "grid")
ROUNDING_MODES = ("none", "hard", "soft")


# ----------------------------------------------------------------------------------------------------
# Gaussian reference
# ----------------------------------------------------------------------------------------------------


class GaussianReference:
    """The Gaussian ``N(mean, U diag(eigvals) U^T)`` that anchors the continuous estimate.

    Attributes: ``mean`` ``[d]`` (float64), ``eigvals`` ``[d]`` (floored at ``min_eigval``), ``eigvecs``
    ``[d, d]`` (columns; ``None`` for a diagonal reference, i.e. ``U = I``), ``shape`` (one sample's shape),
    ``dim`` (d).
    """

    def __init__(self, mean: Tensor, eigvals: Tensor, eigvecs: Tensor | None = None, shape=None,
                 min_eigval: float = DEFAULT_MIN_EIGVAL):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        d = self.mean.numel()
        eigvals = torch.as_tensor(eigvals, dtype=torch.float64, device=self.mean.device).reshape(-1)
        if eigvals.numel() != d:
            raise ValueError(f"GaussianReference: {eigvals.numel()} eigenvalues for a {d}-dimensional mean")
        self.eigvals = eigvals.clamp_min(min_eigval)
        self.eigvecs = None if eigvecs is None else torch.as_tensor(eigvecs, dtype=torch.float64,
                                                                    device=self.mean.device)
        if self.eigvecs is not None and self.eigvecs.shape != (d, d):
            raise ValueError(f"GaussianReference: eigvecs must be [{d}, {d}], "
                             f"got {tuple(self.eigvecs.shape)}")
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"GaussianReference: shape {self.shape} does not hold {d} values")
        self.min_eigval = float(min_eigval)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def log_eigvals(self) -> Tensor:
        return self.eigvals.log()

    @classmethod
    def from_data(cls, x: Tensor, diagonal: bool = False, min_eigval: float = DEFAULT_MIN_EIGVAL,
                  chunk_size: int = 4096) -> GaussianReference:
        """Mean and covariance spectrum of ``x`` ``[N, *shape]`` in float64.

        Full: ``eigh`` of the unbiased covariance ``Xc^T Xc / (N - 1)`` (accumulated over chunks of rows so
        N can be large); diagonal: per-coordinate variances (for large d where a d x d matrix is too much).
        """
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError("GaussianReference.from_data: need x of shape [N >= 2, *shape], "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        mean = flat.to(torch.float64).mean(0)
        if diagonal:
            var = sum((c.to(torch.float64) - mean).square().sum(0) for c in flat.split(chunk_size))
            return cls(mean, var / (n - 1), None, x.shape[1:], min_eigval)
        cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for c in flat.split(chunk_size):
            centred = c.to(torch.float64) - mean
            cov += centred.T @ centred
        eigvals, eigvecs = torch.linalg.eigh(cov / (n - 1))
        return cls(mean, eigvals, eigvecs, x.shape[1:], min_eigval)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, shape=None,
                     min_eigval: float = DEFAULT_MIN_EIGVAL) -> GaussianReference:
        """The reference with a given mean ``[d]`` and covariance ``[d, d]``."""
        eigvals, eigvecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
        return cls(mean, eigvals, eigvecs, shape, min_eigval)

    @property
    def entropy(self) -> float:
        """``h_G = d/2 ln(2 pi e) + 1/2 sum_i ln lambda_i`` (nats)."""
        return 0.5 * self.dim * LOG_2PI_E + 0.5 * self.log_eigvals.sum().item()

    def mmse(self, logsnr: Tensor) -> Tensor:
        """``mmse_G(a) = sum_i sigmoid(a + ln lambda_i)`` (eps units), elementwise over ``logsnr``."""
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=self.mean.device)
        return torch.sigmoid(a[..., None] + self.log_eigvals).sum(-1)

    def logsnr_loc_scale(self, variance_factor: float = ITD_VARIANCE_FACTOR) -> tuple[float, float]:
        """``loc = -mean(ln lambda)``, ``scale = sqrt(1 + variance_factor * var(ln lambda))``.

        Default: ITD's code (``3 / pi``); ``MOMENT_VARIANCE_FACTOR`` (``3 / pi^2``) moment-matches instead.
        The importance-sampled integral is unbiased either way; the wider default reaches the high log-SNRs
        where the discrete estimate's right tail becomes negligible (see :func:`right_tail_bound`).
        """
        log_lam = self.log_eigvals
        var = log_lam.var().item() if log_lam.numel() > 1 else 0.0
        return -log_lam.mean().item(), math.sqrt(1.0 + variance_factor * var)

    def whiten_coords(self, x: Tensor) -> Tensor:
        """``rho_i = (u_i^T (x - mean))^2 / lambda_i`` for every image ``x`` ``[B, *shape]`` -> ``[B, d]``."""
        flat = x.reshape(x.shape[0], -1).to(device=self.mean.device, dtype=torch.float64) - self.mean
        y = flat if self.eigvecs is None else flat @ self.eigvecs
        return y.square() / self.eigvals

    def pointwise_mmse(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """Expected eps-error of this reference's Bayes (linear) decoder at the image x, ``[B, K]``.

        With ``t_i = sigmoid(a + ln lambda_i)`` and ``rho_i`` from :meth:`whiten_coords`,
        ``E_eps ||eps - eps_hat_G||^2 = sum_i [rho_i t_i (1 - t_i) + t_i^2]``; its average over data with
        the reference's moments (``rho_i = 1``) is ``mmse_G(a)``.
        """
        rho = self.whiten_coords(x)  # [B, d]
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=self.mean.device).reshape(rho.shape[0], -1)
        out = torch.empty_like(a)
        for b in range(rho.shape[0]):  # one image at a time keeps memory at K x d
            t = torch.sigmoid(a[b, :, None] + self.log_eigvals)
            out[b] = (rho[b] * t * (1 - t) + t.square()).sum(-1)
        return out

    def decoder_errors(self, x: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
        """Eps-unit error of this reference's Bayes (linear) decoder on given samples ``[n]``.

        ``z = sqrt(s) x + sqrt(1 - s) eps`` with ``s = sigmoid(a)``; in the eigenbasis
        (``y = U^T (x - mean)``, ``e = U^T eps``) the decoder predicts
        ``eps_hat_i = (1 - t_i) (e^{a/2} y_i + e_i)`` with ``t_i = sigmoid(a + ln lambda_i)``, so
        ``||eps - eps_hat||^2 = sum_i (t_i e_i - (1 - t_i) e^{a/2} y_i)^2``.
        Its mean over eps is :meth:`pointwise_mmse`. ``x``, ``eps``: ``[n, *shape]``; ``logsnr``: ``[n]``.
        """
        dev = self.mean.device
        y = x.reshape(x.shape[0], -1).to(device=dev, dtype=torch.float64) - self.mean
        e = eps.reshape(eps.shape[0], -1).to(device=dev, dtype=torch.float64)
        if self.eigvecs is not None:
            y, e = y @ self.eigvecs, e @ self.eigvecs
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=dev).reshape(-1, 1)
        t = torch.sigmoid(a + self.log_eigvals)
        return (t * e - (1 - t) * (0.5 * a).exp() * y).square().sum(-1)

    def to(self, device) -> GaussianReference:
        return GaussianReference(self.mean.to(device), self.eigvals.to(device),
                                 None if self.eigvecs is None else self.eigvecs.to(device), self.shape,
                                 self.min_eigval)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "eigvals": self.eigvals.cpu(),
                "eigvecs": None if self.eigvecs is None else self.eigvecs.cpu(),
                "shape": list(self.shape), "min_eigval": self.min_eigval}

    @classmethod
    def from_state_dict(cls, state: dict) -> GaussianReference:
        missing = {"mean", "eigvals", "eigvecs", "shape"} - set(state)
        if missing:
            raise KeyError(f"GaussianReference.from_state_dict: missing {sorted(missing)}")
        return cls(state["mean"], state["eigvals"], state["eigvecs"], state["shape"],
                   state.get("min_eigval", DEFAULT_MIN_EIGVAL))


# ----------------------------------------------------------------------------------------------------
# Log-SNR proposal: truncated logistic
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSNRProposal:
    """Logistic(loc, scale) truncated to ``[loc - clip * scale, high]`` (``high`` defaults to
    ``loc + clip * scale``; a higher end lets the discrete estimate reach the SNRs that resolve a lattice).

    Density ``q(a) = sigmoid(u) sigmoid(-u) / (scale * mass)`` with ``u = (a - loc) / scale`` and
    ``mass = sigmoid(u_hi) - sigmoid(u_lo)`` the kept probability (``tanh(clip/2)`` when symmetric). Points
    come from the quantile function at ``p`` in [0, 1): ``random`` i.i.d. uniform p; ``stratified`` one
    uniform p in each of K equal-probability strata, ``p_k = (k + U_k) / K`` (unbiased, lower variance);
    ``grid`` the midpoints ``(k + 1/2) / K`` (deterministic points; quadrature error O(1/K^2) is not in
    the standard error).
    """

    loc: float
    scale: float
    clip: float = 4.0
    high: float | None = None

    def __post_init__(self):
        if not (self.scale > 0 and self.clip > 0):
            raise ValueError(f"LogSNRProposal: scale and clip must be positive, "
                             f"got {self.scale}, {self.clip}")
        if self.high is not None and not self.high > self.loc - self.clip * self.scale:
            raise ValueError(f"LogSNRProposal: high={self.high} is below the lower end {self.bounds[0]}")

    @classmethod
    def from_reference(cls, reference: GaussianReference, clip: float = 4.0,
                       variance_factor: float = ITD_VARIANCE_FACTOR,
                       delta: float | None = None) -> LogSNRProposal:
        """The reference's proposal; with a lattice spacing ``delta``, its upper end is raised (if needed)
        to :func:`resolving_logsnr`, where the discrete estimate's right tail is negligible."""
        loc, scale = reference.logsnr_loc_scale(variance_factor)
        high = None
        if delta is not None and resolving_logsnr(delta) > loc + clip * scale:
            high = resolving_logsnr(delta)
        return cls(loc, scale, clip, high)

    @property
    def bounds(self) -> tuple[float, float]:
        """``(a_lo, a_hi)``: the sampled log-SNR range."""
        high = self.loc + self.clip * self.scale if self.high is None else self.high
        return self.loc - self.clip * self.scale, high

    def _sigmoid_bounds(self) -> tuple[float, float]:
        lo, hi = self.bounds
        return 1.0 / (1.0 + math.exp(self.clip)), 1.0 / (1.0 + math.exp(-(hi - self.loc) / self.scale))

    def quantile(self, p: Tensor) -> Tensor:
        s_lo, s_hi = self._sigmoid_bounds()
        return self.loc + self.scale * torch.logit(s_lo + (s_hi - s_lo) * p.to(torch.float64))

    def cdf(self, a: Tensor) -> Tensor:
        """Probability of the truncated proposal below ``a``, in [0, 1]."""
        u = (torch.as_tensor(a, dtype=torch.float64) - self.loc) / self.scale
        s_lo, s_hi = self._sigmoid_bounds()
        return ((torch.sigmoid(u) - s_lo) / (s_hi - s_lo)).clamp(0.0, 1.0)

    def log_prob(self, a: Tensor) -> Tensor:
        """``ln q(a)`` inside the range, ``-inf`` outside."""
        a = torch.as_tensor(a, dtype=torch.float64)
        u = (a - self.loc) / self.scale
        s_lo, s_hi = self._sigmoid_bounds()
        log_q = torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u) \
            - math.log(self.scale * (s_hi - s_lo))
        lo, hi = self.bounds
        return torch.where((a >= lo) & (a <= hi), log_q, torch.full_like(log_q, -math.inf))

    def points(self, npoints: int, mode: str = "stratified",
               generator: torch.Generator | None = None) -> Tensor:
        """``npoints`` log-SNRs (float64, CPU), ordered by stratum for ``stratified`` and ``grid``."""
        k = torch.arange(npoints, dtype=torch.float64)
        if mode == "random":
            p = torch.rand(npoints, dtype=torch.float64, generator=generator)
        elif mode == "stratified":
            p = (k + torch.rand(npoints, dtype=torch.float64, generator=generator)) / npoints
        elif mode == "grid":
            p = (k + 0.5) / npoints
        else:
            raise ValueError(f"logsnr sampling must be one of {SAMPLING_MODES}, got {mode!r}")
        return self.quantile(p)

    def bins(self, a: Tensor, nbins: int) -> Tensor:
        """Index of the equal-probability bin (stratum) holding each log-SNR, in ``0 .. nbins - 1``."""
        return (self.cdf(a) * nbins).floor().long().clamp(0, nbins - 1)


# ----------------------------------------------------------------------------------------------------
# Monte Carlo means, standard errors, and the cross-fitted decoder choice
# ----------------------------------------------------------------------------------------------------


def mc_mean_and_stderr(values: Tensor, sampling: str) -> tuple[Tensor, Tensor]:
    """Per-row mean of ``values`` ``[B, K]`` and its standard error for the sampling mode used.

    ``random`` (i.i.d. points): ``std / sqrt(K)``. ``stratified`` and ``grid`` (column k = stratum k): the
    collapsed-strata estimator, ``Var(mean) = (1/K^2) sum_groups n_g s_g^2`` over groups of two adjacent
    strata (the last group holds three when K is odd); slightly conservative, since differences between
    neighbouring strata means count as noise. K < 2 gives ``nan``.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"logsnr sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    k = values.shape[-1]
    mean = values.mean(-1)
    if k < 2:
        return mean, torch.full_like(mean, math.nan)
    if sampling == "random":
        return mean, values.std(-1) / math.sqrt(k)
    npairs = k // 2 - (k % 2)  # pairs before the (possible) final triple
    paired = values[..., : 2 * npairs]
    total = (paired[..., 0::2] - paired[..., 1::2]).square().sum(-1)  # n s^2 = (v1 - v2)^2 for a pair
    if k % 2:
        total = total + 3 * values[..., 2 * npairs:].var(-1)
    return mean, total.sqrt() / k


def cross_fitted_choice(integrands: Tensor, bins: Tensor, nbins: int, z_threshold: float = 2.0) -> Tensor:
    """Per image and point, the integrand of the decoder that is best *on the other images*.

    ``integrands`` ``[C, B, K]`` holds C candidate decoders' integrands on the same points; ``bins``
    ``[B, K]`` the log-SNR bin of every point. Candidate 0 (the network) is the default. For image b and
    bin j, candidate c replaces it when, over the points of the *other* images in bin j, the mean paired
    difference ``integrand_c - integrand_0`` is below ``-z_threshold`` standard errors; among several such
    candidates the one with the lowest mean wins. Image b's own errors never enter its choice, so its
    estimate stays unbiased for the decoder it uses; the threshold keeps noise from switching away from a
    network that is in fact better (which would bias the bound upwards).
    """
    chosen = _cross_fitted_index(integrands, bins, nbins, z_threshold).gather(1, bins)  # [B, K]
    return integrands.gather(0, chosen[None]).squeeze(0)


def _cross_fitted_index(integrands: Tensor, bins: Tensor, nbins: int, z_threshold: float = 2.0) -> Tensor:
    """The candidate index :func:`cross_fitted_choice` uses for each image and bin ``[B, nbins]``."""
    c, b, k = integrands.shape
    if c == 1:
        return torch.zeros(b, nbins, dtype=torch.long, device=integrands.device)
    diff = integrands[1:] - integrands[:1]  # [C-1, B, K]
    idx = bins.expand(c - 1, b, k)

    def others(values: Tensor) -> Tensor:  # sum over the other images' points of each bin: [C-1, B, nbins]
        own = values.new_zeros(values.shape[0], b, nbins).scatter_add_(2, idx, values)
        return own.sum(1, keepdim=True) - own

    n = others(torch.ones_like(diff))
    mean = others(diff) / n.clamp_min(1)
    var = (others(diff.square()) / n.clamp_min(1) - mean.square()).clamp_min(0) * n / (n - 1).clamp_min(1)
    significant = (n > 1) & (mean < -z_threshold * (var / n.clamp_min(1)).sqrt())
    score = torch.where(significant, mean, torch.zeros_like(mean))
    best = score.min(0)  # lowest significant mean, 0 when none
    return torch.where(best.values < 0, best.indices + 1, torch.zeros_like(best.indices))  # [B, nbins]


def cross_fitted_coefficient(integrand: Tensor, control: Tensor, bins: Tensor, nbins: int) -> Tensor:
    """Regression coefficient of ``integrand`` on ``control`` (both ``[..., B, K]``) per image and bin,
    fitted on the *other* images' points of the bin: ``Cov / Var`` -> ``[..., B, nbins]`` (0 where the other
    images have fewer than two points in the bin or no spread). Image b's own values never enter, so a
    control variate with this coefficient leaves its estimate unbiased."""
    idx = bins.expand_as(integrand)

    def others(values: Tensor) -> Tensor:
        own = values.new_zeros(*values.shape[:-1], nbins).scatter_add_(-1, idx, values)
        return own.sum(-2, keepdim=True) - own

    control = control.expand_as(integrand)
    n = others(torch.ones_like(integrand))
    mean_f, mean_g = others(integrand) / n.clamp_min(1), others(control) / n.clamp_min(1)
    cov = others(integrand * control) / n.clamp_min(1) - mean_f * mean_g
    var = others(control.square()) / n.clamp_min(1) - mean_g.square()
    ok = (n > 1) & (var > 1e-12 * others(control.square()) / n.clamp_min(1))
    return torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), torch.zeros_like(var))


# ----------------------------------------------------------------------------------------------------
# Tails outside the sampled range
# ----------------------------------------------------------------------------------------------------


def continuous_tails(reference: GaussianReference, x: Tensor, bounds: tuple[float, float]) -> Tensor:
    """``1/2 int_{a outside [a_lo, a_hi]} [mmse_Gdec(x, a) - mmse_G(a)] da`` for the Gaussian decoder ``[B]``.

    With ``d t / d a = t (1 - t)`` the gap ``sum_i (rho_i - 1) t_i (1 - t_i)`` integrates in closed form:
    ``1/2 sum_i (rho_i - 1) [t_i(a_lo) + 1 - t_i(a_hi)]``. Zero on average over data with the reference's
    moments (which is why ITD can drop it), exact per image.
    """
    rho = reference.whiten_coords(x)
    lo, hi = bounds
    t_lo = torch.sigmoid(lo + reference.log_eigvals)
    t_hi = torch.sigmoid(hi + reference.log_eigvals)
    return 0.5 * ((rho - 1) * (t_lo + 1 - t_hi)).sum(-1)


def left_tail(reference: GaussianReference, x: Tensor, a_lo: float) -> Tensor:
    """``1/2 int_{-inf}^{a_lo} mmse_Gdec(x, a) da`` for the Gaussian decoder, in closed form ``[B]``.

    ``= 1/2 sum_i [ln(1 + e^{a_lo} lambda_i) + (rho_i - 1) t_i(a_lo)]``; its data average is ITD's left
    tail ``1/2 sum_i ln(1 + e^{a_lo} lambda_i)``.
    """
    rho = reference.whiten_coords(x)
    u = a_lo + reference.log_eigvals
    return 0.5 * (torch.nn.functional.softplus(u) + (rho - 1) * torch.sigmoid(u)).sum(-1)


def resolving_logsnr(delta: float, tau: float = 7.0) -> float:
    """The log-SNR where the channel noise ``e^{-a/2}`` is ``delta / (2 tau)``: ``2 ln(2 tau / delta)``.

    Above it the discrete integrand is negligible: :func:`right_tail_bound` is ``8 d phi(7) / 7 ~ 1e-11 d``
    nats. For CIFAR-10 (``delta = 2/255``) it is 16.2.
    """
    return 2.0 * math.log(2.0 * tau / delta)


def right_tail_bound(dim: int, delta: float, a_hi: float) -> float:
    """Upper bound on ``1/2 int_{a_hi}^inf mse(x, a) da`` for the decoder that rounds ``z / sqrt(s)``.

    ``z / sqrt(s) = x + n`` with ``n ~ N(0, e^-a)`` per coordinate. Rounding to the lattice errs only where
    ``|n| > delta/2``, and then ``|error| <= |n| + delta/2 < 2|n|``, so the eps-unit error per coordinate is
    at most ``4 e^a E[n^2; |n| > delta/2] = 8 [tau phi(tau) + Q(tau)]`` with ``tau = delta e^{a/2} / 2``
    (phi, Q: standard normal density and upper tail). With ``da = 2 dtau / tau`` and
    ``int_T^inf Q(tau) / tau dtau <= (phi(T) - T Q(T)) / T``:

        1/2 int_{a_hi}^inf mse da  <=  8 d phi(T) / T,      T = delta e^{a_hi / 2} / 2.

    Holds for every x (clamping to the data interval only lowers the error). ITD's code uses the looser
    ``8 n_bins^2 d exp(-e^{a_hi} delta^2 / 8)``. Negligible once T >~ 6 (:func:`resolving_logsnr`); large
    when the proposal stops short of the SNRs that resolve the lattice.
    """
    tau = 0.5 * delta * math.exp(0.5 * a_hi)
    return 8.0 * dim * math.exp(-0.5 * tau * tau) / (math.sqrt(2.0 * math.pi) * tau)


# ----------------------------------------------------------------------------------------------------
# NLLs from error curves (the formulas, written once)
# ----------------------------------------------------------------------------------------------------


@dataclass
class CurveNLL:
    """Per-image estimate and its Monte Carlo standard error (nats)."""

    nll: Tensor
    stderr: Tensor


def _as_candidates(mmse: Tensor) -> Tensor:
    mmse = mmse.to(torch.float64)
    return mmse[None] if mmse.dim() == 2 else mmse


def _estimate(candidates: list[Tensor], logsnr: Tensor, proposal: LogSNRProposal, sampling: str,
              control: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mean_k`` of the chosen integrand per image, and its standard error (the integrand's units).

    ``candidates``: ``[B, K]`` or ``[C, B, K]`` tensors, integrands ``f_c / q`` of the candidate decoders
    on the same points and noise; per image and log-SNR bin the cross-fitted choice
    (:func:`cross_fitted_choice`) picks one. ``control`` ``[B, K]`` (optional): ``(g - E_eps g) / q``, the
    reference decoder's error on the same noise minus its exact mean at that (x, a), so zero-mean at every
    point. It enters as ``f_c / q - beta control`` with ``beta`` per image and bin fitted on the other
    images (:func:`cross_fitted_coefficient`): unbiased (beta and the choice never see the image's own
    noise), and it removes the part of the channel-noise fluctuation the two decoders share.
    """
    stacked = torch.cat([t if t.dim() == 3 else t[None] for t in candidates])
    nbins = min(logsnr.shape[1], DECISION_BINS)
    bins = proposal.bins(logsnr, nbins).to(stacked.device)
    index = _cross_fitted_index(stacked, bins, nbins)  # [B, nbins]
    values = stacked.gather(0, index.gather(1, bins)[None]).squeeze(0)
    if control is not None:
        coef = cross_fitted_coefficient(stacked, control[None], bins, nbins)  # [C, B, nbins]
        values = values - coef.gather(0, index[None]).squeeze(0).gather(1, bins) * control
    return mc_mean_and_stderr(values, sampling)


def _noise_control(gaussian_errors: Tensor | None, gaussian_mmse: Tensor, weight: Tensor) -> Tensor | None:
    """``(g - E_eps g) / q`` from the reference decoder's sampled errors g and their exact mean."""
    return None if gaussian_errors is None else (gaussian_errors.to(torch.float64) - gaussian_mmse) * weight


def continuous_nll_from_curve(mmse: Tensor, logsnr: Tensor, log_q: Tensor, reference: GaussianReference,
                              clamp: bool = True, *, x: Tensor | None = None,
                              gaussian_mmse: Tensor | None = None, proposal: LogSNRProposal | None = None,
                              sampling: str = "stratified",
                              gaussian_errors: Tensor | None = None) -> CurveNLL:
    """``-ln p(x) = h_G + 1/2 E_q[(mmse(x, a) - mmse_G(a)) / q(a)]`` (+ tails), per image, in nats.

    ``mmse``: ``[B, K]`` eps-unit errors at the points ``logsnr`` ``[B, K]`` with proposal log-densities
    ``log_q`` ``[B, K]``; or ``[M, B, K]`` for M models evaluated on the same points and noise (an
    ensemble: ITD's pointwise minimum over models, made unbiased by :func:`cross_fitted_choice`; the first
    model is the default, another takes over in the bins where it is clearly better).
    ``clamp=True`` adds the reference's Gaussian decoder as a candidate (the test-time clamp where
    ``mmse > mmse_G``). ``x`` (the images, ``[B, *shape]``) makes the Gaussian decoder exact per image and
    adds the closed-form tails outside the sampled range (:func:`continuous_tails`); without it the
    Gaussian decoder counts as its data average ``mmse_G(a)`` and the tails as zero (ITD's convention,
    right on average over data with the reference's moments). ``gaussian_mmse`` ``[B, K]`` saves recomputing
    :meth:`GaussianReference.pointwise_mmse`. ``proposal``: the one the points were drawn from (default:
    the reference's); it defines the bins and the range. ``sampling``: how they were drawn, for the
    standard error (:func:`mc_mean_and_stderr`).
    ``gaussian_errors`` ``[B, K]`` (needs ``x``): the reference decoder's errors on the same points and noise
    (:meth:`GaussianReference.decoder_errors`); minus their exact mean they are a zero-mean control variate
    for the channel noise (:func:`_estimate`).
    Differentiable in ``mmse`` (``it_loss`` uses it with K = 1 and no clamp).
    """
    proposal = proposal or LogSNRProposal.from_reference(reference)
    logsnr = logsnr.to(torch.float64)
    weight = torch.exp(-log_q.to(torch.float64))
    if gaussian_errors is not None and x is None:
        raise ValueError("continuous_nll_from_curve: gaussian_errors (the control variate) needs x")
    if x is not None and gaussian_mmse is None and (clamp or gaussian_errors is not None):
        gaussian_mmse = reference.pointwise_mmse(x, logsnr)
    mmse_g = reference.mmse(logsnr)
    candidates = [(_as_candidates(mmse) - mmse_g) * weight]
    if clamp:
        candidates.append(torch.zeros_like(mmse_g) if x is None else (gaussian_mmse - mmse_g) * weight)
    control = None if x is None else _noise_control(gaussian_errors, gaussian_mmse, weight)
    mean, stderr = _estimate(candidates, logsnr, proposal, sampling, control)
    nll = reference.entropy + 0.5 * mean
    if x is not None:
        nll = nll + continuous_tails(reference, x, proposal.bounds)
    return CurveNLL(nll, 0.5 * stderr)


def discrete_nll_from_curve(mmse: Tensor, logsnr: Tensor, log_q: Tensor, reference: GaussianReference,
                            delta: float, clamp: bool = True, *, x: Tensor,
                            gaussian_mmse: Tensor | None = None, proposal: LogSNRProposal | None = None,
                            sampling: str = "stratified", gaussian_errors: Tensor | None = None) -> CurveNLL:
    """``-ln P(x) = 1/2 int mse(x, a) da`` for data on a lattice of spacing ``delta``, per image, in nats.

    ``mmse``: ``[C, B, K]`` (or ``[B, K]``) eps-unit errors of C candidate decoders on the same points
    (e.g. the rounded and the raw x_hat of one network evaluation); per bin the cross-fitted best is used,
    plus the Gaussian decoder if ``clamp``. The first candidate is the default where the other images give
    too little evidence (put the rounded x_hat first: its error vanishes at high SNR, the raw one's does
    not). Inside the sampled range: ``1/2 E_q[mse / q]``; below it the Gaussian decoder
    (:func:`left_tail`); above it the rounding decoder (:func:`right_tail_bound`). ``gaussian_errors``
    ``[B, K]``: the reference decoder's errors on the same points and noise, a zero-mean control variate
    once their exact mean is subtracted (:func:`_estimate`; its fitted coefficient is near 0 at high SNR,
    where a rounded x_hat's error vanishes and the Gaussian's does not).
    """
    proposal = proposal or LogSNRProposal.from_reference(reference, delta=delta)
    logsnr = logsnr.to(torch.float64)
    weight = torch.exp(-log_q.to(torch.float64))
    if gaussian_mmse is None and (clamp or gaussian_errors is not None):
        gaussian_mmse = reference.pointwise_mmse(x, logsnr)
    candidates = [_as_candidates(mmse) * weight] + ([gaussian_mmse * weight] if clamp else [])
    mean, stderr = _estimate(candidates, logsnr, proposal, sampling,
                             _noise_control(gaussian_errors, gaussian_mmse, weight))
    a_lo, a_hi = proposal.bounds
    tails = left_tail(reference, x, a_lo) + right_tail_bound(reference.dim, delta, a_hi)
    return CurveNLL(0.5 * mean + tails, 0.5 * stderr)


# ----------------------------------------------------------------------------------------------------
# Rounding x_hat to the lattice
# ----------------------------------------------------------------------------------------------------


def round_to_lattice(x_hat: Tensor, delta: float, interval: tuple[float, float], mode: str,
                     logsnr: Tensor | None = None) -> Tensor:
    """Map a data prediction onto the lattice ``low + delta * k`` inside ``interval = (low, high)``.

    ``none``: clamp to the interval only. ``hard``: the nearest lattice point. ``soft``: the posterior mean
    of the lattice point given ``x_hat`` seen through Gaussian noise of the channel's standard deviation
    ``tau = e^{-a/2}`` (the error of the trivial decoder ``z / sqrt(s)``, an upper bound on a useful
    network's), under a flat prior on the lattice: ``v0 + delta sum_j j w_j / sum_j w_j`` with
    ``w_j = exp(-(r - j delta)^2 / (2 tau^2))``, ``r = x_hat - v0``, v0 the nearest point. It equals hard
    rounding at high SNR (``tau << delta``) and the identity at low SNR (for ``tau > delta`` the correction
    is below ``1e-8 delta`` and is skipped), and is smooth in between.
    """
    low, high = interval
    x_hat = x_hat.clamp(low, high)
    if mode == "none":
        return x_hat
    nearest = low + delta * torch.round((x_hat - low) / delta)
    if mode == "hard":
        return nearest.clamp(low, high)
    if mode != "soft":
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {mode!r}")
    if logsnr is None:
        raise ValueError("round_to_lattice: soft rounding needs the log-SNR of every sample")
    tau = torch.exp(-0.5 * logsnr.to(x_hat.dtype)).reshape((-1,) + (1,) * (x_hat.dim() - 1))
    r = (x_hat - nearest) / delta  # in [-1/2, 1/2]
    inv_two_var = (delta / tau).square() / 2
    num = torch.zeros_like(x_hat)
    den = torch.ones_like(x_hat)  # j = 0 term
    for j in range(1, 9):  # |j| > 8 has weight < exp(-28) relative to j = 0 while tau <= delta
        for sj in (j, -j):
            # exponent <= 0 since |r| <= 1/2; floored at -600 to keep exp() away from slow denormals
            w = torch.exp(((2 * r * sj - sj * sj) * inv_two_var).clamp_min(-600.0))
            num = num + sj * w
            den = den + w
    soft = (nearest + delta * num / den).clamp(low, high)
    return torch.where(tau > delta, x_hat, soft)


# ----------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------


@dataclass
class ITEstimate:
    """Per-image IT estimates in nats (float64, ``[B]``) and the curves behind them.

    ``discrete`` includes ``discrete_left_tail`` and ``discrete_right_tail`` (ITD's table reports
    ``discrete - tails``). ``dequantized`` already includes ``d ln(1/delta)``: it is a discrete NLL.
    Curves are ``[B, K]``: ``logsnr``, ``log_q`` (log proposal density), ``mmse`` (network, eps units),
    ``mmse_rounded`` (the rounded x_hat), ``mmse_dequantized`` (second pass), ``gaussian_mmse`` (the
    reference's decoder at each image, exact), ``gaussian_errors`` (with ``control_variate``: the reference
    decoder's sampled errors on the same noise; ``gaussian_errors_dequantized`` on the dequantized images).
    ``network_evals``: denoiser calls per image.
    """

    continuous: Tensor
    continuous_stderr: Tensor
    logsnr: Tensor
    log_q: Tensor
    mmse: Tensor
    gaussian_mmse: Tensor
    network_evals: int
    discrete: Tensor | None = None
    discrete_stderr: Tensor | None = None
    discrete_left_tail: Tensor | None = None
    discrete_right_tail: float | None = None
    mmse_rounded: Tensor | None = None
    dequantized: Tensor | None = None
    dequantized_stderr: Tensor | None = None
    mmse_dequantized: Tensor | None = None
    gaussian_errors: Tensor | None = None
    gaussian_errors_dequantized: Tensor | None = None


def _seeds(num: int, image_seeds, generator: torch.Generator | None) -> list[int]:
    if image_seeds is None:
        return torch.randint(0, 2**62, (num,), generator=generator).tolist()
    seeds = [int(s) for s in torch.as_tensor(image_seeds).reshape(-1).tolist()]
    if len(seeds) != num:
        raise ValueError(f"image_seeds has {len(seeds)} entries for {num} images")
    return seeds


def image_draws(seed: int, proposal: LogSNRProposal, npoints: int, sampling: str,
                shape) -> tuple[Tensor, Tensor, int]:
    """What :func:`it_nll` draws for the image seeded with ``seed``, in this order from one generator: its
    ``npoints`` log-SNR points (``proposal.points``, float64 ``[K]``), its dequantisation noise U ~ [0, 1)
    (float64, one image's ``shape``) and the seed of its channel noise. Stored curves can be checked against
    it (the ensemble's reuse of its members' curves does)."""
    gen = torch.Generator().manual_seed(seed)
    points = proposal.points(npoints, sampling, gen)
    uniform = torch.rand(tuple(shape), dtype=torch.float64, generator=gen)
    return points, uniform, int(torch.randint(0, 2**62, (1,), generator=gen))


class _CurveEvaluator:
    """Runs the denoiser on (image, log-SNR point) pairs, ``batch_size`` inputs per call, and records for
    every pair the eps-unit errors of the decoders derived from the one prediction.

    ``passes``: ``[(images [B, *shape], error_fn)]``; ``error_fn(x, z, logsnr, eps, eps_hat)`` returns
    ``{curve name: errors [n]}``. Every pass sees the same points and noise."""

    def __init__(self, denoiser: Denoiser, dtype: torch.dtype, batch_size: int, passes: list,
                 num_images: int, npoints: int):
        if batch_size < 1:
            raise ValueError(f"it_nll: batch_size must be positive, got {batch_size}")
        self.denoiser, self.dtype, self.batch_size, self.passes = denoiser, dtype, batch_size, passes
        self.shape = (num_images, npoints)
        self.curves: dict[str, Tensor] = {}
        self.pending: list[tuple[int, int, int, Tensor, Tensor]] = []
        self.filled = 0

    def add(self, b: int, logsnr: Tensor, eps: Tensor):
        """Queue image b's points (float64 ``[K]``) and noise (``[K, *shape]``)."""
        k = 0
        while k < logsnr.shape[0]:
            take = min(logsnr.shape[0] - k, self.batch_size - self.filled)
            self.pending.append((b, k, k + take, logsnr[k:k + take], eps[k:k + take]))
            self.filled += take
            k += take
            if self.filled == self.batch_size:
                self.flush()

    @torch.no_grad()
    def flush(self):
        if not self.pending:
            return
        for images, error_fn in self.passes:
            device = images.device
            logsnr = torch.cat([p[3] for p in self.pending]).to(device)
            eps = torch.cat([p[4] for p in self.pending]).to(device)
            rows = torch.cat([torch.full((p[2] - p[1],), p[0], dtype=torch.long) for p in self.pending])
            x = images[rows.to(device)]
            z = noisy_channel(x, logsnr, eps)
            eps_hat = self.denoiser(z.to(self.dtype), logsnr.to(self.dtype)).to(torch.float64)
            if eps_hat.shape != z.shape:
                raise ValueError(f"it_nll: the denoiser returned shape {tuple(eps_hat.shape)} for inputs "
                                 f"{tuple(z.shape)}; it must predict eps shaped like z")
            for name, values in error_fn(x, z, logsnr, eps, eps_hat).items():
                curve = self.curves.setdefault(name, torch.full(self.shape, math.nan, dtype=torch.float64))
                values, start = values.cpu(), 0
                for b, k0, k1, _, _ in self.pending:
                    curve[b, k0:k1] = values[start:start + k1 - k0]
                    start += k1 - k0
        self.pending, self.filled = [], 0


def _error_fn(interval: tuple[float, float] | None, delta: float | None, rounding: str, prefix: str,
              reference: GaussianReference | None = None):
    """Errors (eps units) of the raw and, for discrete data, the rounded x_hat of one prediction; with a
    ``reference``, also its linear decoder's errors on the same noise (``<prefix>_gaussian``)."""

    def errors(x, z, logsnr, eps, eps_hat):
        out = {}
        if reference is not None:
            out[prefix + "_gaussian"] = reference.decoder_errors(x, logsnr, eps).to(x.device)
        if interval is None:
            out[prefix] = (eps - eps_hat).flatten(1).square().sum(1)
            return out
        x_hat = x_from_eps(z, logsnr, eps_hat)
        snr = logsnr.exp()
        out[prefix] = snr * (x - x_hat.clamp(*interval)).flatten(1).square().sum(1)
        if delta is not None and rounding != "none":
            rounded = round_to_lattice(x_hat, delta, interval, rounding, logsnr)
            out[prefix + "_rounded"] = snr * (x - rounded).flatten(1).square().sum(1)
        return out

    return errors


def it_nll(denoiser: Denoiser, x: Tensor, reference: GaussianReference, *, npoints: int,
           delta: float | None = None, xinterval: tuple[float, float] | None = None, rounding: str = "soft",
           dequantize: bool = False, clamp: bool = True, logsnr_sampling: str = "stratified",
           proposal: LogSNRProposal | None = None, image_seeds=None, generator: torch.Generator | None = None,
           batch_size: int = 256, control_variate: bool = False) -> ITEstimate:
    """Information-theoretic NLL estimates of the images ``x`` ``[B, *shape]`` under ``denoiser`` (nats).

    For each image, ``npoints`` log-SNRs are drawn from ``proposal`` (default: the reference's truncated
    logistic, :class:`LogSNRProposal`, reaching :func:`resolving_logsnr` when ``delta`` is given) with
    ``logsnr_sampling`` (``stratified``, ``random``, ``grid``), one noise draw per point, and ONE denoiser
    call per (image, point) gives x_hat for every estimate:

    - ``continuous``: :func:`continuous_nll_from_curve` of the raw error curve (x_hat clamped to
      ``xinterval`` if given), the Gaussian decoder as a cross-fitted alternative if ``clamp``.
    - ``discrete`` (``delta`` given; ``xinterval = (low, high)`` is required and fixes the lattice
      ``low + delta k``): :func:`discrete_nll_from_curve` with candidates, unless ``rounding="none"``, the
      rounded x_hat (:func:`round_to_lattice`, ``hard`` or ``soft``; the default decoder) and the raw
      x_hat, chosen per bin by cross-fitting (ITD's ``min(mses, mses_round_xhat)``, unbiased). For the
      exact Bayes denoiser the raw posterior mean already satisfies the pointwise I-MMSE identity
      ``-ln P(x) = 1/2 int mmse(x, a) da`` exactly; rounding it gives another decoder (never better on
      average), so ground truth is checked with ``rounding="none"``. For networks rounding removes the
      non-vanishing high-SNR error of a continuous x_hat and is what makes the integral finite.
    - ``dequantized`` (``dequantize=True``): a second pass on ``x + delta (U - 1/2)`` (same points and
      noise), its continuous estimate plus ``d ln(1/delta)``.

    Standard errors are Monte Carlo errors over log-SNR points and noise for each image (images fixed).
    ``image_seeds`` (one int per image) seeds each image's points, noise and dequantisation noise, so results
    do not depend on batching or sharding (except the cross-fitted choices, which by design look at the
    other images; recompute them on the gathered curves with the ``*_from_curve`` functions). Without it,
    per-image seeds are drawn from ``generator``. ``batch_size``: denoiser inputs per call.

    ``control_variate=True``: the reference's linear decoder, applied to the same z (no network call),
    gives errors g whose mean over the noise at (x, a) is known exactly; ``g - E g`` is a zero-mean control
    variate for the channel noise (``gaussian_errors`` of :func:`continuous_nll_from_curve` and
    :func:`discrete_nll_from_curve`). Same expectation, smaller standard error where the network's errors
    follow the linear decoder's (see ``scripts/bench_estimator_efficiency.py``); costs a ``d x d``
    product per point.
    """
    if npoints < 2:
        raise ValueError(f"it_nll: npoints must be at least 2 (for a standard error), got {npoints}")
    if logsnr_sampling not in SAMPLING_MODES:
        raise ValueError(f"it_nll: logsnr_sampling must be one of {SAMPLING_MODES}, got {logsnr_sampling!r}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"it_nll: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if x.dim() < 2 or x[0].numel() != reference.dim:
        raise ValueError(f"it_nll: images of shape {tuple(x.shape)} do not match the reference "
                         f"(one sample has shape {reference.shape}); pass x as [B, *shape]")
    if delta is not None and not delta > 0:
        raise ValueError(f"it_nll: delta must be positive, got {delta}")
    if delta is not None and xinterval is None:
        raise ValueError("it_nll: discrete estimates need xinterval=(low, high); "
                         "the lattice is low + delta * k")
    if dequantize and delta is None:
        raise ValueError("it_nll: dequantize=True needs delta (the bin width of the uniform noise)")
    proposal = proposal or LogSNRProposal.from_reference(reference, delta=delta)
    num = x.shape[0]
    images = x.detach().to(torch.float64)
    interval = None if xinterval is None else (float(xinterval[0]), float(xinterval[1]))

    # The channel noise is drawn only when an image is queued (memory: one image's [K, *shape] noise).
    logsnr = torch.empty(num, npoints, dtype=torch.float64)
    uniform = torch.empty_like(images, device="cpu")
    noise_seeds = []
    for b, seed in enumerate(_seeds(num, image_seeds, generator)):
        logsnr[b], uniform[b], noise_seed = image_draws(seed, proposal, npoints, logsnr_sampling, x.shape[1:])
        noise_seeds.append(noise_seed)

    cv_reference = reference if control_variate else None
    passes = [(images, _error_fn(interval, delta, rounding, "mmse", cv_reference))]
    x_deq = None
    if dequantize:
        x_deq = images + delta * (uniform.to(images.device) - 0.5)
        wide = None if interval is None else (interval[0] - delta / 2, interval[1] + delta / 2)
        passes.append((x_deq, _error_fn(wide, None, "none", "mmse_dequantized", cv_reference)))
    evaluator = _CurveEvaluator(denoiser, x.dtype, batch_size, passes, num, npoints)
    for b in range(num):
        noise = torch.Generator().manual_seed(noise_seeds[b])
        evaluator.add(b, logsnr[b], torch.randn((npoints,) + tuple(x.shape[1:]), dtype=torch.float64,
                                                generator=noise))
    evaluator.flush()

    # Post-processing on the reference's device; results come back on the CPU.
    dev = reference.mean.device
    curves = {name: c.to(dev) for name, c in evaluator.curves.items()}
    images, logsnr = images.to(dev), logsnr.to(dev)
    x_deq = None if x_deq is None else x_deq.to(dev)
    log_q = proposal.log_prob(logsnr)
    gaussian = reference.pointwise_mmse(images, logsnr)
    common = dict(proposal=proposal, sampling=logsnr_sampling)
    cont = continuous_nll_from_curve(curves["mmse"], logsnr, log_q, reference, clamp, x=images,
                                     gaussian_mmse=gaussian, gaussian_errors=curves.get("mmse_gaussian"),
                                     **common)
    est = ITEstimate(continuous=cont.nll, continuous_stderr=cont.stderr, logsnr=logsnr, log_q=log_q,
                     mmse=curves["mmse"], gaussian_mmse=gaussian, network_evals=npoints * len(passes),
                     gaussian_errors=curves.get("mmse_gaussian"))
    if delta is not None:
        est.mmse_rounded = curves.get("mmse_rounded")
        cands = torch.stack(([est.mmse_rounded] if est.mmse_rounded is not None else []) + [curves["mmse"]])
        disc = discrete_nll_from_curve(cands, logsnr, log_q, reference, delta, clamp, x=images,
                                       gaussian_mmse=gaussian, gaussian_errors=est.gaussian_errors, **common)
        est.discrete, est.discrete_stderr = disc.nll, disc.stderr
        est.discrete_left_tail = left_tail(reference, images, proposal.bounds[0])
        est.discrete_right_tail = right_tail_bound(reference.dim, delta, proposal.bounds[1])
        if est.discrete_right_tail > RIGHT_TAIL_WARN_NATS_PER_DIM * reference.dim:
            resolved = resolving_logsnr(delta)
            warnings.warn(f"it_nll: the discrete right-tail bound is {est.discrete_right_tail:.3g} nats "
                          f"({est.discrete_right_tail / reference.dim:.2e} per dim): the log-SNR proposal "
                          f"ends at {proposal.bounds[1]:.2f}, short of {resolved:.1f} where the lattice is "
                          "resolved; raise the proposal's upper end, e.g. "
                          "LogSNRProposal.from_reference(reference, delta=delta)",
                          stacklevel=2)
    if dequantize:
        est.mmse_dequantized = curves["mmse_dequantized"]
        est.gaussian_errors_dequantized = curves.get("mmse_dequantized_gaussian")
        deq = continuous_nll_from_curve(est.mmse_dequantized, logsnr, log_q, reference, clamp, x=x_deq,
                                        gaussian_errors=est.gaussian_errors_dequantized, **common)
        est.dequantized = deq.nll + reference.dim * math.log(1.0 / delta)
        est.dequantized_stderr = deq.stderr
    for f in dataclasses.fields(est):
        value = getattr(est, f.name)
        if isinstance(value, Tensor):
            setattr(est, f.name, value.cpu())
    return est


def it_loss(denoiser: Denoiser, x: Tensor, reference: GaussianReference,
            generator: torch.Generator | None = None, proposal: LogSNRProposal | None = None,
            image_seeds=None) -> Tensor:
    """Training loss: the continuous estimate with ONE random log-SNR per image, no clamp ``[B]`` (nats).

    ``h_G + 1/2 (||eps - eps_hat||^2 - mmse_G(a)) / q(a)`` + the closed-form tails: an unbiased single-sample
    estimate of the unclamped continuous estimate of :func:`it_nll`, differentiable in the denoiser.
    The log-SNRs and noise come from ``generator``, or with ``image_seeds`` (one int per image) image i's
    from a generator seeded with ``image_seeds[i]``, so an image's loss does not depend on its batch.
    """
    proposal = proposal or LogSNRProposal.from_reference(reference)
    num = x.shape[0]
    if image_seeds is None:
        logsnr = proposal.points(num, "random", generator)
        eps = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    else:
        gens = [torch.Generator().manual_seed(s) for s in _seeds(num, image_seeds, None)]
        logsnr = torch.cat([proposal.points(1, "random", g) for g in gens])
        eps = torch.stack([torch.randn(x.shape[1:], dtype=torch.float64, generator=g) for g in gens])
    logsnr, eps = logsnr.to(x.device), eps.to(x.device)
    z = noisy_channel(x.detach().to(torch.float64), logsnr, eps)
    eps_hat = denoiser(z.to(x.dtype), logsnr.to(x.dtype))
    mse = (eps - eps_hat.to(torch.float64)).flatten(1).square().sum(1)
    log_q = proposal.log_prob(logsnr)[:, None]
    curve = continuous_nll_from_curve(mse[:, None], logsnr[:, None], log_q, reference.to(x.device),
                                      clamp=False, x=x.detach(), proposal=proposal, sampling="random")
    return curve.nll
