"""Finished runs read from the sweep databases (:mod:`iwae.lab.store`) as :class:`RunRecord`, and how the report
groups them: runs that differ only in their seed make one :class:`Cell` (mean and sample standard deviation over
the seeds), the cells of Table 1 and the k-sweeps, and training budgets.

A record keeps a sample grid's path only if it resolves inside the sweep folder the row came from: a report embeds
no file that a database row names elsewhere."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from iwae.config import BURDA_STAGES, TrainConfig
from iwae.lab.experiments import inside, train_config
from iwae.lab.store import DB_FILE, ResultStore
from iwae.models import ModelConfig


@dataclass
class RunRecord:
    """A finished run as the report sees it (everything read from a database row)."""

    label: str
    run_dir: str
    dataset: str
    layers: int
    objective: str
    k: int
    seed: int
    init_from: str | None
    epochs: int
    estimator: str
    variant: str  # the objective with its parameter, e.g. 'miwae(M=8)' or 'ciwae(beta=0.05)'
    train_limit: int | None
    nll: float
    units: tuple[int, ...]
    eval_k: int
    eval_n: int
    recon: float
    kl: float
    seconds_per_epoch: float
    train_bound: float
    valid_bound: float
    log_activity: list[list[float]]
    metrics: list[dict[str, Any]]
    samples_png: str | None
    config: TrainConfig
    env: dict[str, Any] = field(default_factory=dict)


def objective_variant(config: Any) -> str:
    """The objective with the parameter that defines it: 'iwae', 'miwae(M=8)', 'ciwae(beta=0.05)', ..."""
    return config.objective.label()


def is_table1_run(record: RunRecord) -> bool:
    """A cell of Burda's Table 1: VAE or IWAE, standard estimator, trained from scratch."""
    return record.init_from is None and record.estimator == "standard" and record.objective in ("vae", "iwae")


def _record(row: dict[str, Any], label: str, sweep_dir: str | Path) -> RunRecord:
    config = train_config(row["config"])
    samples = row["samples_png"]
    evaluation = row["eval"]
    return RunRecord(
        label=label,
        run_dir=row["run_dir"],
        dataset=config.dataset,
        layers=config.model.n_stochastic,
        objective=config.objective.name,
        k=config.k,
        seed=config.seed,
        init_from=config.init_from,
        epochs=config.total_epochs,
        estimator=config.estimator,
        variant=objective_variant(config),
        train_limit=config.train_limit,
        nll=float(evaluation["nll"]),
        units=tuple(int(u) for u in evaluation["active_units"]),
        eval_k=int(evaluation["k"]),
        eval_n=int(evaluation["n_examples"]),
        recon=float(evaluation["recon_log_lik"]),
        kl=float(evaluation["kl"]),
        seconds_per_epoch=float(row["seconds_per_epoch"]),
        train_bound=float(row["train_bound"]),
        valid_bound=float(row["valid_bound"]),
        log_activity=evaluation.get("log_activity", []),
        metrics=row["metrics"] or [],
        samples_png=samples if samples and inside(samples, sweep_dir) else None,
        config=config,
        env={key: row[key] for key in ("package_version", "torch_version", "device", "git_commit")},
    )


def load_records(sweep_dirs: list[str | Path]) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """Finished runs (as records) and the rows of unfinished ones, from each sweep's database."""
    records, unfinished, seen_dirs = [], [], set()
    for directory in sweep_dirs:
        if not (Path(directory) / DB_FILE).is_file():
            raise ValueError(f"{directory} holds no {DB_FILE}; run 'iwae sweep GRID --out {directory}' first")
        prefix = f"{Path(directory).name}/" if len(sweep_dirs) > 1 else ""
        for row in ResultStore.in_dir(directory).rows():
            if row["status"] == "finished" and row["eval"]:
                run_dir = str(Path(row["run_dir"]).resolve())
                if run_dir in seen_dirs:  # one run recorded by several grids (the sweep reused it)
                    continue
                seen_dirs.add(run_dir)
                records.append(_record(row, prefix + row["name"], directory))
            else:
                unfinished.append(row)
    return records, unfinished


K = TypeVar("K", bound=Hashable)


