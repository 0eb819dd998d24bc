"""iwae.lab.reports.tables: our Table 1 and Table 2 beside the paper's with the differences, the orderings, other
estimators, budgets and protocols apart, cells over seeds as mean ± sd (n), only runs in Burda's setup beside
his numbers (the others in a table of their own, whose note says how they depart), and whose active units a
table shows. The databases are hand-made (tests/report_rows.py; ``made_up`` in conftest.py)."""

from __future__ import annotations

import html
import re
import statistics
from pathlib import Path

import pytest
from report_rows import (
    AUTHORS,
    BURDA,
    STUDENT,
    STUDENT_DEPARTURES,
    THRESHOLD,
    cells,
    evaluated_row,
    finished_row,
    line_cells,
    seed_row,
    setup_row,
)

from iwae.lab.reports import (
    PUBLISHED_TABLE1,
    build_report,
    estimators_table,
    load_records,
    orderings,
    table1,
    table1_cells,
    table2,
    write_report,
)
from iwae.lab.store import ResultStore

# Invented results (inputs for the arithmetic, not measurements): IWAE k=5 has three seeds, VAE k=5 one.
IWAE5 = {0: 86.80, 1: 86.95, 2: 87.31}
IWAE5_UNITS = {0: 20, 1: 21, 2: 23}
IWAE5_SECONDS = {0: 1.50, 1: 1.60, 2: 1.90}
VAE5 = 88.31
PAPER_VAE5, PAPER_IWAE5, PAPER_IWAE50_FROM_VAE1 = 86.47, 85.54, 84.88  # Burda's Table 1 and 2
PAPER_NLLS = {f"{nll:.2f}" for nll, _ in PUBLISHED_TABLE1.values()}


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


