"""A training step over N >= 1 models, and the one place that chooses it (:func:`select_step`).

A step takes a group of models' minibatches and generators, draws their noise, sets their gradients, updates their
parameters and returns each model's summed bound; the lifecycle takes each group's pass in turn. Two strategies sit
behind that one interface (:class:`Step`):

- :class:`PerModelStep`: each model a group of its own, with its own optimiser and its own :class:`StepPath` (the
  reference autograd path, ``torch.compile`` of it, or what :mod:`iwae.fast` serves). A single run is the case
  N = 1, and N seeds trained this way end bit for bit where their single runs end.
- :class:`StackedModelsStep`: all models one group, their parameters stacked and one vmapped autograd step with one
  optimiser (:mod:`iwae.stacked`), eagerly, through ``torch.compile`` or as CUDA graphs: what fills a GPU.

Each model draws from its own generator in a single run's order: binarisation (by the caller), then the noise.

Shape convention: a model's minibatch ``x`` is ``[batch, ...]``, its noise ``[k, batch, d_j]`` per stochastic layer;
a step returns ``[len(group)]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from iwae import estimators
from iwae.config import TrainConfig
from iwae.names import STACK_CHOICES
from iwae.optim import build_optimizer as build_optimizer_named
from iwae.protocol import Model
from iwae.stacked import ModelStack, StackedStep, step_mode


@dataclass(frozen=True)
class StepPath:
    """How one model's training steps get their gradients and update its parameters.

    ``accumulate(model, x, noise)`` adds the estimator's loss gradients to ``.grad`` and returns the bound
    ``[batch]`` (None: the reference path, :func:`iwae.estimators.estimate` and autograd); ``optimizer_step``
    replaces ``optimizer.step()`` (None: ``optimizer.step()``). ``description`` says which path runs, for the
    run's summary and the benchmark; it starts with ``fast:`` where :mod:`iwae.fast` serves the gradients.
    """

    description: str = "autograd"
    accumulate: Callable[[Model, Tensor, list[Tensor]], Tensor] | None = None
    optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None
    compiled_estimate: Callable[..., estimators.EstimatorTerms] | None = None


REFERENCE_PATH = StepPath()


def optimizer_for(parameters: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimiser (:func:`iwae.optim.build_optimizer`: Adam, or the authors' BurdaAdam) at its first
    learning rate, betas and epsilon."""
    betas = (config.beta1, config.beta2)
    return build_optimizer_named(config.optimizer, parameters, config.stages[0][1], betas, config.adam_eps)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """:func:`optimizer_for` the model's parameters."""
    return optimizer_for(list(model.parameters()), config)


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiling scope and ``torch.compile`` guard."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def scale_gradients(parameters: Iterable[Tensor], factor: float) -> None:
    """Multiply the accumulated gradients by ``factor``: the minibatch's summed loss (``loss_reduction = "sum"``, the
    authors' code) has ``batch`` times the gradient of its mean, which every step computes."""
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_(factor)


def optimizer_step(optimizer: torch.optim.Optimizer, path: StepPath = REFERENCE_PATH) -> None:
    """``optimizer.step()``, or the path's replacement for it."""
    if path.optimizer_step is not None:
        path.optimizer_step(optimizer)
    else:
        optimizer.step()


def compile_estimate() -> Callable[..., estimators.EstimatorTerms]:
    """:func:`iwae.estimators.estimate_from_noise` through ``torch.compile``: the model, bound and surrogates as one
    graph forward and one backward (``iwae train --compile`` on a CPU)."""
    return torch.compile(estimators.estimate_from_noise)


def choose_step_path(model: Model, config: TrainConfig, *, compile_model: bool = False, fast: bool = True) -> StepPath:
    """One model's step path: ``torch.compile`` of the reference path with ``compile_model``; else what
    :mod:`iwae.fast` serves (with ``fast``, its switches permitting); else the reference path."""
    if compile_model:
        return StepPath("torch.compile", compiled_estimate=compile_estimate())
    if not fast:
        return REFERENCE_PATH
    # The one place the core consults the speed layer, which sits above it (it imports the models and the
    # estimators) and is optional for every other use of the package: imported here, and it imports nothing back.
    from iwae import fast as fast_layer

    served = fast_layer.training_path(model, config.objective, config.estimator)
    return StepPath(served.description, served.accumulate, served.optimizer_step)


def training_step(
    model: Model,
    x: Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    path: StepPath = REFERENCE_PATH,
    k: int | None = None,
) -> Tensor:
    """Draw k samples (``config.k`` unless given: a k schedule's stage) for minibatch ``x`` ``[batch, ...]`` and add
    the estimator's loss gradient to ``.grad`` (scaled for ``loss_reduction = "sum"``).

    Returns the reported bound ``[batch]``; the caller clears the gradients before and steps the optimiser after.
    Every path draws the same noise from ``generator``.
    """
    k = config.k if k is None else k
    if path.accumulate is not None:
        bound = path.accumulate(model, x, model.draw_noise(x, k, generator))
    else:
        if path.compiled_estimate is not None:
            noise = model.draw_noise(x, k, generator)
            terms = path.compiled_estimate(model, x, noise, config.objective, config.estimator)
        else:
            terms = estimators.estimate(model, x, k, generator, config.objective, config.estimator)
        estimators.backward(model, terms)
        bound = terms.bound
    if config.loss_reduction == "sum":
        scale_gradients(model.parameters(), x.shape[0])
    return bound


