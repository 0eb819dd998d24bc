"""The report's figures, as PNG bytes.

NLL, active units and seconds per epoch against k (ours beside the paper's), learning curves, and histograms of
log A_u.

Drawn on :class:`matplotlib.figure.Figure` objects, without pyplot: no global figure registry or backend is
touched, and the PNG is rendered with Agg.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from iwae.lab.reports.published import PUBLISHED_TABLE1
from iwae.lab.reports.records import Cell, RunRecord, ksweep_groups


def _figure_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


KL_UNITS = "per-unit KL > 0.01"  # the label of the active units counted by the KL


def plot_against_k(cells: dict[tuple[str, int, int, str], Cell], quantity: str, paper: bool = True) -> bytes | None:
    """NLL, active units or seconds per epoch against k, one line per (dataset, layers, objective).

    The active units are Burda's count (the covariance), solid; where every cell of a line has the per-unit KL's
    count too (``units_kl``, the definition other studies plot), it is drawn dotted in the same colour.

    Args:
        cells: the report's cells by (dataset, layers, k, objective) (:mod:`iwae.lab.reports.records`).
        quantity: ``"nll"``, ``"units"`` or ``"seconds"``.
        paper: draw the paper's numbers too (dashed); pass it for cells of runs in Burda's setup only.

    Returns:
        The PNG, or None if no group has a k-sweep. Ours are solid: means over seeds, error bars one sample
        standard deviation.
    """
    groups = ksweep_groups(cells)
    if not groups:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    axis = fig.subplots()
    for (dataset, layers, objective), points in groups.items():
        ks, at_k = [k for k, _ in points], [c for _, c in points]
        label = f"{objective} {dataset} {layers}L"
        if quantity == "nll":
            ours, spread = [c.nll for c in at_k], [c.nll_sd or 0.0 for c in at_k]
            published = [
                (k, PUBLISHED_TABLE1[(dataset, layers, k, objective)][0])
                for k in ks
                if (dataset, layers, k, objective) in PUBLISHED_TABLE1
            ]
        elif quantity == "units":
            ours, spread = [sum(c.units) for c in at_k], [0.0 for _ in at_k]
            published = [
                (k, sum(PUBLISHED_TABLE1[(dataset, layers, k, objective)][1] or ()))
                for k in ks
                if (dataset, layers, k, objective) in PUBLISHED_TABLE1
                and PUBLISHED_TABLE1[(dataset, layers, k, objective)][1]
            ]
        else:
            ours, spread = [c.seconds_per_epoch for c in at_k], [c.seconds_sd or 0.0 for c in at_k]
            published = []
        ours_label = label if quantity == "seconds" or not paper else f"{label} (ours)"
        line = axis.errorbar(ks, ours, yerr=spread, fmt="o-", capsize=3, label=ours_label).lines[0]
        if published and paper:
            axis.plot(*zip(*published, strict=True), "s--", color=line.get_color(), alpha=0.6, label=f"{label} (paper)")
        if quantity == "units" and all(c.units_kl is not None for c in at_k):  # the count studies by the KL report
            by_kl = [sum(c.units_kl or ()) for c in at_k]
            axis.plot(ks, by_kl, "^:", color=line.get_color(), label=f"{label} ({KL_UNITS})")
    all_ks = sorted({k for points in groups.values() for k, _ in points})
    axis.set_xscale("log")
    axis.set_xticks(all_ks, [str(k) for k in all_ks])
    axis.minorticks_off()
    axis.set_xlabel("k (samples per example)")
    axis.set_ylabel(
        {"nll": "test NLL (nats)", "units": "active units (all layers)", "seconds": "seconds per epoch"}[quantity]
    )
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return _figure_bytes(fig)


def plot_learning_curves(records: list[RunRecord]) -> bytes | None:
    """Training bound (dashed) and validation bound (solid) per epoch of each run; None if no run has metrics."""
    curves = [r for r in records if r.metrics]
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5))
    axis = fig.subplots()
    for r in curves:
        epochs = [m["epoch"] for m in r.metrics]
        valid_key = next((key for key in r.metrics[0] if key.startswith("valid_L")), None)
        line = axis.plot(epochs, [m["train_bound"] for m in r.metrics], ".--", alpha=0.6)[0]
        if valid_key:
            axis.plot(
                epochs,
                [m[valid_key] for m in r.metrics],
                "o-",
                color=line.get_color(),
                label=f"{r.label} ({valid_key})",
            )
    axis.set_xlabel("epoch")
    axis.set_ylabel("bound (nats); dashed: training objective's bound")
    if max(len(r.metrics) for r in curves) > 20:
        axis.set_xscale("log")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return _figure_bytes(fig)


def plot_log_activity(records: list[RunRecord]) -> bytes | None:
    """Histograms of log A_u per layer, one panel per run, with the 0.01 threshold; None if no run has them."""
    with_values = [r for r in records if r.log_activity]
    if not with_values:
        return None
    cols = min(3, len(with_values))
    rows = math.ceil(len(with_values) / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for axis, r in zip(axes.flat, with_values, strict=False):
        for j, values in enumerate(r.log_activity):
            axis.hist(values, bins=30, alpha=0.6, label=f"layer {j + 1}")
        axis.axvline(math.log(0.01), color="black", linestyle=":", label="log 0.01")
        axis.set_title(r.label, fontsize=9)
        axis.set_xlabel("log A_u")
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(with_values) :]:
        axis.axis("off")
    return _figure_bytes(fig)
