"""``iwae sweep``, ``iwae reproduce``, ``iwae results`` and ``iwae report`` (iwae.cli.sweep): the table1-smoke
preset end to end, and ``reproduce --protocol authors`` setting the protocol on every run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from iwae import cli


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


def test_reproduce_with_the_authors_protocol_sets_it_on_every_run(tmp_path: Path, monkeypatch, capsys) -> None:
    from iwae.lab import reports, sweep
    from iwae.lab.grid import eval_options, expand_grid, train_config

    seen = {}

    def fake_sweep(grid, out, **options):
        seen["specs"] = expand_grid(grid)
        seen["out"] = out
        return {"runs": len(seen["specs"]), "failed": {}}

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(reports, "write_report", lambda dirs, out, title: str(out))
    monkeypatch.setattr("iwae.cli.sweep._print_table", lambda rows: None)
    monkeypatch.setattr("iwae.cli.sweep._summaries", lambda directory: [])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", "table2", "--preset", "quick", "--protocol", "authors", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "authors" and seen["out"] == str(Path("experiments") / "table2-quick-authors")
    configs = [train_config(spec.options) for spec in seen["specs"]]
    assert len(configs) == 4 and {c.optimizer for c in configs} == {"burda-adam"}  # both phases
    assert {eval_options(spec.options)["eval_units"] for spec in seen["specs"]} == {"authors"}
