"""Gradient signal-to-noise ratio (Rainforth et al. 2018) of the estimators in :mod:`iwae.estimators`.

Shapes: a fixed minibatch ``x`` is ``[batch, x_dim]``; each estimator draws k samples (log-weights ``[k, batch]``)
and returns one gradient of the loss ``-mean(surrogate)``.

Over R repeated draws at fixed parameters, the per-parameter SNR is ``|mean| / std`` (R - 1 degrees of freedom);
parameters whose gradient is exactly zero in every repeat (say, first-layer weights of pixels that are 0 in the
whole minibatch) have no SNR and are left out. The summary per (estimator, part, K) is the median SNR over
parameters; its log-log slope against K is fitted by ordinary least squares, with a 95% Student-t interval
(n_K - 2 degrees of freedom) that reflects how well a line fits the medians, not their Monte Carlo noise. The target
is IWAE_K unless another objective is given; any model that follows :class:`iwae.protocol.Model` can be studied. A
true SNR of 0 is estimated as about ``sqrt(2/pi) / sqrt(R)`` (:func:`snr_floor`). The median effective sample size
``ESS = 1 / sum_i w~_i^2`` per K and its slope are reported too: Rainforth et al.'s asymptotic slopes (+1/2 decoder,
-1/2 standard encoder; DReG's encoder positive) need ESS to grow like K; where it grows like K^s, the decoder's SNR
grows roughly like K^(s/2).

:func:`run_adaptive_study` (``iwae snr --model rainforth``) is the floor-aware variant for models that follow
:class:`iwae.protocol.NoiseModel`, vectorised over repeats (:func:`noise_gradients`). Repeats grow per (estimator, K)
until the smaller part's median SNR ``s`` has relative error ``1 / (s sqrt(R)) <= rel_error``, or ``R K batch``
reaches ``max_samples`` (:func:`adaptive_gradient_blocks`). Each slope is fitted over the Ks whose median exceeds
``floor_factor * snr_floor(R)`` (:func:`clear_of_floor`), with the t-interval and a bootstrap interval over repeats
(64 blocks of running sums per (estimator, K), resampled with replacement; 2.5% and 97.5% percentiles), which
measures the Monte Carlo noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm import tqdm

from iwae import bounds
from iwae.checkpoint import atomic_save_figure, atomic_write_text
from iwae.estimators import ESTIMATOR_NAMES, estimate, stops_q_params, surrogate_gradients, terms_from_sample
from iwae.objectives import IWAE, Objective
from iwae.protocol import Model, NoiseModel, SampleWithNoise

PARTS = ("encoder", "decoder")
DEFAULT_KS = (1, 3, 10, 30, 100, 300, 1000)


@dataclass
class GradientMoments:
    """Running per-parameter sums of a gradient and its square (flattened, float64)."""

    total: Tensor
    total_sq: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, size: int) -> GradientMoments:
        return cls(torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64))

    def add(self, grads: list[Tensor]) -> None:
        flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float64) for g in grads])
        self.total += flat
        self.total_sq += flat * flat
        self.count += 1

    def snr(self) -> Tensor:
        """``|mean| / std`` per parameter with a nonzero std (1-D, float64)."""
        if self.count < 2:
            raise ValueError("the SNR needs at least 2 repeats")
        mean = self.total / self.count
        variance = (self.total_sq - self.count * mean * mean).clamp_min(0.0) / (self.count - 1)
        std = variance.sqrt()
        # Exactly-zero gradients leave float64 round-off of order 1e-300 at most; anything above has a real spread.
        valid = std > 1e-30 * (1.0 + mean.abs())
        return mean[valid].abs() / std[valid]


def gradient_snr(
    model: nn.Module,
    x: Tensor,
    k: int,
    estimator: str,
    repeats: int,
    generator: torch.Generator,
    objective: Objective | None = None,
) -> dict[str, Tensor]:
    """Per-parameter SNR of the encoder's and the decoder's gradient over ``repeats`` estimates at k samples."""
    objective = objective or IWAE()
    encoder_params, decoder_params = list(model.encoder_parameters()), list(model.decoder_parameters())
    moments = {
        "encoder": GradientMoments.zeros(sum(p.numel() for p in encoder_params)),
        "decoder": GradientMoments.zeros(sum(p.numel() for p in decoder_params)),
    }
    for _ in range(repeats):
        encoder_grads, decoder_grads = _gradients(
            model, x, k, generator, objective, estimator, encoder_params, decoder_params
        )
        moments["encoder"].add(encoder_grads)
        moments["decoder"].add(decoder_grads)
    return {part: moments[part].snr() for part in PARTS}


def _gradients(
    model: Model,
    x: Tensor,
    k: int,
    generator: torch.Generator,
    objective: Objective,
    estimator: str,
    encoder_params: list[nn.Parameter],
    decoder_params: list[nn.Parameter],
) -> tuple[list[Tensor], list[Tensor]]:
    """One estimate's encoder and decoder gradients, by autograd over the reference path (any model that follows
    :class:`iwae.protocol.Model`)."""
    terms = estimate(model, x, k, generator, objective, estimator)
    return surrogate_gradients(terms, encoder_params, decoder_params)


@torch.no_grad()
def effective_sample_size(model: nn.Module, x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``1 / sum_i w~_i^2`` of k importance weights per example of ``x``: ``[batch]`` (1 <= ESS <= k)."""
    normalized_weights = bounds.normalized_weights(model(x, k, generator).log_w.double())  # [k, batch]
    return 1.0 / normalized_weights.square().sum(dim=0)


