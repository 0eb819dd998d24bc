"""Peak memory of training steps against the number of samples k, measured (``iwae bench --memory``).

For each (stochastic layers, minibatch, k) of the grid and each of :data:`VARIANTS` (the fast layer's switches,
``IWAE_FAST``), one fresh process (``python -m iwae.lab.bench.worker train``,
:func:`iwae.lab.bench.worker.train_worker`, spawned by :func:`iwae.lab.bench.run.run_worker`, so that peaks do not
mix) builds Burda's model as ``iwae train`` does and takes a few IWAE training steps (standard estimator) on
dynamically binarised minibatches ``[batch, x_dim]`` of the first ``n_train`` MNIST training images. Its peak is
reported above the process's resident memory once the model, its optimiser, its step and the data are loaded (VmHWM,
reset there: :mod:`iwae.lab.bench.memory`); on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation at
that point.

Beside each peak stands the library's own estimate, :func:`iwae.memory.step_memory` (by which ``iwae train`` refuses
a run that would not fit), for ``iwae train --k K --batch-size B`` over Burda's 59,600 training images, and the
peak per float32 value of every layer output and sample row (the quantity the estimate's
:data:`iwae.memory.STEP_COPIES` bounds). Shapes: a step's samples are ``[k, batch, d]``, its log-weights ``[k, batch]``.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from iwae.config import TrainConfig
from iwae.lab.bench import output
from iwae.lab.bench.run import load_average, run_worker, write_worker_data
from iwae.lab.bench.settings import BURDA_BATCH, BURDA_TRAIN_IMAGES
from iwae.memory import PARAMETER_COPIES, STEP_COPIES, check_memory, layer_sizes, step_memory
from iwae.models import ModelConfig
from iwae.runs import resolve_device

# Each variant: its IWAE_FAST value in the worker's environment (None: unset) and what it runs.
VARIANTS: dict[str, tuple[str | None, str]] = {
    "default": (None, "IWAE_FAST unset: the step and malloc as iwae train runs them (on the CPU the fast path)"),
    "plain-malloc": ("-allocator", "IWAE_FAST=-allocator: the default step, glibc's malloc thresholds left alone"),
    "reference": ("0", "IWAE_FAST=0: the autograd reference step, malloc left alone"),
}
DEFAULT_KS = (1, 5, 50, 500, 5000)
DEFAULT_LAYERS = (1, 2)
DEFAULT_STEPS = 3


@dataclass(frozen=True)
class MemorySettings:
    """What ``iwae bench --memory`` measures: the grid (layers x minibatches x ks x variants) and each measurement."""

    ks: tuple[int, ...] = DEFAULT_KS
    layers: tuple[int, ...] = DEFAULT_LAYERS
    batches: tuple[int, ...] = (BURDA_BATCH,)
    variants: tuple[str, ...] = tuple(VARIANTS)
    steps: int = DEFAULT_STEPS  # training steps per measurement; the peak over all of them
    threads: int | None = None  # None: this process's torch threads
    device: str = "auto"
    n_train: int = 1000  # the first N training images: the minibatches and the output bias
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("ks", "layers", "batches", "variants"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be a non-empty list without repeats, got {list(values)}")
        if min((*self.ks, *self.batches)) < 1:
            raise ValueError(f"k and the minibatch must be >= 1, got ks {list(self.ks)}, batches {list(self.batches)}")
        if not set(self.layers) <= {1, 2}:
            raise ValueError(f"layers must be 1 or 2 (Burda's architectures), got {list(self.layers)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; variants: {', '.join(VARIANTS)}")
        if min(self.steps, self.n_train) < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError("steps, n_train and threads must be >= 1")

    def grid(self) -> list[tuple[int, int, int, str]]:
        """(layers, batch, k, variant) in the order measured: a cell's variants one after another."""
        return list(itertools.product(self.layers, self.batches, self.ks, self.variants))


def train_config(layers: int, k: int, batch: int) -> TrainConfig:
    """The configuration of ``iwae train --objective iwae --k K --batch-size B --layers L`` (its other defaults)."""
    return TrainConfig(objective="iwae", k=k, batch_size=batch, model=ModelConfig.burda(layers))


