"""The report's tables (:class:`Table`: headers and rows of strings).

Table 1, Table 2, the k-sweep, the other objectives and estimators, all runs, and the paper's orderings checked on
our numbers.

A cell of several seeds shows its mean ± the sample standard deviation, with the NLL's ``(n=seeds)``:
``86.91 ± 0.12 (n=3)``; a single seed shows its number. Differences from the paper and orderings use the mean.

Every table that shows active units says whose definition (:data:`UNIT_DEFINITIONS`) in a note under it; a count by
the authors' definition carries ``(authors)``. :func:`units_table` sets the definitions side by side per run.

Only runs in Burda's setup (:func:`~iwae.lab.reports.records.is_comparable`) stand beside the paper's numbers. The
others go into :func:`not_comparable_table`, without the paper's columns; its note (:func:`departures_note`) says
why. :func:`protocol_note` says under a Table 1 whether its runs trained as the authors' code does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from iwae.lab.reports.published import PUBLISHED_RAINFORTH, PUBLISHED_TABLE1, PUBLISHED_TABLE2
from iwae.lab.reports.records import (
    Cell,
    RunRecord,
    burda_departures,
    group_by,
    is_table1_run,
    ksweep_groups,
    mean_cell,
    protocol_of,
    protocol_settings,
    setting_of,
)


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    """``value`` to ``digits`` decimals (with its sign if ``signed``); ``—`` for None or NaN."""
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


def fmt_units(units: tuple[float, ...] | None, definition: str = "ours") -> str:
    """Counts per stochastic layer joined by ``+``; ``(authors)`` after a count by the authors' definition."""
    if units is None:
        return "—"
    counts = "+".join(f"{u:g}" if float(u).is_integer() else f"{u:.1f}" for u in units)
    return f"{counts} (authors)" if definition == "authors" else counts


# What each definition of active units counts (iwae.evaluate), as the notes under the tables say it.
UNIT_DEFINITIONS = {
    "ours": (
        "units: Var over the evaluated (test) images of E_q[u|x] > 0.01 (ours; above the first layer E_q[u|x] "
        "averages q's mean over 100 samples of the layer below)"
    ),
    "authors": (
        "units (authors): the authors' code's definition, the variance (ddof 0) of q's mean over the first 500 "
        "training images, layer 2's given one sample of h1, >= 0.01; their pruned NLL cuts the other units out "
        "of the weights"
    ),
    "kl": "units (KL): mean per-unit KL(q(u|.) || p(u|.)) over the evaluated images > 0.01",
}
PAPER_UNITS = "The paper's counts come from the authors' code (their definition)."


def units_note(definitions: set[str], paper: bool = True) -> str:
    """The note under a table of active units: the definitions it shows (and where the paper's counts come from)."""
    shown = [UNIT_DEFINITIONS[d] for d in ("ours", "authors", "kl") if d in definitions]
    return "Active units per stochastic layer. " + "; ".join(shown) + "." + (f" {PAPER_UNITS}" if paper else "")


@dataclass
class Table:
    """A table as strings: headers, rows, and notes shown under it."""

    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)  # shown under the table


def _compare(ours: Cell | None, paper: tuple[float, tuple[int, ...] | None] | None) -> list[str]:
    """ours | paper | difference, for NLL and for active units (ours: the means over seeds)."""
    p_nll, p_units = paper if paper is not None else (None, None)
    nll = ours.nll if ours else None
    units = ours.units if ours else None
    definition = ours.unit_definition if ours else "ours"
    d_nll = nll - p_nll if nll is not None and p_nll is not None else None
    d_units = sum(units) - sum(p_units) if units is not None and p_units is not None else None
    return [
        fmt_nll(ours),
        fmt(p_nll),
        fmt(d_nll, signed=True),
        fmt_units(units, definition),
        fmt_units(p_units),
        fmt(d_units, 0 if d_units is None or float(d_units).is_integer() else 1, signed=True),
    ]


