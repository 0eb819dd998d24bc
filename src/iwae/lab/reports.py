"""Reports: our Table 1 / Table 2 / k-sweep beside Burda et al.'s, with figures, as Markdown and HTML.

Every number in a report comes from the sweep databases (:mod:`iwae.lab.store`): evaluation results,
per-epoch metrics and timings are stored there by the runner; the published numbers come from
:data:`PUBLISHED_TABLE1` and :data:`PUBLISHED_TABLE2` below (Burda, Grosse and Salakhutdinov,
"Importance Weighted Autoencoders", ICLR 2016, Tables 1 and 2 and Appendix D, as transcribed in
REFERENCE.md section 4). Only the sample grids are read from the PNG files whose paths the database
records. ``REPORT.md`` links its figures from ``REPORT_files/``; ``REPORT.html`` embeds them as
base64 PNG and stands alone.

No tensors are handled here (the package's ``[k, batch, ...]`` shape convention does not arise);
the histograms of log A_u use the per-unit values stored in each run's evaluation.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iwae.lab.store import ResultStore

SOURCE = "Burda, Grosse & Salakhutdinov (ICLR 2016), via REFERENCE.md section 4"

# (dataset, stochastic layers, k, objective) -> (test NLL in nats, active units per layer or None).
PUBLISHED_TABLE1: dict[tuple[str, int, int, str], tuple[float, tuple[int, ...] | None]] = {
    # MNIST, dynamic binarisation (Table 1)
    ("mnist", 1, 1, "vae"): (86.76, (19,)),
    ("mnist", 1, 1, "iwae"): (86.76, (19,)),
    ("mnist", 1, 5, "vae"): (86.47, (20,)),
    ("mnist", 1, 5, "iwae"): (85.54, (22,)),
    ("mnist", 1, 50, "vae"): (86.35, (20,)),
    ("mnist", 1, 50, "iwae"): (84.78, (25,)),
    ("mnist", 2, 1, "vae"): (85.33, (16, 5)),
    ("mnist", 2, 1, "iwae"): (85.33, (16, 5)),
    ("mnist", 2, 5, "vae"): (85.01, (17, 5)),
    ("mnist", 2, 5, "iwae"): (83.89, (21, 5)),
    ("mnist", 2, 50, "vae"): (84.78, (17, 5)),
    ("mnist", 2, 50, "iwae"): (82.90, (26, 7)),
    # OMNIGLOT (Table 1)
    ("omniglot", 1, 1, "vae"): (108.11, (28,)),
    ("omniglot", 1, 1, "iwae"): (108.11, (28,)),
    ("omniglot", 1, 5, "vae"): (107.62, (28,)),
    ("omniglot", 1, 5, "iwae"): (106.12, (34,)),
    ("omniglot", 1, 50, "vae"): (107.80, (28,)),
    ("omniglot", 1, 50, "iwae"): (104.67, (41,)),
    ("omniglot", 2, 1, "vae"): (107.58, (28, 4)),
    ("omniglot", 2, 1, "iwae"): (107.56, (30, 5)),
    ("omniglot", 2, 5, "vae"): (106.31, (30, 5)),
    ("omniglot", 2, 5, "iwae"): (104.79, (38, 6)),
    ("omniglot", 2, 50, "vae"): (106.30, (30, 5)),
    ("omniglot", 2, 50, "iwae"): (103.38, (44, 7)),
    # Fixed binarisation MNIST (Appendix D): NLL only
    ("mnist-fixed", 1, 1, "vae"): (88.71, None),
    ("mnist-fixed", 1, 5, "vae"): (88.83, None),
    ("mnist-fixed", 1, 50, "vae"): (89.05, None),
    ("mnist-fixed", 1, 1, "iwae"): (88.71, None),
    ("mnist-fixed", 1, 5, "iwae"): (87.63, None),
    ("mnist-fixed", 1, 50, "iwae"): (87.10, None),
    ("mnist-fixed", 2, 1, "vae"): (88.08, None),
    ("mnist-fixed", 2, 5, "vae"): (87.63, None),
    ("mnist-fixed", 2, 50, "vae"): (87.86, None),
    ("mnist-fixed", 2, 1, "iwae"): (88.08, None),
    ("mnist-fixed", 2, 5, "iwae"): (86.17, None),
    ("mnist-fixed", 2, 50, "iwae"): (85.32, None),
}

# Table 2 (MNIST, one layer; 2,187 further passes at 1e-4): (from objective, k) -> (to objective, k),
# with the base model's and the continued model's (NLL, active units).
PUBLISHED_TABLE2: dict[tuple[tuple[str, int], tuple[str, int]], dict[str, tuple[float, tuple[int, ...]]]] = {
    (("vae", 1), ("iwae", 50)): {"base": (86.76, (19,)), "continued": (84.88, (22,))},
    (("iwae", 50), ("vae", 50)): {"base": (84.78, (25,)), "continued": (86.02, (23,))},
}
BURDA_PASSES = 3280

# Rainforth et al. (ICML 2018), MNIST, one stochastic layer, 64 samples; marked unverified in
# REFERENCE.md section 4 (taken from secondary sources). (variant, estimator, k) -> test NLL.
RAINFORTH_SOURCE = "Rainforth et al. (ICML 2018), unverified, via REFERENCE.md section 4"
PUBLISHED_RAINFORTH: dict[tuple[str, str, int], float] = {
    ("iwae", "standard", 64): 84.52,
    ("miwae(M=8)", "standard", 64): 84.97,
    ("piwae(M=8)", "standard", 64): 84.46,
    ("ciwae(beta=0.05)", "standard", 64): 84.57,
    ("vae", "standard", 64): 86.21,
}


# -- runs from the databases ---------------------------------------------------------------------
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
    parameter = {"miwae": "M", "piwae": "M", "ciwae": "beta", "power": "p", "vr": "alpha"}.get(config.objective)
    return f"{config.objective}({parameter}={getattr(config, parameter):g})" if parameter else config.objective


def is_table1_run(record: RunRecord) -> bool:
    """A cell of Burda's Table 1: VAE or IWAE, standard estimator, trained from scratch."""
    return record.init_from is None and record.estimator == "standard" and record.objective in ("vae", "iwae")