def estimate_mb(layers: int, k: int, batch: int) -> float:
    """:func:`iwae.memory.step_memory` of that run over Burda's 59,600 training images, in MiB."""
    return step_memory(train_config(layers, k, batch), BURDA_TRAIN_IMAGES) / 2**20


def values_per_output(peak_mb: float | None, layers: int, k: int, batch: int) -> float | None:
    """``peak_mb`` in float32 values per layer output and sample row: over 4 bytes x k x batch x the widths of
    every network's layers (:func:`iwae.memory.layer_sizes`), the quantity :data:`iwae.memory.STEP_COPIES` bounds."""
    if peak_mb is None:
        return None
    width = sum(sum(sizes) for sizes in layer_sizes(ModelConfig.burda(layers)))
    return peak_mb * 2**20 / (4 * k * batch * width)


def check_fits(settings: MemorySettings, device: torch.device) -> None:
    """Raise :class:`~iwae.runs.RunError` (one line) if ``iwae train`` would refuse a cell of the grid on ``device``
    for want of memory (:func:`iwae.memory.check_memory`): nothing is measured then."""
    for layers, batch, k in itertools.product(settings.layers, settings.batches, settings.ks):
        check_memory(train_config(layers, k, batch), BURDA_TRAIN_IMAGES, device)


def _row(layers: int, batch: int, k: int, variant: str, measured: dict[str, Any] | None, error: str | None) -> dict:
    fast, _ = VARIANTS[variant]
    measured = measured or {}
    cuda = measured.get("cuda_above_baseline_mb")
    peak = cuda if cuda is not None else measured.get("rss_above_baseline_mb")
    estimate = estimate_mb(layers, k, batch)
    return {
        "layers": layers,
        "batch": batch,
        "k": k,
        "variant": variant,
        "iwae_fast": fast,
        "status": "ok" if error is None else f"failed: {error}",
        "gradients": measured.get("gradients"),
        "allocator": measured.get("allocator"),
        "steps": measured.get("steps"),
        "peak_mb": peak,
        "rss_baseline_mb": measured.get("rss_baseline_mb"),
        "rss_peak_mb": measured.get("rss_peak_mb"),
        "rss_above_baseline_mb": measured.get("rss_above_baseline_mb"),
        "cuda_peak_mb": measured.get("cuda_peak_mb"),
        "cuda_above_baseline_mb": cuda,
        "estimate_mb": estimate,
        "estimate_over_peak": estimate / peak if peak else None,
        "values_per_output": values_per_output(peak, layers, k, batch),
        "seconds_per_step": measured.get("seconds_per_step"),
        "mean_bound": measured.get("mean_bound"),
    }


