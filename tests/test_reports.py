"""Reports: published numbers, the tables' arithmetic, and the table1-smoke preset end to end."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import pytest

from iwae import cli
from iwae.lab.reports import (
    PUBLISHED_TABLE1,
    PUBLISHED_TABLE2,
    build_report,
    estimators_table,
    load_records,
    orderings,
    table1,
    table1_cells,
    table2,
    write_report,
)
from iwae.lab.reports.published import PUBLISHED_RAINFORTH, RAINFORTH_SOURCE
from iwae.lab.store import ResultStore

# The published numbers as transcribed, each table under its source, in the repository's docs/references.md.
REFERENCES = Path(__file__).resolve().parents[1] / "docs" / "references.md"


# -- the published numbers ------------------------------------------------------------------------
def _references_table(heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``### heading`` in docs/references.md, cells stripped."""
    section = REFERENCES.read_text().split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert len(lines) > 2, heading
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_published_numbers_match_docs_references() -> None:
    table1: dict[tuple[str, int, int, str], tuple[float, tuple[int, ...] | None]] = {}
    for dataset, heading in (
        ("mnist", "Burda et al. Table 1: MNIST, dynamic binarisation"),
        ("omniglot", "Burda et al. Table 1: OMNIGLOT"),
    ):
        for layers, k, vae, iwae in _references_table(heading):
            for objective, cell in (("vae", vae), ("iwae", iwae)):
                nll, units = cell.split(" / ")
                table1[(dataset, int(layers), int(k), objective)] = (float(nll), tuple(map(int, units.split("+"))))
    for layers, k, vae, iwae in _references_table("Burda et al. Appendix D: MNIST, fixed binarisation"):
        for objective, nll in (("vae", vae), ("iwae", iwae)):  # NLL only
            table1[("mnist-fixed", int(layers), int(k), objective)] = (float(nll), None)
    assert len(table1) == 36 and table1 == PUBLISHED_TABLE1

    def run(cell: str) -> tuple[str, int]:  # "IWAE, k = 50" -> ("iwae", 50)
        objective, k = cell.split(", k = ")
        return objective.lower(), int(k)

    def result(cell: str) -> tuple[float, tuple[int, ...]]:  # "84.88 / 22" -> (84.88, (22,))
        nll, units = cell.split(" / ")
        return float(nll), (int(units),)

    table2 = {
        (run(base), run(to)): {"base": result(base_cell), "continued": result(to_cell)}
        for base, base_cell, to, to_cell in _references_table("Burda et al. Table 2: the objective swap")
    }
    assert table2 == PUBLISHED_TABLE2

    rainforth = dict(_references_table("Rainforth et al. (ICML 2018): MNIST (unverified)"))
    rows = {
        ("iwae", "standard", 64): "IWAE (K = 64)",
        ("miwae(M=8)", "standard", 64): "MIWAE (M = 8, K = 8)",
        ("piwae(M=8)", "standard", 64): "PIWAE (M = 8, K = 8)",
        ("ciwae(beta=0.05)", "standard", 64): "CIWAE (beta = 0.05)",
        ("vae", "standard", 64): "VAE (M = 64)",
    }
    assert {key: float(rainforth[row]) for key, row in rows.items()} == PUBLISHED_RAINFORTH
    assert "unverified" in RAINFORTH_SOURCE  # secondary sources: reports must say so


