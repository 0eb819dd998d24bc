"""``iwae sweep``, ``iwae reproduce``, ``iwae results`` and ``iwae report``: grids of runs and their report.

- ``iwae sweep GRID.toml --workers N --out DIR`` runs a grid (a TOML file or a preset name) on this machine;
  ``--executor slurm`` submits it as Slurm job arrays instead (:mod:`iwae.lab.cluster`). The sweep owns DIR
  while it runs: a second sweep there stops with one line naming the holder (exit 2), or waits (``--wait``).
- ``iwae reproduce table1 --preset quick|smoke|full`` (also ``table2``, ``ksweep``, ``schedules``, ``student``)
  runs a shipped preset and writes ``DIR/report.md`` and ``DIR/report.html``; ``--protocol authors`` runs it as
  the authors' code ran it.
- ``iwae results DIR [--csv FILE] [--rescan]`` lists the runs in a sweep's database and exports them;
  ``--rescan`` first indexes the runs' result files (what cluster jobs wrote) into it.
- ``iwae report DIR [DIR ...] --out REPORT`` writes ``REPORT.md`` and a self-contained ``REPORT.html``.

Each handler returns the JSON object the CLI prints; tables and progress go to stderr. A bad grid is one line
on stderr and exit code 2, with nothing written. When some runs of a sweep (or reproduce) failed, diverged or
were busy (held by another process), it prints its JSON summary all the same, then one line on stderr, and exits
with code 1 (:data:`EXIT_RUNS_FAILED`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from iwae.cli.common import UsageError, add_run_options, non_negative_int, positive_int
from iwae.names import PROTOCOLS, STACK_CHOICES

# Deferred on purpose: the lab (iwae.lab.grid, iwae.lab.sweep, iwae.lab.store, iwae.lab.reports) imports torch,
# which takes seconds that ``iwae --help`` and usage errors should not pay; the handlers import what they use.

EXIT_RUNS_FAILED = 1
# iwae sweep's cluster flags (argparse dest) -> the field of iwae.lab.cluster.ClusterOptions they set.
CLUSTER_FLAGS = {
    "partition": "partition",
    "time_limit": "time_limit_min",
    "gpus_per_task": "gpus_per_task",
    "array_parallelism": "array_parallelism",
}
REPRODUCIBLE = {
    "table1": ("smoke", "quick", "full"),
    "table2": ("smoke", "quick", "full"),
    "ksweep": (),
    "schedules": ("smoke", "quick"),
    "student": ("smoke", "full"),
}
DEFAULT_PRESET = {"student": "full"}  # else quick
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
        choices=STACK_CHOICES,
        default="auto",
        help="train runs that differ only in seed, objective or init_from as one stacked computation: on, off, or "
        "auto (default: on a GPU only; on a CPU the single runs' fast path is as fast)",
    )
    add_run_options(parser)


def register(subparsers) -> None:
    """Add ``sweep``, ``reproduce``, ``results`` and ``report`` to the ``iwae`` subparsers."""
    p = subparsers.add_parser("sweep", help="run a grid of experiments (TOML file or preset), resumably")
    p.add_argument("grid", help="grid TOML file, or a preset name (table1-smoke, table1-quick, ...)")
    p.add_argument("--out", required=True, help="sweep directory (runs/ and results.sqlite)")
    p.add_argument("--wait", action="store_true", help="if another sweep is running in --out, wait for it to end")
    _add_runner_options(p)
    cluster = p.add_argument_group("cluster (--executor slurm: each phase one Slurm job array, through submitit)")
    cluster.add_argument("--executor", choices=["local", "slurm"], default="local",
                         help="local (default): processes on this machine; slurm: a job array per phase")  # fmt: skip
    cluster.add_argument("--partition", metavar="NAME", help="Slurm partition (default: the cluster's)")
    # The cluster flags default to None (ClusterOptions' defaults, named in the help), so that one given with
    # --executor local is seen and refused.
    cluster.add_argument("--time-limit", type=positive_int, metavar="MINUTES",
                         help="time limit of each task (default 1440)")  # fmt: skip
    cluster.add_argument("--gpus-per-task", type=non_negative_int, metavar="N", help="GPUs per task (default 0)")
    cluster.add_argument("--array-parallelism", type=positive_int, metavar="N",
                         help="tasks of an array that run at once (default 64)")  # fmt: skip
    p.set_defaults(handler=cmd_sweep)

    p = subparsers.add_parser("reproduce", help="run one of Burda et al.'s tables from a preset, then report")
    p.add_argument("what", choices=sorted(REPRODUCIBLE), help="table1, table2, ksweep, schedules or student")
    p.add_argument(
        "--preset",
        help="table1, table2: smoke, quick (default) or full; schedules: smoke or quick "
        "(default); student (a student reproduction's protocol): smoke or full (default)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="default",
        help="authors: every run as the authors' code ran it (iwae train --protocol authors) and evaluated "
        "their way; the default --out gets the suffix -authors",
    )
    p.add_argument("--out", help="sweep directory (default experiments/<preset>)")
    _add_runner_options(p)
    p.set_defaults(handler=cmd_reproduce)

    p = subparsers.add_parser("results", help="list the runs of a sweep; export them as CSV")
    p.add_argument("dir", help="sweep directory")
    p.add_argument("--csv", help="write the runs to this CSV file")
    p.add_argument("--rescan", action="store_true",
                   help="first index the runs' result files (runs/*/result.json) into the database")  # fmt: skip
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
    preset = preset or DEFAULT_PRESET.get(what, "quick")
    if preset not in choices:
        raise ValueError(f"--preset for {what} must be one of {', '.join(choices)}, got {preset!r}")
    return f"{what}-{preset}"


def _runner(args: argparse.Namespace):
    """The sweep's runner: None (the local one), or a :class:`~iwae.lab.cluster.SubmititRunner` for Slurm."""
    given = {flag: value for flag in CLUSTER_FLAGS if (value := getattr(args, flag)) is not None}
    if args.executor == "local":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UsageError(f"iwae sweep: {flag} goes with --executor slurm (see 'iwae sweep --help')")
        return None
    from iwae.lab.cluster import ClusterOptions, SubmititRunner

    return SubmititRunner(ClusterOptions(**{CLUSTER_FLAGS[flag]: value for flag, value in given.items()}))