def measure_memory(settings: MemorySettings, images: Tensor) -> dict[str, Any]:
    """Measure every cell of ``settings``' grid, each in a fresh process; the JSON-serialisable result.

    ``images`` ``[n, x_dim]`` are MNIST training grey levels (the first ``settings.n_train`` are used). A worker that
    fails leaves its row with ``status`` ``failed: ...`` and no numbers; the others go on.
    """
    started = time.perf_counter()
    load_before = load_average()
    device = resolve_device(settings.device)
    check_fits(settings, device)
    threads = settings.threads or torch.get_num_threads()
    grid = settings.grid()
    rows = []
    bar = tqdm(total=len(grid), desc="iwae bench --memory", unit="run", disable=not settings.progress, file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="iwae-bench-memory-") as tmp:
            subset = images[: settings.n_train]
            data_path = write_worker_data(Path(tmp) / "train.npz", subset, subset.mean(dim=0))
            for layers, batch, k, variant in grid:
                bar.set_postfix_str(f"layers={layers} batch={batch} k={k} {variant}")
                arguments = [
                    "--layers", str(layers), "--k", str(k), "--batch-size", str(batch), "--steps", str(settings.steps),
                    "--threads", str(threads), "--device", str(device), "--seed", str(settings.seed),
                ]  # fmt: skip
                what = f"the training-memory worker (layers {layers}, batch {batch}, k {k}, {variant})"
                try:
                    measured = run_worker("train", data_path, arguments, what, {"IWAE_FAST": VARIANTS[variant][0]})
                    rows.append(_row(layers, batch, k, variant, measured, None))
                except RuntimeError as error:
                    rows.append(_row(layers, batch, k, variant, None, str(error)))
                bar.update()
    finally:
        bar.close()
    cuda = device.type == "cuda"
    return {
        "mode": "memory",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": threads,
        "torch_version": torch.__version__,
        "steps": settings.steps,
        "n_train": min(settings.n_train, len(images)),
        "seed": settings.seed,
        "peak": "torch.cuda.max_memory_allocated above the baseline's allocation"
        if cuda
        else "resident memory (VmHWM) above the baseline",
        "variants": {name: VARIANTS[name][1] for name in settings.variants},
        "step_copies": STEP_COPIES,
        "valid_k": TrainConfig().valid_k,
        "estimate_train_images": BURDA_TRAIN_IMAGES,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpu_count": os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "notes": [
            f"each row is one fresh process taking {settings.steps} IWAE training steps (standard estimator) as iwae "
            "train takes them; its baseline is taken once the model, its optimiser, its step and the data are "
            "loaded, so the peak above it holds the steps' samples and activations, the gradients, Adam's moments "
            "and what the first step sets up",
            "estimate: iwae.memory.step_memory for iwae train --k K --batch-size B over "
            f"{BURDA_TRAIN_IMAGES:,} training images, which counts the largest of k x batch and the validation "
            f"bound's 100 x valid_k = {100 * TrainConfig().valid_k:,} sample rows, {STEP_COPIES:g} float32 values "
            f"per layer output and row, and {PARAMETER_COPIES} copies of the parameters",
            "values per output: the peak over 4 bytes x k x batch x the widths of every layer of the encoder and "
            "decoder networks (iwae.memory.layer_sizes)",
        ],
        "rows": rows,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else f"{value:{spec}}"


def markdown(result: dict[str, Any]) -> str:
    """:func:`measure_memory`'s result as a Markdown table with a few lines around it."""
    lines = [
        f"## iwae bench --memory: {result['device_name']}, {result['threads']} threads, "
        f"torch {result['torch_version']}",
        "",
        f"Peak memory of training steps: {result['peak']} (MiB), beside iwae.memory.step_memory's estimate.",
        "",
        "| layers | batch | k | variant | peak (MiB) | estimate (MiB) | estimate / peak | values per output "
        "| resident in all (MiB) | s / step |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['layers']} | {r['batch']} | {r['k']} | {r['variant']} | {r['status']} | "
                         f"{r['estimate_mb']:.0f} | – | – | – | – |")  # fmt: skip
            continue
        lines.append(
            f"| {r['layers']} | {r['batch']} | {r['k']:,} | {r['variant']} | {_fmt(r['peak_mb'], ',.1f')} "
            f"| {r['estimate_mb']:,.0f} | {_fmt(r['estimate_over_peak'], '.2f')} "
            f"| {_fmt(r['values_per_output'], '.2f')} "
            f"| {_fmt(r['rss_peak_mb'], ',.0f')} | {_fmt(r['seconds_per_step'], '.3f')} |"
        )
    lines += ["", "Variants:"]
    for name, what in result["variants"].items():
        ran = next((r for r in result["rows"] if r["variant"] == name and r["status"] == "ok"), None)
        detail = f" Gradients: {ran['gradients']}. Malloc: {ran['allocator']}." if ran else ""
        lines.append(f"- `{name}`: {what}.{detail}")
    lines += ["", *(f"- {note}" for note in result["notes"]), f"- total time {result['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``OUT/bench-memory.json`` and ``OUT/bench-memory.md`` (:func:`iwae.lab.bench.output.write_outputs`)."""
    return output.write_outputs(result, out_dir, "bench-memory", markdown)