# -- tables from a hand-made database -------------------------------------------------------------
def _row(store: ResultStore, name: str, run_dir: Path, nll: float, units: list[int], **options) -> None:
    config = {"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options}
    store.upsert(
        name,
        run_dir=str(run_dir / name),
        config=config,
        status="finished",
        seconds_per_epoch=1.5 * options.get("k", 1),
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={
            "nll": nll,
            "active_units": units,
            "k": 10,
            "n_examples": 30,
            "recon_log_lik": -80.0,
            "kl": 20.0,
            "log_activity": [[-9.0, -8.5, 0.1, 0.3][: sum(units) + 2]],
        },
        metrics=[
            {"epoch": 1, "train_bound": -110.0, "valid_L50": -105.0},
            {"epoch": 2, "train_bound": -100.0, "valid_L50": -101.0},
        ],
    )


@pytest.fixture
def made_up(tmp_path: Path) -> Path:
    """A sweep database with invented results (inputs for the arithmetic, not measurements)."""
    store = ResultStore.in_dir(tmp_path)
    _row(store, "vae-k1", tmp_path, 90.0, [10], objective="vae", k=1)
    _row(store, "vae-k5", tmp_path, 89.5, [11], objective="vae", k=5)
    _row(store, "iwae-k1", tmp_path, 90.0, [10], objective="iwae", k=1)
    _row(store, "iwae-k5", tmp_path, 88.0, [14], objective="iwae", k=5)
    _row(store, "iwae-k5-s1", tmp_path, 87.0, [16], objective="iwae", k=5, seed=1)
    _row(store, "swap", tmp_path, 87.5, [12], objective="iwae", k=50, init_from=str(tmp_path / "vae-k1"))
    store.upsert("broken", config={"k": 1}, status="failed", error="RuntimeError: boom")
    return tmp_path


def test_table1_sets_ours_beside_the_paper_with_differences(made_up: Path) -> None:
    records, unfinished = load_records([made_up])
    assert len(records) == 6 and [row["name"] for row in unfinished] == ["broken"]
    cells = table1_cells(records)
    assert ("mnist", 1, 50, "iwae") not in cells  # continued runs are not Table 1 cells
    iwae5 = cells[("mnist", 1, 5, "iwae")]
    assert iwae5.nll == pytest.approx(87.5) and iwae5.units == (15.0,) and iwae5.seeds == 2
    table = table1(cells)
    row = next(r for r in table.rows if r[:3] == ["mnist", "1", "5"])
    assert row[3:9] == ["89.50", "86.47", "+3.03", "11", "20", "-9"]  # VAE: ours, paper, diff (NLL; units)
    assert row[9:15] == ["87.50 ± 0.71 (n=2)", "85.54", "+1.96", "15", "22", "-7"]  # IWAE, mean of two seeds


def test_table2_pairs_continued_runs_with_their_base(made_up: Path) -> None:
    records, _ = load_records([made_up])
    table = table2(records)
    assert table is not None and len(table.rows) == 1
    row = table.rows[0]
    assert row[:7] == ["swap", "vae k=1", "iwae k=50", "90.00", "86.76", "10", "19"]
    assert row[7:] == ["87.50", "84.88", "+2.62", "12", "22", "-10"]


def test_orderings_are_judged_from_our_numbers(made_up: Path) -> None:
    records, _ = load_records([made_up])
    lines = orderings(table1_cells(records))
    assert "mnist, 1 layer(s), k=5: IWAE NLL < VAE NLL holds (VAE - IWAE = +2.00 nats)" in lines
    assert any("IWAE NLL falls as k grows holds" in line for line in lines)


def test_report_files_markdown_and_self_contained_html(made_up: Path, tmp_path: Path) -> None:
    paths = write_report([made_up], tmp_path / "out" / "REPORT.md", title="made up")
    markdown = Path(paths["markdown"]).read_text()
    page = Path(paths["html"]).read_text()
    assert paths["markdown"].endswith("REPORT.md") and paths["html"].endswith("REPORT.html")
    assert "| mnist | 1 | 5 | 89.50 | 86.47 | +3.03 |" in markdown
    assert "E log p(x\\|h)" in markdown  # pipes inside cells are escaped
    assert "](REPORT_files/learning_curves.png)" in markdown
    assert (tmp_path / "out" / "REPORT_files" / "log_activity.png").is_file()
    assert page.count("data:image/png;base64,") >= 4 and "<img" in page and "src='REPORT_files" not in page
    assert "RuntimeError: boom" in markdown
    records, unfinished = load_records([made_up])
    report = build_report(records, unfinished, "x")
    assert [b[1] for b in report.blocks if b[0] == "h2"][:3] == [
        "Table 1: test NLL (nats) and active units, ours | paper | difference",
        "The paper's orderings at this budget",
        "Table 2: objective swap (continue a finished run under the other objective)",
    ]


def test_runs_with_different_budgets_are_not_averaged(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    _row(store, "short", tmp_path, 100.0, [5], objective="iwae", k=5)
    _row(store, "long", tmp_path, 90.0, [9], objective="iwae", k=5, epochs=20)
    records, _ = load_records([tmp_path])
    headings = [b[1] for b in build_report(records, [], "x").blocks if b[0] == "h2"]
    tables = [h for h in headings if h.startswith("Table 1")]
    assert len(tables) == 2 and any("2 passes" in h for h in tables) and any("20 passes" in h for h in tables)
    markdown = build_report(records, [], "x").markdown("files")
    assert "| mnist | 1 | 5 | — | 86.47 | — | — | 20 | — | 100.00 | 85.54 | +14.46 |" in markdown
    assert "| 90.00 | 85.54 | +4.46 |" in markdown


def test_other_estimators_get_their_own_table_not_a_table1_cell(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    _row(store, "iwae", tmp_path, 90.0, [20], objective="iwae", k=64)
    _row(store, "dreg", tmp_path, 89.0, [22], objective="iwae", k=64, estimator="dreg")
    _row(store, "miwae", tmp_path, 91.0, [18], objective="miwae", k=64, M=8)
    _row(store, "ciwae", tmp_path, 92.5, [17], objective="ciwae", k=64, beta=0.05)
    records, _ = load_records([tmp_path])
    cell = table1_cells(records)[("mnist", 1, 64, "iwae")]
    assert cell.nll == 90.0 and cell.seeds == 1  # DReG is not averaged into the IWAE cell
    table = estimators_table(records)
    assert [row[3:5] for row in table.rows] == [
        ["iwae", "dreg"],
        ["iwae", "standard"],
        ["ciwae(beta=0.05)", "standard"],
        ["miwae(M=8)", "standard"],
    ]
    assert table.rows[1][6:9] == ["90.00", "84.52", "+5.48"]  # Rainforth's IWAE(64), unverified
    assert table.rows[0][7] == "—" and table.rows[3][6:9] == ["91.00", "84.97", "+6.03"]


# -- table1-smoke end to end ----------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "smoke"
    first = _cli(
        [
            "reproduce",
            "table1",
            "--preset",
            "smoke",
            "--workers",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capsys,
    )
    assert first["runs"] == 4 and first["ran"] == 4 and first["failed"] == {} and first["threads_per_worker"] >= 1
    again = _cli(
        ["sweep", "table1-smoke", "--workers", "2", "--out", str(out), "--device", "cpu", "--no-progress"], capsys
    )
    assert again["ran"] == 0 and again["skipped"] == 4  # finished runs are skipped

    listing = _cli(["results", str(out), "--csv", str(tmp_path / "runs.csv")], capsys)
    assert {r["name"] for r in listing["runs"]} == {"vae-k1", "vae-k5", "iwae-k1", "iwae-k5"}
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        assert 50 < float(r["nll"]) < 550  # a barely trained model: worse than the paper, better than chance
        assert r["torch_version"] and r["device"] == "cpu" and r["eval_k"] == "50" and r["eval_examples"] == "100"
        assert len(json.loads(r["config"])) >= 10
    by_name = {r["name"]: r for r in rows}
    # at k = 1 the VAE and IWAE objectives coincide, and with one seed the runs are identical
    assert by_name["vae-k1"]["nll"] == by_name["iwae-k1"]["nll"]

    report = _cli(["report", str(out), "--out", str(tmp_path / "report")], capsys)
    markdown = Path(report["markdown"]).read_text()
    # 500 of Burda's 59,600 training images: the runs are not his setup, so they stand apart from the paper's numbers
    assert "## Table 1" not in markdown and "| paper |" not in markdown
    block = markdown.split("## Runs not comparable with Burda et al.'s Table 1")[1].split("\n## ")[0]
    assert "trained on the first 500 training images (Burda: all 59,600)" in block
    for name in by_name:
        objective, k = name.split("-k")
        line = next(x for x in block.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:6] == ["mnist", "1", objective, k, f"{float(by_name[name]['nll']):.2f}"]
    assert re.search(r"!\[iwae-k5\]\(report_files/samples_iwae-k5\.png\)", markdown)
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (out / "report.md").is_file() and (out / "report.html").is_file()  # written by reproduce


# -- which active units a table shows --------------------------------------------------------------------------------
def _evaluated(store: ResultStore, name: str, directory: Path, evaluation: dict, **options) -> None:
    """A finished run whose evaluation carries ``evaluation`` beside ours: 12 active units, NLL 88."""
    store.upsert(
        name,
        run_dir=str(directory / name),
        config={"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options},
        status="finished",
        seconds_per_epoch=1.0,
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={"nll": 88.0, "active_units": [12], "k": 10, "n_examples": 30, "recon_log_lik": -80.0, "kl": 20.0}
        | evaluation,
        metrics=[],
    )


def test_reports_say_whose_active_units_they_show(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    authors = {"active_units_authors": [15], "active_units_kl": [9], "nll_active_only": 88.3, "pruned_by": "authors"}
    # an eval.json from before pruned_by: its active_units_authors used our 100-sample definition, not the authors'
    _evaluated(store, "old", tmp_path, {"active_units_authors": [13], "nll_active_only": 88.1}, objective="vae", k=5)
    _evaluated(
        store, "ours", tmp_path, {"active_units_authors": [14], "active_units_kl": [9], "pruned_by": "ours"}, k=1
    )
    _evaluated(store, "auth-k1", tmp_path, authors, objective="iwae", k=1)
    _evaluated(store, "auth-k5", tmp_path, authors, objective="iwae", k=5)
    _evaluated(store, "swap", tmp_path, authors, objective="iwae", k=50, init_from=str(tmp_path / "old"))
    records, _ = load_records([tmp_path])
    assert [(r.label, r.units_authors, r.units_kl, r.pruned_by) for r in records] == [
        ("old", None, None, "ours"),
        ("ours", (14,), (9,), "ours"),
        ("auth-k1", (15,), (9,), "authors"),
        ("auth-k5", (15,), (9,), "authors"),
        ("swap", (15,), (9,), "authors"),
    ]
    report = build_report(records, [], "x")
    markdown, page = report.markdown("files"), report.html()
    ours_note = "units: Var over the evaluated (test) images of E_q[u|x] > 0.01 (ours"
    authors_note = (
        "units (authors): the authors' code's definition, the variance (ddof 0) of q's mean over the first 500"
    )

    # Table 1: one table per definition (the authors' is a budget of its own), each with its note
    tables = markdown.split("## Table 1")[1:]
    by_authors = next(t for t in tables if "by the authors' definition" in t.splitlines()[0])
    by_ours = next(t for t in tables if "by the authors' definition" not in t.splitlines()[0])
    row = _cells(next(x for x in by_authors.splitlines() if x.startswith("| mnist | 1 | 5 |")))
    assert row[12:15] == ["15 (authors)", "22", "-7"]
    assert authors_note in by_authors and ours_note not in by_authors.split("## ")[0]
    row = _cells(next(x for x in by_ours.splitlines() if x.startswith("| mnist | 1 | 5 |")))
    assert row[6:9] == ["12", "20", "-8"] and ours_note in by_ours.split("## ")[0]
    assert "The paper's counts come from the authors' code" in by_ours

    sweep = _cells(next(x for x in markdown.splitlines() if x.startswith("| mnist | 1 | iwae | 5 |")))
    assert sweep[6] == "15 (authors)"  # the k-sweep of the authors' runs
    swap = _cells(next(x for x in markdown.splitlines() if x.startswith("| swap |")))
    assert swap[5] == "12" and swap[10] == "15 (authors)"  # Table 2: the base by ours, the continued run by theirs
    table2_block = markdown.split("## Table 2")[1].split("## ")[0]
    assert ours_note in table2_block and authors_note in table2_block

    # every run: the three definitions side by side, and whose units the pruned NLL leaves out
    block = markdown.split("## Active units by definition")[1]
    assert (
        "| run | units: Var E_q[u\\|x] (ours) | units: per-unit KL | units: authors' (500 training images) |" in block
    )
    assert "| old | 12 | — | — | 88.00 | 88.10 | ours (units masked) |" in block
    assert "| ours | 12 | 9 | 14 | 88.00 | — | — |" in block
    assert "| auth-k5 | 12 | 9 | 15 | 88.00 | 88.30 | authors (units cut out of the weights) |" in block
    assert "units (KL): mean per-unit KL" in block and authors_note in block
    assert "units (ours)" in markdown.split("## All runs")[1].splitlines()[2]  # the runs table's column says whose
    assert "15 (authors)" in page and html.escape(authors_note) in page


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
