"""``iwae bench``: training and evaluation speed of this library beside Pyro, plain PyTorch and the matmul roofline.

Shape convention (as everywhere in the package): samples first. Minibatches ``x`` are
``[batch, x_dim]``, latent samples ``[k, batch, d]`` and log-weights ``[k, batch]``.

What is measured, for each (stochastic layers, k, batch) of the grid, in one process with one
thread count, on the first ``n_train`` MNIST training images binarised dynamically (a pool of
pre-binarised minibatches, so binarisation is outside the timer):

- ``iwae``: one training step of this library exactly as :func:`iwae.train.fit` takes it:
  :func:`iwae.train.clear_gradients`, :func:`iwae.train.training_step` (IWAE objective, standard estimator)
  and :func:`iwae.train.adam_step` with the optimiser of :func:`iwae.train.build_optimizer`; with ``--compile``,
  as ``iwae train --compile`` takes it (:func:`iwae.train.compile_estimate`).
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
:mod:`iwae.fast.step` where it builds; autograd; or ``torch.compile`` with ``--compile``); ``IWAE_NATIVE=0``
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
test images, in a fresh subprocess (``python -m iwae.lab.bench --eval-worker``) whose peak resident memory
is reported above the same process's baseline after imports and a tiny warm-up (and, on CUDA,
``torch.cuda.max_memory_allocated``). On Linux the peak is VmHWM of ``/proc/self/status``, reset at the
baseline: ``getrusage``'s ``ru_maxrss`` (used elsewhere) carries the parent's peak across fork and exec.
Quick mode measures 20 images with minibatches of 20 (the chunks of samples then have as many rows as
the full evaluation's), takes the median of 5 such passes, and scales to 1,000 images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from iwae.checkpoint import atomic_write_text
from iwae.config import BURDA_STAGES, TrainConfig
from iwae.data import IDX_VALIDATION_IMAGES, Dataset, Split, binarize, load_dataset
from iwae.estimators import BoundSpec
from iwae.fast import allocator, backprop, native
from iwae.fast import step as native_step
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import resolve_device
from iwae.train import adam_step, build_model, build_optimizer, clear_gradients, compile_estimate, training_step

EVAL_K = 5000
PYRO_MISSING = "pyro-ppl not installed (pip install 'iwae[bench]')"
PYRO_SKIPPED = "skipped (--no-pyro)"
TRAIN_IMPLS = ("iwae", "plain", "pyro")
POOL_BATCHES = 4  # distinct pre-binarised minibatches cycled through by every training benchmark
BURDA_PASSES = sum(epochs for epochs, _ in BURDA_STAGES)  # 3,280 passes over the training set
BURDA_TRAIN_IMAGES = 60_000 - IDX_VALIDATION_IMAGES  # MNIST training images in Burda's split: 59,600
BURDA_BATCH = 20
MIN_TIMED_SECONDS = 2e-3  # matmul timings loop a call until one repeat takes at least this long
TRAINING_MIN_SECONDS = 0.1  # a repeat of a training step runs consecutive steps for at least this long


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    """What ``iwae bench`` measures; :func:`full_settings` and :func:`quick_settings` are the presets."""

    mode: str = "full"
    layers: tuple[int, ...] = (1, 2)
    ks: tuple[int, ...] = (1, 5, 50)
    batches: tuple[int, ...] = (20, 100, 1000)
    repeats: int = 11
    warmup: int = 3
    threads: int | None = None  # None: torch's default
    device: str = "auto"
    pyro: bool = True
    n_train: int = 1000  # the first N training images feed the training benchmarks
    eval_images: int = 1000
    eval_batch_size: int = 100
    eval_repeats: int = 1  # L_5000 passes over the eval images; the median is reported
    compile: bool = False  # iwae's steps as `iwae train --compile` takes them
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not (self.layers and self.ks and self.batches) or min((*self.ks, *self.batches)) < 1:
            raise ValueError("the grid needs at least one layer count, k >= 1 and batch >= 1")
        if not set(self.layers) <= {1, 2}:
            raise ValueError(f"layers must be 1 or 2 (Burda's architectures), got {self.layers}")
        if min(self.eval_images, self.eval_batch_size, self.eval_repeats, self.n_train) < 1:
            raise ValueError("eval_images, eval_batch_size, eval_repeats and n_train must be >= 1")

    def grid(self) -> list[tuple[int, int, int]]:
        """(layers, k, batch) in the order measured."""
        return list(itertools.product(self.layers, self.ks, self.batches))


def full_settings(**changes: Any) -> BenchSettings:
    """The whole grid: layers 1 and 2, k in {1, 5, 50}, batch in {20, 100, 1000}, L_5000 on 1,000 images."""
    return replace(BenchSettings(), **changes)


def quick_settings(**changes: Any) -> BenchSettings:
    """Under a minute on 2 cores: one layer, k in {5, 50}, batch in {20, 100}, L_5000 on 20 images (5 passes)."""
    quick = BenchSettings(
        mode="quick",
        layers=(1,),
        ks=(5, 50),
        batches=(20, 100),
        repeats=7,
        warmup=2,
        eval_images=20,
        eval_batch_size=20,
        eval_repeats=5,
    )
    return replace(quick, **changes)


# -- FLOPs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a model: ``[rows, in_dim] x [in_dim, out_dim]``.

    ``per_sample``: it runs on k * batch rows (it sees latent samples), otherwise on batch rows.
    """

    part: str  # "encoder" or "decoder"
    layer: int  # stochastic layer j of the conditional it belongs to (0-based)
    in_dim: int
    out_dim: int
    per_sample: bool

    @property
    def flops_per_row(self) -> int:
        return 2 * self.in_dim * self.out_dim

    def rows(self, k: int, batch: int) -> int:
        return k * batch if self.per_sample else batch