def table1(cells: dict[tuple[str, int, int, str], Cell]) -> Table:
    """Burda's Table 1 layout: per (dataset, layers, k), VAE and IWAE NLL and active units beside the paper's."""
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
    return Table(headers, rows, [units_note({cell.unit_definition for cell in cells.values()})])


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
    rows, definitions, off_setup = [], set(), []
    for runs in group_by([r for r in records if r.init_from is not None], key).values():
        r, base = runs[0], base_of(runs[0])
        bases = mean_cell([b for b in map(base_of, runs) if b is not None]) if base else None
        base_key = (base.objective, base.k) if base else None
        departures = list(dict.fromkeys(d for run in (r, base) if run for d in burda_departures(run.config)))
        if departures:
            off_setup.append(f"{_labels(runs)}: {'; '.join(departures)}")
        published = base is not None and r.dataset == "mnist" and r.layers == 1 and not departures
        paper = PUBLISHED_TABLE2.get((base_key, (r.objective, r.k))) if published else None
        base_paper = paper["base"] if paper else (None, None)
        cell = mean_cell(runs)
        cont = _compare(cell, paper["continued"] if paper else None)
        definitions |= {cell.unit_definition, *([bases.unit_definition] if bases else [])}
        rows.append(
            [
                _labels(runs),
                f"{base.objective} k={base.k}" if base else Path(str(r.init_from)).name,
                f"{r.objective} k={r.k}",
                fmt_nll(bases),
                fmt(base_paper[0]),
                fmt_units(bases.units, bases.unit_definition) if bases else "—",
                fmt_units(base_paper[1]),
                *cont,
            ]
        )
    notes = [units_note(definitions)]
    if off_setup:
        notes.append(f"Not beside the paper's numbers, not being Burda et al.'s setup: {'. '.join(off_setup)}.")
    return Table(headers, rows, notes) if rows else None


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

    rows, definitions = [], set()
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
                fmt_units(cell.units, cell.unit_definition),
                fmt_seconds(cell),
            ]
        )
        definitions.add(cell.unit_definition)
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
    return Table(headers, rows, [units_note(definitions, paper=False)])


def ksweep_table(cells: dict[tuple[str, int, int, str], Cell], paper: bool = True) -> Table | None:
    """NLL, active units and seconds per epoch against k; None if no group has a k-sweep.

    With ``paper``, the paper's NLL stands beside ours; pass it for cells of runs in Burda's setup only.
    """
    rows, definitions = [], set()
    for (dataset, layers, objective), points in ksweep_groups(cells).items():
        for k, cell in points:
            published = PUBLISHED_TABLE1.get((dataset, layers, k, objective))
            rows.append(
                [
                    dataset,
                    str(layers),
                    objective,
                    str(k),
                    fmt_nll(cell),
                    *([fmt(published[0] if published else None)] if paper else []),
                    fmt_units(cell.units, cell.unit_definition),
                    fmt_seconds(cell),
                ]
            )
            definitions.add(cell.unit_definition)
    headers = ["dataset", "layers", "objective", "k", "NLL", *(["paper NLL"] if paper else []), "active units"]
    headers.append("seconds/epoch")
    return Table(headers, rows, [units_note(definitions, paper=False)]) if rows else None


def departures_note(records: list[RunRecord]) -> str:
    """Why runs are not beside the paper's numbers: their :func:`burda_departures`, per setting.

    Runs that depart alike share one list.
    """
    by_departures = group_by(records, lambda r: tuple(burda_departures(r.config)))
    why = [
        ("; ".join(departures) if len(by_departures) == 1 else f"{_labels(runs)}: {'; '.join(departures)}")
        for departures, runs in by_departures.items()
        if departures
    ]
    return (
        "Not beside Burda et al.'s numbers, because these runs depart from the paper's setup: " + ". ".join(why) + "."
    )


