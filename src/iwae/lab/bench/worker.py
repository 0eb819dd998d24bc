"""The ``L_5000`` evaluation worker of ``iwae bench``, run in a fresh process.

``python -m iwae.lab.bench.worker NPZ [--k K] ...``, spawned by :func:`iwae.lab.bench.run.measure_eval`, prints
its result as one JSON line on stdout.

Its peak resident memory is reported above the process's baseline after imports and a tiny warm-up (and, on
CUDA, ``torch.cuda.max_memory_allocated``); see :mod:`iwae.lab.bench.memory`. It leaves malloc alone, as
``iwae eval`` does. Nothing else imports this module (so ``python -m`` runs it once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from iwae.data import Split
from iwae.evaluate import chunk_rows, estimate_log_likelihood
from iwae.fast import for_evaluation
from iwae.lab.bench.memory import memory_baseline, rss_mb
from iwae.lab.bench.settings import EVAL_K
from iwae.lab.bench.timing import synchronizer
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import resolve_device


def eval_worker(
    data_path: str, k: int, threads: int, device_name: str, batch_size: int, seed: int, repeats: int = 1
) -> dict[str, Any]:
    """Time ``L_k`` of a fresh one-layer model on the images in ``data_path``, ``repeats`` times, in this process.

    Args:
        data_path: an ``.npz`` with ``images`` ``[n, x_dim]`` and ``mean_x`` ``[x_dim]`` (the output bias).
        k: samples per image.
        threads: torch's threads.
        device_name: as :func:`iwae.runs.resolve_device` takes it.
        batch_size: images per minibatch.
        seed: the model's initialisation and the samples' random source.
        repeats: passes over the images.

    Returns:
        ``seconds`` (the median pass), every pass's time, peak memory above the baseline after a warm-up, and
        the sizes. The chunks are those ``iwae eval`` takes on the device (:func:`iwae.evaluate.chunk_rows`).
    """
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    arrays = np.load(data_path)
    split = Split(torch.from_numpy(arrays["images"])).to(device)
    torch.manual_seed(seed)
    model = LatentVariableModel(ModelConfig.burda(1))
    model.set_output_bias(torch.from_numpy(arrays["mean_x"]))
    model = for_evaluation(model.to(device).eval())  # as iwae eval draws its samples
    generator = torch.Generator(device=device).manual_seed(seed)
    sync = synchronizer(device)
    rows = chunk_rows(device)  # sample rows per chunk, as iwae eval takes them on this device
    # warm-up
    estimate_log_likelihood(model, split.subset(1), "dynamic", 10, generator, batch_size=batch_size, max_rows=rows)
    sync()
    baseline = memory_baseline()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        estimates = estimate_log_likelihood(model, split, "dynamic", k, generator, batch_size=batch_size, max_rows=rows)
        sync()
        passes.append(time.perf_counter() - started)
    _, peak = rss_mb()
    return {
        "seconds": statistics.median(passes),
        "seconds_per_pass": passes,
        "images": len(split),
        "k": k,
        "batch_size": batch_size,
        "chunk_rows": rows,
        "threads": torch.get_num_threads(),
        "rss_baseline_mb": baseline,
        "rss_peak_mb": peak,
        "rss_above_baseline_mb": None if peak is None or baseline is None else peak - baseline,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "mean_log_lik": float(estimates["log_lik"].mean()),
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iwae.lab.bench.worker", description="internal: the L_k timing worker"
    )
    parser.add_argument("npz", help="images and mean_x arrays")
    parser.add_argument("--k", type=int, default=EVAL_K)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    result = eval_worker(args.npz, args.k, args.threads, args.device, args.batch_size, args.seed, args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
