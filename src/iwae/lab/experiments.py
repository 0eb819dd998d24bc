"""Experiment grids: TOML grid files, shipped presets, the run function, and sweeps run locally or on a cluster.

A grid file names fixed settings and axes; the product of the axes gives the configurations::

    [fixed]                      # settings shared by every run
    dataset = "mnist"
    layers = 1
    schedule = "burda:3"         # or epochs = N with lr = X
    eval_k = 5000
    eval_limit = 1000

    [axes]                       # one run per combination, named from the axis values
    objective = ["vae", "iwae"]  # -> vae-k1, vae-k5, ..., iwae-k50
    k = [1, 5, 50]

An axis entry may be a table of several settings that go together (``setting = [{objective = "vae",
k = 1}, ...]``). A grid may instead hold several ``[[phase]]`` tables (each with its own ``name``,
``fixed`` and ``axes``; top-level ``[fixed]`` applies to all), run one after the other: a later phase
may start from an earlier phase's finished runs with ``init_from = "<run name>"`` (Burda's Table 2).

Settings are the options of ``iwae train`` (dataset, objective, k, layers, seed, schedule or
epochs/lr, batch_size, train_limit, beta1, activation, latent_dims, valid_k, init_from and any
other :class:`~iwae.config.TrainConfig` field) and of ``iwae eval`` (eval_k, eval_limit,
eval_split, eval_seed, eval_batch_size, eval_units; ``protocol = "authors"`` makes the last two 20 and
``authors`` unless given), plus ``samples`` (write a sample grid, default true).
Every run's settings are checked before anything is written (:func:`check_settings`: its TrainConfig built,
the types and ranges of the rest), and so are the names: a phase or run name is one path component
(:func:`check_name`), and every run directory must resolve inside the sweep folder (:func:`run_dir_of`).

Running: a run is a plain function of its settings, :func:`run_one` ``(options, run_dir) -> dict``
(train with resume, evaluate, draw samples). :func:`run_group` is a sweep's unit of work, wherever it runs: one
run, or runs that differ only in seed, objective and ``init_from`` trained as one stacked computation first
(:mod:`iwae.stacked`); it holds each run's lock (``runs/NAME/.lock``, :mod:`iwae.lab.locks`) throughout, and
writes each run's row to ``runs/NAME/result.json``, never to the database. The sweep is the database's one
writer: it indexes the result files into ``DIR/results.sqlite`` (:mod:`iwae.lab.store`) as tasks end, and
:func:`rescan` (``iwae results DIR --rescan``) indexes whatever is on disk. :func:`execute` and
:func:`execute_stack` run specs in this process and record them at once.

:func:`run_sweep` owns the sweep folder while it runs (``DIR/.sweep.lock``: a second sweep on it is refused, or
waits) and runs the grid phase by phase through a runner: :class:`LocalRunner` (the default) runs each task in a
fresh process (forked from a ``forkserver`` that has imported torch, else ``spawn``), ``workers`` at a time with
``cores // workers`` threads each, and its processes end with the sweep however it ends
(:mod:`iwae.lab.lifeline`); :class:`iwae.lab.cluster.SubmititRunner` submits each phase as one Slurm job array.
Finished runs are skipped, interrupted ones resume from their checkpoints, and a finished run whose grid
changed only in its evaluation settings is re-evaluated without retraining.

Shape convention (where tensors appear, inside training and evaluation): samples first,
log-weights ``[k, batch]``, data ``[batch, x_dim]``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from multiprocessing import connection, get_all_start_methods, get_context
from pathlib import Path
from typing import Any

from iwae.config import TrainConfig, build_train_config, setting_names
from iwae.data import DATASETS
from iwae.fast import for_evaluation
from iwae.lab import lifeline, locks
from iwae.lab.store import COLUMNS, DB_FILE, ResultStore, now
from iwae.names import AUTHORS_EVAL_BATCH, UNIT_DEFINITIONS

RUNS_SUBDIR = "runs"
SAMPLES_FILE = "samples.png"
GRID_COPY = "grid.json"
RESULT_FILE = "result.json"  # a run's row, written by its task; the sweep indexes it into the database
RUN_LOCK = ".lock"  # runs/NAME/.lock: held by the process that trains and evaluates the run
SWEEP_LOCK = ".sweep.lock"  # DIR/.sweep.lock: held by the sweep that owns the folder
# The forkserver imports these before it forks any worker; iwae.lab.lifeline first (it ties the server to the sweep).
PRELOAD = [
    "iwae.lab.lifeline",
    "torch",
    "torch._dynamo",
    "matplotlib.pyplot",
    "iwae.train",
    "iwae.evaluate",
    "iwae.sampling",
]

# Options that drive evaluation and the run's extras (the training settings are iwae.config.setting_names()).
EVAL_DEFAULTS: dict[str, Any] = {
    "eval_k": 5000,
    "eval_limit": None,
    "eval_split": "test",
    "eval_seed": 0,
    "eval_batch_size": 100,
    "eval_units": "ours",
}
# What ``protocol = "authors"`` changes in a run's evaluation where the grid leaves it: the authors' inactive units
# (iwae.evaluate) and their minibatch of 20 for L_5000 (measure_marginal_log_likelihood in yburda/iwae).
AUTHORS_EVAL: dict[str, Any] = {"eval_units": "authors", "eval_batch_size": AUTHORS_EVAL_BATCH}
RUN_DEFAULTS: dict[str, Any] = {"samples": True}
NAME_FORMATS = {
    "objective": "{}",
    "estimator": "{}",
    "dataset": "{}",
    "k": "k{}",
    "layers": "L{}",
    "seed": "s{}",
    "init_from": "from-{}",
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")


# -- options -> TrainConfig ----------------------------------------------------------------------
def known_options() -> set[str]:
    return setting_names() | set(EVAL_DEFAULTS) | set(RUN_DEFAULTS)


def check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - known_options()
    if unknown:
        raise ValueError(f"unknown grid settings {sorted(unknown)}; known: {', '.join(sorted(known_options()))}")


def train_config(options: dict[str, Any]) -> TrainConfig:
    """The :class:`~iwae.config.TrainConfig` that a run's settings describe (:func:`iwae.config.build_train_config`
    on its training settings; the evaluation and run settings are left out)."""
    check_options(options)
    return build_train_config({key: value for key, value in options.items() if key in setting_names()})


def eval_options(options: dict[str, Any]) -> dict[str, Any]:
    """The run's evaluation settings, each given or its default (:data:`AUTHORS_EVAL` under the authors' protocol)."""
    defaults = {**EVAL_DEFAULTS, **(AUTHORS_EVAL if options.get("protocol") == "authors" else {})}
    return {key: options.get(key, default) for key, default in defaults.items()}


def _whole(value: Any, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The settings whose type and range the lab checks itself: the evaluation's and the run's, and the training
# settings that the TrainConfig takes as given. (setting: (test, what it must be))
SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eval_k": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "eval_limit": (lambda v: v is None or _whole(v, 1), "a whole number >= 1"),
    "eval_split": (lambda v: v in ("train", "valid", "test"), "train, valid or test"),
    "eval_seed": (_whole, "a whole number"),
    "eval_batch_size": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "eval_units": (lambda v: v in UNIT_DEFINITIONS, " or ".join(UNIT_DEFINITIONS)),
    "samples": (lambda v: isinstance(v, bool), "true or false"),
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "epochs": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "beta1": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "beta2": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "adam_eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "schedule": (lambda v: isinstance(v, str), "a string such as 'burda' or 'burda:3'"),
    "init_from": (lambda v: isinstance(v, str) and v != "", "a run name or a run directory"),
}


def check_settings(options: dict[str, Any]) -> TrainConfig:
    """Check every setting of a run as the run would read it, and return its TrainConfig: unknown settings, the
    types and ranges in :data:`SETTING_CHECKS` (evaluation and run settings with their defaults filled in), and
    the TrainConfig built (which checks the rest). Raises a one-line ``ValueError``."""
    check_options(options)
    given = {key: value for key, value in options.items() if value is not None}
    values = {**given, **eval_options(options), "samples": options.get("samples", RUN_DEFAULTS["samples"])}
    for key, value in values.items():
        test, expected = SETTING_CHECKS.get(key, (None, ""))
        if test is not None and not test(value):
            raise ValueError(f"{key} must be {expected}, got {value!r}")
    try:
        return train_config(options)
    except TypeError as error:  # a value of the wrong type deep in the builder
        raise ValueError(str(error)) from None


def check_name(name: Any, what: str) -> str:
    """``name`` if it is one safe path component (letters, digits and ``. _ = + -``, starting with a letter,
    a digit or ``_``, without ``..``); else a one-line ``ValueError``. Phase and run names name directories."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} must be letters, digits and . _ = + - (no path separators, no '..', not empty), "
            "starting with a letter, a digit or _"
        )
    return name


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or somewhere below it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def run_dir_of(out_dir: str | Path, name: str) -> Path:
    """``OUT/runs/NAME``, refused (``ValueError``) unless ``name`` is a safe name and the directory resolves
    inside ``OUT`` (a link under ``runs/`` that points elsewhere, say)."""
    path = Path(out_dir) / RUNS_SUBDIR / check_name(name, "run name")
    if not inside(path, out_dir):
        raise ValueError(f"run directory {path} resolves to {path.resolve()}, outside the sweep folder {out_dir}")
    return path


