"""``iwae bench``: training and evaluation speed of this library beside Pyro, plain PyTorch and the matmul roofline.

Shape convention (as everywhere in the package): samples first. Minibatches ``x`` are
``[batch, x_dim]``, latent samples ``[k, batch, d]`` and log-weights ``[k, batch]``.

What is measured, for each (stochastic layers, k, batch) of the grid, in one process with one
thread count, on the first ``n_train`` MNIST training images binarised dynamically (a pool of
pre-binarised minibatches, so binarisation is outside the timer):

- ``iwae``: one training step of this library exactly as :func:`iwae.train.fit` takes it:
  :func:`iwae.steps.clear_gradients`, :func:`iwae.steps.training_step` (IWAE objective, standard estimator)
  and :func:`iwae.steps.optimizer_step` with the optimiser of :func:`iwae.steps.build_optimizer`, on the step path
  that :func:`iwae.steps.choose_step_path` picks for the run (the fast layer's, or ``torch.compile`` with
  ``--compile``, as ``iwae train --compile`` takes it).
- ``plain``: the same model written the obvious way (``nn.Sequential`` tanh MLPs, ``torch.distributions``
  Normal/Bernoulli with k as a leading dimension, ``logsumexp - log k``, ``torch.optim.Adam``), started
  from the same parameters; :class:`PlainIWAE`.
- ``pyro``: a Pyro model/guide over the same modules with ``RenyiELBO(alpha=0, num_particles=k,
  vectorize_particles=True)``, ``SVI`` and ``pyro.optim.Adam`` (optional: ``pip install 'iwae[bench]'``).
  Pyro's RenyiELBO sums the log-weights over the data plate before the log-mean-exp over particles, so
  for batch > 1 its objective is not the per-example IWAE bound; its cost per step is the same.
- ``roofline``: every linear layer's forward matmul (``addmm`` of ``[rows, in] x [in, out]``) and its two
  backward matmuls, timed separately with the shapes of a training step (rows = batch for the first
  encoder MLP, k * batch for everything that sees samples); roofline GFLOP/s = summed FLOPs / summed
  median times.

Each minibatch-20 cell also gives ``burda_schedule_hours``: the wall time of Burda's 3,280 passes over
59,600 images at iwae's step time (validation and data preparation not counted).

``native_kernels`` in the result says which of :mod:`iwae.fast.native`'s CPU paths the iwae steps took, and
``gradients`` how they got their gradients (:mod:`iwae.fast.backprop`'s explicit backpropagation, in C++ through
:mod:`iwae.fast.step` where it builds; autograd; or ``torch.compile`` with ``--compile``); ``IWAE_FAST=0``
measures without the native paths and explicit backpropagation. ``allocator`` says how malloc was set up for
the training steps (:func:`iwae.fast.allocator.configure`, applied before anything is measured, so the same for
every implementation, as ``iwae train`` sets it); the evaluation subprocess leaves malloc alone, as
``iwae eval`` does.

Each timing is the median over ``repeats`` after ``warmup`` untimed calls; within a cell the three
training steps and the roofline's matmuls are timed round-robin (one repeat of each, then the next), so
a change in the machine's load hits them alike. A repeat of a training step runs consecutive steps for at
least ``TRAINING_MIN_SECONDS``, as a training loop does: one step timed alone, after the other
implementations' work, also measures the refill of its caches (the model, its gradients, Adam's moments),
which costs the shortest steps most: at k = 5, batch 20, Pyro's time per step over iwae's was 2.33-2.42 in
back-to-back loops (``train.fit``'s and an SVI loop), 1.98-2.21 timed a step at a time and 2.27-2.64 timed
as here, in three interleaved rounds. FLOPs count the
matmuls only: ``2 * in * out`` per row per linear layer, a training step = 3x the forward pass
(:func:`model_flops`; element-wise work such as tanh and the log-densities is not counted).

Evaluation: ``L_5000`` (:func:`iwae.evaluate.estimate_log_likelihood`, no unit masks) of a fresh model on
test images, in a fresh subprocess (``python -m iwae.lab.bench.worker``) whose peak resident memory
is reported above the same process's baseline after imports and a tiny warm-up (and, on CUDA,
``torch.cuda.max_memory_allocated``). On Linux the peak is VmHWM of ``/proc/self/status``, reset at the
baseline: ``getrusage``'s ``ru_maxrss`` (used elsewhere) carries the parent's peak across fork and exec.
Quick mode measures 20 images with minibatches of 20 (the chunks of samples then have as many rows as
the full evaluation's), takes the median of 5 such passes, and scales to 1,000 images.

The modules, one job each: :mod:`~iwae.lab.bench.settings` (what is measured), :mod:`~iwae.lab.bench.rivals`
(plain PyTorch and Pyro), :mod:`~iwae.lab.bench.flops` (FLOP model, roofline matmuls),
:mod:`~iwae.lab.bench.timing` (the harness), :mod:`~iwae.lab.bench.cells` (one cell of the grid),
:mod:`~iwae.lab.bench.paths` (which :mod:`iwae.fast` paths ran), :mod:`~iwae.lab.bench.memory` (peak memory),
:mod:`~iwae.lab.bench.worker` (the evaluation subprocess), :mod:`~iwae.lab.bench.run` (the whole run) and
:mod:`~iwae.lab.bench.output` (Markdown and the files).
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
