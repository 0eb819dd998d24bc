"""Seeds trained together against single runs, on a CPU, in one process.

    python benchmarks/seeds_together.py [K]

Alternates, six times: four single runs (:func:`iwae.train.fit`, one after another), the same four seeds in one call
(:func:`iwae.train.fit_runs`: each model its own fast step, one pass after another) and the vmapped stack
(``stack="on"``). One pass over 6,000 MNIST images, minibatch 20, VAE for K = 1 (default) and IWAE otherwise,
2 threads. Each call is timed by the process's CPU time (``time.process_time``, validation included), which a busy
host moves less than wall time; the summary gives medians and the median of the paired ratios.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from iwae.config import TrainConfig
from iwae.data import load_dataset
from iwae.fast import allocator
from iwae.train import fit, fit_runs


def cpu_seconds(call, *args, **kwargs) -> float:
    started = time.process_time()
    call(*args, **kwargs)
    return time.process_time() - started


def singles(configs: list[TrainConfig], dirs: list[Path], **options) -> None:
    for config, run_dir in zip(configs, dirs, strict=True):
        fit(config, run_dir, **options)


def main(k: int) -> None:
    allocator.configure()
    torch.set_num_threads(2)
    data = load_dataset("mnist", progress=False)
    objective = "vae" if k == 1 else "iwae"
    configs = [TrainConfig(objective=objective, k=k, seed=s, stages=((1, 1e-3),), train_limit=6000) for s in range(4)]
    options = {"dataset": data, "progress": False, "device": "cpu"}
    single, together, stacked = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for rep in range(6):
            dirs = {name: [Path(work) / f"{name}{rep}-{c.seed}" for c in configs] for name in ("s", "t", "v")}
            single.append(cpu_seconds(singles, configs, dirs["s"], **options))
            together.append(cpu_seconds(fit_runs, configs, dirs["t"], **options))
            stacked.append(cpu_seconds(fit_runs, configs, dirs["v"], stack="on", **options))
            print(rep, f"{single[-1]:.2f} {together[-1]:.2f} {stacked[-1]:.2f}", flush=True)
    median = statistics.median
    print(
        f"k={k}: four single runs {median(single):.2f} s, the four seeds in one call {median(together):.2f} s "
        f"(paired ratio {median([t / s for s, t in zip(single, together, strict=True)]):.3f}), the vmapped stack "
        f"{median(stacked):.2f} s (paired ratio {median([t / s for s, t in zip(single, stacked, strict=True)]):.3f})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