def finite_parameters(parameters: Iterable[Tensor]) -> bool:
    """Whether every value of ``parameters`` is finite (one host synchronisation)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all())


class Step(Protocol):
    """One training step of N >= 1 models, each with its own optimiser (which checkpoints save).

    ``groups`` are the models that step together, as contiguous ranges of indices: the lifecycle takes a whole pass
    of one group's minibatches before the next group's, so that a model's parameters and moments stay in the cache
    (on a CPU, models stepped in turn minibatch by minibatch were 15% slower than one after another).
    """

    description: str
    groups: list[range]

    def __call__(self, group: range, xs: Sequence[Tensor], generators: Sequence[torch.Generator], k: int) -> Tensor:
        """Draw the group's models' noise and update them; returns each one's summed bound ``[len(group)]``."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def sync(self) -> None:
        """Make each model's own module and optimiser hold its current parameters and state."""
        ...

    def finite_models(self) -> list[bool]: ...


class PerModelStep:
    """Each model on its own: its own :class:`StepPath` and its own optimiser; one group per model."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        configs: Sequence[TrainConfig],
        paths: Sequence[StepPath],
    ) -> None:
        self.models, self.optimizers, self.configs, self.paths = list(models), list(optimizers), list(configs), paths
        self.groups = [range(index, index + 1) for index in range(len(self.models))]
        self.description = paths[0].description
        if len(self.models) > 1:
            self.description += f"; {len(self.models)} models, one after another"

    def __call__(self, group: range, xs: Sequence[Tensor], generators: Sequence[torch.Generator], k: int) -> Tensor:
        ((index, x, generator),) = zip(group, xs, generators, strict=True)  # a group of one model
        optimizer, path = self.optimizers[index], self.paths[index]
        clear_gradients(optimizer)
        bound = training_step(self.models[index], x, self.configs[index], generator, path, k)
        optimizer_step(optimizer, path)
        return bound.detach().sum().reshape(1)  # a view: no copy on the minibatch-20 step's hot path

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def sync(self) -> None:
        pass

    def finite_models(self) -> list[bool]:
        return [finite_parameters(model.parameters()) for model in self.models]


class StackedModelsStep:
    """The models as one :class:`~iwae.stacked.ModelStack`, one :class:`~iwae.stacked.StackedStep` and one optimiser
    over the stacked tensors (element-wise, so each model's slice moves as its own optimiser would); the models'
    own optimisers (restored or continued) seed it and take their slices back for checkpoints (:meth:`sync`)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        configs: Sequence[TrainConfig],
        mode: str,
    ) -> None:
        self.models, self.optimizers, self.config = list(models), list(optimizers), configs[0]
        self.stack = ModelStack(self.models)
        self.optimizer = optimizer_for(self.stack.parameters(), self.config)
        self.stack.import_optimizer_states(self.optimizer, self.models, self.optimizers)
        self.step = StackedStep(self.stack, [c.objective for c in configs], self.config.estimator, mode)
        self.groups = [range(len(self.models))]

    @property
    def description(self) -> str:
        return self.step.description

    def __call__(self, group: range, xs: Sequence[Tensor], generators: Sequence[torch.Generator], k: int) -> Tensor:
        noises = [model.draw_noise(x, k, g) for model, x, g in zip(self.models, xs, generators, strict=True)]
        bounds = self.step(torch.stack(list(xs)), [torch.stack(layer) for layer in zip(*noises, strict=True)])
        if self.config.loss_reduction == "sum":
            scale_gradients(self.stack.parameters(), xs[0].shape[0])
        self.optimizer.step()
        return bounds.sum(dim=1)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def sync(self) -> None:
        self.stack.write_to(self.models)
        for index, (model, own) in enumerate(zip(self.models, self.optimizers, strict=True)):
            self.stack.export_optimizer_state(self.optimizer, index, model, own)

    def finite_models(self) -> list[bool]:
        return self.stack.finite_models()


def stacks(n_models: int, device: torch.device, *, compile_model: bool = False, stack: str = "auto") -> bool:
    """Whether :func:`select_step` stacks: ``stack = "on"``, or ``"auto"`` on a GPU for several models or for
    ``compile_model`` (CUDA graphs). On a CPU the models' own fast steps one after another are faster than one
    vmapped autograd step (docs/performance.md)."""
    if stack not in STACK_CHOICES:
        raise ValueError(f"stack must be one of {', '.join(STACK_CHOICES)}, got {stack!r}")
    return stack == "on" or (stack == "auto" and device.type == "cuda" and (n_models > 1 or compile_model))


def select_step(
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    configs: Sequence[TrainConfig],
    device: torch.device,
    *,
    compile_model: bool = False,
    fast: bool = True,
    stack: str = "auto",
) -> Step:
    """The training step of these models on this device; its ``description`` says which and why.

    Stacked (:func:`stacks`): CUDA graphs with ``compile_model`` on CUDA, ``torch.compile`` with it elsewhere, else
    eager vmapped autograd. Otherwise each model's own path (:func:`choose_step_path`)."""
    if stacks(len(models), device, compile_model=compile_model, stack=stack):
        return StackedModelsStep(models, optimizers, configs, step_mode(device, compile_model))
    paths = [
        choose_step_path(model, config, compile_model=compile_model, fast=fast)
        for model, config in zip(models, configs, strict=True)
    ]
    return PerModelStep(models, optimizers, configs, paths)


__all__ = [
    "REFERENCE_PATH",
    "STACK_CHOICES",
    "PerModelStep",
    "StackedModelsStep",
    "Step",
    "StepPath",
    "build_optimizer",
    "choose_step_path",
    "clear_gradients",
    "compile_estimate",
    "optimizer_for",
    "optimizer_step",
    "scale_gradients",
    "select_step",
    "stacks",
    "training_step",
]
