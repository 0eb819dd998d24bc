"""Reports over seeds: a cell of several seeds shows mean ± sample standard deviation (n=seeds), one seed its number."""

from __future__ import annotations

import statistics
from pathlib import Path

from iwae.lab.reports import build_report, load_records, table1_cells, write_report
from iwae.lab.store import ResultStore

# Invented results (inputs for the arithmetic, not measurements): IWAE k=5 has three seeds, VAE k=5 one.
IWAE5 = {0: 86.80, 1: 86.95, 2: 87.31}
IWAE5_UNITS = {0: 20, 1: 21, 2: 23}
IWAE5_SECONDS = {0: 1.50, 1: 1.60, 2: 1.90}
VAE5 = 88.31
PAPER_VAE5, PAPER_IWAE5, PAPER_IWAE50_FROM_VAE1 = 86.47, 85.54, 84.88  # Burda's Table 1 and 2


def _row(store: ResultStore, name: str, directory: Path, nll: float, units: int = 20, seconds: float = 1.5, **options):
    store.upsert(
        name,
        run_dir=str(directory / name),
        config={"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options},
        status="finished",
        seconds_per_epoch=seconds,
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={"nll": nll, "active_units": [units], "k": 10, "n_examples": 30, "recon_log_lik": -80.0, "kl": 20.0},
        metrics=[],
    )


def _sweep(directory: Path) -> Path:
    store = ResultStore.in_dir(directory)
    for seed, nll in IWAE5.items():
        units, seconds = IWAE5_UNITS[seed], IWAE5_SECONDS[seed]
        _row(store, f"iwae-k5-s{seed}", directory, nll, units, seconds, objective="iwae", k=5, seed=seed)
    _row(store, "vae-k5", directory, VAE5, 19, objective="vae", k=5)
    _row(store, "iwae-k1", directory, 89.0, 18, objective="iwae", k=1)
    return directory


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _line(markdown: str, start: str) -> list[str]:
    (line,) = [x for x in markdown.splitlines() if x.startswith(start)]  # one row per cell, not one per seed
    return _cells(line)


def test_table1_shows_mean_sd_and_n_for_several_seeds_and_the_number_for_one(tmp_path: Path) -> None:
    paths = write_report([_sweep(tmp_path / "sweep")], tmp_path / "REPORT.md")
    markdown = Path(paths["markdown"]).read_text(encoding="utf-8")
    mean, sd = statistics.mean(IWAE5.values()), statistics.stdev(IWAE5.values())
    row = _line(markdown, "| mnist | 1 | 5 |")
    assert row[3:6] == [f"{VAE5:.2f}", f"{PAPER_VAE5:.2f}", f"{VAE5 - PAPER_VAE5:+.2f}"]  # one seed: its number
    assert row[9:12] == [f"{mean:.2f} ± {sd:.2f} (n=3)", f"{PAPER_IWAE5:.2f}", f"{mean - PAPER_IWAE5:+.2f}"]
    assert row[12] == f"{statistics.mean(IWAE5_UNITS.values()):.1f}"  # active units: the mean
    assert f"{mean:.2f} ± {sd:.2f} (n=3)" in Path(paths["html"]).read_text(encoding="utf-8")

    sweep = _line(markdown, "| mnist | 1 | iwae | 5 |")  # the k-sweep: NLL and seconds per epoch over seeds
    seconds = statistics.mean(IWAE5_SECONDS.values()), statistics.stdev(IWAE5_SECONDS.values())
    assert sweep[4] == f"{mean:.2f} ± {sd:.2f} (n=3)" and sweep[7] == f"{seconds[0]:.3f} ± {seconds[1]:.3f}"
    assert _line(markdown, "| mnist | 1 | iwae | 1 |")[4:8] == ["89.00", "86.76", "18", "1.500"]
    assert (tmp_path / "REPORT_files" / "nll_vs_k.png").is_file()  # the figure plots the means

    all_runs = markdown.split("## All runs")[1].split("## Active units by definition")[0]
    runs = [_cells(x) for x in all_runs.splitlines() if x.startswith("| iwae-k5-s")]  # all runs: one row per seed
    assert [(r[1], r[5]) for r in runs] == [(str(seed), f"{nll:.2f}") for seed, nll in IWAE5.items()]


def test_other_objectives_and_table2_rows_are_settings_over_seeds(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    dreg = {0: 88.0, 1: 88.5}
    for seed, nll in dreg.items():
        _row(store, f"dreg-s{seed}", tmp_path, nll, objective="iwae", k=64, estimator="dreg", seed=seed)
    _row(store, "iwae-k64", tmp_path, 90.0, objective="iwae", k=64)
    base, continued = {0: 90.0, 1: 91.0}, {0: 87.0, 1: 87.6}
    for seed in (0, 1):
        _row(store, f"base-s{seed}", tmp_path, base[seed], objective="vae", k=1, seed=seed)
        init = str(tmp_path / f"base-s{seed}")
        _row(store, f"swap-s{seed}", tmp_path, continued[seed], objective="iwae", k=50, seed=seed, init_from=init)
    records, _ = load_records([tmp_path])
    markdown = build_report(records, [], "x").markdown("files")

    mean, sd = statistics.mean(dreg.values()), statistics.stdev(dreg.values())
    row = _line(markdown, "| dreg-s0, dreg-s1 |")
    assert row[4:7] == ["dreg", "64", f"{mean:.2f} ± {sd:.2f} (n=2)"] and row[8] == "—"
    assert _line(markdown, "| iwae-k64 | mnist |")[6] == "90.00"  # one seed (the all-runs row has no dataset)

    row = _line(markdown, "| swap-s0, swap-s1 |")
    b_mean, b_sd = statistics.mean(base.values()), statistics.stdev(base.values())
    c_mean, c_sd = statistics.mean(continued.values()), statistics.stdev(continued.values())
    assert row[1:5] == ["vae k=1", "iwae k=50", f"{b_mean:.2f} ± {b_sd:.2f} (n=2)", "86.76"]
    paper = PAPER_IWAE50_FROM_VAE1
    assert row[7:10] == [f"{c_mean:.2f} ± {c_sd:.2f} (n=2)", f"{paper:.2f}", f"{c_mean - paper:+.2f}"]


def test_only_runs_that_differ_in_their_seed_alone_are_averaged(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _row(ResultStore.in_dir(first), "iwae-s0", first, 87.0, objective="iwae", k=5, seed=0)
    _row(ResultStore.in_dir(first), "iwae-s1", first, 88.0, objective="iwae", k=5, seed=1)
    _row(ResultStore.in_dir(second), "iwae-s0", second, 87.2, objective="iwae", k=5, seed=0)  # seed 0 rerun
    _row(ResultStore.in_dir(second), "iwae-sum", second, 91.0, objective="iwae", k=5, loss_reduction="sum")
    _row(ResultStore.in_dir(second), "iwae-b100", second, 95.0, objective="iwae", k=5, batch_size=100)
    records, _ = load_records([first, second])
    cell = table1_cells([r for r in records if r.config == records[0].config.replace(seed=r.seed)])
    assert cell[("mnist", 1, 5, "iwae")].seeds == 2
    assert cell[("mnist", 1, 5, "iwae")].nll == statistics.mean([statistics.mean([87.0, 87.2]), 88.0])

    report = build_report(records, [], "x")
    headings = [b[1] for b in report.blocks if b[0] == "h2" and b[1].startswith("Table 1")]
    assert len(headings) == 2 and any("loss_reduction=sum" in h for h in headings)  # another setting: another table
    markdown = report.markdown("files")
    assert "| 91.00 | 85.54 | +5.46 |" in markdown and "(n=2)" in markdown and "(n=3)" not in markdown
    assert "95.00 | 85.54" not in markdown  # minibatch 100 is not Burda's setup: not beside the paper's number
    assert _line(markdown, "| b/iwae-b100 | mnist |")[5] == "95.00"  # in the table of the other runs