def _record(row: dict[str, Any], label: str) -> RunRecord:
    from iwae.lab.experiments import train_config

    config = train_config(row["config"])
    evaluation = row["eval"]
    return RunRecord(
        label=label,
        run_dir=row["run_dir"],
        dataset=config.dataset,
        layers=config.model.n_stochastic,
        objective=config.objective,
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
    from iwae.lab.store import DB_FILE

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


# -- formatting -----------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_units(units: tuple[float, ...] | None) -> str:
    if units is None:
        return "—"
    return "+".join(f"{u:g}" if float(u).is_integer() else f"{u:.1f}" for u in units)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class Cell:
    """Our result for one setting, averaged over seeds."""

    nll: float
    units: tuple[float, ...]
    seeds: int
    seconds_per_epoch: float


def _cell(records: list[RunRecord]) -> Cell:
    units = tuple(_mean([r.units[j] for r in records]) for j in range(len(records[0].units)))
    return Cell(_mean([r.nll for r in records]), units, len(records), _mean([r.seconds_per_epoch for r in records]))


def table1_cells(records: list[RunRecord]) -> dict[tuple[str, int, int, str], Cell]:
    groups: dict[tuple[str, int, int, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if is_table1_run(r):
            groups[(r.dataset, r.layers, r.k, r.objective)].append(r)
    return {key: _cell(group) for key, group in sorted(groups.items())}


def estimators_table(records: list[RunRecord]) -> Table | None:
    """Runs with another objective or estimator, beside the IWAE runs of the same setting and Rainforth's numbers."""
    others = [r for r in records if r.init_from is None and not is_table1_run(r)]
    if not others:
        return None
    settings = {(r.dataset, r.layers, r.k, r.epochs, r.train_limit) for r in others}
    shown = [
        r for r in records if r.init_from is None and (r.dataset, r.layers, r.k, r.epochs, r.train_limit) in settings
    ]
    rows = []
    for r in sorted(shown, key=lambda r: (r.dataset, r.layers, r.k, r.variant != "iwae", r.variant, r.estimator)):
        published = r.dataset == "mnist" and r.layers == 1
        paper = PUBLISHED_RAINFORTH.get((r.variant, r.estimator, r.k)) if published else None
        rows.append(
            [
                r.label,
                r.dataset,
                str(r.layers),
                r.variant,
                r.estimator,
                str(r.k),
                fmt(r.nll),
                fmt(paper),
                fmt(r.nll - paper, signed=True) if paper is not None else "—",
                fmt_units(r.units),
                fmt(r.seconds_per_epoch, 3),
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


# -- tables ---------------------------------------------------------------------------------------
@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


def _compare(ours: Cell | None, paper: tuple[float, tuple[int, ...] | None] | None) -> list[str]:
    """ours | paper | difference, for NLL and for active units."""
    p_nll, p_units = paper if paper is not None else (None, None)
    nll = ours.nll if ours else None
    units = ours.units if ours else None
    d_nll = nll - p_nll if nll is not None and p_nll is not None else None
    d_units = sum(units) - sum(p_units) if units is not None and p_units is not None else None
    return [
        fmt(nll),
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
    by_dir = {str(Path(r.run_dir).resolve()): r for r in records}
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
    for r in records:
        if r.init_from is None:
            continue
        base = by_dir.get(str(Path(r.init_from).resolve()))
        base_key = (base.objective, base.k) if base else None
        published = base is not None and r.dataset == "mnist" and r.layers == 1
        paper = PUBLISHED_TABLE2.get((base_key, (r.objective, r.k))) if published else None
        base_paper = paper["base"] if paper else (None, None)
        cont = _compare(_cell([r]), paper["continued"] if paper else None)
        rows.append(
            [
                r.label,
                f"{base.objective} k={base.k}" if base else Path(r.init_from).name,
                f"{r.objective} k={r.k}",
                fmt(base.nll) if base else "—",
                fmt(base_paper[0]),
                fmt_units(base.units) if base else "—",
                fmt_units(base_paper[1]),
                *cont,
            ]
        )
    return Table(headers, rows) if rows else None


def ksweep_groups(cells: dict[tuple[str, int, int, str], Cell]) -> dict[tuple[str, int, str], list[tuple[int, Cell]]]:
    groups: dict[tuple[str, int, str], list[tuple[int, Cell]]] = defaultdict(list)
    for (dataset, layers, k, objective), cell in cells.items():
        groups[(dataset, layers, objective)].append((k, cell))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in groups.items() if len(points) >= 2}


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
                    fmt(cell.nll),
                    fmt(paper[0] if paper else None),
                    fmt_units(cell.units),
                    fmt(cell.seconds_per_epoch, 3),
                ]
            )
    headers = ["dataset", "layers", "objective", "k", "NLL", "paper NLL", "active units", "seconds/epoch"]
    return Table(headers, rows) if rows else None


def runs_table(records: list[RunRecord]) -> Table:
    headers = [
        "run",
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


# -- figures --------------------------------------------------------------------------------------
def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_k(cells: dict[tuple[str, int, int, str], Cell], quantity: str) -> bytes | None:
    """NLL, active units or seconds per epoch against k, ours (solid) and the paper's (dashed)."""
    groups = ksweep_groups(cells)
    if not groups:
        return None
    plt = _plt()
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    for (dataset, layers, objective), points in groups.items():
        ks = [k for k, _ in points]
        label = f"{objective} {dataset} {layers}L"
        if quantity == "nll":
            line = axis.plot(ks, [c.nll for _, c in points], "o-", label=f"{label} (ours)")[0]
            paper = [
                (k, PUBLISHED_TABLE1[(dataset, layers, k, objective)][0])
                for k in ks
                if (dataset, layers, k, objective) in PUBLISHED_TABLE1
            ]
        elif quantity == "units":
            line = axis.plot(ks, [sum(c.units) for _, c in points], "o-", label=f"{label} (ours)")[0]
            paper = [
                (k, sum(PUBLISHED_TABLE1[(dataset, layers, k, objective)][1] or ()))
                for k in ks
                if (dataset, layers, k, objective) in PUBLISHED_TABLE1
                and PUBLISHED_TABLE1[(dataset, layers, k, objective)][1]
            ]
        else:
            line = axis.plot(ks, [c.seconds_per_epoch for _, c in points], "o-", label=label)[0]
            paper = []
        if paper:
            axis.plot(*zip(*paper, strict=True), "s--", color=line.get_color(), alpha=0.6, label=f"{label} (paper)")
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
    curves = [r for r in records if r.metrics]
    if not curves:
        return None
    plt = _plt()
    fig, axis = plt.subplots(figsize=(7, 4.5))
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
    with_values = [r for r in records if r.log_activity]
    if not with_values:
        return None
    plt = _plt()
    cols = min(3, len(with_values))
    rows = math.ceil(len(with_values) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
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


# -- assembling -----------------------------------------------------------------------------------
@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, name: str, data: bytes, caption: str) -> None:
        self.blocks.append(("img", (name, data, caption)))

    def markdown(self, files_dir: str) -> str:
        out = [f"# {self.title}", ""]
        for kind, content in self.blocks:
            if kind == "h2":
                out += [f"## {content}", ""]
            elif kind == "p":
                out += [content, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in content] + [""]
            elif kind == "table":
                header = " | ".join(h.replace("|", "\\|") for h in content.headers)
                out += [f"| {header} |", "|" + "---|" * len(content.headers)]
                out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in content.rows]
                out += [""]
            else:
                name, _, caption = content
                out += [f"![{caption}]({files_dir}/{name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        out = [
            "<!DOCTYPE html>",
            "<html><head><meta charset='utf-8'>",
            f"<title>{esc(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
            "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
            "img{max-width:100%}figcaption{font-style:italic;font-size:13px}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for kind, content in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{esc(content)}</h2>")
            elif kind == "p":
                out.append(f"<p>{esc(content)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in content) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in content.headers)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in content.rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                name, data, caption = content
                encoded = base64.b64encode(data).decode("ascii")
                out.append(
                    f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{encoded}'>"
                    f"<figcaption>{esc(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _budget_text(records: list[RunRecord]) -> str:
    epochs = sorted({r.epochs for r in records})
    limits = sorted({str(r.train_limit or "all") for r in records})
    evals = sorted({f"L_{r.eval_k} on {r.eval_n} test examples" for r in records})
    return (
        f"Budget: {', '.join(map(str, epochs))} pass(es) over {', '.join(limits)} training examples "
        f"(the paper: {BURDA_PASSES:,} passes over all of them); evaluation: {'; '.join(evals)} "
        "(the paper: L_5000 on the whole test set). Differences are ours minus the paper's; units are "
        "counted per stochastic layer (A_u > 0.01). Cells are means over seeds."
    )


def _environment_text(records: list[RunRecord]) -> str:
    keys = ("package_version", "torch_version", "device", "git_commit")
    seen = {key: sorted({str(r.env.get(key)) for r in records}) for key in keys}
    return "Environment: " + "; ".join(f"{key} {', '.join(values)}" for key, values in seen.items())


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


def _add_table1(report: Report, cells: dict[tuple[str, int, int, str], Cell], suffix: str) -> None:
    report.heading(f"Table 1: test NLL (nats) and active units, ours | paper | difference{suffix}")
    report.table(table1(cells))
    lines = orderings(cells)
    if lines:
        report.heading(f"The paper's orderings at this budget{suffix}")
        report.bullets(lines)


def _add_ksweep(report: Report, cells: dict[tuple[str, int, int, str], Cell], suffix: str, tag: str) -> None:
    sweep = ksweep_table(cells)
    if sweep is None:
        return
    report.heading(f"k-sweep{suffix}")
    report.table(sweep)
    for quantity, name, caption in (
        ("nll", "nll_vs_k", "Test NLL against k (dashed: the paper)"),
        ("units", "units_vs_k", "Active units against k (dashed: the paper)"),
        ("seconds", "seconds_vs_k", "Training seconds per epoch against k"),
    ):
        data = plot_against_k(cells, quantity)
        if data:
            report.image(f"{name}{tag}.png", data, caption + suffix)


def build_report(records: list[RunRecord], unfinished: list[dict[str, Any]], title: str) -> Report:
    report = Report(title)
    report.text(f"{len(records)} finished run(s), {len(unfinished)} not finished. Published numbers: {SOURCE}.")
    if records:
        report.text(_budget_text(records))
        report.text(_environment_text(records))
    groups = budget_groups(records)
    for budget, group in groups.items():
        suffix = f" ({budget})" if len(groups) > 1 else ""
        _add_table1(report, table1_cells(group), suffix)
    estimators = estimators_table(records)
    if estimators is not None:
        report.heading("Objectives and estimators")
        report.text(f"Paper numbers: {RAINFORTH_SOURCE}.")
        report.table(estimators)
    swap = table2(records)
    if swap is not None:
        report.heading("Table 2: objective swap (continue a finished run under the other objective)")
        report.table(swap)
    for index, (budget, group) in enumerate(groups.items()):
        suffix, tag = (f" ({budget})", f"_{index + 1}") if len(groups) > 1 else ("", "")
        _add_ksweep(report, table1_cells(group), suffix, tag)
    if records:
        report.heading("All runs")
        report.table(runs_table(records))
        curves = plot_learning_curves(records)
        if curves:
            report.heading("Learning curves")
            report.image("learning_curves.png", curves, "Validation bound per epoch (solid), training bound (dashed)")
        activity = plot_log_activity(records)
        if activity:
            report.heading("Histograms of log A_u")
            report.text(
                "A_u = Cov_x(E_q[u|x]); a unit is active if A_u > 0.01 (dotted line). After full training "
                "the paper finds the histogram bimodal; barely trained models need not be."
            )
            report.image("log_activity.png", activity, "log A_u per model and stochastic layer")
        samples = [(r, Path(r.samples_png)) for r in records if r.samples_png and Path(r.samples_png).is_file()]
        if samples:
            report.heading("Samples, reconstructions and interpolations")
            for r, path in samples:
                report.image(f"samples_{re.sub(r'[^A-Za-z0-9._-]+', '_', r.label)}.png", path.read_bytes(), r.label)
    if unfinished:
        report.heading("Runs not finished")
        report.table(
            Table(["run", "status", "error"], [[row["name"], row["status"], row["error"] or ""] for row in unfinished])
        )
    return report


def write_report(sweep_dirs: list[str | Path], out: str | Path, title: str = "IWAE experiments") -> dict[str, str]:
    """Write ``OUT.md`` (figures in ``OUT_files/``) and a self-contained ``OUT.html``."""
    out = Path(out)
    if out.suffix in (".md", ".html"):
        out = out.with_suffix("")
    records, unfinished = load_records(list(sweep_dirs))
    report = build_report(records, unfinished, title)
    files_dir = out.parent / f"{out.name}_files"
    files_dir.mkdir(parents=True, exist_ok=True)
    for kind, content in report.blocks:
        if kind == "img":
            name, data, _ = content
            (files_dir / name).write_bytes(data)
    md_path, html_path = out.with_suffix(".md"), out.with_suffix(".html")
    md_path.write_text(report.markdown(files_dir.name))
    html_path.write_text(report.html())
    return {
        "markdown": str(md_path),
        "html": str(html_path),
        "figures": str(files_dir),
        "runs": str(len(records)),
        "unfinished": str(len(unfinished)),
    }
