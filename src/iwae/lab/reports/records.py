"""Finished runs read from the sweep databases (:mod:`iwae.lab.store`) as :class:`RunRecord`, and how the report
groups them: Table 1 settings averaged over seeds (:class:`Cell`), k-sweeps and training budgets."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iwae.lab.experiments import train_config
from iwae.lab.store import DB_FILE, ResultStore


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
    env: dict[str, Any] = field(default_factory=dict)


def objective_variant(config: Any) -> str:
    """The objective with the parameter that defines it: 'iwae', 'miwae(M=8)', 'ciwae(beta=0.05)', ..."""
    return config.objective.label()


def is_table1_run(record: RunRecord) -> bool:
    """A cell of Burda's Table 1: VAE or IWAE, standard estimator, trained from scratch."""
    return record.init_from is None and record.estimator == "standard" and record.objective in ("vae", "iwae")


def _record(row: dict[str, Any], label: str) -> RunRecord:
    config = train_config(row["config"])
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
        samples_png=row["samples_png"],
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
                records.append(_record(row, prefix + row["name"]))
            else:
                unfinished.append(row)
    return records, unfinished


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class Cell:
    """Our result for one setting, averaged over seeds."""

    nll: float
    units: tuple[float, ...]
    seeds: int
    seconds_per_epoch: float


def mean_cell(records: list[RunRecord]) -> Cell:
    """The mean over ``records`` (one setting, one run per seed)."""
    units = tuple(_mean([r.units[j] for r in records]) for j in range(len(records[0].units)))
    return Cell(_mean([r.nll for r in records]), units, len(records), _mean([r.seconds_per_epoch for r in records]))


def table1_cells(records: list[RunRecord]) -> dict[tuple[str, int, int, str], Cell]:
    groups: dict[tuple[str, int, int, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if is_table1_run(r):
            groups[(r.dataset, r.layers, r.k, r.objective)].append(r)
    return {key: mean_cell(group) for key, group in sorted(groups.items())}


def ksweep_groups(cells: dict[tuple[str, int, int, str], Cell]) -> dict[tuple[str, int, str], list[tuple[int, Cell]]]:
    groups: dict[tuple[str, int, str], list[tuple[int, Cell]]] = defaultdict(list)
    for (dataset, layers, k, objective), cell in cells.items():
        groups[(dataset, layers, objective)].append((k, cell))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in groups.items() if len(points) >= 2}


def budget_of(record: RunRecord) -> str:
    """What a run's numbers depend on besides its setting: training passes and data, evaluation."""
    examples = "all" if record.train_limit is None else f"{record.train_limit:,}"
    return f"{record.epochs:,} passes over {examples} training examples, L_{record.eval_k} on {record.eval_n:,}"


def budget_groups(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Table 1 runs (not continued ones) by budget: cells are only compared within one budget."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.init_from is None:
            groups[budget_of(r)].append(r)
    return dict(sorted(groups.items()))
