"""iwae.lab.reports.render: a report's files, Markdown and a self-contained HTML page, and its sections in order."""

from __future__ import annotations

from pathlib import Path

from iwae.lab.reports import build_report, load_records, write_report


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
