"""One run of a grid, and one stack of runs: train (resuming), evaluate, draw samples, write the run's result file.

A run is a plain function of its settings, :func:`run_one` ``(options, run_dir) -> dict`` (train with resume,
evaluate with :func:`iwae.evaluate.evaluate_run`, draw samples); it needs no database and no runner.
:func:`run_group` is a sweep's unit of work, wherever it runs: one run, or runs that differ only in seed, objective
and ``init_from`` trained as one stacked computation first (:mod:`iwae.stacked`); it holds each run's lock
(``runs/NAME/.lock``, :func:`iwae.runs.hold_run`) throughout, and writes each run's row to ``runs/NAME/result.json``,
never to the database. :func:`read_result` reads such a file back and :func:`record` writes a row into the
sweep's database (:mod:`iwae.lab.store`), which only the sweep does (:mod:`iwae.lab.sweep`).

Shape convention (where tensors appear, inside training and evaluation): samples first,
log-weights ``[k, batch]``, data ``[batch, x_dim]``.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from iwae import __version__, runs
from iwae.checkpoint import atomic_write_text
from iwae.data import for_run, load_dataset
from iwae.evaluate import evaluate_run
from iwae.fast import for_evaluation
from iwae.lab.grid import EVAL_DEFAULTS, RUN_DEFAULTS, eval_options, run_dir_of, train_config
from iwae.lab.store import COLUMNS, ResultStore, now
from iwae.runs import CONFIG_FILE, EVAL_FILE, MODEL_FILE, RunError, load_model, read_metrics, resolve_device
from iwae.sampling import sample_figure
from iwae.train import fit, fit_runs

SAMPLES_FILE = "samples.png"
RESULT_FILE = "result.json"  # a run's row, written by its task; the sweep indexes it into the database


def environment() -> dict[str, Any]:
    """Package and torch versions and the git commit of the package's checkout (None if not in git)."""
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


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
    final train and validation bounds, the evaluation (``eval.json``: reused where it holds this run's evaluation
    settings, else written by :func:`iwae.evaluate.evaluate_run` with them as ``eval_settings``), the per-epoch
    metrics and the PNG path.
    """
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
    settings = eval_options(options)
    saved = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).is_file() else {}
    # a setting missing from the saved eval_settings has its default
    if saved.get("eval_settings") is None or {**EVAL_DEFAULTS, **saved["eval_settings"]} != settings:
        evaluate_run(
            run_dir,
            k=settings["eval_k"],
            split=settings["eval_split"],
            limit=settings["eval_limit"],
            seed=settings["eval_seed"],
            device=device,
            units=settings["eval_units"],
            batch_size=settings["eval_batch_size"],
            progress=False,
            accelerate=for_evaluation,
            dataset=dataset,
            extra={"eval_settings": settings},
        )
        saved = json.loads((run_dir / EVAL_FILE).read_text())
    samples = None
    if options.get("samples", RUN_DEFAULTS["samples"]):
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
        "eval": saved,
        "metrics": metrics,
        "samples_png": samples,
        "device": _device_name(torch_device),
    }


def _failure(error: Exception) -> dict[str, Any]:
    """A run's status and error for an exception: ``diverged`` for :class:`iwae.runs.DivergenceError` (a
    non-finite bound stopped it), else ``failed``."""
    status = "diverged" if isinstance(error, runs.DivergenceError) else "failed"
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
    """Train, evaluate and write the result of one run, or of several trained as one stack: a sweep's unit of work.

    Holds every run's ``runs/NAME/.lock`` throughout and writes each run's row (the store's columns, plus
    ``attempt``) to ``runs/NAME/result.json`` atomically; it never touches the database. Errors are written there,
    not raised, so one bad run does not stop a sweep. Runs of a stack whose directories are at different points,
    and the rest of a stack some of whose runs diverged, go on one by one.

    Args:
        specs: ``RunSpec.to_dict()`` of each run; several train as one stack (:func:`iwae.train.fit_runs`) and are
            then evaluated one by one.
        out_dir: the sweep folder.
        attempt: recorded in each row.

    Returns:
        The rows written.

    Raises:
        iwae.locks.LockBusy: another process holds one of the runs' locks (nothing is touched).
    """
    out_dir = Path(out_dir)
    env = env if env is not None else environment()
    run_dirs = [run_dir_of(out_dir, spec["name"]) for spec in specs]
    with ExitStack() as held:
        for run_dir in run_dirs:
            run_dir.mkdir(parents=True, exist_ok=True)  # inside the sweep folder, links resolved (iwae.lab.grid)
            held.enter_context(runs.hold_run(run_dir))
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
                fit_runs(configs, run_dirs, resume=resume, device=device, data_dir=data_dir, progress=False, stack="on")
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
