"""The report assembled (:func:`build_report`) and written (:func:`write_report`), as Markdown and HTML.

``OUT.md`` has its figures in ``OUT_files/``; ``OUT.html`` embeds them as base64 PNG and stands alone.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iwae.checkpoint import atomic_write_bytes, atomic_write_text
from iwae.files import make_folder
from iwae.lab.reports.figures import plot_against_k, plot_learning_curves, plot_log_activity
from iwae.lab.reports.published import BURDA_PASSES, RAINFORTH_SOURCE, SOURCE
from iwae.lab.reports.records import (
    Cell,
    RunRecord,
    budget_groups,
    cells_of,
    is_comparable,
    is_table1_run,
    load_records,
    protocol_of,
    table1_cells,
)
from iwae.lab.reports.tables import (
    Table,
    estimators_table,
    ksweep_table,
    not_comparable_table,
    orderings,
    protocol_note,
    runs_table,
    table1,
    table2,
    units_table,
)

# How a Table 1's heading names its runs' protocol (records.protocol_of): always where they trained as the authors'
# code does, and the default where the report holds another protocol's Table 1 too.
PROTOCOL_TAGS = {
    "authors": ", runs following the authors' code",
    "default": ", default protocol",
    "mixed": ", mixed protocol",
}
NOT_COMPARABLE = "Runs not comparable with Burda et al.'s Table 1"


@dataclass
class Report:
    """A report as a list of blocks (headings, paragraphs, lists, tables, images), rendered by :meth:`markdown`
    and :meth:`html`."""

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
                for note in content.notes:
                    out += [note, ""]
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
                out += [f"<p>{esc(note)}</p>" for note in content.notes]
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
        "(the paper: L_5000 on the whole test set). Differences are ours minus the paper's; active units are "
        "counted per stochastic layer, by the definition the note under each table names. A cell of several seeds "
        "shows mean ± sample standard deviation "
        "(n = seeds; units: the mean); differences, orderings and figures use the mean."
    )


def _environment_text(records: list[RunRecord]) -> str:
    keys = ("package_version", "torch_version", "device", "git_commit")
    seen = {key: sorted({str(r.env.get(key)) for r in records}) for key in keys}
    return "Environment: " + "; ".join(f"{key} {', '.join(values)}" for key, values in seen.items())


def _add_table1(report: Report, runs: list[RunRecord], suffix: str, tag: str) -> None:
    cells = table1_cells(runs)
    report.heading(f"Table 1{tag}: test NLL (nats) and active units, ours | paper | difference{suffix}")
    table = table1(cells)
    table.notes.insert(0, protocol_note(runs))
    report.table(table)
    _add_orderings(report, cells, tag + suffix)


def _add_orderings(report: Report, cells: dict[tuple[str, int, int, str], Cell], suffix: str) -> None:
    lines = orderings(cells)
    if lines:
        report.heading(f"The paper's orderings at this budget{suffix}")
        report.bullets(lines)


def _add_not_comparable(report: Report, runs: list[RunRecord], suffix: str) -> None:
    """The Table 1 runs outside Burda's setup: their own table, no paper columns, the note saying why."""
    table = not_comparable_table(runs)
    if table is None:
        return
    report.heading(f"{NOT_COMPARABLE}: test NLL (nats) and active units by two definitions{suffix}")
    report.table(table)
    _add_orderings(report, cells_of(runs), suffix)


def _add_ksweep(
    report: Report, cells: dict[tuple[str, int, int, str], Cell], suffix: str, tag: str, paper: bool = True
) -> None:
    """A k-sweep's table and figures beside the paper's; for runs outside Burda's setup (``paper`` False) the
    figures alone, without the paper's (their table is :func:`not_comparable_table`)."""
    sweep = ksweep_table(cells, paper)
    if sweep is None:
        return
    report.heading(f"k-sweep{suffix}" if paper else f"k-sweep, {NOT_COMPARABLE[0].lower()}{NOT_COMPARABLE[1:]}{suffix}")
    if paper:
        report.table(sweep)
    dashed = " (dashed: the paper)" if paper else ""
    for quantity, name, caption in (
        ("nll", "nll_vs_k", f"Test NLL against k{dashed}"),
        ("units", "units_vs_k", f"Active units against k{dashed}"),
        ("seconds", "seconds_vs_k", "Training seconds per epoch against k"),
    ):
        data = plot_against_k(cells, quantity, paper)
        if data:
            report.image(f"{name}{tag}.png", data, caption + suffix)


