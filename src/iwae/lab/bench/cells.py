"""One cell of the benchmark's grid (stochastic layers, k, batch): the training steps timed, and their ratios.

iwae's, the plain and the Pyro training steps are timed round-robin with the roofline's matmuls.

Every step starts from the same initial parameters and cycles through the same pool of pre-binarised
minibatches ``[batch, x_dim]`` (binarisation is outside the timer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from iwae.config import TrainConfig
from iwae.data import binarize
from iwae.lab.bench.flops import model_flops, roofline_calls
from iwae.lab.bench.rivals import PlainIWAE, PyroIWAE, adam_settings
from iwae.lab.bench.settings import (
    BURDA_BATCH,
    BURDA_PASSES,
    BURDA_TRAIN_IMAGES,
    POOL_BATCHES,
    TRAIN_IMPLS,
    TRAINING_MIN_SECONDS,
    BenchSettings,
)
from iwae.lab.bench.timing import Timed, synchronizer, time_round_robin
from iwae.models import LatentVariableModel, ModelConfig
from iwae.steps import build_optimizer, choose_step_path, clear_gradients, optimizer_step, training_step
from iwae.train import build_model


def binarised_pool(images: Tensor, batch: int, generator: torch.Generator, n: int = POOL_BATCHES) -> list[Tensor]:
    """``n`` dynamically binarised minibatches ``[batch, x_dim]``, cycling through ``images``."""
    pool = []
    for i in range(n):
        index = (torch.arange(batch, device=images.device) + i * batch) % images.shape[0]
        pool.append(binarize(images[index], "dynamic", generator))
    return pool


def _cycling(step: Callable[[Tensor], Any], pool: Sequence[Tensor]) -> Callable[[], Any]:
    """``step`` on the minibatches of ``pool`` in turn, one per call."""
    batches = itertools.cycle(pool)
    return lambda: step(next(batches))


def iwae_step(model: LatentVariableModel, config: TrainConfig, compile_model: bool = False) -> Callable[[Tensor], None]:
    """This library's training step, as :func:`iwae.train.fit` takes it.

    With ``compile_model``, as ``iwae train --compile`` takes it: the first warm-up call compiles.
    """
    optimizer = build_optimizer(model, config)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    path = choose_step_path(model, config, compile_model=compile_model)

    def step(x: Tensor) -> None:
        clear_gradients(optimizer)
        training_step(model, x, config, generator, path)
        optimizer_step(optimizer, path)

    return step


def plain_step(plain: PlainIWAE, config: TrainConfig) -> Callable[[Tensor], None]:
    """The plain PyTorch model's training step with ``torch.optim.Adam`` at the config's settings."""
    optimizer = torch.optim.Adam(plain.parameters(), **adam_settings(config))

    def step(x: Tensor) -> None:
        optimizer.zero_grad()
        plain.loss(x, config.k).backward()
        optimizer.step()

    return step


def _train_row(
    impl: str, layers: int, k: int, batch: int, flops: int, seconds: float | None, status: str = "ok"
) -> dict[str, Any]:
    measured = seconds is not None and seconds > 0
    return {
        "task": "train" if impl != "roofline" else "matmul-roofline",
        "impl": impl,
        "layers": layers,
        "k": k,
        "batch": batch,
        "ms_per_step": seconds * 1e3 if measured else None,
        "examples_per_s": batch / seconds if measured else None,
        "gflops": flops / seconds / 1e9 if measured else None,
        "flops_per_step": flops,
        "status": status,
    }


def measure_cell(
    layers: int, k: int, batch: int, images: Tensor, settings: BenchSettings, pyro_status: str | None
) -> list[dict[str, Any]]:
    """Rows for one (layers, k, batch): iwae, plain, pyro (or its reason for being skipped), roofline.

    The three training steps (consecutive steps for :data:`TRAINING_MIN_SECONDS` a repeat) and the roofline's
    matmuls are timed round-robin in one loop.
    """
    device = images.device
    config = TrainConfig(objective="iwae", k=k, batch_size=batch, model=ModelConfig.burda(layers), seed=settings.seed)
    model = build_model(config, images, device)
    steps = {"plain": plain_step(PlainIWAE(config.model).to(device).copy_from(model), config)}
    if pyro_status is None:
        steps["pyro"] = PyroIWAE(PlainIWAE(config.model).to(device).copy_from(model), k, config).step
    steps["iwae"] = iwae_step(model, config, settings.compile)  # all three start from model's initial parameters
    pool = binarised_pool(images, batch, torch.Generator(device=device).manual_seed(settings.seed))
    calls = {name: Timed(_cycling(step, pool), TRAINING_MIN_SECONDS) for name, step in steps.items()}
    matmuls, per_layer = roofline_calls(config.model, k, batch, device)
    seconds = time_round_robin({**calls, **matmuls}, settings.repeats, settings.warmup, synchronizer(device))
    flops = model_flops(config.model).training_step(k, batch)
    rows = [_train_row(impl, layers, k, batch, flops, seconds.get(impl)) for impl in TRAIN_IMPLS if impl in steps]
    if pyro_status is not None:
        rows.append(_train_row("pyro", layers, k, batch, flops, None, pyro_status))
    rows.append(_train_row("roofline", layers, k, batch, flops, sum(seconds[name] for name in per_layer)))
    return rows


def burda_schedule_hours(ms_per_step: float | None, batch: int) -> float | None:
    """Hours that Burda's schedule takes at this step time; None for other minibatch sizes or without a time.

    The schedule: 3,280 passes over 59,600 images at minibatch 20, validation and data preparation not counted.
    """
    if ms_per_step is None or batch != BURDA_BATCH:
        return None
    return ms_per_step / 1e3 * math.ceil(BURDA_TRAIN_IMAGES / batch) * BURDA_PASSES / 3600


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios for one cell, from :func:`measure_cell`'s rows.

    iwae's GFLOP/s over the roofline's, iwae's examples/s over each baseline's; at minibatch 20 also the hours of
    Burda's schedule at iwae's step time (:func:`burda_schedule_hours`).
    """
    by_impl = {row["impl"]: row for row in rows}
    ours = by_impl["iwae"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "layers": ours["layers"],
        "k": ours["k"],
        "batch": ours["batch"],
        "roofline_fraction": ratio(ours["gflops"], by_impl["roofline"]["gflops"]),
        "speedup_vs_plain": ratio(ours["examples_per_s"], by_impl["plain"]["examples_per_s"]),
        "speedup_vs_pyro": ratio(ours["examples_per_s"], by_impl["pyro"]["examples_per_s"]),
        "burda_schedule_hours": burda_schedule_hours(ours["ms_per_step"], ours["batch"]),
    }
