"""``iwae sweep``, ``iwae reproduce``, ``iwae results`` and ``iwae report``: grids of runs and their report.

- ``iwae sweep GRID.toml --workers N --out DIR`` runs a grid (a TOML file or a preset name).
- ``iwae reproduce table1 --preset quick|smoke|full`` (``table2``, ``ksweep``) runs a shipped preset
  and writes ``DIR/report.md`` and ``DIR/report.html``.
- ``iwae results DIR [--csv FILE]`` lists the runs in a sweep's database and exports them.
- ``iwae report DIR [DIR ...] --out REPORT`` writes ``REPORT.md`` and a self-contained ``REPORT.html``.

Each handler returns the JSON object the CLI prints; tables and progress go to stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from iwae.cli.common import add_run_options

# Deferred on purpose: the lab (iwae.lab.experiments, iwae.lab.store, iwae.lab.reports) imports torch, which takes
# seconds that ``iwae --help`` and usage errors should not pay; the handlers import what they use.

REPRODUCIBLE = {"table1": ("smoke", "quick", "full"), "table2": (), "ksweep": (), "schedules": ("smoke", "quick")}
# Columns of the store copied into the CSV as they are.
STORE_COLUMNS = (
    "train_bound",
    "valid_bound",
    "seconds",
    "seconds_per_epoch",
    "started",
    "finished",
    "device",
    "package_version",
    "torch_version",
    "git_commit",
    "run_dir",
    "error",
)
CSV_COLUMNS = [
    "name",
    "phase",
    "status",
    "dataset",
    "layers",
    "objective",
    "k",
    "seed",
    "epochs",
    "nll",
    "active_units",
    "recon_log_lik",
    "kl",
    "eval_k",
    "eval_examples",
    *STORE_COLUMNS,
    "config",
]


def _workers(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_runner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_workers, default=1, help="runs at a time, each with cores/N threads")
    parser.add_argument(
        "--stack",
        choices=["on", "off"],
        default="on",
        help="on (default): train runs that differ only in seed, objective or init_from as one stacked computation",
    )
    add_run_options(parser)


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of experiments (TOML file or preset), resumably")
    p.add_argument("grid", help="grid TOML file, or a preset name (table1-smoke, table1-quick, ...)")
    p.add_argument("--out", required=True, help="sweep directory (runs/ and results.sqlite)")
    _add_runner_options(p)
    p.set_defaults(handler=cmd_sweep)

    p = subparsers.add_parser("reproduce", help="run one of Burda et al.'s tables from a preset, then report")
    p.add_argument("what", choices=sorted(REPRODUCIBLE), help="table1, table2, ksweep or schedules")
    p.add_argument("--preset", help="table1: smoke, quick (default) or full; schedules: smoke or quick (default)")
    p.add_argument("--out", help="sweep directory (default experiments/<preset>)")
    _add_runner_options(p)
    p.set_defaults(handler=cmd_reproduce)

    p = subparsers.add_parser("results", help="list the runs of a sweep; export them as CSV")
    p.add_argument("dir", help="sweep directory")
    p.add_argument("--csv", help="write the runs to this CSV file")
    p.set_defaults(handler=cmd_results)

    p = subparsers.add_parser("report", help="Markdown + HTML report: our tables beside the paper's, figures")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep directories (one or more)")
    p.add_argument("--out", required=True, help="REPORT: writes REPORT.md, REPORT.html and REPORT_files/")
    p.add_argument("--title", default="IWAE experiments")
    p.set_defaults(handler=cmd_report)


def _preset_for(what: str, preset: str | None) -> str:
    choices = REPRODUCIBLE[what]
    if not choices:
        if preset is not None:
            raise ValueError(f"'iwae reproduce {what}' has no presets; leave out --preset")
        return what
    preset = preset or "quick"
    if preset not in choices:
        raise ValueError(f"--preset for {what} must be one of {', '.join(choices)}, got {preset!r}")
    return f"{what}-{preset}"


def _run(grid_source: str, out: str, args: argparse.Namespace) -> dict[str, Any]:
    from iwae.lab.experiments import load_grid, run_sweep

    return run_sweep(
        load_grid(grid_source),
        out,
        workers=args.workers,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        stack=args.stack == "on",
    )


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    return _run(args.grid, args.out, args)


def cmd_reproduce(args: argparse.Namespace) -> dict[str, Any]:
    from iwae.lab.reports import write_report

    preset = _preset_for(args.what, args.preset)
    out = args.out or str(Path("experiments") / preset)
    summary = _run(preset, out, args)
    summary["preset"] = preset
    summary["report"] = write_report([out], Path(out) / "report", title=f"IWAE experiments: {preset}")
    _print_table(_summaries(out))
    if args.what == "schedules":
        summary["schedules"] = _write_schedules(out)
    return summary


def _write_schedules(directory: str) -> str:
    """The schedules study's comparison as ``DIR/schedules.md`` (and on stderr)."""
    from iwae.checkpoint import atomic_write_text
    from iwae.lab import schedules
    from iwae.lab.store import ResultStore

    table = schedules.markdown(schedules.comparison(ResultStore.in_dir(directory).rows()))
    path = Path(directory) / "schedules.md"
    atomic_write_text(path, table)
    print(table, file=sys.stderr)
    return str(path)