# -- grids ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One configuration of a grid: its name, phase and settings (a flat JSON-able dict)."""

    name: str
    phase: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "phase": self.phase, "options": dict(self.options)}


def preset_names() -> list[str]:
    folder = resources.files("iwae") / "presets"
    return sorted(entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_grid(source: str | Path) -> dict[str, Any]:
    """A grid from a TOML file, or a shipped preset by name (``table1-smoke``, ``table1-quick``, ...)."""
    path = Path(source)
    if path.is_file():
        text = path.read_text()
    elif str(source) in preset_names():
        text = (resources.files("iwae") / "presets" / f"{source}.toml").read_text()
    else:
        raise ValueError(f"no grid file {str(source)!r} and no such preset; presets: {', '.join(preset_names())}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML ({error})") from None


def _segment(key: str, value: Any) -> str:
    text = NAME_FORMATS.get(key, key + "{}").format(value)
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _axis_items(value: Any) -> list[tuple[str, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


def _table(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a table, got {value!r}")
    return value


def _phase_specs(phase: dict[str, Any], shared: dict[str, Any]) -> list[RunSpec]:
    unknown = set(_table(phase, "a [[phase]] entry")) - {"name", "fixed", "axes"}
    if unknown:
        raise ValueError(f"a grid (or phase) holds name, [fixed] and [axes] only; found {sorted(unknown)}")
    phase_name = check_name(phase["name"], "phase name") if "name" in phase else ""
    fixed = {**shared, **_table(phase.get("fixed", {}), "[fixed]")}
    axes: dict[str, list[Any]] = _table(phase.get("axes", {}), "[axes]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"axis {key!r} must be a non-empty list")
    specs = []
    for combination in itertools.product(*axes.values()):
        options, segments = dict(fixed), [phase_name] if phase_name else []
        for key, value in zip(axes, combination, strict=True):
            items = _axis_items(value) or [(key, value)]
            options.update(items)
            segments.extend(_segment(k, v) for k, v in items)
        check_options(options)
        specs.append(RunSpec(check_name("-".join(segments) or "run", "run name"), phase_name, options))
    return specs


def expand_grid(grid: dict[str, Any]) -> list[RunSpec]:
    """All configurations of a grid, phase by phase, each fully checked (:func:`check_settings`)."""
    shared = _table(grid.get("fixed", {}), "[fixed]")
    if "phase" in grid:
        if "axes" in grid:
            raise ValueError("a grid with [[phase]] tables keeps its axes inside the phases")
        unknown = set(grid) - {"fixed", "phase"}
        if unknown:
            raise ValueError(f"a grid with [[phase]] tables holds [fixed] and the phases only; found {sorted(unknown)}")
        phases = grid["phase"]
        if not isinstance(phases, list) or not phases:
            raise ValueError("[[phase]] must be a non-empty array of tables")
    else:
        phases = [{key: value for key, value in grid.items() if key != "fixed"}]
        shared = {}
        phases[0]["fixed"] = grid.get("fixed", {})
    specs = [spec for phase in phases for spec in _phase_specs(phase, shared)]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"the grid gives several runs the same name {duplicates}; make the axes differ")
    for spec in specs:
        try:
            check_settings(spec.options)  # fail early on a bad setting
        except ValueError as error:
            raise ValueError(f"run {spec.name!r}: {error}") from None
    return specs


# -- one run --------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Package and torch versions and the git commit of the package's checkout (None if not in git)."""
    import torch

    from iwae import __version__

    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package_version": __version__, "torch_version": torch.__version__, "git_commit": commit}


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


def _evaluate(run_dir: Path, dataset, settings: dict[str, Any], device) -> dict[str, Any]:
    """``eval.json`` of the run for these settings (reused if it already matches, else computed)."""
    from iwae.checkpoint import atomic_write_text
    from iwae.evaluate import evaluate_model
    from iwae.runs import EVAL_FILE, load_model

    path = run_dir / EVAL_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("eval_settings") is not None and {**EVAL_DEFAULTS, **saved["eval_settings"]} == settings:
            return saved  # settings saved before a setting existed have its default
    model, config = load_model(run_dir, device)
    result = evaluate_model(
        model,
        dataset.split(settings["eval_split"]).subset(settings["eval_limit"]),
        dataset.binarization,
        k=settings["eval_k"],
        seed=settings["eval_seed"],
        split_name=settings["eval_split"],
        authors_split=dataset.train,
        units=settings["eval_units"],
        batch_size=settings["eval_batch_size"],
        accelerate=for_evaluation,
    )
    payload = {**result.to_dict(), "limit": settings["eval_limit"], "dataset": config.dataset}
    payload["eval_settings"] = settings
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return payload


def run_one(
    options: dict[str, Any],
    run_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    dataset=None,
) -> dict[str, Any]:
    """Train (resuming if the run directory holds a checkpoint), evaluate and draw samples for one run.

    ``dataset`` is an already loaded :class:`~iwae.data.Dataset` (else ``options["dataset"]`` is loaded).

    A plain function of its settings: it needs no database and no runner. Returns the summary the
    database stores: epochs done, training seconds (summed over resumed calls), seconds per epoch,
    final train and validation bounds, the evaluation object, the per-epoch metrics and the PNG path.
    """
    import torch

    from iwae.data import for_run, load_dataset
    from iwae.runs import CONFIG_FILE, MODEL_FILE, read_metrics, resolve_device
    from iwae.sampling import sample_figure
    from iwae.train import fit

    if threads is not None:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    config = train_config(options)
    torch_device = resolve_device(device)
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir, progress=progress)
    dataset = for_run(dataset, config.binarization, config.train_split)
    if not (run_dir / MODEL_FILE).is_file():
        resume = (run_dir / CONFIG_FILE).is_file()
        fit(config, run_dir, resume=resume, device=device, data_dir=data_dir, dataset=dataset, progress=progress)
    metrics = read_metrics(run_dir)
    if len(metrics) != config.total_epochs:
        raise RuntimeError(f"{run_dir}: {len(metrics)} epochs of metrics for a {config.total_epochs}-epoch schedule")
    evaluation = _evaluate(run_dir, dataset, eval_options(options), torch_device)
    samples = None
    if options.get("samples", RUN_DEFAULTS["samples"]):
        from iwae.runs import load_model

        model, _ = load_model(run_dir, torch_device)
        layers = config.model.n_stochastic
        title = f"{run_dir.name}: {config.objective.label()} k={config.k}, {layers} stochastic layer(s)"
        samples = str(
            sample_figure(
                model,
                dataset.test.images,
                dataset.binarization,
                run_dir / SAMPLES_FILE,
                title=title,
                shape=dataset.image_shape,
            )
        )
    seconds = sum(m["seconds"] for m in metrics)
    last = metrics[-1]
    return {
        "epochs_done": len(metrics),
        "seconds": seconds,
        "seconds_per_epoch": seconds / len(metrics),
        "train_bound": last["train_bound"],
        "valid_bound": last[f"valid_L{config.valid_k}"],
        "eval": evaluation,
        "metrics": metrics,
        "samples_png": samples,
        "device": _device_name(torch_device),
    }


def _failure(error: Exception) -> dict[str, Any]:
    """A run's status and error for an exception: ``diverged`` for :class:`iwae.runs.DivergenceError` (a
    non-finite bound stopped it), else ``failed``."""
    from iwae import runs

    divergence = getattr(runs, "DivergenceError", ())  # () where the training loop does not define it: never matches
    status = "diverged" if isinstance(error, divergence) else "failed"
    return {"status": status, "error": f"{type(error).__name__}: {error}"}


def run_group(
    specs: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
    attempt: str | None = None,
) -> list[dict[str, Any]]:
    """Train, evaluate and write the result of specs (``RunSpec.to_dict()``): one run, or several that train as
    one stack (:func:`iwae.stacked.fit_stacked`) and are then evaluated one by one. A sweep's unit of work,
    wherever it runs; it never touches the database.

    Holds ``runs/NAME/.lock`` of every run throughout (:class:`~iwae.lab.locks.LockBusy`, and nothing touched,
    if another process holds one), and writes each run's row (the store's columns, plus ``attempt``) to
    ``runs/NAME/result.json``, atomically; errors are written there, not raised, so one bad run does not stop a
    sweep. Runs of a stack whose directories are at different points go on one by one; where some runs of a stack
    diverge, those are recorded ``diverged`` and the others go on one by one. Returns the rows.
    """
    import torch

    from iwae.checkpoint import atomic_write_text
    from iwae.runs import CONFIG_FILE, RunError
    from iwae.stacked import fit_stacked

    out_dir = Path(out_dir)
    env = env if env is not None else environment()
    run_dirs = [run_dir_of(out_dir, spec["name"]) for spec in specs]
    with ExitStack() as held:
        for run_dir in run_dirs:
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(locks.hold(run_dir / RUN_LOCK, what=f"run {run_dir}"))
        for run_dir in run_dirs:
            (run_dir / RESULT_FILE).unlink(missing_ok=True)  # this attempt's result replaces the last one
        if threads is not None:
            torch.set_num_threads(threads)
        started = now()
        failures: dict[Path, dict[str, Any]] = {}  # run directory -> its status and error, where the stack decides
        if len(specs) > 1:
            configs = [train_config(spec["options"]) for spec in specs]
            resume = any((run_dir / CONFIG_FILE).is_file() for run_dir in run_dirs)
            try:
                fit_stacked(configs, run_dirs, resume=resume, device=device, data_dir=data_dir, progress=False)
            except RunError as error:  # at different points, or some diverged (named): the rest go on one by one
                diverged = {Path(run_dir).resolve() for run_dir in getattr(error, "run_dirs", ())}
                failures = {run_dir: _failure(error) for run_dir in run_dirs if run_dir.resolve() in diverged}
            except Exception as error:
                failures = {run_dir: _failure(error) for run_dir in run_dirs}
        rows = []
        for spec, run_dir in zip(specs, run_dirs, strict=True):
            row = {"name": spec["name"], "phase": spec["phase"], "run_dir": str(run_dir), "config": spec["options"]}
            row.update(started=started, attempt=attempt, **env)
            if run_dir in failures:
                row.update(failures[run_dir])
            else:
                try:
                    summary = run_one(spec["options"], run_dir, device=device, data_dir=data_dir)
                    row.update(status="finished", error=None, **summary)
                except Exception as error:  # written to the result file; the sweep goes on
                    row.update(_failure(error))
            row["finished"] = now()
            atomic_write_text(run_dir / RESULT_FILE, json.dumps(row, indent=2) + "\n")
            rows.append(row)
    return rows


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The row in ``run_dir/result.json``, or None if there is none (or it cannot be read)."""
    try:
        row = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("name"), str) else None


def record(store: ResultStore, row: dict[str, Any]) -> None:
    """Write a run's row (as :func:`run_group` returns it, or a result file holds it) into the database."""
    store.upsert(row["name"], **{key: value for key, value in row.items() if key in COLUMNS and key != "name"})


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


def execute_stack(
    specs: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
) -> list[tuple[str, str, str | None]]:
    """:func:`run_group` in this process, then each run recorded in the database in ``out_dir``: the simplest
    way to run specs that share everything but seed, objective and ``init_from`` (one spec also does) from a
    launcher of one's own on one machine.

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


def execute(
    spec: dict[str, Any],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
) -> tuple[str, str, str | None]:
    """Run one spec (``RunSpec.to_dict()``) in ``out_dir`` and record it in the database there
    (:func:`execute_stack` of one spec). Returns ``(name, status, error)``."""
    return execute_stack([spec], out_dir, device=device, data_dir=data_dir, threads=threads, env=env)[0]


def stack_groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Specs that can train as one stack (:func:`iwae.stacked.stack_key`), in their first member's order."""
    from iwae.stacked import stack_key

    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(stack_key(train_config(spec.options)), []).append(spec)
    return list(groups.values())


# -- tasks and runners -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One unit of a sweep's work, picklable for a worker process or a cluster job: the specs of one
    :func:`run_group` and how to run them. ``attempt`` marks the result files this task writes, so that the
    sweep never takes an older attempt's file for this one's."""

    specs: tuple[dict[str, Any], ...]
    out_dir: str
    attempt: str
    device: str = "auto"
    data_dir: str | None = None
    env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEnd:
    """How a task ended, as its runner saw it. Both fields None: it ran (each run's outcome is in its result
    file). ``busy``: another process holds one of its runs (nothing was touched). ``error``: it ended without
    writing its results (a crash, a killed process, a failed or cancelled cluster job)."""

    busy: str | None = None
    error: str | None = None


def run_task(task: Task, threads: int | None = None) -> TaskEnd:
    """What a worker process or a cluster job calls: :func:`run_group` on the task. Never raises."""
    try:
        run_group(list(task.specs), task.out_dir, device=task.device, data_dir=task.data_dir, threads=threads,
                  env=task.env or None, attempt=task.attempt)  # fmt: skip
    except locks.LockBusy as busy:
        return TaskEnd(busy=str(busy))
    except Exception as error:
        return TaskEnd(error=f"{type(error).__name__}: {error}")
    return TaskEnd()


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


# A runner takes a phase's tasks and runs them, calling started(task) as each is handed on and done(task, end) as
# each ends (in the calling thread, which is the sweep's and the database's one writer).
Runner = Callable[[list[Task], Callable[[Task], None], Callable[[Task, TaskEnd], None]], None]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _context():
    """Fresh processes for the runs: forked from a server that has imported torch (and nothing has run
    torch's thread pools in it), which saves each run the imports; plain ``spawn`` where that is missing."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _work(task: Task, writer: Any, sweep_pid: int, threads: int) -> None:
    """A worker process: tied to the sweep (it ends with it), it runs the task and sends back how it ended."""
    lifeline.watch(sweep_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the sweep ends its workers
    writer.send(run_task(task, threads))
    writer.close()


class LocalRunner:
    """Runs each task in a fresh process on this machine, ``workers`` at a time, each with ``cores // workers``
    threads. The processes come from :func:`_context` and end with the sweep, however it ends
    (:mod:`iwae.lab.lifeline`); if the sweep stops on an exception (Ctrl-C included) it kills them first."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.threads = max(1, available_cores() // workers)

    def __call__(
        self, tasks: list[Task], started: Callable[[Task], None], done: Callable[[Task, TaskEnd], None]
    ) -> None:
        context, queue = _context(), list(tasks)
        live: dict[int, tuple[Any, Any, Task]] = {}  # sentinel -> (process, pipe's reading end, task)
        # Inherited by the forkserver when it starts (each worker also sets torch's threads); the pid ties it to us.
        saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", lifeline.SWEEP_PID_ENV)}
        os.environ.update({"OMP_NUM_THREADS": str(self.threads), lifeline.SWEEP_PID_ENV: str(os.getpid())})
        try:
            while queue or live:
                while queue and len(live) < self.workers:
                    task = queue.pop(0)
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(target=_work, args=(task, writer, os.getpid(), self.threads),
                                              name=f"iwae-sweep-{task.specs[0]['name']}")  # fmt: skip
                    started(task)
                    process.start()
                    writer.close()
                    live[process.sentinel] = (process, reader, task)
                for sentinel in connection.wait(list(live)):
                    process, reader, task = live.pop(sentinel)
                    process.join()
                    try:
                        end = reader.recv()
                    except EOFError:
                        end = TaskEnd(error=f"the worker process ended with exit code {process.exitcode}")
                    reader.close()
                    done(task, end)
        finally:
            for process, reader, _ in live.values():
                process.kill()
                process.join()
                reader.close()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# -- sweeps ---------------------------------------------------------------------------------------
def _resolve_init_from(options: dict[str, Any], runs_dir: Path, names: set[str]) -> dict[str, Any]:
    """``init_from`` as a directory: a grid's own run by its path under ``runs/`` (which may be a link to a reused
    twin: not followed, so the recorded setting stays the same when the sweep is run again); any other value
    must be a finished run directory already."""
    from iwae.runs import MODEL_FILE

    source = options.get("init_from")
    if source is None:
        return options
    if source in names:
        return {**options, "init_from": str(runs_dir.resolve() / source)}
    path = Path(source).resolve()
    if not (path / MODEL_FILE).is_file():
        raise ValueError(f"init_from {source!r} is neither a run of this grid nor a finished run directory")
    return {**options, "init_from": str(path)}


def _cost(options: dict[str, Any]) -> float:
    """A rough relative cost (to start the longest runs first)."""
    config = train_config(options)
    examples = config.train_limit or 60_000
    return config.total_epochs * examples * (1 + config.k / 8) * config.model.n_stochastic


def _is_done(row: dict[str, Any] | None, options: dict[str, Any]) -> bool:
    from iwae.runs import EVAL_FILE, MODEL_FILE

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
        runs_dir.mkdir(parents=True, exist_ok=True)
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
        store = ResultStore.in_dir(out_dir)
        for spec in specs:
            _check_same_settings(store.get(spec.name), spec.options, out_dir)


@contextmanager
def sweep_lock(
    out_dir: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Own the sweep folder ``out_dir`` (created if missing) for the block, through ``DIR/.sweep.lock``: while a
    sweep (or ``iwae results --rescan``) holds it, another raises :class:`~iwae.lab.locks.LockBusy` naming the
    holder, or with ``wait`` waits for it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    what, hint = f"sweep folder {out_dir}", "wait for that sweep to end, or pass --wait"
    with locks.hold(out_dir / SWEEP_LOCK, what=what, hint=hint, wait=wait, on_wait=on_wait):
        yield


def resolved_specs(grid: dict[str, Any], out_dir: str | Path) -> list[RunSpec]:
    """The grid's configurations as they run in ``out_dir``, every setting and name checked
    (:func:`expand_grid`, :func:`run_dir_of`): ``init_from`` names become run directories."""
    specs = expand_grid(grid)
    names = {spec.name for spec in specs}
    runs_dir = Path(out_dir) / RUNS_SUBDIR
    for spec in specs:
        run_dir_of(out_dir, spec.name)
    return [RunSpec(s.name, s.phase, _resolve_init_from(s.options, runs_dir, names)) for s in specs]


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
    from tqdm import tqdm

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


def stacks_by_default(device: str) -> bool:
    """Whether a sweep on ``device`` stacks its runs unless told: on a GPU, where one minibatch-20 model leaves the
    device idle. Not on a CPU, where a stacked step costs about what the single runs' fast path costs (0.8 to 1.1
    times their training throughput on this project's 2-core machine, ``docs/performance.md``), so separate runs
    in parallel workers are as fast and keep the fast path."""
    from iwae.runs import resolve_device

    return resolve_device(device).type == "cuda"


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
    """Run every configuration of ``grid`` not yet finished in ``out_dir``; phases one after the other. With
    ``stack``, the runs of a phase that share everything but seed, objective and ``init_from`` (the architecture,
    k, the minibatches and the schedule) train as one stacked computation (:mod:`iwae.stacked`); ``None`` (the
    default) stacks where that pays, on a GPU (:func:`stacks_by_default`).

    Everything is checked before anything is written (a bad grid or ``out_dir`` raises a one-line
    ``ValueError``); then the sweep holds the folder (:func:`sweep_lock`; ``wait``: wait for another sweep there)
    and runs each phase through ``runner`` (default: a :class:`LocalRunner` of ``workers``). The summary names
    the runs that ``failed``, ``diverged`` or were ``busy`` (held by another process).
    """
    from iwae.checkpoint import atomic_write_text

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if stack is None:
        stack = stacks_by_default(device)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a sweep directory")
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
        root, env = out_dir.resolve(), environment()  # tasks and rows name absolute paths: jobs start elsewhere
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
