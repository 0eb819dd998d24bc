"""The whole run of ``iwae bench``, summed up in the JSON-serialisable result (see :mod:`iwae.lab.bench`).

The grid's cells run in this process, then ``L_5000`` in a fresh subprocess (:mod:`iwae.lab.bench.worker`), spawned by
:func:`run_worker`, which every measurement in a process of its own goes through (``iwae bench --memory`` too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae.data import Dataset, load_dataset
from iwae.lab.bench.cells import compare, measure_cell
from iwae.lab.bench.paths import configure_allocator, gradient_path, native_kernels
from iwae.lab.bench.rivals import pyro_skip_reason, pyro_version
from iwae.lab.bench.settings import EVAL_K, TRAINING_MIN_SECONDS, BenchSettings
from iwae.runs import resolve_device


def run_bench(settings: BenchSettings, dataset: Dataset | None = None) -> dict[str, Any]:
    """Measure the grid and the evaluation; returns the JSON-serialisable result (see :mod:`iwae.lab.bench`).

    ``settings.threads`` applies to everything (torch.set_num_threads, restored afterwards).
    """
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, dataset)
    finally:
        torch.set_num_threads(previous_threads)


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _run(settings: BenchSettings, dataset: Dataset | None) -> dict[str, Any]:
    started = time.perf_counter()
    allocator_setting = configure_allocator()  # every implementation measured under the same malloc settings
    load_before = load_average()
    device = resolve_device(settings.device)
    threads = torch.get_num_threads()
    data = dataset if dataset is not None else load_dataset("mnist", progress=settings.progress)
    images = data.train.images[: settings.n_train].to(device)
    version = pyro_version()
    pyro_status = pyro_skip_reason(settings.pyro, version)
    grid = settings.grid()
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    bar = tqdm(total=len(grid) + 1, desc="iwae bench", unit="cell", disable=not settings.progress, file=sys.stderr)
    try:
        for layers, k, batch in grid:
            bar.set_postfix_str(f"layers={layers} k={k} batch={batch}")
            cell = measure_cell(layers, k, batch, images, settings, pyro_status)
            rows += cell
            comparisons.append(compare(cell))
            bar.update()
        bar.set_postfix_str(f"L_{EVAL_K} on {min(settings.eval_images, len(data.test))} test images")
        evaluation = measure_eval(data.test.images, images.mean(dim=0), settings, device, threads)
        bar.update()
    finally:
        bar.close()
    rows.append({"task": "eval", "impl": "iwae", "layers": 1, **evaluation})
    result = _summary(settings, device, threads, version, pyro_status, rows, comparisons, evaluation, started)
    result.update(
        allocator=allocator_setting,
        load_average_before=load_before,
        load_average_after=load_average(),
        cpu_count=os.cpu_count(),
    )
    cpus = os.cpu_count() or 1
    if load_before is not None and load_before > 0.5 * cpus:
        result["notes"].append(
            f"the machine was busy when the bench started (1-minute load average {load_before:.1f} on {cpus} CPUs): "
            "timings are noisy, and with as many threads as busy cores they can be far slower than on an idle "
            "machine (try --threads 1)"
        )
    return result


def _lookup(comparisons: list[dict[str, Any]], key: str, layers: int, k: int, batch: int) -> float | None:
    for c in comparisons:
        if (c["layers"], c["k"], c["batch"]) == (layers, k, batch):
            return c[key]
    return None


def _summary(
    settings: BenchSettings,
    device: torch.device,
    threads: int,
    version: str | None,
    pyro_status: str | None,
    rows: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    evaluation: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    n_eval = evaluation["images"]
    scaled = n_eval != 1000
    passes = len(evaluation["seconds_per_pass"])
    eval_note = (
        f"L_{EVAL_K} measured on {n_eval} test images (minibatches of {evaluation['batch_size']}) and scaled to 1,000"
        if scaled
        else f"L_{EVAL_K} measured on 1,000 test images"
    ) + (f", median of {passes} passes" if passes > 1 else "")
    return {
        "roofline_fraction_k50": _lookup(comparisons, "roofline_fraction", 1, 50, 100),
        "speedup_vs_pyro_k5_b20": _lookup(comparisons, "speedup_vs_pyro", 1, 5, 20),
        "speedup_vs_pyro_k50_b20": _lookup(comparisons, "speedup_vs_pyro", 1, 50, 20),
        "speedup_vs_plain_k5_b20": _lookup(comparisons, "speedup_vs_plain", 1, 5, 20),
        "speedup_vs_plain_k50_b20": _lookup(comparisons, "speedup_vs_plain", 1, 50, 20),
        "eval_s_per_1000_k5000": evaluation["seconds"] / n_eval * 1000,
        "eval_peak_rss_mb": evaluation["rss_above_baseline_mb"],
        "eval_peak_rss_total_mb": evaluation["rss_peak_mb"],
        "eval_cuda_peak_mb": evaluation["cuda_peak_mb"],
        "eval_images": n_eval,
        "eval_scaled": scaled,
        "threads": threads,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "native_kernels": native_kernels(device),
        "compile": settings.compile,
        "gradients": gradient_path(settings, device),
        "pyro_version": version,
        "pyro_status": pyro_status or "ok",
        "mode": settings.mode,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "n_train": settings.n_train,
        "seconds": time.perf_counter() - started,
        "notes": [
            eval_note,
            f"each repeat of a training step runs consecutive steps for at least {TRAINING_MIN_SECONDS:g} s, "
            "as a training loop does; ms per step is the median repeat's time over its steps",
            "GFLOP/s count matmul FLOPs only: 2*in*out per row per linear layer, a training step = 3x forward",
            "Pyro's RenyiELBO sums log-weights over the data plate before the log-mean-exp over particles "
            "(not the per-example IWAE bound for batch > 1); the cost per step is the same",
        ],
        "comparisons": comparisons,
        "rows": rows,
    }


def write_worker_data(path: Path, images: Tensor, mean_x: Tensor) -> Path:
    """Save ``images`` ``[n, x_dim]`` and ``mean_x`` ``[x_dim]`` as the ``.npz`` a worker reads; returns ``path``."""
    np.savez(path, images=images.cpu().numpy(), mean_x=mean_x.cpu().numpy())
    return path


def run_worker(
    task: str, data_path: Path, arguments: Sequence[str], what: str, environment: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """Run ``python -m iwae.lab.bench.worker TASK NPZ ARGUMENTS...`` in a fresh process and return its JSON result.

    The one way the bench spawns a measurement, so that each runs in a process of its own and peaks do not mix
    (:mod:`iwae.lab.bench.worker`: ``eval`` or ``train``). ``environment`` sets variables for the worker (None removes
    one); this checkout's package comes first on its ``PYTHONPATH``.

    Raises:
        RuntimeError: the worker failed; the message names ``what``, its exit code and its last line on stderr.
    """
    command = [sys.executable, "-m", "iwae.lab.bench.worker", task, str(data_path), *arguments]
    env = dict(os.environ)
    for name, value in (environment or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    package_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_eval(
    test_images: Tensor, mean_x: Tensor, settings: BenchSettings, device: torch.device, threads: int
) -> dict[str, Any]:
    """Time ``L_5000`` on the first ``settings.eval_images`` of ``test_images`` in a fresh subprocess.

    The subprocess is ``python -m iwae.lab.bench.worker eval`` (:func:`iwae.lab.bench.worker.eval_worker`, through
    :func:`run_worker`), whose result this returns; ``mean_x`` (``[x_dim]``) sets the fresh model's output bias.
    """
    n = min(settings.eval_images, test_images.shape[0])
    batch_size = min(settings.eval_batch_size, n)
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        data_path = write_worker_data(Path(tmp) / "eval.npz", test_images[:n], mean_x)
        arguments = [
            "--k", str(EVAL_K), "--threads", str(threads), "--device", str(device), "--batch-size", str(batch_size),
            "--seed", str(settings.seed), "--repeats", str(settings.eval_repeats),
        ]  # fmt: skip
        return run_worker("eval", data_path, arguments, f"the L_{EVAL_K} evaluation worker")