def loglog_slope(ks: list[int], values: list[float]) -> dict[str, float]:
    """OLS slope of log(value) on log(K), its standard error and 95% Student-t interval."""
    from scipy import stats

    log_k, log_v = np.log(np.asarray(ks, dtype=float)), np.log(np.asarray(values, dtype=float))
    n = len(log_k)
    if n < 2:
        raise ValueError("a slope needs at least two values of K; pass more in --ks")
    slope, intercept = np.polyfit(log_k, log_v, 1)
    result = {"slope": float(slope), "intercept": float(intercept)}
    if n > 2:
        residuals = log_v - (slope * log_k + intercept)
        stderr = math.sqrt(float(residuals @ residuals) / (n - 2) / float(((log_k - log_k.mean()) ** 2).sum()))
        half = float(stats.t.ppf(0.975, n - 2)) * stderr
        result.update(stderr=stderr, ci95_low=float(slope) - half, ci95_high=float(slope) + half)
    return result


@dataclass
class SNRStudy:
    """Per-parameter SNRs for every (estimator, part, K); see the module docstring."""

    ks: list[int]
    estimators: list[str]
    repeats: int
    batch_size: int
    snr: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)  # estimator -> part -> per K
    ess: list[float] = field(default_factory=list)  # median effective sample size over the minibatch, per K

    def medians(self) -> dict[str, dict[str, list[float]]]:
        return {
            est: {part: [float(np.median(values)) if values.size else math.nan for values in per_k[part]]
                  for part in PARTS}
            for est, per_k in self.snr.items()
        }  # fmt: skip

    def slopes(self) -> dict[str, dict[str, dict[str, float]]]:
        medians = self.medians()
        return {part: {est: loglog_slope(self.ks, medians[est][part]) for est in self.estimators} for part in PARTS}

    def to_dict(self) -> dict:
        fits = self.slopes()
        return {
            "ks": self.ks,
            "estimators": self.estimators,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "snr_floor": snr_floor(self.repeats),
            "slope_method": "OLS of log median SNR on log K; 95% Student-t interval from the OLS standard error",
            "slopes": {part: {est: fit["slope"] for est, fit in fits[part].items()} for part in PARTS},
            "slope_fits": fits,
            "median_snr": self.medians(),
            "median_ess": self.ess,
            "ess_slope": loglog_slope(self.ks, self.ess)["slope"] if len(self.ess) == len(self.ks) > 1 else None,
            "n_parameters": {
                est: {part: [int(v.size) for v in per_k[part]] for part in PARTS} for est, per_k in self.snr.items()
            },
        }


