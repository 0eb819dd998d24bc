"""The GPU check at toy sizes on the CPU (``iwae gpu-check --smoke``): every part runs, and the summary says what
it measured, so the command cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
from pathlib import Path

from iwae.cli import main


def test_the_smoke_check_writes_its_json_and_summary(tmp_path: Path, capsys) -> None:
    assert main(["gpu-check", "--smoke", "--out", str(tmp_path / "check"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "check" / "gpu-check.json").read_text())
    assert {(r["k"], r["batch"]) for r in result["steps"]} == {(1, 20), (3, 20)}
    assert all(r["single_ms"] > 0 and r["stacked_ms"] > 0 for r in result["steps"])
    assert result["column_hours"]["column_models"] == 3
    assert result["evaluation"]["seconds_per_10000_images"] > 0
    assert result["agreement"]["model"] == "vae-k1" and result["agreement"]["images"] == 20
    column = {(r["objective"], r["k"]): r for r in result["column"]["runs"]}
    assert set(column) == {("vae", 1), ("vae", 3), ("iwae", 3)} and result["column"]["failures"] == {}
    assert all(r["passes"] == 1 and r["nll"] is not None and r["eval_examples"] == 20 for r in column.values())
    assert column[("vae", 1)]["paper_nll"] == 86.76  # Burda's Table 1, via iwae.lab.reports.published
    summary = (tmp_path / "check" / "gpu-check.md").read_text()
    assert "| vae | 1 | 1 of 1 |" in summary and "| 86.76 |" in summary and "L_10:" in summary
