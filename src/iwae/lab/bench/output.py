"""``iwae bench``'s result as Markdown (:func:`markdown`), and both files: ``OUT/bench.json`` and ``OUT/bench.md``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iwae.checkpoint import atomic_write_text
from iwae.lab.bench.settings import BURDA_BATCH, BURDA_PASSES, BURDA_TRAIN_IMAGES, EVAL_K


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _cell(row: dict[str, Any]) -> str:
    if row["ms_per_step"] is None:
        return row["status"]
    return f"{row['ms_per_step']:.2f} ms · {row['examples_per_s']:,.0f}/s · {row['gflops']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table with a few lines around it."""
    pyro = result["pyro_version"] or "not installed"
    compiled = "; iwae through --compile" if result.get("compile") else ""
    lines = [
        f"## iwae bench ({result['mode']}): {result['device_name']}, {result['threads']} threads, "
        f"torch {result['torch_version']}, pyro {pyro}",
        "",
        f"Native CPU paths (iwae.fast.native): {result['native_kernels']}. Gradients: {result['gradients']}. "
        f"Training steps' malloc: {result.get('allocator', 'not recorded')}.",
        "",
        f"Training steps (IWAE objective, standard estimator{compiled}), median of {result['repeats']} after "
        f"{result['warmup']} warm-up steps, first {result['n_train']} MNIST training images binarised dynamically. "
        "Cells: ms/step · examples/s · GFLOP/s.",
        "",
        "| layers | k | batch | iwae | plain PyTorch | Pyro | matmul roofline GFLOP/s | iwae / roofline "
        "| iwae vs plain | iwae vs Pyro |",
        "|---:|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    train = [row for row in result["rows"] if row["task"] in ("train", "matmul-roofline")]
    for c in result["comparisons"]:
        cell = {r["impl"]: r for r in train if (r["layers"], r["k"], r["batch"]) == (c["layers"], c["k"], c["batch"])}
        lines.append(
            f"| {c['layers']} | {c['k']} | {c['batch']} | {_cell(cell['iwae'])} | {_cell(cell['plain'])} "
            f"| {_cell(cell['pyro'])} | {_fmt(cell['roofline']['gflops'], '.1f')} "
            f"| {_fmt(c['roofline_fraction'], '.2f')} | {_fmt(c['speedup_vs_plain'], '.2f', 'x')} "
            f"| {_fmt(c['speedup_vs_pyro'], '.2f', 'x')} |"
        )
    schedule = [c for c in result["comparisons"] if c.get("burda_schedule_hours") is not None]
    if schedule:
        cells = ", ".join(
            f"{c['layers']} layer{'s' if c['layers'] > 1 else ''} k = {c['k']}: {c['burda_schedule_hours']:.1f} h"
            for c in schedule
        )
        setting = f"{BURDA_PASSES:,} passes over {BURDA_TRAIN_IMAGES:,} images at minibatch {BURDA_BATCH}"
        lines += ["", f"Burda's schedule ({setting}, validation not counted) at iwae's step times: {cells}."]
    rss = result["eval_peak_rss_mb"]
    cuda = result["eval_cuda_peak_mb"]
    lines += [
        "",
        f"Evaluation: L_{EVAL_K} takes {result['eval_s_per_1000_k5000']:.1f} s per 1,000 test images "
        f"({result['notes'][0]}); peak memory {_fmt(rss, '.0f', ' MB')} above the worker's baseline "
        f"({_fmt(result['eval_peak_rss_total_mb'], '.0f', ' MB')} in all)"
        + (f", CUDA peak {cuda:.0f} MB" if cuda is not None else "")
        + ".",
        "",
        *(f"- {note}" for note in result["notes"][1:]),
        f"- total time {result['seconds']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(
    result: dict[str, Any],
    out_dir: str | Path,
    stem: str = "bench",
    render: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[Path, Path]:
    """``OUT/<stem>.json`` and ``OUT/<stem>.md`` (``render``'s table; default :func:`markdown`'s), each written
    atomically: every bench mode writes its files here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, (render or markdown)(result))
    return json_path, md_path
