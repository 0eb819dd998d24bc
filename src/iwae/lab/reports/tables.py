"""The report's tables (:class:`Table`: headers and rows of strings): Table 1, Table 2, the k-sweep, the other
objectives and estimators, all runs, and the paper's orderings checked on our numbers.

A cell of several seeds shows its mean ± the sample standard deviation, with the NLL's ``(n=seeds)``:
``86.91 ± 0.12 (n=3)``; a single seed shows its number. Differences from the paper and orderings use the mean."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from iwae.lab.reports.published import PUBLISHED_RAINFORTH, PUBLISHED_TABLE1, PUBLISHED_TABLE2
from iwae.lab.reports.records import Cell, RunRecord, group_by, is_table1_run, ksweep_groups, mean_cell, setting_of


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_spread(mean: float, sd: float | None, digits: int = 2, seeds: int | None = None) -> str:
    """``mean ± sd`` (and ``(n=seeds)`` if given) over several seeds; the plain number for one (``sd`` None)."""
    if sd is None:
        return fmt(mean, digits)
    spread = f"{fmt(mean, digits)} ± {fmt(sd, digits)}"
    return spread if seeds is None else f"{spread} (n={seeds})"


def fmt_nll(cell: Cell | None) -> str:
    return "—" if cell is None else fmt_spread(cell.nll, cell.nll_sd, seeds=cell.seeds)


def fmt_seconds(cell: Cell) -> str:
    return fmt_spread(cell.seconds_per_epoch, cell.seconds_sd, 3)


def _labels(runs: list[RunRecord]) -> str:
    return ", ".join(r.label for r in runs)


def fmt_units(units: tuple[float, ...] | None) -> str:
    if units is None:
        return "—"
    return "+".join(f"{u:g}" if float(u).is_integer() else f"{u:.1f}" for u in units)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


def _compare(ours: Cell | None, paper: tuple[float, tuple[int, ...] | None] | None) -> list[str]:
    """ours | paper | difference, for NLL and for active units (ours: the means over seeds)."""
    p_nll, p_units = paper if paper is not None else (None, None)
    nll = ours.nll if ours else None
    units = ours.units if ours else None
    d_nll = nll - p_nll if nll is not None and p_nll is not None else None
    d_units = sum(units) - sum(p_units) if units is not None and p_units is not None else None
    return [
        fmt_nll(ours),
        fmt(p_nll),
        fmt(d_nll, signed=True),
        fmt_units(units),
        fmt_units(p_units),
        fmt(d_units, 0 if d_units is None or float(d_units).is_integer() else 1, signed=True),
    ]


def table1(cells: dict[tuple[str, int, int, str], Cell]) -> Table:
    headers = ["dataset", "layers", "k"]
    for objective in ("VAE", "IWAE"):
        headers += [f"{objective} NLL", "paper", "diff", f"{objective} units", "paper", "diff"]
    settings = sorted({key[:3] for key in cells})
    rows = []
    for dataset, layers, k in settings:
        row = [dataset, str(layers), str(k)]
        for objective in ("vae", "iwae"):
            key = (dataset, layers, k, objective)
            row += _compare(cells.get(key), PUBLISHED_TABLE1.get(key))
        rows.append(row)
    return Table(headers, rows)


def table2(records: list[RunRecord]) -> Table | None:
    """A row per continued setting: its runs (seeds) and their bases, over seeds."""
    by_dir = {str(Path(r.run_dir).resolve()): r for r in records}

    def base_of(r: RunRecord) -> RunRecord | None:
        return by_dir.get(str(Path(r.init_from).resolve())) if r.init_from else None

    def key(r: RunRecord) -> tuple[object, ...]:
        base = base_of(r)
        return (*setting_of(r), setting_of(base) if base else Path(str(r.init_from)).name)

    headers = [
        "run",
        "from",
        "to",
        "base NLL",
        "paper",
        "base units",
        "paper",
        "continued NLL",
        "paper",
        "diff",
        "continued units",
        "paper",
        "diff",
    ]
    rows = []
    for runs in group_by([r for r in records if r.init_from is not None], key).values():
        r, base = runs[0], base_of(runs[0])
        bases = mean_cell([b for b in map(base_of, runs) if b is not None]) if base else None
        base_key = (base.objective, base.k) if base else None
        published = base is not None and r.dataset == "mnist" and r.layers == 1
        paper = PUBLISHED_TABLE2.get((base_key, (r.objective, r.k))) if published else None
        base_paper = paper["base"] if paper else (None, None)
        cont = _compare(mean_cell(runs), paper["continued"] if paper else None)
        rows.append(
            [
                _labels(runs),
                f"{base.objective} k={base.k}" if base else Path(str(r.init_from)).name,
                f"{r.objective} k={r.k}",
                fmt_nll(bases),
                fmt(base_paper[0]),
                fmt_units(bases.units if bases else None),
                fmt_units(base_paper[1]),
                *cont,
            ]
        )
    return Table(headers, rows) if rows else None


def estimators_table(records: list[RunRecord]) -> Table | None:
    """Runs with another objective or estimator, beside the IWAE runs of the same setting and Rainforth's numbers."""
    others = [r for r in records if r.init_from is None and not is_table1_run(r)]
    if not others:
        return None
    settings = {(r.dataset, r.layers, r.k, r.epochs, r.train_limit) for r in others}
    shown = [
        r for r in records if r.init_from is None and (r.dataset, r.layers, r.k, r.epochs, r.train_limit) in settings
    ]

    def order(runs: list[RunRecord]) -> tuple[str, int, int, bool, str, str]:
        r = runs[0]
        return (r.dataset, r.layers, r.k, r.variant != "iwae", r.variant, r.estimator)

    rows = []
    for runs in sorted(group_by(shown, setting_of).values(), key=order):  # a row per setting, over its seeds
        r, cell = runs[0], mean_cell(runs)
        published = r.dataset == "mnist" and r.layers == 1
        paper = PUBLISHED_RAINFORTH.get((r.variant, r.estimator, r.k)) if published else None
        rows.append(
            [
                _labels(runs),
                r.dataset,
                str(r.layers),
                r.variant,
                r.estimator,
                str(r.k),
                fmt_nll(cell),
                fmt(paper),
                fmt(cell.nll - paper, signed=True) if paper is not None else "—",
                fmt_units(cell.units),
                fmt_seconds(cell),
            ]
        )
    headers = [
        "run",
        "dataset",
        "layers",
        "objective",
        "estimator",
        "k",
        "NLL",
        "paper NLL",
        "diff",
        "units",
        "s/epoch",
    ]
    return Table(headers, rows)


