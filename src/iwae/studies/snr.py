"""Gradient signal-to-noise ratio (Rainforth et al. 2018) of the estimators in :mod:`iwae.estimators`.

At fixed parameters and a fixed minibatch ``x`` ``[batch, x_dim]``, each estimator draws k samples
(log-weights ``[k, batch]``) and returns one gradient of the loss ``-mean(surrogate)``. Over R repeated
draws, the per-parameter SNR is ``|mean| / std`` (std with R - 1 degrees of freedom); parameters whose
gradient is exactly zero in every repeat (e.g. first-layer weights of pixels that are 0 in the whole
minibatch) have no SNR and are left out. The summary per (estimator, part, K) is the median SNR
over parameters; its log-log slope against K is fitted by ordinary least squares, with the OLS
standard error and a 95% Student-t interval (n_K - 2 degrees of freedom). The interval reflects how
well a straight line fits the medians, not the Monte Carlo noise of each median.

The target is IWAE_K (:class:`~iwae.objectives.IWAE`) unless another objective is given. Any model that
follows :class:`iwae.protocol.Model` can be studied. Rainforth et al. predict
slopes of about +1/2 (decoder) and -1/2 (encoder, standard estimator); DReG's encoder slope is positive.
A true SNR of 0 is estimated as about ``sqrt(2/pi) / sqrt(R)`` (``snr_floor``): medians near it are
limited by the number of repeats.

Those slopes are asymptotic: they need the importance weights to be far from degenerate, i.e. an
effective sample size ``ESS = 1 / sum_i w~_i^2`` that grows like K. The study therefore also reports
the median ESS over the minibatch per K and its log-log slope; where ESS grows like K^s with s < 1,
the decoder's SNR grows roughly like sqrt(ESS), K^(s/2), rather than K^(1/2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from iwae import bounds
from iwae.checkpoint import atomic_save_figure, atomic_write_text
from iwae.estimators import ESTIMATOR_NAMES, estimate, surrogate_gradients
from iwae.objectives import IWAE, Objective
from iwae.protocol import Model

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
            "snr_floor": math.sqrt(2 / math.pi) / math.sqrt(self.repeats),
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
    """Log-log plot of the median SNR against K (interquartile band), encoder and decoder side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians, fits = study.medians(), study.slopes()
    ks = np.asarray(study.ks, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, part in zip(axes, PARTS, strict=True):
        for est in study.estimators:
            per_k = study.snr[est][part]
            quartiles = np.array([np.quantile(v, [0.25, 0.75]) if v.size else [np.nan] * 2 for v in per_k])
            (line,) = ax.plot(ks, medians[est][part], "o-", label=f"{est} (slope {fits[part][est]['slope']:+.2f})")
            ax.fill_between(ks, quartiles[:, 0], quartiles[:, 1], color=line.get_color(), alpha=0.15)
        floor = math.sqrt(2 / math.pi) / math.sqrt(study.repeats)
        ax.axhline(floor, color="grey", ls=":", lw=1, label=f"SNR floor of {study.repeats} repeats")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (samples)")
        ax.set_ylabel("median per-parameter SNR")
        ax.set_title(f"{part}")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"gradient SNR, IWAE_K, {study.repeats} repeats, batch {study.batch_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(path, fig, dpi=120)
    plt.close(fig)
    return path


def write_study(study: SNRStudy, out_dir: Path, meta: dict | None = None) -> dict:
    """Write ``snr.json`` and ``snr.png`` into ``out_dir``; return the JSON object (with their paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**(meta or {}), **study.to_dict()}
    summary["png"] = str(plot_study(study, out_dir / "snr.png"))
    summary["json"] = str(out_dir / "snr.json")
    atomic_write_text(out_dir / "snr.json", json.dumps(summary, indent=2) + "\n")
    return summary
