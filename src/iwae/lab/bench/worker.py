"""The workers of ``iwae bench``, each run in a fresh process: ``L_5000`` evaluation, and training steps' memory.

``python -m iwae.lab.bench.worker eval NPZ [--k K] ...`` (:func:`eval_worker`) and ``python -m iwae.lab.bench.worker
train NPZ --k K ...`` (:func:`train_worker`), spawned by :func:`iwae.lab.bench.run.run_worker`, print their result as
one JSON line on stdout.

Peak resident memory is reported above the process's baseline (and, on CUDA, ``torch.cuda.max_memory_allocated``);
see :mod:`iwae.lab.bench.memory`. The evaluation's baseline is taken after imports and a tiny warm-up, and it leaves
malloc alone, as ``iwae eval`` does; the training steps' baseline is taken once the model, its optimiser, its step
and the data are ready, as ``iwae train`` has them when its first step starts, and malloc is set up as ``iwae train``
sets it. Nothing else imports this module (so ``python -m`` runs it once).
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

from iwae.config import TrainConfig
from iwae.data import Split
from iwae.evaluate import chunk_rows, estimate_log_likelihood
from iwae.fast import allocator, for_evaluation
from iwae.lab.bench.cells import binarised_pool
from iwae.lab.bench.memory import memory_baseline, rss_mb
from iwae.lab.bench.settings import BURDA_BATCH, EVAL_K
from iwae.lab.bench.timing import synchronizer
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import resolve_device
from iwae.steps import build_optimizer, select_step
from iwae.train import build_model


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


def train_worker(
    data_path: str, layers: int, k: int, batch_size: int, steps: int, threads: int, device_name: str, seed: int
) -> dict[str, Any]:
    """Peak memory of ``steps`` IWAE training steps of Burda's model with ``layers`` stochastic layers, in this process.

    The steps are ``iwae train``'s: malloc set up by :func:`iwae.fast.allocator.configure`, the model built by
    :func:`iwae.train.build_model`, the step chosen by :func:`iwae.steps.select_step` (the fast path where
    ``IWAE_FAST`` allows it, else the autograd reference), on dynamically binarised minibatches ``[batch, x_dim]``
    of the images. The baseline is taken once all that is ready, before the first step, so the peak above it holds
    the steps' samples and activations, the gradients, the optimiser's moments and whatever the first step sets up.

    Args:
        data_path: an ``.npz`` with ``images`` ``[n, x_dim]`` (training grey levels; their mean sets the output bias).
        layers: stochastic layers, 1 or 2.
        k: samples per example.
        batch_size: examples per minibatch.
        steps: training steps taken (the peak over all of them is reported).
        threads: torch's threads.
        device_name: as :func:`iwae.runs.resolve_device` takes it.
        seed: the model's initialisation, the binarisation and the noise.

    Returns:
        The sizes, the step's path (``gradients``), malloc's setting, resident memory (baseline, peak, peak above
        the baseline, MiB), on CUDA ``torch.cuda.max_memory_allocated`` (in all and above the baseline's
        allocation, MiB), seconds per step and the last minibatch's mean bound.
    """
    allocator_setting = allocator.configure()  # as iwae train sets malloc up, before anything is allocated
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    images = torch.from_numpy(np.load(data_path)["images"]).to(device)
    config = TrainConfig(objective="iwae", k=k, batch_size=batch_size, model=ModelConfig.burda(layers), seed=seed)
    model = build_model(config, images, device)
    optimizer = build_optimizer(model, config)
    step = select_step([model], [optimizer], [config], device)
    generator = torch.Generator(device=device).manual_seed(seed)
    pool = binarised_pool(images, batch_size, generator)
    sync = synchronizer(device)
    sync()
    baseline = memory_baseline()
    cuda_baseline = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device) / 2**20
    started = time.perf_counter()
    for index in range(steps):
        bound = step(step.groups[0], [pool[index % len(pool)]], [generator], k)
    sync()
    seconds = time.perf_counter() - started
    _, peak = rss_mb()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "layers": layers,
        "k": k,
        "batch": batch_size,
        "steps": steps,
        "gradients": step.description,
        "allocator": allocator_setting,
        "threads": torch.get_num_threads(),
        "rss_baseline_mb": baseline,
        "rss_peak_mb": peak,
        "rss_above_baseline_mb": None if peak is None or baseline is None else peak - baseline,
        "cuda_peak_mb": cuda_peak,
        "cuda_above_baseline_mb": None if cuda_peak is None else cuda_peak - cuda_baseline,
        "seconds_per_step": seconds / steps,
        "mean_bound": float(bound.sum()) / batch_size,
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iwae.lab.bench.worker", description="internal: iwae bench's workers"
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    evaluation = tasks.add_parser("eval", help="time L_k (eval_worker)")
    training = tasks.add_parser("train", help="peak memory of training steps (train_worker)")
    for task in (evaluation, training):
        task.add_argument("npz", help="images (and, for eval, mean_x) arrays")
        task.add_argument("--threads", type=int, default=torch.get_num_threads())
        task.add_argument("--device", default="cpu")
        task.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--k", type=int, default=EVAL_K)
    evaluation.add_argument("--batch-size", type=int, default=100)
    evaluation.add_argument("--repeats", type=int, default=1)
    training.add_argument("--k", type=int, required=True)
    training.add_argument("--layers", type=int, default=1)
    training.add_argument("--batch-size", type=int, default=BURDA_BATCH)
    training.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.task == "eval":
        result = eval_worker(args.npz, args.k, args.threads, args.device, args.batch_size, args.seed, args.repeats)
    else:
        result = train_worker(
            args.npz, args.layers, args.k, args.batch_size, args.steps, args.threads, args.device, args.seed
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
