"""Experiment grids: TOML grid files, shipped presets, a local process-pool runner and the run function.

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
eval_split, eval_seed, eval_batch_size), plus ``samples`` (write a sample grid, default true).

Running: a run is a plain function of its settings, :func:`run_one` ``(options, run_dir) -> dict``
(train with resume, evaluate, draw samples); :func:`execute` wraps it to record the run in the
sweep's SQLite database (:mod:`iwae.lab.store`), and :func:`execute_stack` trains runs that differ only in seed,
objective and ``init_from`` as one stacked computation first (:mod:`iwae.stacked`). :func:`run_sweep` is a simple
local runner: each configuration (or stack) runs in its own fresh process (a process pool with one task per
child, forked from a ``forkserver`` that has imported torch, else ``spawn``) with ``cores // workers`` threads; finished
runs are skipped, interrupted ones resume from their checkpoints, and a finished run whose grid
changed only in its evaluation settings is re-evaluated without retraining.

Nothing here is a scheduler. To run the same grid on a cluster, take :func:`resolved_specs`
``(grid, out_dir)`` (the configurations with ``init_from`` resolved to run directories) and hand
``execute(spec.to_dict(), out_dir, ...)`` to an existing launcher: a Slurm job array through
``submitit`` (one array task per spec, one array per phase) or ``ray.remote(execute)``. All tasks
of a sweep write to one SQLite file, so keep ``out_dir`` on a file system with working POSIX locks
(a local disk, not NFS), or give each task its own out_dir.

Shape convention (where tensors appear, inside training and evaluation): samples first,
log-weights ``[k, batch]``, data ``[batch, x_dim]``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

from iwae.config import TrainConfig, build_train_config, setting_names
from iwae.fast import for_evaluation
from iwae.lab.store import ResultStore, now

RUNS_SUBDIR = "runs"
SAMPLES_FILE = "samples.png"
GRID_COPY = "grid.json"
PRELOAD = ["torch", "torch._dynamo", "matplotlib.pyplot", "iwae.train", "iwae.evaluate", "iwae.sampling"]

# Options that drive evaluation and the run's extras (the training settings are iwae.config.setting_names()).
EVAL_DEFAULTS: dict[str, Any] = {
    "eval_k": 5000,
    "eval_limit": None,
    "eval_split": "test",
    "eval_seed": 0,
    "eval_batch_size": 100,
}
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
    return {key: options.get(key, default) for key, default in EVAL_DEFAULTS.items()}


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


def _phase_specs(phase: dict[str, Any], shared: dict[str, Any]) -> list[RunSpec]:
    unknown = set(phase) - {"name", "fixed", "axes"}
    if unknown:
        raise ValueError(f"a grid (or phase) holds name, [fixed] and [axes] only; found {sorted(unknown)}")
    phase_name = str(phase.get("name", ""))
    fixed = {**shared, **phase.get("fixed", {})}
    axes: dict[str, list[Any]] = phase.get("axes", {})
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
        specs.append(RunSpec("-".join(segments) or "run", phase_name, options))
    return specs


def expand_grid(grid: dict[str, Any]) -> list[RunSpec]:
    """All configurations of a grid, phase by phase, each checked by building its TrainConfig."""
    shared = grid.get("fixed", {})
    if "phase" in grid:
        if "axes" in grid:
            raise ValueError("a grid with [[phase]] tables keeps its axes inside the phases")
        phases = grid["phase"]
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
        train_config(spec.options)  # fail early on a bad setting
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
        if saved.get("eval_settings") == settings:
            return saved
    model, config = load_model(run_dir, device)
    result = evaluate_model(
        model,
        dataset.split(settings["eval_split"]).subset(settings["eval_limit"]),
        dataset.binarization,
        k=settings["eval_k"],
        seed=settings["eval_seed"],
        split_name=settings["eval_split"],
        authors_split=dataset.train,
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

    from iwae.data import load_dataset
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


def execute(
    spec: dict[str, Any],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
) -> tuple[str, str, str | None]:
    """Run one spec (``RunSpec.to_dict()``) in ``out_dir`` and record it in the database there.

    Returns ``(name, status, error)``; errors are recorded, not raised, so one bad run does not
    stop a sweep.
    """
    out_dir = Path(out_dir)
    store = ResultStore.in_dir(out_dir)
    name = spec["name"]
    run_dir = out_dir / RUNS_SUBDIR / name
    store.upsert(
        name,
        phase=spec["phase"],
        run_dir=str(run_dir),
        config=spec["options"],
        status="running",
        started=now(),
        finished=None,
        error=None,
        **(env if env is not None else environment()),
    )
    try:
        summary = run_one(spec["options"], run_dir, device=device, data_dir=data_dir, threads=threads)
    except Exception as error:  # recorded in the database; the sweep goes on
        store.upsert(name, status="failed", finished=now(), error=f"{type(error).__name__}: {error}")
        return name, "failed", f"{type(error).__name__}: {error}"
    store.upsert(name, status="finished", finished=now(), **summary)
    return name, "finished", None


def execute_stack(
    specs: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    threads: int | None = None,
    env: dict[str, Any] | None = None,
) -> list[tuple[str, str, str | None]]:
    """Train specs that share everything but seed, objective and ``init_from`` as one stack
    (:func:`iwae.stacked.fit_stacked`), then evaluate and record each with :func:`execute` (which finds it trained).

    Runs whose directories are at different points (a sweep interrupted before stacking, say) train one by one.
    """
    import torch

    from iwae.runs import CONFIG_FILE, RunError
    from iwae.stacked import fit_stacked

    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    store = ResultStore.in_dir(out_dir)
    env = env if env is not None else environment()
    run_dirs = [out_dir / RUNS_SUBDIR / spec["name"] for spec in specs]
    for spec, run_dir in zip(specs, run_dirs, strict=True):
        store.upsert(spec["name"], phase=spec["phase"], run_dir=str(run_dir), config=spec["options"], status="running",
                     started=now(), finished=None, error=None, **env)  # fmt: skip
    configs = [train_config(spec["options"]) for spec in specs]
    resume = any((run_dir / CONFIG_FILE).is_file() for run_dir in run_dirs)
    try:
        fit_stacked(configs, run_dirs, resume=resume, device=device, data_dir=data_dir, progress=False)
    except RunError:
        pass  # at different points: each resumes on its own in execute()
    except Exception as error:  # recorded in the database; the sweep goes on
        message = f"{type(error).__name__}: {error}"
        for spec in specs:
            store.upsert(spec["name"], status="failed", finished=now(), error=message)
        return [(spec["name"], "failed", message) for spec in specs]
    return [execute(spec, out_dir, device=device, data_dir=data_dir, threads=threads, env=env) for spec in specs]


def stack_groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Specs that can train as one stack (:func:`iwae.stacked.stack_key`), in their first member's order."""
    from iwae.stacked import stack_key

    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(stack_key(train_config(spec.options)), []).append(spec)
    return list(groups.values())