def _run(
    grid_source: str, out: str, args: argparse.Namespace, runner=None, protocol: str = "default"
) -> dict[str, Any]:
    from iwae.lab.grid import load_grid
    from iwae.lab.sweep import run_sweep

    grid = load_grid(grid_source)
    if protocol != "default":  # every run, every phase: the grid's shared settings
        grid["fixed"] = {**grid.get("fixed", {}), "protocol": protocol}
    return run_sweep(
        grid,
        out,
        workers=args.workers,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        stack=None if args.stack == "auto" else args.stack == "on",
        wait=getattr(args, "wait", False),
        runner=runner,
    )


def _finish(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary to print.

    Where runs failed, diverged or were busy, print it here, then one line on stderr, and exit with
    :data:`EXIT_RUNS_FAILED`.
    """
    problems = {status: summary[status] for status in ("failed", "diverged", "busy") if summary.get(status)}
    if not problems:
        return summary
    print(json.dumps(summary))
    counts = ", ".join(f"{len(names)} {status} ({', '.join(sorted(names))})" for status, names in problems.items())
    print(f"sweep {summary['out']}: of {summary['runs']} runs, {counts}; see 'iwae results {summary['out']}'",
          file=sys.stderr)  # fmt: skip
    raise SystemExit(EXIT_RUNS_FAILED)


def _check_grid_source(source: str) -> None:
    """A grid that is neither a file nor a shipped preset is a usage error, told before torch is imported."""
    from importlib import resources

    presets = {entry.name.removesuffix(".toml") for entry in (resources.files("iwae") / "presets").iterdir()}
    if not Path(source).is_file() and source not in presets:
        raise UsageError(
            f"iwae sweep: no grid file {source!r} and no such preset; presets: {', '.join(sorted(presets))}"
        )


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """``iwae sweep``: run the grid in ``--out``; returns the sweep's summary."""
    _check_grid_source(args.grid)
    runner = _runner(args)  # before anything runs: a misplaced flag is a usage error
    return _finish(_run(args.grid, args.out, args, runner))


def cmd_reproduce(args: argparse.Namespace) -> dict[str, Any]:
    """``iwae reproduce``: run the preset's sweep, then write its report (and the schedules study's table)."""
    from iwae.lab.reports import write_report

    preset = _preset_for(args.what, args.preset)
    authors = args.protocol == "authors"
    out = args.out or str(Path("experiments") / (preset + ("-authors" if authors else "")))
    summary = _run(preset, out, args, protocol=args.protocol)
    summary["preset"] = preset
    summary["protocol"] = args.protocol
    title = f"IWAE experiments: {preset}" + (" (the authors' protocol)" if authors else "")
    summary["report"] = write_report([out], Path(out) / "report", title=title)
    _print_table(_summaries(out))
    if args.what == "schedules":
        summary["schedules"] = _write_schedules(out)
    return _finish(summary)


def _write_schedules(directory: str) -> str:
    """The schedules study's comparison as ``DIR/schedules.md`` (and on stderr)."""
    from iwae.checkpoint import atomic_write_text
    from iwae.lab import schedules
    from iwae.lab.store import ResultStore

    table = schedules.markdown(schedules.comparison(ResultStore.in_dir(directory, create=False).rows()))
    path = Path(directory) / "schedules.md"
    atomic_write_text(path, table)
    print(table, file=sys.stderr)
    return str(path)


def _summaries(directory: str) -> list[dict[str, Any]]:
    from iwae.lab.grid import train_config
    from iwae.lab.store import DB_FILE, ResultStore

    if not (Path(directory) / DB_FILE).is_file():
        raise ValueError(f"{directory} holds no {DB_FILE}; run 'iwae sweep GRID --out {directory}' first")
    rows = []
    for row in ResultStore.in_dir(directory, create=False).rows():
        config = train_config(row["config"], recorded=True)
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
    """``iwae results``: the runs of a sweep's database (indexed first with ``--rescan``), as a table and CSV."""
    indexed = None
    if args.rescan:
        from iwae.lab.sweep import rescan, sweep_lock

        if not Path(args.dir).is_dir():
            raise ValueError(f"no sweep directory {args.dir}")
        with sweep_lock(args.dir):  # the database's one writer while it indexes
            indexed = rescan(args.dir)
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
    result = {"dir": args.dir, "runs": brief, "csv": args.csv}
    return result if indexed is None else {**result, "indexed": len(indexed)}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    """``iwae report``: :func:`iwae.lab.reports.write_report` of the sweep directories."""
    from iwae.lab.reports import write_report

    return write_report(args.dirs, args.out, title=args.title)