def test_runs_with_different_budgets_are_not_averaged(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    finished_row(store, "short", tmp_path, 100.0, [5], objective="iwae", k=5)
    finished_row(store, "long", tmp_path, 90.0, [9], objective="iwae", k=5, epochs=20)
    records, _ = load_records([tmp_path])
    headings = [b[1] for b in build_report(records, [], "x").blocks if b[0] == "h2"]
    tables = [h for h in headings if h.startswith("Table 1")]
    assert len(tables) == 2 and any("2 passes" in h for h in tables) and any("20 passes" in h for h in tables)
    markdown = build_report(records, [], "x").markdown("files")
    assert "| mnist | 1 | 5 | — | 86.47 | — | — | 20 | — | 100.00 | 85.54 | +14.46 |" in markdown
    assert "| 90.00 | 85.54 | +4.46 |" in markdown


def test_other_estimators_get_their_own_table_not_a_table1_cell(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    finished_row(store, "iwae", tmp_path, 90.0, [20], objective="iwae", k=64)
    finished_row(store, "dreg", tmp_path, 89.0, [22], objective="iwae", k=64, estimator="dreg")
    finished_row(store, "miwae", tmp_path, 91.0, [18], objective="miwae", k=64, M=8)
    finished_row(store, "ciwae", tmp_path, 92.5, [17], objective="ciwae", k=64, beta=0.05)
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


def _evaluated(store: ResultStore, name: str, directory: Path, evaluation: dict, **options) -> None:
    """A finished run whose evaluation carries ``evaluation`` beside ours: 12 active units, NLL 88."""
    evaluated_row(store, name, directory, 88.0, [12], evaluation=evaluation, **options)


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
    row = cells(next(x for x in by_authors.splitlines() if x.startswith("| mnist | 1 | 5 |")))
    assert row[12:15] == ["15 (authors)", "22", "-7"]
    assert authors_note in by_authors and ours_note not in by_authors.split("## ")[0]
    row = cells(next(x for x in by_ours.splitlines() if x.startswith("| mnist | 1 | 5 |")))
    assert row[6:9] == ["12", "20", "-8"] and ours_note in by_ours.split("## ")[0]
    assert "The paper's counts come from the authors' code" in by_ours

    sweep = cells(next(x for x in markdown.splitlines() if x.startswith("| mnist | 1 | iwae | 5 |")))
    assert sweep[6] == "15 (authors)"  # the k-sweep of the authors' runs
    swap = cells(next(x for x in markdown.splitlines() if x.startswith("| swap |")))
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


def _seed_sweep(directory: Path) -> Path:
    store = ResultStore.in_dir(directory)
    for seed, nll in IWAE5.items():
        units, seconds = IWAE5_UNITS[seed], IWAE5_SECONDS[seed]
        seed_row(store, f"iwae-k5-s{seed}", directory, nll, units, seconds, objective="iwae", k=5, seed=seed)
    seed_row(store, "vae-k5", directory, VAE5, 19, objective="vae", k=5)
    seed_row(store, "iwae-k1", directory, 89.0, 18, objective="iwae", k=1)
    return directory


def test_table1_shows_mean_sd_and_n_for_several_seeds_and_the_number_for_one(tmp_path: Path) -> None:
    paths = write_report([_seed_sweep(tmp_path / "sweep")], tmp_path / "REPORT.md")
    markdown = Path(paths["markdown"]).read_text(encoding="utf-8")
    mean, sd = statistics.mean(IWAE5.values()), statistics.stdev(IWAE5.values())
    row = line_cells(markdown, "| mnist | 1 | 5 |")
    assert row[3:6] == [f"{VAE5:.2f}", f"{PAPER_VAE5:.2f}", f"{VAE5 - PAPER_VAE5:+.2f}"]  # one seed: its number
    assert row[9:12] == [f"{mean:.2f} ± {sd:.2f} (n=3)", f"{PAPER_IWAE5:.2f}", f"{mean - PAPER_IWAE5:+.2f}"]
    assert row[12] == f"{statistics.mean(IWAE5_UNITS.values()):.1f}"  # active units: the mean
    assert f"{mean:.2f} ± {sd:.2f} (n=3)" in Path(paths["html"]).read_text(encoding="utf-8")

    sweep = line_cells(markdown, "| mnist | 1 | iwae | 5 |")  # the k-sweep: NLL and seconds per epoch over seeds
    seconds = statistics.mean(IWAE5_SECONDS.values()), statistics.stdev(IWAE5_SECONDS.values())
    assert sweep[4] == f"{mean:.2f} ± {sd:.2f} (n=3)" and sweep[7] == f"{seconds[0]:.3f} ± {seconds[1]:.3f}"
    assert line_cells(markdown, "| mnist | 1 | iwae | 1 |")[4:8] == ["89.00", "86.76", "18", "1.500"]
    assert (tmp_path / "REPORT_files" / "nll_vs_k.png").is_file()  # the figure plots the means

    all_runs = markdown.split("## All runs")[1].split("## Active units by definition")[0]
    runs = [cells(x) for x in all_runs.splitlines() if x.startswith("| iwae-k5-s")]  # all runs: one row per seed
    assert [(r[1], r[5]) for r in runs] == [(str(seed), f"{nll:.2f}") for seed, nll in IWAE5.items()]


def test_other_objectives_and_table2_rows_are_settings_over_seeds(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    dreg = {0: 88.0, 1: 88.5}
    for seed, nll in dreg.items():
        seed_row(store, f"dreg-s{seed}", tmp_path, nll, objective="iwae", k=64, estimator="dreg", seed=seed)
    seed_row(store, "iwae-k64", tmp_path, 90.0, objective="iwae", k=64)
    base, continued = {0: 90.0, 1: 91.0}, {0: 87.0, 1: 87.6}
    for seed in (0, 1):
        seed_row(store, f"base-s{seed}", tmp_path, base[seed], objective="vae", k=1, seed=seed)
        init = str(tmp_path / f"base-s{seed}")
        seed_row(store, f"swap-s{seed}", tmp_path, continued[seed], objective="iwae", k=50, seed=seed, init_from=init)
    records, _ = load_records([tmp_path])
    markdown = build_report(records, [], "x").markdown("files")

    mean, sd = statistics.mean(dreg.values()), statistics.stdev(dreg.values())
    row = line_cells(markdown, "| dreg-s0, dreg-s1 |")
    assert row[4:7] == ["dreg", "64", f"{mean:.2f} ± {sd:.2f} (n=2)"] and row[8] == "—"
    assert line_cells(markdown, "| iwae-k64 | mnist |")[6] == "90.00"  # one seed (the all-runs row has no dataset)

    row = line_cells(markdown, "| swap-s0, swap-s1 |")
    b_mean, b_sd = statistics.mean(base.values()), statistics.stdev(base.values())
    c_mean, c_sd = statistics.mean(continued.values()), statistics.stdev(continued.values())
    assert row[1:5] == ["vae k=1", "iwae k=50", f"{b_mean:.2f} ± {b_sd:.2f} (n=2)", "86.76"]
    paper = PAPER_IWAE50_FROM_VAE1
    assert row[7:10] == [f"{c_mean:.2f} ± {c_sd:.2f} (n=2)", f"{paper:.2f}", f"{c_mean - paper:+.2f}"]


def _setup_sweep(directory: Path) -> Path:
    store = ResultStore.in_dir(directory)
    setup_row(store, "burda-k5", directory, 88.13, 21, 19, **BURDA)
    setup_row(store, "authors-k5", directory, 86.91, 22, 20, **AUTHORS)
    setup_row(store, "student-k5", directory, 90.41, 31, 17, **STUDENT, k=5)
    setup_row(store, "student-k50", directory, 89.27, 33, 18, **STUDENT, k=50)
    setup_row(store, "threshold-k5", directory, 70.33, 18, 16, **THRESHOLD)
    return directory


def _sections(markdown: str) -> dict[str, str]:
    """Each '## ' heading's text, up to the next heading."""
    parts = re.split(r"^## ", markdown, flags=re.MULTILINE)[1:]
    return {part.splitlines()[0]: part for part in parts}


def _escaped_cells(line: str) -> list[str]:
    """A Markdown row's cells (an escaped pipe, ``\\|``, is inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _row_of(section: str, run: str) -> list[str]:
    (line,) = [x for x in section.splitlines() if x.startswith(f"| {run} |")]
    return _escaped_cells(line)


def test_a_reader_sees_only_runs_in_burdas_setup_beside_the_paper(tmp_path: Path) -> None:
    paths = write_report([_setup_sweep(tmp_path / "sweep")], tmp_path / "REPORT.md")
    markdown = Path(paths["markdown"]).read_text(encoding="utf-8")
    sections = _sections(markdown)

    # (a) and (c) beside the paper's numbers, in two Table 1s, each labelled by its protocol
    tables = {heading: text for heading, text in sections.items() if heading.startswith("Table 1")}
    assert len(tables) == 2
    (authors,) = [text for heading, text in tables.items() if "the authors' code" in heading.split(":")[0]]
    (default,) = [text for heading, text in tables.items() if "default protocol" in heading.split(":")[0]]
    assert "| mnist | 1 | 5 |" in authors and "| 86.91 | 85.54 | +1.37 | 22 | 22 | +0 |" in authors
    assert "| mnist | 1 | 5 |" in default and "| 88.13 | 85.54 | +2.59 | 21 | 22 | -1 |" in default
    assert "88.13" not in authors and "86.91" not in default  # the protocols are not averaged into one cell
    for setting in ("optimizer burda-adam", "beta1 0.99", "data_order fixed", "loss_reduction sum"):
        assert setting in authors and setting not in default  # the note under the authors' table names them
    assert "These runs follow the authors' code" in authors
    assert "default protocol, not the authors' code" in default and "optimizer adam" in default

    # (b) and (d) nowhere beside a paper number: each line that shows their NLL has no published NLL in it
    for nll in ("90.41", "89.27", "70.33"):
        lines = [x for x in markdown.splitlines() if nll in x]
        assert lines and not any(paper in _escaped_cells(x) for x in lines for paper in PAPER_NLLS), nll
        assert not any(nll in text for text in tables.values())
    apart = {heading: text for heading, text in sections.items() if heading.startswith("Runs not comparable")}
    assert len(apart) == 2 and not any("paper" in text.splitlines()[2] for text in apart.values())  # no paper column
    (student,) = [text for text in apart.values() if "| student-k5 |" in text]
    (threshold,) = [text for text in apart.values() if "| threshold-k5 |" in text]
    assert "| student-k50 |" in student and "| threshold-k5 |" not in student
    # the note under each says why, per setting
    assert f"depart from the paper's setup: {STUDENT_DEPARTURES}." in student and "threshold" not in student
    assert "depart from the paper's setup: threshold binarisation instead of dynamic." in threshold
    assert "ReLU" not in threshold and "burda-k5" not in markdown.split("## Runs not comparable")[1].split("## All")[0]

    # (b): per k, the NLL and both counts of active units side by side, the covariance one and the per-unit KL's
    headers = _escaped_cells(student.splitlines()[2])
    covariance, kl = headers.index("units: Var_x E_q[u\\|x] (covariance)"), headers.index("units: per-unit KL")
    assert kl == covariance + 1 and headers[headers.index("k")] == "k"
    for run, k, nll, units, kl_units in (
        ("student-k5", "5", "90.41", "31", "17"),
        ("student-k50", "50", "89.27", "33", "18"),
    ):
        row = _row_of(student, run)
        assert (row[headers.index("k")], row[headers.index("NLL")], row[covariance], row[kl]) == (
            k,
            nll,
            units,
            kl_units,
        )
    assert "units (KL): mean per-unit KL" in student and "units: Var over the evaluated (test) images" in student

    # the k-sweep of (b) plots no paper line and has no paper column
    assert not any("paper" in x for x in markdown.split("## k-sweep, runs not comparable")[1].split("## All")[0])

    page = Path(paths["html"]).read_text(encoding="utf-8")
    assert html.escape(f"depart from the paper's setup: {STUDENT_DEPARTURES}.") in page
    assert html.escape("Runs not comparable with Burda et al.'s Table 1") in page
    assert "optimizer burda-adam" in page


def test_a_sweep_of_one_protocol_says_which(tmp_path: Path) -> None:
    for name, options in (("default", BURDA), ("authors", AUTHORS)):
        directory = tmp_path / name
        setup_row(ResultStore.in_dir(directory), "run", directory, 88.0, 20, 18, **options)
        records, _ = load_records([directory])
        headings = [b[1] for b in build_report(records, [], "x").blocks if b[0] == "h2"]
        table = next(h for h in headings if h.startswith("Table 1"))
        if name == "default":
            assert table == "Table 1: test NLL (nats) and active units, ours | paper | difference"
        else:
            assert table.startswith("Table 1, runs following the authors' code:")
        assert not any(h.startswith("Runs not comparable") for h in headings)


def test_table2_sets_only_runs_in_burdas_setup_beside_the_paper(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    setup_row(store, "base", tmp_path, 90.0, 19, 18, objective="vae", k=1)
    setup_row(store, "swap", tmp_path, 87.5, 22, 20, objective="iwae", k=50, init_from=str(tmp_path / "base"))
    setup_row(store, "base-128", tmp_path, 91.0, 19, 18, objective="vae", k=1, batch_size=128)
    setup_row(
        store,
        "swap-128",
        tmp_path,
        88.5,
        22,
        20,
        objective="iwae",
        k=50,
        batch_size=128,
        init_from=str(tmp_path / "base-128"),
    )
    records, _ = load_records([tmp_path])
    block = build_report(records, [], "x").markdown("files").split("## Table 2")[1].split("## ")[0]
    assert _row_of(block, "swap")[3:] == ["90.00", "86.76", "19", "19", "87.50", "84.88", "+2.62", "22", "22", "+0"]
    assert _row_of(block, "swap-128")[3:] == ["91.00", "—", "19", "—", "88.50", "—", "—", "22", "—", "—"]
    assert (
        "Not beside the paper's numbers, not being Burda et al.'s setup: swap-128: minibatch 128 instead of 20."
        in block
    )