def linear_shapes(config: ModelConfig) -> list[LinearShape]:
    """Every linear layer of :class:`~iwae.models.LatentVariableModel` for ``config``, encoder first.

    q(h_1 | x) sees the batch; q(h_{j+1} | h_j) and every decoder network see the k samples.
    """
    in_dims = (config.x_dim, *config.latent_dims[:-1])
    obs_params = 1 if config.likelihood == "bernoulli" else 2
    shapes = []
    for j, (in_dim, hidden, latent) in enumerate(zip(in_dims, config.hidden_dims, config.latent_dims, strict=True)):
        sizes = (in_dim, *hidden, 2 * latent)
        shapes += [LinearShape("encoder", j, a, b, j > 0) for a, b in itertools.pairwise(sizes)]
    for j, (hidden, latent) in enumerate(zip(config.hidden_dims, config.latent_dims, strict=True)):
        sizes = (latent, *reversed(hidden), in_dims[j] * (obs_params if j == 0 else 2))
        shapes += [LinearShape("decoder", j, a, b, True) for a, b in itertools.pairwise(sizes)]
    return shapes


@dataclass(frozen=True)
class ModelFlops:
    """Forward-pass matmul FLOPs (2 * MACs) of a model: per example (batch rows) and per sample (k * batch rows)."""

    encoder_per_example: int
    encoder_per_sample: int
    decoder_per_sample: int

    @property
    def per_example(self) -> int:
        return self.encoder_per_example

    @property
    def per_sample(self) -> int:
        return self.encoder_per_sample + self.decoder_per_sample

    def forward(self, k: int, batch: int) -> int:
        return batch * self.per_example + k * batch * self.per_sample

    def training_step(self, k: int, batch: int) -> int:
        """Forward plus backward (gradients of inputs and of weights): 3x the forward pass."""
        return 3 * self.forward(k, batch)