def not_comparable_table(records: list[RunRecord]) -> Table | None:
    """Table 1 runs outside Burda's setup, a row per setting over its seeds, without paper columns; None if none.

    Table 1 runs: VAE or IWAE, standard estimator, from scratch. A row shows the NLL, and active units by the
    covariance definition (ours, or the authors' where evaluated so) beside the per-unit KL's. The note says how
    the runs depart from Burda's setup.
    """
    runs_of = [r for r in records if is_table1_run(r) and burda_departures(r.config)]
    if not runs_of:
        return None

    def order(runs: list[RunRecord]) -> tuple[str, int, str, int]:
        return (runs[0].dataset, runs[0].layers, runs[0].objective, runs[0].k)

    rows, definitions = [], {"kl"}
    for runs in sorted(group_by(runs_of, setting_of).values(), key=order):
        r, cell = runs[0], mean_cell(runs)
        rows.append(
            [
                _labels(runs),
                r.dataset,
                str(r.layers),
                r.objective,
                str(r.k),
                fmt_nll(cell),
                fmt_units(cell.units, cell.unit_definition),
                fmt_units(cell.units_kl),
                fmt_seconds(cell),
            ]
        )
        definitions.add(cell.unit_definition)
    headers = [
        "run",
        "dataset",
        "layers",
        "objective",
        "k",
        "NLL",
        "units: Var_x E_q[u|x] (covariance)",
        "units: per-unit KL",
        "s/epoch",
    ]
    return Table(headers, rows, [departures_note(runs_of), units_note(definitions, paper=False)])


def protocol_note(records: list[RunRecord]) -> str:
    """Under a Table 1: whether its runs trained as the authors' code does, with the settings named.

    The runs of a table share their protocol (it is part of their budget).
    """
    config = records[0].config
    settings = protocol_settings(config)
    protocol = protocol_of(config)
    if protocol == "authors":
        return (
            'These runs follow the authors\' code (protocol = "authors"; github.com/yburda/iwae, which produced the '
            f"paper's numbers): {settings}."
        )
    if protocol == "default":
        return (
            f"These runs follow this package's default protocol, not the authors' code: {settings}. The paper's "
            'numbers come from the authors\' code (protocol = "authors" trains as it does).'
        )
    return f"These runs follow neither this package's default protocol nor the authors' code throughout: {settings}."


def runs_table(records: list[RunRecord]) -> Table:
    """One row per run: seed, epochs, examples, evaluation, NLL, active units, its terms, bounds, seconds per epoch."""
    headers = [
        "run",
        "seed",
        "epochs",
        "train examples",
        "eval",
        "NLL",
        "units (ours)",
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
    return Table(
        headers, rows, [units_note({"ours"}, paper=False) + " The other definitions: 'Active units by definition'."]
    )


def units_table(records: list[RunRecord]) -> Table:
    """Per run, its active units by each definition side by side, and its NLL beside its pruned NLL.

    The definitions: ours, the per-unit KL's, the authors'; the pruned NLL says whose units it leaves out. '—'
    where the record has no value: an ``eval.json`` without ``pruned_by`` gives no authors' count
    (:mod:`iwae.lab.reports.records`).
    """
    headers = [
        "run",
        "units: Var E_q[u|x] (ours)",
        "units: per-unit KL",
        "units: authors' (500 training images)",
        "NLL",
        "pruned NLL",
        "pruned by",
    ]
    pruned_by = {"ours": "ours (units masked)", "authors": "authors (units cut out of the weights)"}
    rows = [
        [
            r.label,
            fmt_units(r.units),
            fmt_units(r.units_kl),
            fmt_units(r.units_authors),
            fmt(r.nll),
            fmt(r.nll_pruned),
            pruned_by.get(r.pruned_by, r.pruned_by) if r.nll_pruned is not None else "—",
        ]
        for r in records
    ]
    notes = [
        units_note({"ours", "authors", "kl"}, paper=False),
        "The pruned NLL is L_k of the model without the inactive units of the definition 'pruned by' names "
        "(the authors' 'dead units removed').",
    ]
    return Table(headers, rows, notes)


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
