"""Sweeps: a grid run phase by phase in one folder, resumably, with its results indexed into one database.

:func:`run_sweep` owns the sweep folder while it runs (``DIR/.sweep.lock``: a second sweep on it is refused, or
waits) and runs the grid (:mod:`iwae.lab.grid`) phase by phase through a runner (:mod:`iwae.lab.runner`): the
runs of a phase that may train as one stack are grouped (:func:`stack_groups`), and each group is one task
(:func:`iwae.lab.run.run_group`). Finished runs are skipped, interrupted ones resume from their checkpoints, a
finished run whose grid changed only in its evaluation settings is re-evaluated without retraining, and a finished
run of another grid in the same folder with exactly these settings (a twin) is reused, not trained again.

The sweep is the database's one writer: tasks write each run's row to ``runs/NAME/result.json``, and the sweep
indexes the result files into ``DIR/results.sqlite`` (:mod:`iwae.lab.store`) as tasks end (:func:`index_task`);
:func:`rescan` (``iwae results DIR --rescan``) indexes whatever is on disk. :func:`execute` runs specs in this
process and records them at once.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from iwae import locks
from iwae.checkpoint import atomic_write_text
from iwae.files import make_folder, resolved
from iwae.lab.grid import (
    EVAL_DEFAULTS,
    RUN_DEFAULTS,
    RUNS_SUBDIR,
    RunSpec,
    expand_grid,
    inside,
    run_dir_of,
    train_config,
)
from iwae.lab.run import environment, read_result, record, run_group
from iwae.lab.runner import LocalRunner, Runner, Task, TaskEnd, available_cores
from iwae.lab.store import DB_FILE, ResultStore, check_database, now
from iwae.runs import EVAL_FILE, MODEL_FILE, resolve_device
from iwae.stacked import stack_key

GRID_COPY = "grid.json"
SWEEP_LOCK = ".sweep.lock"  # DIR/.sweep.lock: held by the sweep that owns the folder


def _resolve_init_from(options: dict[str, Any], runs_dir: Path, names: set[str]) -> dict[str, Any]:
    """``init_from`` as a directory: a grid's own run by its path under ``runs/`` (which may be a link to a reused
    twin: not followed, so the recorded setting stays the same when the sweep is run again); any other value
    must be a finished run directory already."""
    source = options.get("init_from")
    if source is None:
        return options
    if source in names:
        return {**options, "init_from": str(resolved(runs_dir) / source)}
    path = resolved(source, "init_from")
    if not (path / MODEL_FILE).is_file():
        raise ValueError(f"init_from {source!r} is neither a run of this grid nor a finished run directory")
    return {**options, "init_from": str(path)}


def resolved_specs(grid: dict[str, Any], out_dir: str | Path) -> list[RunSpec]:
    """The grid's configurations as they run in ``out_dir``, every setting and name checked
    (:func:`~iwae.lab.grid.expand_grid`, :func:`~iwae.lab.grid.run_dir_of`): ``init_from`` names become run
    directories."""
    specs = expand_grid(grid)
    names = {spec.name for spec in specs}
    runs_dir = Path(out_dir) / RUNS_SUBDIR
    for spec in specs:
        run_dir_of(out_dir, spec.name)
    return [RunSpec(s.name, s.phase, _resolve_init_from(s.options, runs_dir, names)) for s in specs]


def stack_groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Specs that can train as one stack (:func:`iwae.stacked.stack_key`), in their first member's order."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(stack_key(train_config(spec.options)), []).append(spec)
    return list(groups.values())


def stacks_by_default(device: str) -> bool:
    """Whether a sweep on ``device`` stacks its runs unless told: on a GPU, where one minibatch-20 model leaves the
    device idle; not on a CPU, where stacking does not pay (docs/performance.md#stacked-training) and separate runs
    in parallel workers keep the fast path."""
    return resolve_device(device).type == "cuda"


def _cost(options: dict[str, Any]) -> float:
    """A rough relative cost (to start the longest runs first)."""
    config = train_config(options)
    examples = config.train_limit or 60_000
    return config.total_epochs * examples * (1 + config.k / 8) * config.model.n_stochastic


# -- what the folder holds already ------------------------------------------------------------------
def _is_done(row: dict[str, Any] | None, options: dict[str, Any]) -> bool:
    if row is None or row["status"] != "finished":
        return False
    run_dir = Path(row["run_dir"])
    return (run_dir / MODEL_FILE).is_file() and (run_dir / EVAL_FILE).is_file() and row["config"] == options


def _finished_twin(store: ResultStore, spec: RunSpec, out_dir: Path) -> dict[str, Any] | None:
    """A finished run in the store, under another name, with exactly these settings (another grid's run), whose
    directory lies inside the sweep folder."""
    for row in store.rows(status="finished"):
        if row["name"] != spec.name and _is_done(row, spec.options) and inside(row["run_dir"], out_dir):
            return row
    return None


def _adopt_twin(store: ResultStore, spec: RunSpec, twin: dict[str, Any], runs_dir: Path) -> None:
    """Record ``spec`` as the finished ``twin`` instead of training it again.

    The row copies the twin's results and points at the twin's directory (the report counts a run
    directory once); ``runs/NAME`` becomes a link to it, so ``init_from = NAME`` finds the weights.
    """
    link = runs_dir / spec.name
    if not link.exists():
        make_folder(runs_dir, "the sweep's runs folder")
        try:
            link.symlink_to(Path(twin["run_dir"]).resolve(), target_is_directory=True)
        except OSError:  # no symbolic links here (some Windows set-ups): a copy does as well
            shutil.copytree(twin["run_dir"], link)
    fields = {key: value for key, value in twin.items() if key not in ("name", "phase")}
    store.upsert(spec.name, **{**fields, "phase": spec.phase})


def _training_settings(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in EVAL_DEFAULTS and key not in RUN_DEFAULTS}


def _check_same_settings(row: dict[str, Any] | None, options: dict[str, Any], out_dir: Path) -> None:
    """A recorded run may be re-evaluated with other eval settings, but not retrained with other settings."""
    if row is None or row["config"] == {}:
        return
    if _training_settings(row["config"]) != _training_settings(options):
        raise ValueError(
            f"run {row['name']!r} in {out_dir} was recorded with other training settings; "
            "use another --out for this grid"
        )


def _check_recorded(specs: list[RunSpec], out_dir: Path) -> None:
    """Refuse runs that the sweep folder's database recorded with other training settings (reads an existing
    database only: creates nothing)."""
    if (out_dir / DB_FILE).is_file():
        store = ResultStore.in_dir(out_dir, create=False)
        for spec in specs:
            _check_same_settings(store.get(spec.name), spec.options, out_dir)


# -- the database, written by the sweep alone -----------------------------------------------------------
@contextmanager
def sweep_lock(
    out_dir: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Own the sweep folder ``out_dir`` (created if missing) for the block, through ``DIR/.sweep.lock``: while a
    sweep (or ``iwae results --rescan``) holds it, another raises :class:`~iwae.locks.LockBusy` naming the
    holder, or with ``wait`` waits for it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    what, hint = f"sweep folder {out_dir}", "wait for that sweep to end, or pass --wait"
    with locks.hold(out_dir / SWEEP_LOCK, what=what, hint=hint, wait=wait, on_wait=on_wait):
        yield


def index_task(store: ResultStore, task: Task, end: TaskEnd) -> list[tuple[str, str, str | None]]:
    """Record the runs of an ended task: each run's result file of this attempt, else the reason there is none
    (``busy``: back to ``pending``; otherwise ``failed``). Returns ``(name, status, error)`` per run."""
    outcomes = []
    for spec in task.specs:
        name = spec["name"]
        row = read_result(run_dir_of(task.out_dir, name))
        if row is not None and row.get("attempt") == task.attempt:
            record(store, row)
            outcomes.append((name, row["status"], row["error"]))
        elif end.busy is not None:
            store.upsert(name, status="pending", error=end.busy)
            outcomes.append((name, "busy", end.busy))
        else:
            error = end.error or "the task ended without writing its result"
            store.upsert(name, status="failed", finished=now(), error=error)
            outcomes.append((name, "failed", error))
    return outcomes


def rescan(out_dir: str | Path) -> list[str]:
    """Index every run's result file under ``out_dir/runs/`` into the sweep's database: the runs of cluster jobs,
    or of a sweep that ended before it indexed them. Call it under :func:`sweep_lock` (the database has one
    writer). Links under ``runs/`` (runs reused from another grid, recorded under their own names) are left
    out. Returns the names indexed."""
    out_dir = Path(out_dir)
    store = ResultStore.in_dir(out_dir)
    runs_dir = out_dir / RUNS_SUBDIR
    indexed = []
    for run_dir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if run_dir.is_symlink() or not run_dir.is_dir() or not inside(run_dir, out_dir):
            continue
        row = read_result(run_dir)
        if row is not None and row["name"] == run_dir.name:
            record(store, row)
            indexed.append(row["name"])
    return indexed


def execute(
    specs: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
) -> list[tuple[str, str, str | None]]:
    """:func:`~iwae.lab.run.run_group` in this process, then each run recorded in the database in ``out_dir``: the
    simplest way to run one spec (``RunSpec.to_dict()``), or specs that share everything but seed, objective and
    ``init_from``, from a launcher of one's own on one machine.

    Returns ``(name, status, error)`` per spec; errors are recorded, not raised. ``status`` is ``busy`` (and
    nothing is recorded) where another process holds one of the runs.
    """
    try:
        rows = run_group(specs, out_dir, device=device, data_dir=data_dir, threads=threads, env=env)
    except locks.LockBusy as busy:
        return [(spec["name"], "busy", str(busy)) for spec in specs]
    store = ResultStore.in_dir(out_dir)
    for row in rows:
        record(store, row)
    return [(row["name"], row["status"], row["error"]) for row in rows]


# -- the sweep --------------------------------------------------------------------------------------
def _run_phase(
    specs: list[RunSpec],
    store: ResultStore,
    runner: Runner,
    out_dir: Path,
    *,
    device: str,
    data_dir: str | None,
    progress: bool,
    stack: bool,
    env: dict[str, Any],
) -> list[tuple[str, str, str | None]]:
    groups = stack_groups(specs) if stack else [[spec] for spec in specs]
    groups.sort(key=lambda group: -sum(_cost(spec.options) for spec in group))
    tasks = [
        Task(tuple(spec.to_dict() for spec in group), str(out_dir), uuid.uuid4().hex, device, data_dir, env)
        for group in groups
    ]
    results: list[tuple[str, str, str | None]] = []
    bar = tqdm(total=len(specs), unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)

    def started(task: Task) -> None:
        for spec in task.specs:
            store.upsert(spec["name"], status="running", started=now(), finished=None, error=None)

    def done(task: Task, end: TaskEnd) -> None:
        for name, status, error in index_task(store, task, end):
            results.append((name, status, error))
            bar.set_postfix_str(f"{name}: {status}")
            bar.update(1)
            if error and progress:
                tqdm.write(f"run {name} {status}: {error}")

    try:
        runner(tasks, started, done)
    finally:
        bar.close()
    return results


def run_sweep(
    grid: dict[str, Any],
    out_dir: str | Path,
    *,
    workers: int = 1,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
    stack: bool | None = None,
    wait: bool = False,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Run every configuration of ``grid`` not yet finished in ``out_dir``, phase after phase.

    Everything is checked before anything is written; then the sweep holds the folder (:func:`sweep_lock`) and runs
    each phase through ``runner``.

    Args:
        grid: a loaded grid (:func:`iwae.lab.grid.load_grid`).
        out_dir: the sweep folder.
        workers: parallel runs of the default runner.
        stack: train the runs of a phase that share the architecture, k, the minibatches and the schedule (all but
            seed, objective and ``init_from``) as one stacked computation (:mod:`iwae.stacked`); None stacks on a
            GPU only (:func:`stacks_by_default`).
        wait: wait for another sweep holding the folder instead of stopping.
        runner: default a :class:`~iwae.lab.runner.LocalRunner` of ``workers``.

    Returns:
        The summary; it names the runs that ``failed``, ``diverged`` or were ``busy`` (held by another process).

    Raises:
        ValueError: one line, for a bad grid or ``out_dir``.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if stack is None:
        stack = stacks_by_default(device)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    resolved(out_dir, "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a sweep directory")
    check_database(out_dir / DB_FILE)
    specs = resolved_specs(grid, out_dir)
    _check_recorded(specs, out_dir)
    runner = runner if runner is not None else LocalRunner(workers)
    skipped: list[str] = []
    reused: list[str] = []
    results: list[tuple[str, str, str | None]] = []
    with sweep_lock(out_dir, wait=wait, on_wait=lambda text: print(text, file=sys.stderr)):
        _check_recorded(specs, out_dir)  # again: another sweep may have recorded runs while this one waited
        store = ResultStore.in_dir(out_dir)
        atomic_write_text(out_dir / GRID_COPY, json.dumps(grid, indent=2, sort_keys=True) + "\n")
        root, env = resolved(out_dir), environment()  # tasks and rows name absolute paths: jobs start elsewhere
        runs_dir = root / RUNS_SUBDIR
        for phase in dict.fromkeys(spec.phase for spec in specs):
            todo = []
            for spec in (s for s in specs if s.phase == phase):
                if _is_done(store.get(spec.name), spec.options):
                    skipped.append(spec.name)
                    continue
                twin = _finished_twin(store, spec, out_dir)
                if twin is not None:
                    _adopt_twin(store, spec, twin, runs_dir)
                    reused.append(spec.name)
                    continue
                store.upsert(spec.name, phase=phase, run_dir=str(runs_dir / spec.name), config=spec.options,
                             status="pending")  # fmt: skip
                todo.append(spec)
            if todo:
                results.extend(_run_phase(todo, store, runner, root, device=device, data_dir=data_dir,
                                          progress=progress, stack=stack, env=env))  # fmt: skip
    by_status: dict[str, dict[str, str | None]] = {"failed": {}, "diverged": {}, "busy": {}}
    for name, status, error in results:
        if status in by_status:
            by_status[status][name] = error
    return {
        "out": str(out_dir),
        "database": str(store.path),
        "runs": len(specs),
        "ran": len(results),
        "skipped": len(skipped),
        "reused": len(reused),
        **by_status,
        "workers": workers,
        "stack": stack,
        "threads_per_worker": max(1, available_cores() // workers),
        "seconds": round(time.perf_counter() - started, 2),
    }