def model_flops(config: ModelConfig) -> ModelFlops:
    """For Burda's one-layer model: 433,600 per example (encoder 784-200-200-2x50) and 413,600 per sample
    (decoder 50-200-200-784); for the two-layer model 473,600 per example and 563,600 per sample."""
    shapes = linear_shapes(config)

    def total(part: str, per_sample: bool) -> int:
        return sum(s.flops_per_row for s in shapes if s.part == part and s.per_sample == per_sample)

    return ModelFlops(total("encoder", False), total("encoder", True), total("decoder", True))


# -- plain PyTorch -------------------------------------------------------------------------------
_PLAIN_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(_PLAIN_ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class PlainIWAE(nn.Module):
    """The IWAE written the obvious way, as a baseline: ``nn.Sequential`` MLPs and ``torch.distributions``.

    ``encoders[j]`` outputs (mean, log-std) of q(h_{j+1} | h_j); ``decoders[0]`` the Bernoulli logits of
    p(x | h_1) and ``decoders[j]`` (mean, log-std) of p(h_j | h_{j+1}): the layout of
    :class:`~iwae.models.LatentVariableModel`, so :meth:`copy_from` can take its parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.likelihood != "bernoulli":
            raise ValueError("the plain baseline has a Bernoulli observation model only")
        in_dims = (config.x_dim, *config.latent_dims[:-1])
        self.encoders = nn.ModuleList(
            _mlp((in_dim, *hidden, 2 * latent), config.activation)
            for in_dim, hidden, latent in zip(in_dims, config.hidden_dims, config.latent_dims, strict=True)
        )
        self.decoders = nn.ModuleList(
            _mlp((latent, *reversed(hidden), in_dims[j] * (1 if j == 0 else 2)), config.activation)
            for j, (hidden, latent) in enumerate(zip(config.hidden_dims, config.latent_dims, strict=True))
        )

    def q(self, j: int, inputs: Tensor) -> torch.distributions.Normal:
        mean, log_std = self.encoders[j](inputs).chunk(2, dim=-1)
        return torch.distributions.Normal(mean, log_std.exp())

    def p(self, j: int, h: Tensor) -> torch.distributions.Distribution:
        if j == 0:
            return torch.distributions.Bernoulli(logits=self.decoders[0](h))
        mean, log_std = self.decoders[j](h).chunk(2, dim=-1)
        return torch.distributions.Normal(mean, log_std.exp())

    def log_weights(self, x: Tensor, k: int, noise: Sequence[Tensor] | None = None) -> Tensor:
        """``[batch, x_dim] -> [k, batch]``; ``noise[j]`` (``[k, batch, d_j]``) replaces rsample's draws."""
        inputs, latents, log_q = x, [], 0.0
        for j in range(len(self.encoders)):
            q = self.q(j, inputs)
            h = self._draw(q, j, k, noise)
            log_q = log_q + q.log_prob(h).sum(-1)
            latents.append(h)
            inputs = h
        top = latents[-1]
        log_p = torch.distributions.Normal(torch.zeros_like(top), torch.ones_like(top)).log_prob(top).sum(-1)
        for j in range(len(latents) - 1):
            log_p = log_p + self.p(j + 1, latents[j + 1]).log_prob(latents[j]).sum(-1)
        log_p = log_p + self.p(0, latents[0]).log_prob(x).sum(-1)
        return log_p - log_q

    @staticmethod
    def _draw(q: torch.distributions.Normal, j: int, k: int, noise: Sequence[Tensor] | None) -> Tensor:
        if noise is not None:
            return q.loc + noise[j] * q.scale  # what Normal.rsample computes
        return q.rsample((k,)) if j == 0 else q.rsample()

    def loss(self, x: Tensor, k: int, noise: Sequence[Tensor] | None = None) -> Tensor:
        """Minus the mean over the batch of the IWAE bound ``logsumexp(log_w, 0) - log k``."""
        return -(torch.logsumexp(self.log_weights(x, k, noise), dim=0) - math.log(k)).mean()

    @torch.no_grad()
    def copy_from(self, model: LatentVariableModel) -> PlainIWAE:
        """Take the parameters of ``model`` (same architecture), linear layer by linear layer."""
        pairs = [*zip(self.encoders, model.encoder, strict=True), *zip(self.decoders, model.decoder, strict=True)]
        for mine, theirs in pairs:
            for a, b in zip(_linears(mine), _linears(theirs), strict=True):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
        return self


def adam_settings(config: TrainConfig) -> dict[str, Any]:
    """Learning rate, betas and epsilon of :func:`iwae.train.build_optimizer` for ``config``."""
    return {"lr": config.stages[0][1], "betas": (config.beta1, config.beta2), "eps": config.adam_eps}


# -- Pyro ----------------------------------------------------------------------------------------
def pyro_version() -> str | None:
    """Pyro's version, or None if ``import pyro`` fails."""
    try:
        import pyro
    except ImportError:
        return None
    return pyro.__version__


def pyro_skip_reason(wanted: bool, version: str | None) -> str | None:
    """Why the Pyro baseline is left out (for its rows and the table), or None if it runs."""
    if not wanted:
        return PYRO_SKIPPED
    return PYRO_MISSING if version is None else None


class PyroIWAE:
    """Pyro's IWAE over the modules of a :class:`PlainIWAE`: ``RenyiELBO(alpha=0)`` with vectorised particles.

    Clears Pyro's global parameter store; one instance at a time.
    """

    def __init__(self, plain: PlainIWAE, k: int, config: TrainConfig):
        import pyro
        import pyro.infer
        import pyro.optim

        pyro.clear_param_store()
        self.plain = plain
        self.top_dim = config.model.latent_dims[-1]
        elbo = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        self.svi = pyro.infer.SVI(self.model, self.guide, pyro.optim.Adam(adam_settings(config)), loss=elbo)

    def model(self, x: Tensor) -> None:
        import pyro
        import pyro.distributions as dist

        pyro.module("decoders", self.plain.decoders)
        n = len(self.plain.decoders)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros((x.shape[0], self.top_dim)), 1.0)
            h = pyro.sample(f"h{n}", prior.to_event(1))
            for j in reversed(range(n - 1)):
                mean, log_std = self.plain.decoders[j + 1](h).chunk(2, dim=-1)
                h = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.plain.decoders[0](h)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        import pyro
        import pyro.distributions as dist

        pyro.module("encoders", self.plain.encoders)
        inputs = x
        with pyro.plate("data", x.shape[0]):
            for j, encoder in enumerate(self.plain.encoders):
                mean, log_std = encoder(inputs).chunk(2, dim=-1)
                inputs = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))

    def step(self, x: Tensor) -> float:
        """One SVI step (zero grads, loss and gradients, Adam); returns the loss."""
        return self.svi.step(x)


