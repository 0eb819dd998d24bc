"""``iwae bench``: training and evaluation speed of this library beside Pyro, plain PyTorch and the matmul roofline.

Shape convention (as everywhere in the package): samples first. Minibatches ``x`` are
``[batch, x_dim]``, latent samples ``[k, batch, d]`` and log-weights ``[k, batch]``.

For each (stochastic layers, k, batch) of the grid, in one process with one thread count, on the first ``n_train``
MNIST training images (a pool of pre-binarised minibatches, so binarisation is outside the timer):

- ``iwae``: one training step exactly as :func:`iwae.train.fit` takes it (:func:`iwae.steps.clear_gradients`,
  :func:`iwae.steps.training_step`, :func:`iwae.steps.optimizer_step`; IWAE objective, standard estimator), on the
  path :func:`iwae.steps.choose_step_path` picks (``torch.compile`` with ``--compile``);
- ``plain``: the same model written the obvious way in PyTorch (:class:`PlainIWAE`), from the same parameters;
- ``pyro``: Pyro's ``RenyiELBO(alpha=0, vectorize_particles=True)`` over the same modules (optional:
  ``pip install 'iwae[bench]'``; for batch > 1 its objective is not the per-example IWAE bound, its cost is the same);
- ``roofline``: every linear layer's forward and two backward matmuls, timed separately with a step's shapes.

Each timing is the median over ``repeats`` after ``warmup`` untimed calls; within a cell the implementations are
timed round-robin, and a repeat of a training step runs consecutive steps for at least ``TRAINING_MIN_SECONDS``.
FLOPs count the matmuls only (:func:`model_flops`). Evaluation is ``L_5000`` of a fresh model on test images in a
fresh subprocess, with its peak resident memory. Minibatch-20 cells also give ``burda_schedule_hours``; the result
says which fast paths ran (``native_kernels``, ``gradients``) and how malloc was set up (``allocator``). The method
and its reasons: docs/performance.md#where-the-numbers-come-from.

The modules, one job each: :mod:`~iwae.lab.bench.settings` (what is measured), :mod:`~iwae.lab.bench.rivals`
(plain PyTorch and Pyro), :mod:`~iwae.lab.bench.flops` (FLOP model, roofline matmuls),
:mod:`~iwae.lab.bench.timing` (the harness), :mod:`~iwae.lab.bench.cells` (one cell of the grid),
:mod:`~iwae.lab.bench.paths` (which :mod:`iwae.fast` paths ran), :mod:`~iwae.lab.bench.memory` (peak memory),
:mod:`~iwae.lab.bench.worker` (the measurements in a fresh process), :mod:`~iwae.lab.bench.run` (the whole run, and
:func:`~iwae.lab.bench.run.run_worker`, which spawns the workers) and :mod:`~iwae.lab.bench.output` (Markdown and the
files). Two other modes: :mod:`~iwae.lab.bench.stacked` (``iwae bench --stacked N``) and
:mod:`~iwae.lab.bench.training_memory` (``iwae bench --memory``: training steps' peak memory against k).
"""

from __future__ import annotations

from iwae.lab.bench.cells import iwae_step, measure_cell
from iwae.lab.bench.flops import model_flops
from iwae.lab.bench.output import markdown, write_outputs
from iwae.lab.bench.rivals import PYRO_MISSING, PYRO_SKIPPED, PlainIWAE, PyroIWAE, pyro_skip_reason
from iwae.lab.bench.run import run_bench
from iwae.lab.bench.settings import (
    MIN_TIMED_SECONDS,
    TRAINING_MIN_SECONDS,
    BenchSettings,
    full_settings,
    quick_settings,
)
from iwae.lab.bench.timing import Timed, time_round_robin
from iwae.train import build_model  # the model every implementation starts from, as measure_cell builds it

__all__ = [
    "MIN_TIMED_SECONDS",
    "PYRO_MISSING",
    "PYRO_SKIPPED",
    "TRAINING_MIN_SECONDS",
    "BenchSettings",
    "PlainIWAE",
    "PyroIWAE",
    "Timed",
    "build_model",
    "full_settings",
    "iwae_step",
    "markdown",
    "measure_cell",
    "model_flops",
    "pyro_skip_reason",
    "quick_settings",
    "run_bench",
    "time_round_robin",
    "write_outputs",
]
