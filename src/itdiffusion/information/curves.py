"""The network work of the IT estimate: error curves per image (eps units), nothing estimated yet.

For each image, ``K`` log-SNR points and their channel noise come from the image's own seed
(:func:`image_draws`), so curves do not depend on batching, sharding or process count. ONE denoiser call per
(image, point) serves every decoder derived from the prediction: x_hat clamped to the data interval, x_hat
rounded to the pixel lattice, and (on the dequantized image, a second pass with the same points and noise)
the continuous error there. The reference's linear decoder runs on the same noisy inputs without a network
call (the control variate), and the per-image constants the estimate needs from the images (the Gaussian
decoder's exact error and the closed-form tails) are computed here, batch by batch, so that
:func:`itdiffusion.information.estimate.estimate` is pure post-processing on ``[B, K]`` arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itdiffusion.denoisers import Denoiser, noisy_channel, x_from_eps
from itdiffusion.information.bounds import continuous_tails, left_tail
from itdiffusion.information.proposal import SAMPLING_MODES, LogSNRProposal, itd_range
from itdiffusion.information.reference import GaussianReference

ROUNDING_MODES = ("soft", "hard", "none")
MODEL_FIELDS = ("mmse", "mmse_rounded", "mmse_dequantized")  # [M, B, K]: one row per model


@dataclass
class Curves:
    """Error curves of M models on B images at K log-SNR points each, plus the per-image constants of the
    Gaussian reference: everything :func:`~itdiffusion.information.estimate.estimate` reads (float64, CPU).

    - ``logsnr`` ``[B, K]``: each image's points, drawn from ``proposal`` with ``sampling``.
    - ``mmse`` ``[M, B, K]``: ``||eps - eps_hat||^2`` of each model (x_hat clamped to the data interval if
      one was given); ``mmse_rounded`` with x_hat rounded to the lattice; ``mmse_dequantized`` on the
      dequantized image (same points and noise).
    - ``gaussian_mmse`` ``[B, K]``: the expected error of the reference's linear decoder at the image
      (exact, :meth:`GaussianReference.pointwise_mmse`): the clamp's alternative decoder.
    - ``gaussian_errors`` ``[B, K]``: that decoder's error on the same noise (control variate), or None.
    - ``continuous_tail`` ``[B]``: the continuous integral outside the sampled range (closed form,
      :func:`continuous_tails`); ``discrete_left_tail`` ``[B]``: the discrete one below it
      (:func:`left_tail`).
    - ``gaussian_nll`` ``[B]``: the reference's exact ``-ln N(x; mu, Sigma)`` at each image
      (:meth:`GaussianReference.nll`, nats): what the continuous estimate would be with the Gaussian decoder
      at every log-SNR, for figures and checks.
    - ``continuous_tail_itd`` ``[B]``: the continuous integral outside ITD's range (:func:`itd_range`
      intersected with the sampled one), for the estimate restricted to ITD's range.
    - ``*_dequantized``: the same at the dequantized image.
    - ``network_evals``: denoiser calls per image and model; ``proposal``, ``sampling``: how the points were
      drawn; ``delta``: the lattice spacing (None: continuous data, no discrete or dequantized curves).
    """

    logsnr: Tensor
    mmse: Tensor
    gaussian_mmse: Tensor
    continuous_tail: Tensor
    proposal: LogSNRProposal
    sampling: str
    network_evals: int
    delta: float | None = None
    mmse_rounded: Tensor | None = None
    mmse_dequantized: Tensor | None = None
    gaussian_errors: Tensor | None = None
    discrete_left_tail: Tensor | None = None
    gaussian_mmse_dequantized: Tensor | None = None
    gaussian_errors_dequantized: Tensor | None = None
    continuous_tail_dequantized: Tensor | None = None
    continuous_tail_itd: Tensor | None = None
    gaussian_nll: Tensor | None = None

    @property
    def num_models(self) -> int:
        return self.mmse.shape[0]

    @property
    def num_images(self) -> int:
        return self.logsnr.shape[0]

    @property
    def num_points(self) -> int:
        return self.logsnr.shape[1]

    @property
    def log_q(self) -> Tensor:
        """``ln q(a)`` of every point under the proposal ``[B, K]``."""
        return self.proposal.log_prob(self.logsnr)

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def models(self, index: Sequence[int]) -> Curves:
        """The curves of the models ``index`` (one: a single model; several: their ensemble)."""
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return dataclasses.replace(self, **{k: v[rows] for k, v in self.tensors().items()
                                            if k in MODEL_FIELDS})

    def images(self, rows) -> Curves:
        """The curves of some images (``rows``: a slice, indices or a boolean mask)."""
        return dataclasses.replace(self, **{k: v[:, rows] if k in MODEL_FIELDS else v[rows]
                                            for k, v in self.tensors().items()})

    @staticmethod
    def cat(parts: Sequence[Curves]) -> Curves:
        """Concatenate the images of curves drawn with the same settings."""
        first = parts[0]
        return dataclasses.replace(first, **{
            k: torch.cat([p.tensors()[k] for p in parts], dim=1 if k in MODEL_FIELDS else 0)
            for k in first.tensors()})

    def first_points(self, k: int) -> Curves:
        """The first ``k`` points of every image (the first block of a topped-up draw)."""
        return dataclasses.replace(self, network_evals=self.network_evals * k // self.num_points,
                                   **{n: v[..., :k] for n, v in self.tensors().items() if v.dim() >= 2})

    @staticmethod
    def cat_points(parts: Sequence[Curves]) -> Curves:
        """The points of several draws for the same images and models, one after the other (``[B, sum K]``;
        the per-image constants ``[B]`` must agree: the draws share the images and the dequantization
        noise, see ``uniform_seeds`` of :func:`sample_curves`)."""
        first = parts[0]
        out = {}
        for k, v in first.tensors().items():
            if v.dim() == 1:
                if any(not torch.equal(p.tensors()[k], v) for p in parts[1:]):
                    raise ValueError(f"Curves.cat_points: the draws' {k} differ (other images or "
                                     "dequantization noise)")
                out[k] = v
            else:
                out[k] = torch.cat([p.tensors()[k] for p in parts], dim=-1)
        return dataclasses.replace(first, network_evals=sum(p.network_evals for p in parts), **out)

    @staticmethod
    def stack(members: Sequence[Curves]) -> Curves:
        """The models of several curves of the same images, points and noise, as one (an ensemble)."""
        first = members[0]
        for other in members[1:]:
            if not torch.equal(other.logsnr, first.logsnr):
                raise ValueError("Curves.stack: the models were evaluated at different log-SNR points")
            if set(other.tensors()) != set(first.tensors()):
                raise ValueError("Curves.stack: the models' curves were sampled with different settings")
        return dataclasses.replace(first, **{k: torch.cat([m.tensors()[k] for m in members])
                                             for k in first.tensors() if k in MODEL_FIELDS})

    def to(self, device) -> Curves:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def image_draws(seed: int, proposal: LogSNRProposal, npoints: int, sampling: str,
                shape) -> tuple[Tensor, Tensor, int]:
    """What the image seeded with ``seed`` draws, in this order from one generator: its ``npoints`` log-SNR
    points (``proposal.points``, float64 ``[K]``), its dequantisation noise U ~ [0, 1) (float64, one image's
    ``shape``) and the seed of its channel noise. Stored curves can be checked against it."""
    gen = torch.Generator().manual_seed(seed)
    points = proposal.points(npoints, sampling, gen)
    uniform = torch.rand(tuple(shape), dtype=torch.float64, generator=gen)
    return points, uniform, int(torch.randint(0, 2**62, (1,), generator=gen))


def draw_seeds(num: int, image_seeds=None, generator: torch.Generator | None = None) -> list[int]:
    """One seed per image: ``image_seeds`` as given (checked), else drawn from ``generator``."""
    if image_seeds is None:
        return torch.randint(0, 2**62, (num,), generator=generator).tolist()
    seeds = [int(s) for s in torch.as_tensor(image_seeds).reshape(-1).tolist()]
    if len(seeds) != num:
        raise ValueError(f"image_seeds has {len(seeds)} entries for {num} images")
    return seeds


def sample_curves(denoisers: Denoiser | Sequence[Denoiser], x: Tensor, reference: GaussianReference, *,
                  npoints: int, seeds: Sequence[int], proposal: LogSNRProposal | None = None,
                  sampling: str = "stratified", delta: float | None = None,
                  xinterval: tuple[float, float] | None = None, rounding: str = "soft",
                  dequantize: bool = False, control_variate: bool = False,
                  batch_size: int = 256, uniform_seeds: Sequence[int] | None = None) -> Curves:
    """The error curves of one or several models on the images ``x`` ``[B, *shape]`` (see :class:`Curves`).

    Every model sees the same points and noise: image b's come from ``seeds[b]`` (:func:`image_draws`).
    ``proposal``: where the points come from (default: the reference's, reaching :func:`resolving_logsnr`
    when ``delta`` is given). ``delta`` with ``xinterval = (low, high)``: data on the lattice
    ``low + delta k``; then x_hat is clamped to the interval and, unless ``rounding="none"``, also rounded
    (:func:`round_to_lattice`, ``hard`` or ``soft``). ``dequantize``: a second pass at
    ``x + delta (U - 1/2)``, U from the image's seed. ``control_variate``: the reference decoder's errors on
    the same noise (no network call, a ``d x d`` product per point). ``batch_size``: denoiser inputs per call.
    ``uniform_seeds``: the seeds whose :func:`image_draws` (at the same ``npoints``) give the dequantization
    noise, when they are not ``seeds`` (further draws of the same dequantized images: the dataset budget's
    top-up blocks, concatenated with :meth:`Curves.cat_points`).
    Time is linear in images x points; memory is ``O(B K + batch_size d)`` besides ``x``.
    """
    denoisers = list(denoisers) if isinstance(denoisers, Sequence) else [denoisers]
    proposal = proposal or LogSNRProposal.from_reference(reference, delta=delta)
    check_arguments(x, reference, npoints, sampling, rounding, delta, xinterval, dequantize, batch_size)
    num, shape = x.shape[0], tuple(x.shape[1:])
    images = x.detach().to(torch.float64)
    interval = None if xinterval is None else (float(xinterval[0]), float(xinterval[1]))
    seeds = draw_seeds(num, seeds)

    logsnr = torch.empty(num, npoints, dtype=torch.float64)
    uniform = torch.empty((num,) + shape, dtype=torch.float64) if dequantize else None
    noise_seeds = []
    for b, seed in enumerate(seeds):
        logsnr[b], u, noise_seed = image_draws(seed, proposal, npoints, sampling, shape)
        noise_seeds.append(noise_seed)
        if uniform is not None:
            uniform[b] = u
    if uniform is not None and uniform_seeds is not None:
        for b, seed in enumerate(draw_seeds(num, uniform_seeds)):
            uniform[b] = image_draws(seed, proposal, npoints, sampling, shape)[1]

    cv_reference = reference if control_variate else None
    passes = [_Pass(images, "", _network_errors(interval, delta, rounding), cv_reference)]
    x_deq = None
    if dequantize:
        x_deq = images + delta * (uniform.to(images.device) - 0.5)
        wide = None if interval is None else (interval[0] - delta / 2, interval[1] + delta / 2)
        passes.append(_Pass(x_deq, "_dequantized", _network_errors(wide, None, "none"), cv_reference))
    sampler = _CurveSampler(denoisers, x.dtype, batch_size, passes, num, npoints)
    for b in range(num):  # the channel noise is drawn when an image is queued: one image's [K, *shape]
        noise = torch.Generator().manual_seed(noise_seeds[b])
        sampler.add(b, logsnr[b], torch.randn((npoints,) + shape, dtype=torch.float64, generator=noise))
    sampler.flush()

    curves = Curves(logsnr=logsnr, proposal=proposal, sampling=sampling, delta=delta,
                    network_evals=npoints * len(passes),
                    **sampler.curves, **_gaussian_constants(reference, images, logsnr, proposal, "", delta))
    if x_deq is not None:
        for k, v in _gaussian_constants(reference, x_deq, logsnr, proposal, "_dequantized", None).items():
            setattr(curves, k, v)
    return curves


def check_arguments(x, reference, npoints, sampling, rounding, delta, xinterval, dequantize, batch_size):
    if npoints < 2:
        raise ValueError(f"it_nll: npoints must be at least 2 (for a standard error), got {npoints}")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"it_nll: logsnr_sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
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
    if batch_size < 1:
        raise ValueError(f"it_nll: batch_size must be positive, got {batch_size}")


def _gaussian_constants(reference: GaussianReference, x: Tensor, logsnr: Tensor, proposal: LogSNRProposal,
                        suffix: str, delta: float | None, chunk: int = 256) -> dict[str, Tensor]:
    """The reference's per-image quantities at the images ``x``, ``chunk`` images at a time (CPU float64)."""
    out: dict[str, list[Tensor]] = {"gaussian_mmse" + suffix: [], "continuous_tail" + suffix: []}
    if delta is not None:
        out["discrete_left_tail"] = []
    for rows in torch.arange(x.shape[0]).split(chunk):
        xs, a = x[rows].to(reference.mean.device), logsnr[rows]
        out["gaussian_mmse" + suffix].append(reference.pointwise_mmse(xs, a).cpu())
        out["continuous_tail" + suffix].append(continuous_tails(reference, xs, proposal.bounds).cpu())
        if not suffix:
            out.setdefault("gaussian_nll", []).append(reference.nll(xs).cpu())
            out.setdefault("continuous_tail_itd", []).append(
                continuous_tails(reference, xs, itd_range(reference, proposal.bounds)).cpu())
        if delta is not None:
            out["discrete_left_tail"].append(left_tail(reference, xs, proposal.bounds[0]).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class _Pass:
    images: Tensor  # [B, *shape] float64
    suffix: str  # curve names: "mmse" + suffix, ...
    errors: object  # (x, z, logsnr, eps, eps_hat) -> {name: [n]}
    reference: GaussianReference | None  # with a control variate: the reference decoder on the same noise


def _network_errors(interval: tuple[float, float] | None, delta: float | None, rounding: str):
    """Errors (eps units) of the raw and, for discrete data, the rounded x_hat of one prediction."""

    def errors(x, z, logsnr, eps, eps_hat):
        if interval is None:
            return {"mmse": (eps - eps_hat).flatten(1).square().sum(1)}
        x_hat = x_from_eps(z, logsnr, eps_hat)
        snr = logsnr.exp()
        out = {"mmse": snr * (x - x_hat.clamp(*interval)).flatten(1).square().sum(1)}
        if delta is not None and rounding != "none":
            rounded = round_to_lattice(x_hat, delta, interval, rounding, logsnr)
            out["mmse_rounded"] = snr * (x - rounded).flatten(1).square().sum(1)
        return out

    return errors


class _CurveSampler:
    """Runs the denoisers on (image, log-SNR point) pairs, ``batch_size`` inputs per call, and writes every
    pair's errors into preallocated ``[M, B, K]`` curves (time linear in the number of pairs)."""

    def __init__(self, denoisers: list, dtype: torch.dtype, batch_size: int, passes: list[_Pass],
                 num_images: int, npoints: int):
        self.denoisers, self.dtype, self.batch_size, self.passes = denoisers, dtype, batch_size, passes
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

    def _store(self, name: str, model: int | None, values: Tensor) -> None:
        if name not in self.curves:
            lead = (len(self.denoisers),) if model is not None else ()
            self.curves[name] = torch.full(lead + self.shape, math.nan, dtype=torch.float64)
        curve = self.curves[name] if model is None else self.curves[name][model]
        values, start = values.cpu(), 0
        for b, k0, k1, _, _ in self.pending:
            curve[b, k0:k1] = values[start:start + k1 - k0]
            start += k1 - k0

    @torch.no_grad()
    def flush(self):
        if not self.pending:
            return
        for p in self.passes:
            device = p.images.device
            logsnr = torch.cat([q[3] for q in self.pending]).to(device)
            eps = torch.cat([q[4] for q in self.pending]).to(device)
            rows = torch.cat([torch.full((q[2] - q[1],), q[0], dtype=torch.long) for q in self.pending])
            x = p.images[rows.to(device)]
            z = noisy_channel(x, logsnr, eps)
            if p.reference is not None:
                self._store("gaussian_errors" + p.suffix, None, p.reference.decoder_errors(x, logsnr, eps))
            for m, denoiser in enumerate(self.denoisers):
                eps_hat = denoiser(z.to(self.dtype), logsnr.to(self.dtype)).to(torch.float64)
                if eps_hat.shape != z.shape:
                    raise ValueError(f"it_nll: the denoiser returned shape {tuple(eps_hat.shape)} for inputs "
                                     f"{tuple(z.shape)}; it must predict eps shaped like z")
                for name, values in p.errors(x, z, logsnr, eps, eps_hat).items():
                    self._store(name + p.suffix, m, values)
        self.pending, self.filled = [], 0


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