def group_by(records: list[RunRecord], key: Callable[[RunRecord], K]) -> dict[K, list[RunRecord]]:
    groups: dict[K, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(groups)


@dataclass
class Cell:
    """Our result for one setting: means over its seeds, and the sample standard deviations (ddof=1; None for one
    seed) of the NLL and of the seconds per epoch."""

    nll: float
    units: tuple[float, ...]
    seeds: int
    seconds_per_epoch: float
    nll_sd: float | None = None
    seconds_sd: float | None = None


def mean_cell(records: list[RunRecord]) -> Cell:
    """The mean over ``records`` (one setting). Runs of one seed (the setting rerun by another sweep) count as
    one seed, with their mean."""
    by_seed = list(group_by(records, lambda r: r.seed).values())

    def over_seeds(value: Callable[[RunRecord], float]) -> list[float]:
        return [statistics.fmean(value(r) for r in runs) for runs in by_seed]

    def sd(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    nlls, seconds = over_seeds(lambda r: r.nll), over_seeds(lambda r: r.seconds_per_epoch)
    seed_units = [[statistics.fmean(u) for u in zip(*(r.units for r in runs), strict=True)] for runs in by_seed]
    units = tuple(statistics.fmean(u) for u in zip(*seed_units, strict=True))
    return Cell(statistics.fmean(nlls), units, len(by_seed), statistics.fmean(seconds), sd(nlls), sd(seconds))


def table1_cells(records: list[RunRecord]) -> dict[tuple[str, int, int, str], Cell]:
    """Table 1's cells of runs of one budget (:func:`budget_groups`), over seeds."""
    groups = group_by([r for r in records if is_table1_run(r)], lambda r: (r.dataset, r.layers, r.k, r.objective))
    return {key: mean_cell(group) for key, group in sorted(groups.items())}


def ksweep_groups(cells: dict[tuple[str, int, int, str], Cell]) -> dict[tuple[str, int, str], list[tuple[int, Cell]]]:
    groups: dict[tuple[str, int, str], list[tuple[int, Cell]]] = defaultdict(list)
    for (dataset, layers, k, objective), cell in cells.items():
        groups[(dataset, layers, objective)].append((k, cell))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in groups.items() if len(points) >= 2}


# The settings the tables show in their rows and columns, the budget's and the seed: the others (batch size, Adam's,
# the architecture beyond its layers, ...) are named in the budget where they are not Burda's.
SHOWN_SETTINGS = ("dataset", "objective", "k", "model", "stages", "seed", "train_limit", "estimator", "init_from")


def other_settings(config: TrainConfig) -> list[str]:
    """The training settings outside the tables and the budget's passes in which ``config`` is not Burda's."""
    burda_model, default = ModelConfig.burda(config.model.n_stochastic, config.model.x_dim), TrainConfig()
    notes = [
        f"{f.name}={getattr(config.model, f.name)}"
        for f in fields(ModelConfig)
        if getattr(config.model, f.name) != getattr(burda_model, f.name)
    ]
    if len(config.stages) == 1 and config.stages != BURDA_STAGES[:1]:
        notes.append(f"lr {config.stages[0][1]:g}")
    elif config.stages != BURDA_STAGES[: len(config.stages)]:
        notes.append("lr " + " + ".join(f"{passes}@{lr:g}" for passes, lr in config.stages))
    return notes + [
        f"{f.name}={getattr(config, f.name)}"
        for f in fields(TrainConfig)
        if f.name not in SHOWN_SETTINGS and getattr(config, f.name) != getattr(default, f.name)
    ]


def budget_of(record: RunRecord) -> str:
    """What a run's numbers depend on besides its setting in the tables and its seed: training passes, data and
    any other setting that is not Burda's, and the evaluation."""
    examples = "all" if record.train_limit is None else f"{record.train_limit:,}"
    budget = f"{record.epochs:,} passes over {examples} training examples, L_{record.eval_k} on {record.eval_n:,}"
    return "; ".join([budget, *other_settings(record.config)])


def setting_of(record: RunRecord) -> tuple[str, str, int, str, str, int]:
    """Everything a run's numbers depend on but its seed (and, for a continued run, its base): runs with the same
    setting are the seeds of one cell."""
    return (budget_of(record), record.dataset, record.layers, record.variant, record.estimator, record.k)


def budget_groups(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Table 1 runs (not continued ones) by budget: cells are only compared within one budget."""
    return dict(sorted(group_by([r for r in records if r.init_from is None], budget_of).items()))