def build_report(records: list[RunRecord], unfinished: list[dict[str, Any]], title: str) -> Report:
    """The report of finished runs and the rows of unfinished ones (:func:`iwae.lab.reports.records.load_records`).

    Table 1 (beside the paper for runs in Burda's setup, apart otherwise), objectives and estimators, Table 2,
    k-sweeps with figures, all runs, active units, learning curves, histograms of log A_u, sample grids and the
    runs not finished; each section only where the records hold it.
    """
    report = Report(title)
    report.text(f"{len(records)} finished run(s), {len(unfinished)} not finished. Published numbers: {SOURCE}.")
    if records:
        report.text(_budget_text(records))
        report.text(_environment_text(records))
    table1_runs = [r for r in records if is_table1_run(r)]
    comparable = budget_groups([r for r in table1_runs if is_comparable(r)])
    others = budget_groups([r for r in table1_runs if not is_comparable(r)])
    several = len(comparable) + len(others) > 1
    protocols = {protocol_of(group[0].config) for group in comparable.values()}
    for budget, group in comparable.items():
        protocol = protocol_of(group[0].config)
        tag = "" if protocols == {"default"} else PROTOCOL_TAGS[protocol]
        _add_table1(report, group, f" ({budget})" if several else "", tag)
    for budget, group in others.items():
        _add_not_comparable(report, group, f" ({budget})" if several else "")
    estimators = estimators_table(records)
    if estimators is not None:
        report.heading("Objectives and estimators")
        report.text(f"Paper numbers: {RAINFORTH_SOURCE}.")
        report.table(estimators)
    swap = table2(records)
    if swap is not None:
        report.heading("Table 2: objective swap (continue a finished run under the other objective)")
        report.table(swap)
    groups = [(budget, group, True) for budget, group in comparable.items()]
    groups += [(budget, group, False) for budget, group in others.items()]
    for index, (budget, group, paper) in enumerate(groups):
        suffix, tag = (f" ({budget})", f"_{index + 1}") if several else ("", "")
        _add_ksweep(report, cells_of(group), suffix, tag, paper)
    if records:
        report.heading("All runs")
        report.table(runs_table(records))
        report.heading("Active units by definition")
        report.table(units_table(records))
        curves = plot_learning_curves(records)
        if curves:
            report.heading("Learning curves")
            report.image("learning_curves.png", curves, "Validation bound per epoch (solid), training bound (dashed)")
        activity = plot_log_activity(records)
        if activity:
            report.heading("Histograms of log A_u")
            report.text(
                "A_u = Var over the evaluated images of E_q[u|x] (ours); a unit is active if A_u > 0.01 (dotted "
                "line). After full training "
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
    """Write ``OUT.md`` (figures in ``OUT_files/``) and a self-contained ``OUT.html``, atomically.

    Args:
        sweep_dirs: the sweep folders whose databases the report reads.
        out: the report's path without suffix (a ``.md`` or ``.html`` suffix is dropped).
        title: the report's title.

    Returns:
        The paths written (``markdown``, ``html``, ``figures``) and the counts of ``runs`` and ``unfinished``,
        as strings.
    """
    out = Path(out)
    if out.suffix in (".md", ".html"):
        out = out.with_suffix("")
    records, unfinished = load_records(list(sweep_dirs))
    report = build_report(records, unfinished, title)
    files_dir = out.parent / f"{out.name}_files"
    make_folder(files_dir, "the report's figures folder")
    for kind, content in report.blocks:
        if kind == "img":
            name, data, _ = content
            atomic_write_bytes(files_dir / name, data)
    md_path, html_path = out.with_suffix(".md"), out.with_suffix(".html")
    atomic_write_text(md_path, report.markdown(files_dir.name))  # UTF-8
    atomic_write_text(html_path, report.html())
    return {
        "markdown": str(md_path),
        "html": str(html_path),
        "figures": str(files_dir),
        "runs": str(len(records)),
        "unfinished": str(len(unfinished)),
    }