def run_study(
    model: nn.Module,
    x: Tensor,
    ks: list[int],
    estimators: list[str],
    repeats: int,
    seed: int = 0,
    progress: bool = True,
    objective: Objective | None = None,
) -> SNRStudy:
    """SNRs for every estimator and K; each (estimator, K) draws from its own seeded generator."""
    for name in estimators:
        if name not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATOR_NAMES)}")
    if repeats < 2:
        raise ValueError(f"--repeats must be >= 2 for a standard deviation, got {repeats}")
    study = SNRStudy(list(ks), list(estimators), repeats, x.shape[0])
    ess_generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + 1)
    study.ess = [float(effective_sample_size(model, x, k, ess_generator).median()) for k in ks]
    jobs = [(est, i, k) for est in estimators for i, k in enumerate(ks)]
    bar = tqdm(total=sum(k for _, _, k in jobs) * repeats, unit="sample", desc="snr", disable=not progress)
    try:
        for est, i, k in jobs:
            generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + 7919 * i + 31 * k)
            result = gradient_snr(model, x, k, est, repeats, generator, objective)
            per_part = study.snr.setdefault(est, {part: [] for part in PARTS})
            for part in PARTS:
                per_part[part].append(result[part].numpy())
            bar.update(k * repeats)
    finally:
        bar.close()
    return study


def plot_study(study: SNRStudy, path: Path, title: str = "") -> Path:
    """Log-log plot of the median SNR against K (interquartile band), encoder and decoder side by side.

    For an :class:`AdaptiveSNRStudy`: each estimator's floor (dotted, its colour) follows its repeats per K,
    the Ks left out of a fit are hollow, and the fitted line is dashed over the Ks that entered it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = isinstance(study, AdaptiveSNRStudy)
    medians, fits = study.medians(), study.slopes()
    ks = np.asarray(study.ks, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5 if adaptive else 4), constrained_layout=True)
    for ax, part in zip(axes, PARTS, strict=True):
        for est in study.estimators:
            per_k = study.snr[est][part]
            quartiles = np.array([np.quantile(v, [0.25, 0.75]) if v.size else [np.nan] * 2 for v in per_k])
            fit = fits[part][est]
            if not adaptive:
                (line,) = ax.plot(ks, medians[est][part], "o-", label=f"{est} (slope {fit['slope']:+.2f})")
            else:
                (line,) = ax.plot(ks, medians[est][part], "-", label=f"{est} ({_slope_text(fit)})")
                colour = line.get_color()
                fitted = np.isin(study.ks, fit["fit_ks"])
                values = np.asarray(medians[est][part])
                ax.plot(ks[fitted], values[fitted], "o", color=colour)
                ax.plot(ks[~fitted], values[~fitted], "o", mfc="none", color=colour)
                floors = [snr_floor(r) for r in study.repeats_per_k[est]]
                ax.plot(ks, floors, ":", color=colour, lw=1)
                if fit["slope"] is not None:
                    fit_ks = np.asarray(fit["fit_ks"], dtype=float)
                    ax.plot(fit_ks, np.exp(fit["intercept"]) * fit_ks ** fit["slope"], "--", color=colour, lw=1)
            ax.fill_between(ks, quartiles[:, 0], quartiles[:, 1], color=line.get_color(), alpha=0.15)
        if adaptive:
            ax.plot([], [], ":", color="grey", lw=1, label="floor of each K's repeats")
            ax.plot([], [], "o", mfc="none", color="grey", label="left out of the fit")
        else:
            floor = snr_floor(study.repeats)
            ax.axhline(floor, color="grey", ls=":", lw=1, label=f"SNR floor of {study.repeats} repeats")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (samples)")
        ax.set_ylabel("median per-parameter SNR")
        ax.set_title(f"{part}")
        if adaptive:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
        else:
            ax.legend(fontsize=8)
    if adaptive:
        counts = [r for reps in study.repeats_per_k.values() for r in reps]
        default = f"gradient SNR, IWAE_K, {min(counts):,} to {max(counts):,} repeats per K, batch {study.batch_size}"
    else:
        default = f"gradient SNR, IWAE_K, {study.repeats} repeats, batch {study.batch_size}"
    fig.suptitle(title or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(path, fig, dpi=120)
    plt.close(fig)
    return path


def _slope_text(fit: dict) -> str:
    if fit["slope"] is None:
        return "no slope: under 2 Ks clear of the floor"
    low, high = fit.get("bootstrap_ci95_low", fit.get("ci95_low")), fit.get("bootstrap_ci95_high", fit.get("ci95_high"))
    interval = f" [{low:+.2f}, {high:+.2f}]" if low is not None else ""
    return f"slope {fit['slope']:+.2f}{interval}, K {fit['fit_ks'][0]}-{fit['fit_ks'][-1]}"


def write_study(study: SNRStudy, out_dir: Path, meta: dict | None = None) -> dict:
    """Write ``snr.json`` and ``snr.png`` into ``out_dir``; return the JSON object (with their paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**(meta or {}), **study.to_dict()}
    summary["png"] = str(plot_study(study, out_dir / "snr.png"))
    summary["json"] = str(out_dir / "snr.json")
    atomic_write_text(out_dir / "snr.json", json.dumps(summary, indent=2) + "\n")
    return summary