# -- timing --------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Timed:
    """A call to time; a repeat loops it until it takes at least ``min_seconds`` (so microsecond calls
    are not timer noise)."""

    fn: Callable[[], Any]
    min_seconds: float = 0.0


def _calls_per_repeat(timed: Timed, sync: Callable[[], None]) -> int:
    sync()
    started = time.perf_counter()
    timed.fn()
    sync()
    once = time.perf_counter() - started
    return max(1, min(10_000, math.ceil(timed.min_seconds / max(once, 1e-9))))


def time_round_robin(calls: dict[str, Timed], repeats: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` over ``repeats`` after ``warmup`` calls.

    The repeats are interleaved (one repeat of every call, then the next), so a change in the machine's
    load during the measurement affects every call alike.
    """
    inner = {}
    for name, timed in calls.items():
        for _ in range(warmup):
            timed.fn()
        inner[name] = _calls_per_repeat(timed, sync)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, timed in calls.items():
            sync()
            started = time.perf_counter()
            for _ in range(inner[name]):
                timed.fn()
            sync()
            times[name].append((time.perf_counter() - started) / inner[name])
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_calls(rows: int, in_dim: int, out_dim: int, device: torch.device) -> dict[str, Timed]:
    """A linear layer's training matmuls on random data: forward ``addmm(b, x, W^T)`` ``[rows, in] x [in, out]``,
    gradient of the input ``g @ W`` and of the weight ``x^T @ g``."""
    x = torch.randn(rows, in_dim, device=device)
    weight = torch.randn(out_dim, in_dim, device=device)
    bias = torch.randn(out_dim, device=device)
    grad = torch.randn(rows, out_dim, device=device)
    name = f"{rows}x{in_dim}x{out_dim}"
    return {
        f"{name}:forward": Timed(lambda: torch.addmm(bias, x, weight.t()), MIN_TIMED_SECONDS),
        f"{name}:grad_input": Timed(lambda: grad.mm(weight), MIN_TIMED_SECONDS),
        f"{name}:grad_weight": Timed(lambda: x.t().mm(grad), MIN_TIMED_SECONDS),
    }


def roofline_calls(config: ModelConfig, k: int, batch: int, device: torch.device) -> tuple[dict[str, Timed], list[str]]:
    """The matmuls of a training step by shape (each shape once), and the call names of every linear layer
    in order (a shape used by two layers is listed twice), whose median times add up to the roofline time."""
    calls: dict[str, Timed] = {}
    per_layer: list[str] = []
    for shape in linear_shapes(config):
        layer_calls = matmul_calls(shape.rows(k, batch), shape.in_dim, shape.out_dim, device)
        for name, timed in layer_calls.items():
            calls.setdefault(name, timed)
        per_layer += list(layer_calls)
    return calls, per_layer


# -- training benchmarks ---------------------------------------------------------------------------
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
    """This library's training step, as :func:`iwae.train.fit` takes it (with ``compile_model``, as
    ``iwae train --compile`` does: the first warm-up call compiles)."""
    optimizer = build_optimizer(model, config)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    compiled_estimate = compile_estimate() if compile_model else None

    def step(x: Tensor) -> None:
        clear_gradients(optimizer)
        training_step(model, x, config, generator, compiled_estimate)
        adam_step(optimizer)

    return step


def plain_step(plain: PlainIWAE, config: TrainConfig) -> Callable[[Tensor], None]:
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
    """Hours that Burda's schedule (3,280 passes over 59,600 images at minibatch 20) takes at this step time,
    validation and data preparation not counted; None for other minibatch sizes or without a time."""
    if ms_per_step is None or batch != BURDA_BATCH:
        return None
    return ms_per_step / 1e3 * math.ceil(BURDA_TRAIN_IMAGES / batch) * BURDA_PASSES / 3600


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios for one cell: iwae's GFLOP/s over the roofline's, iwae's examples/s over each baseline's; at
    minibatch 20 also the hours of Burda's schedule at iwae's step time."""
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


# -- evaluation ---------------------------------------------------------------------------------
def _rss_mb() -> tuple[float | None, float | None]:
    """(current, peak) resident memory of this process in MiB.

    On Linux from ``/proc/self/status`` (VmRSS, VmHWM): the peak belongs to this process image only,
    whereas ``getrusage``'s ``ru_maxrss`` keeps the parent's peak across fork and exec. Elsewhere
    ``(None, ru_maxrss)``, or ``(None, None)`` where ``resource`` is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        if "VmRSS" in fields and "VmHWM" in fields:
            return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    try:
        import resource
    except ImportError:
        return None, None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the peak resident memory (VmHWM) to the current one (Linux >= 4.0); False where that fails."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_baseline() -> float | None:
    """The resident memory that later peaks are measured against: the current one after a peak reset,
    else the peak so far."""
    current, peak = _rss_mb()
    return current if _reset_peak_rss() and current is not None else peak


def eval_worker(
    data_path: str, k: int, threads: int, device_name: str, batch_size: int, seed: int, repeats: int = 1
) -> dict[str, Any]:
    """In a fresh process: time ``L_k`` of a fresh one-layer model on the images in ``data_path`` (``.npz``),
    ``repeats`` times; ``seconds`` is the median pass."""
    from iwae.evaluate import estimate_log_likelihood

    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    arrays = np.load(data_path)
    split = Split(torch.from_numpy(arrays["images"])).to(device)
    torch.manual_seed(seed)
    model = LatentVariableModel(ModelConfig.burda(1))
    model.set_output_bias(torch.from_numpy(arrays["mean_x"]))
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sync = synchronizer(device)
    estimate_log_likelihood(model, split.subset(1), "dynamic", 10, generator, batch_size=batch_size)  # warm-up
    sync()
    baseline = _memory_baseline()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        estimates = estimate_log_likelihood(model, split, "dynamic", k, generator, batch_size=batch_size)
        sync()
        passes.append(time.perf_counter() - started)
    _, peak = _rss_mb()
    return {
        "seconds": statistics.median(passes),
        "seconds_per_pass": passes,
        "images": len(split),
        "k": k,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rss_baseline_mb": baseline,
        "rss_peak_mb": peak,
        "rss_above_baseline_mb": None if peak is None or baseline is None else peak - baseline,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "mean_log_lik": float(estimates["log_lik"].mean()),
    }


def measure_eval(
    test_images: Tensor, mean_x: Tensor, settings: BenchSettings, device: torch.device, threads: int
) -> dict[str, Any]:
    """Run :func:`eval_worker` in a fresh ``python -m iwae.lab.bench --eval-worker`` subprocess."""
    n = min(settings.eval_images, test_images.shape[0])
    batch_size = min(settings.eval_batch_size, n)
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        data_path = Path(tmp) / "eval.npz"
        np.savez(data_path, images=test_images[:n].cpu().numpy(), mean_x=mean_x.cpu().numpy())
        command = [
            sys.executable, "-m", "iwae.lab.bench", "--eval-worker", str(data_path), "--k", str(EVAL_K),
            "--threads", str(threads), "--device", str(device), "--batch-size", str(batch_size),
            "--seed", str(settings.seed), "--repeats", str(settings.eval_repeats),
        ]  # fmt: skip
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the L_{EVAL_K} evaluation worker failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the whole run ---------------------------------------------------------------------------------
def run_bench(settings: BenchSettings, dataset: Dataset | None = None) -> dict[str, Any]:
    """Measure the grid and the evaluation; returns the JSON-serialisable result (see the module docstring).

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
    allocator_setting = allocator.configure()  # every implementation measured under the same malloc settings
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
        "native_kernels": native.status() if device.type == "cpu" else "not used on this device",
        "compile": settings.compile,
        "gradients": _gradient_path(settings),
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


# -- output -------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _cell(row: dict[str, Any]) -> str:
    if row["ms_per_step"] is None:
        return row["status"]
    return f"{row['ms_per_step']:.2f} ms · {row['examples_per_s']:,.0f}/s · {row['gflops']:.1f}"


def _gradient_path(settings: BenchSettings) -> str:
    """How the iwae training steps get their gradients (:func:`iwae.train.training_step`'s choice)."""
    if settings.compile:
        return "torch.compile (iwae train --compile)"
    model = LatentVariableModel(ModelConfig.burda(1))
    if not backprop.applies(model, BoundSpec("iwae"), "standard"):
        return "autograd"
    if native_step.applies(model, torch.zeros(1, model.config.x_dim)):
        return f"explicit backpropagation (iwae.fast.backprop), in C++: {native_step.status()}"
    return f"explicit backpropagation (iwae.fast.backprop), in Python: {native_step.status()}"


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


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``OUT/bench.json`` and ``OUT/bench.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, markdown(result))
    return json_path, md_path


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m iwae.lab.bench", description="internal: the L_k timing worker")
    parser.add_argument("--eval-worker", metavar="NPZ", required=True, help="images and mean_x arrays")
    parser.add_argument("--k", type=int, default=EVAL_K)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    result = eval_worker(args.eval_worker, args.k, args.threads, args.device, args.batch_size, args.seed, args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