# -- the local runner ------------------------------------------------------------------------------
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve_init_from(options: dict[str, Any], runs_dir: Path, names: set[str]) -> dict[str, Any]:
    source = options.get("init_from")
    if source is None:
        return options
    # A grid's own run is named by its path under runs/ (which may be a link to a reused twin: not followed,
    # so the recorded setting stays the same when the sweep is run again).
    path = runs_dir.resolve() / source if source in names else Path(source).resolve()
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


def _finished_twin(store: ResultStore, name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run in the store, under another name, with exactly these settings (another grid's run)."""
    for row in store.rows(status="finished"):
        if row["name"] != name and _is_done(row, options):
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


def _context():
    """Fresh processes for the runs: forked from a server that has imported torch (and nothing has run
    torch's thread pools in it), which saves each run the imports; plain ``spawn`` where that is missing."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run_phase(
    specs: list[RunSpec],
    out_dir: Path,
    workers: int,
    device: str,
    data_dir: str | None,
    progress: bool,
    stack: bool = True,
) -> list[tuple[str, str, str | None]]:
    from tqdm import tqdm

    groups = stack_groups(specs) if stack else [[spec] for spec in specs]
    groups.sort(key=lambda group: -sum(_cost(spec.options) for spec in group))
    threads = max(1, available_cores() // workers)
    env = environment()
    results = []
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the workers (each also sets torch's threads)
    try:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(groups)), mp_context=_context(), max_tasks_per_child=1)
        with pool:
            futures = [
                pool.submit(
                    execute_stack,
                    [spec.to_dict() for spec in group],
                    out_dir,
                    device=device,
                    data_dir=data_dir,
                    threads=threads,
                    env=env,
                )
                if len(group) > 1
                else pool.submit(
                    execute, group[0].to_dict(), out_dir, device=device, data_dir=data_dir, threads=threads, env=env
                )
                for group in groups
            ]
            bar = tqdm(total=len(specs), unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)
            for future in as_completed(futures):
                outcome = future.result()
                for name, status, error in outcome if isinstance(outcome, list) else [outcome]:
                    results.append((name, status, error))
                    bar.set_postfix_str(f"{name}: {status}")
                    bar.update(1)
                    if error and progress:
                        tqdm.write(f"run {name} failed: {error}")
            bar.close()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return results


def resolved_specs(grid: dict[str, Any], out_dir: str | Path) -> list[RunSpec]:
    """The grid's configurations as they run in ``out_dir``: ``init_from`` names become run directories."""
    specs = expand_grid(grid)
    names = {spec.name for spec in specs}
    runs_dir = Path(out_dir) / RUNS_SUBDIR
    return [RunSpec(s.name, s.phase, _resolve_init_from(s.options, runs_dir, names)) for s in specs]


def run_sweep(
    grid: dict[str, Any],
    out_dir: str | Path,
    *,
    workers: int = 1,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
    stack: bool = True,
) -> dict[str, Any]:
    """Run every configuration of ``grid`` not yet finished in ``out_dir``; phases one after the other. With
    ``stack``, the runs of a phase that share everything but seed, objective and ``init_from`` (the architecture,
    k, the minibatches and the schedule) train as one stacked computation (:mod:`iwae.stacked`)."""
    from iwae.checkpoint import atomic_write_text

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    specs = resolved_specs(grid, out_dir)
    store = ResultStore.in_dir(out_dir)
    for spec in specs:
        _check_same_settings(store.get(spec.name), spec.options, out_dir)
    atomic_write_text(out_dir / GRID_COPY, json.dumps(grid, indent=2, sort_keys=True) + "\n")
    runs_dir = out_dir / RUNS_SUBDIR
    phases = list(dict.fromkeys(spec.phase for spec in specs))
    skipped: list[str] = []
    reused: list[str] = []
    results: list[tuple[str, str, str | None]] = []
    for phase in phases:
        todo = []
        for spec in (s for s in specs if s.phase == phase):
            options = spec.options
            if _is_done(store.get(spec.name), options):
                skipped.append(spec.name)
                continue
            twin = _finished_twin(store, spec.name, options)
            if twin is not None:
                _adopt_twin(store, spec, twin, runs_dir)
                reused.append(spec.name)
                continue
            store.upsert(spec.name, phase=phase, run_dir=str(runs_dir / spec.name), config=options, status="pending")
            todo.append(RunSpec(spec.name, phase, options))
        if todo:
            results.extend(_run_phase(todo, out_dir, workers, device, data_dir, progress, stack))
    failed = {name: error for name, status, error in results if status == "failed"}
    return {
        "out": str(out_dir),
        "database": str(store.path),
        "runs": len(specs),
        "ran": len(results),
        "skipped": len(skipped),
        "reused": len(reused),
        "failed": failed,
        "workers": workers,
        "stack": stack,
        "threads_per_worker": max(1, available_cores() // workers),
        "seconds": round(time.perf_counter() - started, 2),
    }
