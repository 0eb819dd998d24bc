"""The schedules study: do fewer, larger steps (or a k schedule) land where Burda's minibatch-20 schedule lands?

And how much wall time do they save? ``iwae reproduce schedules`` runs it (presets ``schedules-*``); the outcome is
in docs/results.md.

Every run of a sweep is labelled by how it ran its schedule; runs that differ only in the seed are one cell (mean,
sample standard deviation, number of seeds); each cell is compared with the cell of the same objective and final k
run as Burda ran it (minibatch 20, decaying rates, one k).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from iwae.config import BURDA_BATCH_SIZE, TrainConfig
from iwae.lab.bench.settings import BURDA_TRAIN_IMAGES
from iwae.lab.grid import train_config
from iwae.train import total_steps

MATCH_NATS = 0.3  # the study's criterion: within this many nats of the minibatch-20 cell


def schedule_label(config: TrainConfig) -> str:
    """How a run ran its schedule, in words."""
    if config.stage_k is not None:
        return "k " + "→".join(map(str, config.stage_k)) + f", batch {config.batch_size}"
    if config.stage_batch_sizes is not None:
        return "batch grows " + "→".join(map(str, config.stage_batch_sizes)) + f", lr {config.stages[0][1]:g}"
    if config.batch_size == BURDA_BATCH_SIZE:
        return f"batch {BURDA_BATCH_SIZE} (Burda)"
    return f"batch {config.batch_size}, lr from {config.stages[0][1]:.3g}"


def is_baseline(config: TrainConfig) -> bool:
    """Whether the run ran Burda's schedule: minibatch 20, one k, no growing minibatch."""
    return config.stage_k is None and config.stage_batch_sizes is None and config.batch_size == BURDA_BATCH_SIZE


@dataclass
class Cell:
    """The runs of one setting, seeds pooled: their NLLs, training seconds and the schedule's number of steps."""

    objective: str
    k: int
    schedule: str
    baseline: bool
    nlls: list[float]
    seconds: list[float]
    steps: int

    @property
    def nll(self) -> float:
        return statistics.mean(self.nlls)

    @property
    def nll_sd(self) -> float | None:
        return statistics.stdev(self.nlls) if len(self.nlls) > 1 else None

    @property
    def mean_seconds(self) -> float:
        return statistics.mean(self.seconds)


def cells(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    """The finished, evaluated runs of a sweep's store, one :class:`Cell` per setting (seeds pooled)."""
    grouped: dict[tuple, Cell] = {}
    for row in rows:
        evaluation = row.get("eval") or {}
        if row.get("status") != "finished" or evaluation.get("nll") is None:
            continue
        config = train_config(row["config"], recorded=True)
        key = (config.objective.label(), config.k, schedule_label(config), config.total_epochs)
        cell = grouped.setdefault(
            key,
            Cell(
                key[0],
                key[1],
                key[2],
                is_baseline(config),
                [],
                [],
                total_steps(config, config.train_limit or BURDA_TRAIN_IMAGES),
            ),
        )
        cell.nlls.append(float(evaluation["nll"]))
        cell.seconds.append(float(row["seconds"]))
    return sorted(grouped.values(), key=lambda c: (c.objective, c.k, not c.baseline, c.schedule))


def comparison(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell beside the minibatch-20 cell of its objective and k, one dict per cell.

    Args:
        rows: a sweep's store rows (:meth:`iwae.lab.store.ResultStore.rows`).

    Returns:
        Per cell: its NLL (mean and sample standard deviation over seeds), steps, mean training seconds, the NLL
        difference from the minibatch-20 cell, whether that is within :data:`MATCH_NATS`, and the fraction of
        training time saved (None where the cell has no minibatch-20 cell).
    """
    found = cells(rows)
    baselines = {(c.objective, c.k): c for c in found if c.baseline}
    table = []
    for cell in found:
        base = baselines.get((cell.objective, cell.k))
        diff = None if base is None else cell.nll - base.nll
        table.append(
            {
                "objective": cell.objective,
                "k": cell.k,
                "schedule": cell.schedule,
                "seeds": len(cell.nlls),
                "nll": cell.nll,
                "nll_sd": cell.nll_sd,
                "steps": cell.steps,
                "train_seconds": cell.mean_seconds,
                "nll_minus_batch20": diff,
                "matches_batch20": None if diff is None else abs(diff) <= MATCH_NATS,
                "time_saved": None if base is None else 1.0 - cell.mean_seconds / base.mean_seconds,
            }
        )
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| objective | k | schedule | seeds | test NLL | steps | train s | vs batch 20 | within "
        f"{MATCH_NATS} | time saved |",
        "|---|---:|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in table:
        nll = f"{r['nll']:.2f}" + (f" ± {r['nll_sd']:.2f}" if r["nll_sd"] is not None else "")
        diff = "—" if r["nll_minus_batch20"] is None else f"{r['nll_minus_batch20']:+.2f}"
        match = "—" if r["matches_batch20"] is None else ("yes" if r["matches_batch20"] else "no")
        saved = "—" if r["time_saved"] is None or math.isnan(r["time_saved"]) else f"{100 * r['time_saved']:.0f}%"
        lines.append(
            f"| {r['objective']} | {r['k']} | {r['schedule']} | {r['seeds']} | {nll} | {r['steps']:,} | "
            f"{r['train_seconds']:.1f} | {diff} | {match} | {saved} |"
        )
    return "\n".join(lines) + "\n"