# -- the floor-aware, vectorised study (``iwae snr --model rainforth``) ------------------------------------------

MAX_BLOCKS = 64  # blocks of repeats kept per (estimator, K) for the bootstrap
CHUNK_SAMPLES = 1 << 17  # samples (repeats x k x batch) per vmap call: tens of MB of float64 for D = 20
CHUNK_GRADIENTS = 1 << 21  # and per-repeat gradient values (repeats x parameters) per vmap call: 16 MB
DEFAULT_REL_ERROR = 0.1
DEFAULT_MAX_SAMPLES = 10**8
DEFAULT_FLOOR_FACTOR = 3.0
DEFAULT_BOOTSTRAP = 1000


def snr_floor(repeats: int) -> float:
    """What a true SNR of 0 reads as with ``repeats`` repeats: ``E|mean| / std = sqrt(2 / pi) / sqrt(R)``."""
    return math.sqrt(2 / math.pi) / math.sqrt(repeats)


def clear_of_floor(medians: list[float], repeats: list[int], factor: float = DEFAULT_FLOOR_FACTOR) -> list[bool]:
    """Per K, whether its median SNR stands clear of the floor of its repeats: finite and
    ``> factor * snr_floor(R)``. Only those Ks enter a slope of :func:`run_adaptive_study`."""
    if len(medians) != len(repeats):
        raise ValueError(f"{len(medians)} medians but {len(repeats)} repeat counts")
    return [bool(math.isfinite(m) and m > factor * snr_floor(r)) for m, r in zip(medians, repeats, strict=True)]


def stacked_noise(model: NoiseModel, x: Tensor, k: int, repeats: int, generator: torch.Generator) -> list[Tensor]:
    """``repeats`` independent draws of ``model.draw_noise(x, k)``, stacked first: each ``[repeats, k, batch, ...]``.

    Drawn in one call for ``x`` repeated ``repeats`` times along the batch, so the model's noise must be
    ``[k, batch, ...]`` (samples first, then the batch)."""
    batch = x.shape[0]
    tiled = x.repeat(repeats, *([1] * (x.dim() - 1)))
    stacked = []
    for eps in model.draw_noise(tiled, k, generator):
        if eps.dim() < 2 or eps.shape[1] != repeats * batch:
            raise ValueError(f"expected noise [k, batch, ...] with batch {repeats * batch}, got {tuple(eps.shape)}")
        stacked.append(eps.reshape(eps.shape[0], repeats, batch, *eps.shape[2:]).movedim(1, 0))
    return stacked


def noise_gradients(
    model: NoiseModel, x: Tensor, noise: list[Tensor], objective: Objective, estimator: str
) -> tuple[Tensor, Tensor]:
    """Per-repeat loss gradients for stacked noise (each tensor ``[R, ...]``, see :func:`stacked_noise`): encoder
    ``[R, n_encoder]`` and decoder ``[R, n_decoder]``, flattened in the order of ``encoder_parameters()`` and
    ``decoder_parameters()``.

    Each repeat's gradients are those of :func:`iwae.estimators.estimate_from_noise` and
    :func:`iwae.estimators.surrogate_gradients` (``-mean(surrogate)``, each part from its own surrogate), taken by
    :func:`torch.func.grad` (one shared surrogate) or :func:`torch.func.jacrev` (two) under :func:`torch.func.vmap`.
    """
    stop = stops_q_params(estimator)
    wrapper = SampleWithNoise(model)
    names = {id(p): f"model.{name}" for name, p in model.named_parameters()}
    encoder, decoder = list(model.encoder_parameters()), list(model.decoder_parameters())
    encoder_names, decoder_names = [names[id(p)] for p in encoder], [names[id(p)] for p in decoder]
    encoder_values, decoder_values = tuple(p.detach() for p in encoder), tuple(p.detach() for p in decoder)

    def terms(encoder_params, decoder_params, noise_r):
        params = dict(zip(encoder_names, encoder_params, strict=True)) | dict(
            zip(decoder_names, decoder_params, strict=True)
        )
        return terms_from_sample(functional_call(wrapper, params, (x, noise_r, stop)), objective, estimator)

    with torch.no_grad():
        shared = terms(encoder_values, decoder_values, [eps[0] for eps in noise]).shared
    if shared:
        shared_grad = grad(lambda e, d, n: -terms(e, d, n).encoder_surrogate.mean(), argnums=(0, 1))

        def per_repeat(noise_r):
            return shared_grad(encoder_values, decoder_values, noise_r)
    else:

        def losses(e, d, n):
            t = terms(e, d, n)
            return torch.stack([-t.encoder_surrogate.mean(), -t.decoder_surrogate.mean()])

        jacobian = jacrev(losses, argnums=(0, 1))

        def per_repeat(noise_r):
            by_encoder, by_decoder = jacobian(encoder_values, decoder_values, noise_r)
            return tuple(g[0] for g in by_encoder), tuple(g[1] for g in by_decoder)

    encoder_grads, decoder_grads = vmap(per_repeat)(noise)
    repeats = noise[0].shape[0]
    return (
        torch.cat([g.reshape(repeats, -1) for g in encoder_grads], dim=1),
        torch.cat([g.reshape(repeats, -1) for g in decoder_grads], dim=1),
    )