def ksweep_table(cells: dict[tuple[str, int, int, str], Cell]) -> Table | None:
    rows = []
    for (dataset, layers, objective), points in ksweep_groups(cells).items():
        for k, cell in points:
            paper = PUBLISHED_TABLE1.get((dataset, layers, k, objective))
            rows.append(
                [
                    dataset,
                    str(layers),
                    objective,
                    str(k),
                    fmt_nll(cell),
                    fmt(paper[0] if paper else None),
                    fmt_units(cell.units),
                    fmt_seconds(cell),
                ]
            )
    headers = ["dataset", "layers", "objective", "k", "NLL", "paper NLL", "active units", "seconds/epoch"]
    return Table(headers, rows) if rows else None


def runs_table(records: list[RunRecord]) -> Table:
    headers = [
        "run",
        "seed",
        "epochs",
        "train examples",
        "eval",
        "NLL",
        "units",
        "E log p(x|h)",
        "KL",
        "train bound",
        "valid bound",
        "s/epoch",
    ]
    rows = [
        [
            r.label,
            str(r.seed),
            str(r.epochs),
            str(r.train_limit or "all"),
            f"L_{r.eval_k} on {r.eval_n}",
            fmt(r.nll),
            fmt_units(r.units),
            fmt(r.recon),
            fmt(r.kl),
            fmt(r.train_bound),
            fmt(r.valid_bound),
            fmt(r.seconds_per_epoch, 3),
        ]
        for r in records
    ]
    return Table(headers, rows)


def orderings(cells: dict[tuple[str, int, int, str], Cell]) -> list[str]:
    """Which of the paper's orderings hold for our numbers (only where both sides were run)."""
    lines = []
    for dataset, layers in sorted({key[:2] for key in cells}):
        where = f"{dataset}, {layers} layer(s)"
        ks = sorted({key[2] for key in cells if key[:2] == (dataset, layers)})
        for k in ks:
            vae, iwae = cells.get((dataset, layers, k, "vae")), cells.get((dataset, layers, k, "iwae"))
            if k > 1 and vae and iwae:
                gap = vae.nll - iwae.nll
                verdict = "holds" if gap > 0 else "does not hold"
                lines.append(f"{where}, k={k}: IWAE NLL < VAE NLL {verdict} (VAE - IWAE = {gap:+.2f} nats)")
                more = "holds" if sum(iwae.units) >= sum(vae.units) else "does not hold"
                counts = f"{fmt_units(iwae.units)} vs {fmt_units(vae.units)}"
                lines.append(f"{where}, k={k}: IWAE has at least as many active units as the VAE {more} ({counts})")
        for objective in ("iwae",):
            points = [(k, cells[key]) for k in ks if (key := (dataset, layers, k, objective)) in cells]
            if len(points) >= 2:
                nlls = [cell.nll for _, cell in points]
                falls = "holds" if all(b < a for a, b in itertools.pairwise(nlls)) else "does not hold"
                series = ", ".join(f"k={k}: {cell.nll:.2f}" for k, cell in points)
                lines.append(f"{where}: {objective.upper()} NLL falls as k grows {falls} ({series})")
    return lines
