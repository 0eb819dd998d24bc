"""Stacked against single training steps (``iwae bench --stacked N``).

How many more examples a second the same device trains when N models share each step (:mod:`iwae.stacked`).
Results: docs/performance.md#stacked-training, docs/gpu.md.

For each (k, minibatch) the bench times, round-robin in one process, on pre-binarised minibatches of MNIST:

- ``single``: one step of one model as ``iwae train`` takes it (:func:`iwae.steps.choose_step_path`, never
  compiled: on the CPU the fast layer's C++ step, elsewhere its explicit backpropagation in Python), noise drawn
  from the run's generator;
- ``stacked``: one step of N models as ``iwae train --seeds --stack on`` takes it (:class:`iwae.stacked.StackedStep`
  and one Adam; each model's noise from its own generator): ``eager``, or with ``--compile``
  (:func:`iwae.stacked.step_mode`) CUDA graphs on CUDA and ``torch.compile`` elsewhere.

``speedup`` is N single steps' time over one stacked step's: the training throughput of N stacked models over that
of N single runs taken one after another on the same device. At minibatch 20 the rows also give the hours of
Burda's 3,280 passes per model (``single``) and for all N models (``stacked``), validation not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from iwae.config import TrainConfig
from iwae.lab.bench.cells import binarised_pool, burda_schedule_hours
from iwae.lab.bench.settings import TRAINING_MIN_SECONDS
from iwae.lab.bench.timing import Timed, synchronizer, time_round_robin
from iwae.models import ModelConfig
from iwae.stacked import ModelStack, StackedStep, step_mode
from iwae.steps import (
    build_optimizer,
    choose_step_path,
    clear_gradients,
    optimizer_for,
    optimizer_step,
    training_step,
)
from iwae.train import build_model


def measure(
    images: Tensor,
    *,
    models: int,
    k: int,
    batch: int,
    layers: int = 1,
    compile_model: bool = False,
    repeats: int = 7,
    warmup: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """One row: single and stacked step times for ``models`` models at this k and minibatch.

    The models are Burda's architecture with ``layers`` stochastic layers (IWAE, standard estimator, seeds
    ``seed``, ``seed + 1``, ...), trained on ``images``' device from a pool of its minibatches.

    Args:
        images: ``[n, x_dim]`` grey levels, on the device to time.
        models: N, the models in the stack.
        k: samples per example.
        batch: the minibatch size.
        layers: stochastic layers (1 or 2).
        compile_model: the stacked step with CUDA graphs on CUDA, ``torch.compile`` elsewhere.
        repeats: timed repeats (the median is kept).
        warmup: untimed calls first.
        seed: the first model's seed.

    Returns:
        The times (``single_ms``, ``stacked_ms``, ``stacked_ms_per_model``), ``speedup``, examples a second,
        the paths taken and, at minibatch 20, Burda's schedule in hours.
    """
    device = images.device
    configs = [
        TrainConfig(objective="iwae", k=k, batch_size=batch, model=ModelConfig.burda(layers), seed=seed + index)
        for index in range(models)
    ]
    generators = [torch.Generator(device=device).manual_seed(c.seed) for c in configs]
    pool = binarised_pool(images, batch, generators[0])

    single_model = build_model(configs[0], images, device)
    single_optimizer = build_optimizer(single_model, configs[0])
    path = choose_step_path(single_model, configs[0])
    single_calls = iter(range(10**12))

    def single() -> None:
        x = pool[next(single_calls) % len(pool)]
        clear_gradients(single_optimizer)
        training_step(single_model, x, configs[0], generators[0], path)
        optimizer_step(single_optimizer, path)

    stacked_models = [build_model(c, images, device) for c in configs]
    stack = ModelStack(stacked_models)
    optimizer = optimizer_for(stack.parameters(), configs[0])
    step = StackedStep(stack, [c.objective for c in configs], "standard", step_mode(device, compile_model))
    stacked_calls = iter(range(10**12))

    def stacked() -> None:
        x = pool[next(stacked_calls) % len(pool)]
        noises = [model.draw_noise(x, k, g) for model, g in zip(stacked_models, generators, strict=True)]
        step(x.expand(models, *x.shape), [torch.stack(layer) for layer in zip(*noises, strict=True)])
        optimizer.step()

    seconds = time_round_robin(
        {"single": Timed(single, TRAINING_MIN_SECONDS), "stacked": Timed(stacked, TRAINING_MIN_SECONDS)},
        repeats,
        warmup,
        synchronizer(device),
    )
    single_s, stacked_s = seconds["single"], seconds["stacked"]
    return {
        "layers": layers,
        "k": k,
        "batch": batch,
        "models": models,
        "single_path": path.description,
        "stacked_path": step.mode,
        "single_ms": 1e3 * single_s,
        "stacked_ms": 1e3 * stacked_s,
        "stacked_ms_per_model": 1e3 * stacked_s / models,
        "speedup": models * single_s / stacked_s,
        "single_examples_per_second": batch / single_s,
        "stacked_examples_per_second": models * batch / stacked_s,
        "burda_schedule_hours_single": burda_schedule_hours(1e3 * single_s, batch),
        "burda_schedule_hours_stacked": burda_schedule_hours(1e3 * stacked_s, batch),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`measure`'s rows as a Markdown table."""
    lines = [
        "| layers | k | batch | models | single (ms) | stacked (ms) | per model (ms) | speedup | stacked path |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['k']} | {r['batch']} | {r['models']} | {r['single_ms']:.3f} | {r['stacked_ms']:.3f} "
            f"| {r['stacked_ms_per_model']:.3f} | {r['speedup']:.2f}x | {r['stacked_path']} |"
        )
    return "\n".join(lines) + "\n"