class RepeatBlocks:
    """Sums of per-repeat gradients (flattened, float64) and of their squares in ``max_blocks`` blocks of repeats.

    Each :meth:`add` goes whole into the block with the fewest repeats so far, so blocks of chunks of equal size
    stay about equal. The sums live in two tensors allocated once, added to in place, so that glibc's heap does not
    fragment between the gradients' large temporaries (docs/results.md, ``iwae snr --model rainforth``)."""

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self.counts = np.zeros(max_blocks, dtype=np.int64)
        self.totals: Tensor | None = None
        self.totals_sq: Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, grads: Tensor) -> None:
        """Add ``[R, n_parameters]`` gradients to one block."""
        grads = grads.detach().to("cpu", torch.float64)
        if self.totals is None:
            self.totals = torch.zeros(len(self.counts), grads.shape[1], dtype=torch.float64)
            self.totals_sq = torch.zeros_like(self.totals)
        block = int(np.argmin(self.counts))
        self.counts[block] += grads.shape[0]
        self.totals[block] += grads.sum(dim=0)
        self.totals_sq[block] += grads.square().sum(dim=0)

    def moments(self) -> GradientMoments:
        if self.totals is None:
            raise ValueError("no repeats yet")
        return GradientMoments(self.totals.sum(0), self.totals_sq.sum(0), self.count)

    def grouped(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The blocks that hold repeats: counts ``[G]``, sums ``[G, P]`` and sums of squares ``[G, P]``."""
        if self.totals is None:
            raise ValueError("no repeats yet")
        used = self.counts > 0
        return self.counts[used].copy(), self.totals.numpy()[used], self.totals_sq.numpy()[used]


def adaptive_gradient_blocks(
    model: NoiseModel,
    x: Tensor,
    k: int,
    estimator: str,
    repeats: int,
    generator: torch.Generator,
    objective: Objective,
    rel_error: float = DEFAULT_REL_ERROR,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    bar: tqdm | None = None,
) -> RepeatBlocks:
    """Per-repeat gradients at k samples, in blocks, until ``R >= 1 / (rel_error^2 s^2)`` (s: the smaller part's
    median SNR so far) or ``R k batch >= max_samples``; at least ``repeats``."""
    batch = x.shape[0]
    n_encoder = sum(p.numel() for p in model.encoder_parameters())
    most = max(1, min(CHUNK_SAMPLES // (k * batch), CHUNK_GRADIENTS // sum(p.numel() for p in model.parameters())))
    cap = max(repeats, max_samples // (k * batch))
    target, blocks = repeats, RepeatBlocks()
    while blocks.count < target:
        chunk = min(target - blocks.count, most, max(1, -(-target // MAX_BLOCKS)))
        noise = stacked_noise(model, x, k, chunk, generator)
        encoder_grads, decoder_grads = noise_gradients(model, x, noise, objective, estimator)
        blocks.add(torch.cat([encoder_grads, decoder_grads], dim=1))
        if bar is not None:
            bar.update(chunk * k * batch)
        if blocks.count >= target:
            snr, valid = _snr_and_valid(blocks.moments())
            parts = [snr[:n_encoder][valid[:n_encoder]], snr[n_encoder:][valid[n_encoder:]]]
            medians = [float(v.median()) for v in parts if v.numel()]
            smallest = min(medians, default=math.nan)
            if math.isfinite(smallest) and smallest > 0:
                target = min(cap, max(target, math.ceil(1.0 / (rel_error * smallest) ** 2)))
    return blocks


def _snr_and_valid(moments: GradientMoments) -> tuple[Tensor, Tensor]:
    """Per-parameter ``|mean| / std`` over all parameters and the mask of those with a spread (as
    :meth:`GradientMoments.snr`, which returns only the valid ones)."""
    mean = moments.total / moments.count
    std = ((moments.total_sq - moments.count * mean * mean).clamp_min(0.0) / (moments.count - 1)).sqrt()
    valid = std > 1e-30 * (1.0 + mean.abs())
    return mean.abs() / std.where(valid, torch.ones_like(std)), valid


@dataclass
class AdaptiveSNRStudy(SNRStudy):
    """:class:`SNRStudy` with repeats per (estimator, K) and floor-aware slopes; see the module docstring."""

    repeats_per_k: dict[str, list[int]] = field(default_factory=dict)  # estimator -> repeats per K
    rel_error: float = DEFAULT_REL_ERROR
    max_samples: int = DEFAULT_MAX_SAMPLES
    floor_factor: float = DEFAULT_FLOOR_FACTOR
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    n_encoder: int = 0
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)
    mean_gradients: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)  # est -> per K [P]
    stderr_gradients: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)  # est -> per K [P]

    def _columns(self, part: str) -> slice:
        return slice(0, self.n_encoder) if part == "encoder" else slice(self.n_encoder, None)

    def _bootstrap_medians(self, est: str, part: str, i: int, rng: np.random.Generator) -> np.ndarray:
        """``[bootstrap]`` medians of the part's per-parameter SNR, each from the K's blocks resampled."""
        counts, totals, totals_sq = self.blocks[est][i]
        columns = self._columns(part)
        totals, totals_sq = totals[:, columns], totals_sq[:, columns]
        groups = len(counts)
        picks = rng.integers(0, groups, size=(self.bootstrap, groups))
        weights = np.zeros((self.bootstrap, groups))
        np.add.at(weights, (np.arange(self.bootstrap)[:, None], picks), 1.0)
        n = weights @ counts  # [B]
        mean = (weights @ totals) / n[:, None]
        variance = np.clip(weights @ totals_sq - n[:, None] * mean * mean, 0.0, None) / (n[:, None] - 1)
        std = np.sqrt(variance)
        valid = std > 1e-30 * (1.0 + np.abs(mean))
        snr = np.where(valid, np.abs(mean) / np.where(valid, std, 1.0), np.nan)
        return np.nanmedian(snr, axis=1)

    def slopes(self) -> dict[str, dict[str, dict]]:
        """Per part and estimator: the OLS fit over the Ks clear of their floor (``fit_ks``, ``fit_repeats``), its
        Student-t interval (3 or more Ks) and bootstrap interval (2 or more Ks, and 8 or more blocks per K), and the
        slopes between consecutive ``fit_ks`` (``local_slopes``); ``slope`` None when fewer than two Ks are clear."""
        medians = self.medians()
        rng = np.random.default_rng(self.seed * 1_000_003 + 17)
        fits: dict[str, dict[str, dict]] = {part: {} for part in PARTS}
        for part in PARTS:
            for est in self.estimators:
                repeats = self.repeats_per_k[est]
                clear = clear_of_floor(medians[est][part], repeats, self.floor_factor)
                index = [i for i, ok in enumerate(clear) if ok]
                fit: dict = {
                    "fit_ks": [self.ks[i] for i in index],
                    "fit_repeats": [repeats[i] for i in index],
                    "excluded_ks": [k for k, ok in zip(self.ks, clear, strict=True) if not ok],
                }
                if len(index) < 2:
                    fit.update(slope=None, intercept=None, reason=f"{len(index)} K clear of the floor; a slope needs 2")
                    fits[part][est] = fit
                    continue
                fit.update(loglog_slope(fit["fit_ks"], [medians[est][part][i] for i in index]))
                log_k, log_m = np.log(fit["fit_ks"]), np.log([medians[est][part][i] for i in index])
                fit["local_slopes"] = (np.diff(log_m) / np.diff(log_k)).tolist()  # between consecutive fit_ks
                if min(len(self.blocks[est][i][0]) for i in index) >= 8:
                    log_k = np.log(np.asarray(fit["fit_ks"], dtype=float))
                    boot = np.log(np.stack([self._bootstrap_medians(est, part, i, rng) for i in index], axis=1))
                    centred = log_k - log_k.mean()
                    boot_slopes = (boot - boot.mean(axis=1, keepdims=True)) @ centred / float(centred @ centred)
                    low, high = np.nanpercentile(boot_slopes, [2.5, 97.5])
                    fit.update(bootstrap_ci95_low=float(low), bootstrap_ci95_high=float(high))
                    fit["bootstrap_stderr"] = float(np.nanstd(boot_slopes, ddof=1))
                fits[part][est] = fit
        return fits

    def to_dict(self) -> dict:
        summary = super().to_dict()
        summary.update(
            slope_method=(
                "OLS of log median SNR on log K over the Ks whose median exceeds floor_factor x snr_floor(repeats at "
                "that K) (fit_ks); ci95: Student-t from the OLS standard error (3 or more Ks); bootstrap_ci95: "
                f"percentiles of {self.bootstrap} refits with each K's blocks of repeats resampled"
            ),
            repeats_per_k=self.repeats_per_k,
            snr_floor_per_k={est: [snr_floor(r) for r in reps] for est, reps in self.repeats_per_k.items()},
            rel_error=self.rel_error,
            max_samples=self.max_samples,
            floor_factor=self.floor_factor,
            bootstrap=self.bootstrap,
        )
        return summary


def run_adaptive_study(
    model: NoiseModel,
    x: Tensor,
    ks: list[int],
    estimators: list[str],
    repeats: int,
    *,
    rel_error: float = DEFAULT_REL_ERROR,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    floor_factor: float = DEFAULT_FLOOR_FACTOR,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: bool = True,
    objective: Objective | None = None,
) -> AdaptiveSNRStudy:
    """SNRs for every estimator and K with repeats grown per (estimator, K) (:func:`adaptive_gradient_blocks`),
    vectorised over repeats; each (estimator, K) draws from its own seeded generator, as in :func:`run_study`."""
    for name in estimators:
        if name not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATOR_NAMES)}")
    if repeats < 2:
        raise ValueError(f"--repeats must be >= 2 for a standard deviation, got {repeats}")
    if not rel_error > 0 or max_samples < 1 or not floor_factor > 0 or bootstrap < 1:
        raise ValueError("rel_error, max_samples, floor_factor and bootstrap must be > 0")
    objective = objective or IWAE()
    n_encoder = sum(p.numel() for p in model.encoder_parameters())
    study = AdaptiveSNRStudy(
        list(ks), list(estimators), repeats, x.shape[0], rel_error=rel_error, max_samples=max_samples,
        floor_factor=floor_factor, bootstrap=bootstrap, seed=seed, n_encoder=n_encoder,
    )  # fmt: skip
    ess_generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + 1)
    study.ess = [float(effective_sample_size(model, x, k, ess_generator).median()) for k in ks]
    bar = tqdm(unit="sample", desc="snr", disable=not progress)
    try:
        for est in estimators:
            for i, k in enumerate(ks):
                generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + 7919 * i + 31 * k)
                blocks = adaptive_gradient_blocks(
                    model, x, k, est, repeats, generator, objective, rel_error, max_samples, bar
                )
                moments = blocks.moments()
                snr, valid = _snr_and_valid(moments)
                per_part = study.snr.setdefault(est, {part: [] for part in PARTS})
                for part in PARTS:
                    columns = study._columns(part)
                    per_part[part].append(snr[columns][valid[columns]].numpy())
                mean = moments.total / moments.count
                variance = (moments.total_sq - moments.count * mean * mean).clamp_min(0.0) / (moments.count - 1)
                study.mean_gradients.setdefault(est, []).append(mean.numpy())
                study.stderr_gradients.setdefault(est, []).append((variance / moments.count).sqrt().numpy())
                study.repeats_per_k.setdefault(est, []).append(moments.count)
                study.blocks.setdefault(est, []).append(blocks.grouped())
    finally:
        bar.close()
    return study