def _summaries(directory: str) -> list[dict[str, Any]]:
    from iwae.lab.experiments import train_config
    from iwae.lab.store import DB_FILE, ResultStore

    if not (Path(directory) / DB_FILE).is_file():
        raise ValueError(f"{directory} holds no {DB_FILE}; run 'iwae sweep GRID --out {directory}' first")
    rows = []
    for row in ResultStore.in_dir(directory).rows():
        config = train_config(row["config"])
        evaluation = row["eval"] or {}
        rows.append(
            {
                "name": row["name"],
                "phase": row["phase"],
                "status": row["status"],
                "dataset": config.dataset,
                "layers": config.model.n_stochastic,
                "objective": config.objective.name,
                "k": config.k,
                "seed": config.seed,
                "epochs": config.total_epochs,
                "nll": evaluation.get("nll"),
                "active_units": "+".join(map(str, evaluation.get("active_units", []))) or None,
                "recon_log_lik": evaluation.get("recon_log_lik"),
                "kl": evaluation.get("kl"),
                "eval_k": evaluation.get("k"),
                "eval_examples": evaluation.get("n_examples"),
                **{key: row[key] for key in STORE_COLUMNS},
                "config": json.dumps(row["config"], sort_keys=True),
            }
        )
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["name", "status", "epochs", "nll", "active_units", "seconds_per_epoch"]
    width = max([len(str(r["name"])) for r in rows] + [4])
    print(f"{'name':<{width}}  {'status':<8}  {'epochs':>6}  {'NLL':>8}  {'units':>7}  {'s/epoch':>8}", file=sys.stderr)
    for r in rows:
        values = [r[c] for c in columns]
        nll = f"{values[3]:8.2f}" if values[3] is not None else f"{'—':>8}"
        spe = f"{values[5]:8.3f}" if values[5] is not None else f"{'—':>8}"
        print(
            f"{values[0]:<{width}}  {values[1]:<8}  {values[2]:>6}  {nll}  {values[4] or '—':>7}  {spe}",
            file=sys.stderr,
        )


def cmd_results(args: argparse.Namespace) -> dict[str, Any]:
    rows = _summaries(args.dir)
    _print_table(rows)
    if args.csv:
        from iwae.checkpoint import atomic_write_text

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.csv, table.getvalue())  # UTF-8, written whole or not at all
    brief = [{key: r[key] for key in ("name", "status", "nll", "active_units", "seconds_per_epoch")} for r in rows]
    return {"dir": args.dir, "runs": brief, "csv": args.csv}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from iwae.lab.reports import write_report

    return write_report(args.dirs, args.out, title=args.title)
