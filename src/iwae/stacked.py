"""Stacked training: several models of one architecture trained as one computation.

Seeds of one configuration, or grid cells that share the architecture, k, the minibatches and the schedule (VAE and
IWAE at the same k, say), train together: their parameters are stacked along a leading model dimension
(:class:`ModelStack`), and one step computes every model's gradients with the core's reference path (autograd through
``torch.func.vmap`` over ``torch.func.functional_call`` of each model's ``sample_with_noise``): :class:`StackedStep`,
eagerly, through ``torch.compile`` or captured as CUDA graphs. On a GPU that fills a device which one minibatch-20
model leaves idle. The run lifecycle (:func:`iwae.train.fit_runs`) takes it through
:class:`iwae.steps.StackedModelsStep`; :func:`check_stackable` says which runs may share a stack.

Shape convention: samples first within each model, after the leading model dimension: minibatches
``[models, batch, ...]``, noise ``[models, k, batch, d]``, log-weights ``[models, k, batch]``, bounds
``[models, batch]``.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from iwae import estimators
from iwae.config import TrainConfig
from iwae.objectives import Objective
from iwae.protocol import SampleWithNoise
from iwae.runs import RunError

# Settings the runs of one stack may differ in; every other setting is shared.
PER_MODEL_SETTINGS = ("seed", "objective", "init_from")


class ModelStack:
    """The parameters of several models of one architecture (each a :class:`iwae.protocol.NoiseModel`) as stacked
    leaf tensors ``[models, ...]``, and their log-weights in one vectorised call."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        if not models:
            raise ValueError("a stack needs at least one model")
        wrapped = [SampleWithNoise(model) for model in models]
        self.params, self.buffers = torch.func.stack_module_state(wrapped)
        self.size = len(models)
        encoder_ids = {id(p) for p in models[0].encoder_parameters()}
        decoder_ids = {id(p) for p in models[0].decoder_parameters()}
        named = list(models[0].named_parameters())
        self.encoder_names = [f"model.{name}" for name, p in named if id(p) in encoder_ids]
        self.decoder_names = [f"model.{name}" for name, p in named if id(p) in decoder_ids]
        template = copy.deepcopy(wrapped[0]).to("meta")

        def vectorised(stop_q_params: bool) -> Callable[..., Tensor]:
            def one(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, noise: list[Tensor]) -> Tensor:
                return torch.func.functional_call(template, (params, buffers), (x, noise, stop_q_params)).log_w

            return torch.func.vmap(one)

        self._log_weights = {stop: vectorised(stop) for stop in (False, True)}
        self._groups: dict[tuple[Objective, ...], list[tuple[Objective, list[int], Tensor | None]]] = {}

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def objective_groups(self, objectives: Sequence[Objective]) -> list[tuple[Objective, list[int], Tensor | None]]:
        """The models grouped by objective: (objective, model indices, their index tensor on the device, or None for
        all models). Built once per list of objectives, so a step copies nothing from the host."""
        key = tuple(objectives)
        if key not in self._groups:
            groups: dict[Objective, list[int]] = {}
            for index, objective in enumerate(objectives):
                groups.setdefault(objective, []).append(index)
            device = self.parameters()[0].device
            self._groups[key] = [
                (objective, index, None if len(index) == self.size else torch.tensor(index, device=device))
                for objective, index in groups.items()
            ]
        return self._groups[key]

    def log_weights(self, x: Tensor, noise: list[Tensor], stop_q_params: bool = False) -> Tensor:
        """Log-weights ``[models, k, batch]`` of minibatches ``x`` ``[models, batch, ...]`` and noise
        ``[models, k, batch, ...]`` per stochastic layer."""
        return self._log_weights[stop_q_params](self.params, self.buffers, x, noise)

    @torch.no_grad()
    def finite_models(self) -> list[bool]:
        """Whether each model's parameters are all finite (one host synchronisation)."""
        finite = [torch.isfinite(p).reshape(self.size, -1).all(dim=1) for p in self.parameters()]
        return torch.stack(finite).all(dim=0).tolist()

    @torch.no_grad()
    def write_to(self, models: Sequence[nn.Module]) -> None:
        """Copy each model's slice of the stack into its own module (for evaluation and checkpoints)."""
        for index, model in enumerate(models):
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                source = self.params.get(f"model.{name}", self.buffers.get(f"model.{name}"))
                tensor.copy_(source[index])

    def import_optimizer_states(
        self, optimizer: torch.optim.Optimizer, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> None:
        """Stack the models' own optimiser states (loaded from their checkpoints, or continued from their
        ``init_from`` runs) into the stack's optimiser: each per-element tensor stacked, the step count shared."""
        for name, stacked in self.params.items():
            params = [dict(model.named_parameters())[name.removeprefix("model.")] for model in models]
            states = [opt.state.get(param) for opt, param in zip(optimizers, params, strict=True)]
            if all(not state for state in states):
                continue
            if any(not state for state in states) or len({float(state["step"]) for state in states}) != 1:
                raise RunError(
                    "the runs of this stack start from different optimiser steps (saved at different steps, or "
                    "continuing init_from runs of different lengths); train them one by one (--stack off)"
                )
            optimizer.state[stacked] = {
                key: torch.stack([state[key] for state in states]) if value.dim() > 0 else value.clone()
                for key, value in states[0].items()
            }

    def export_optimizer_state(
        self, optimizer: torch.optim.Optimizer, index: int, model: nn.Module, target: torch.optim.Optimizer
    ) -> None:
        """Put model ``index``'s slice of the stack's optimiser state into ``target``, that model's own optimiser."""
        params = dict(model.named_parameters())
        for name, stacked in self.params.items():
            state = optimizer.state.get(stacked)
            if state:
                target.state[params[name.removeprefix("model.")]] = {
                    key: value[index].clone() if value.dim() > 0 else value.clone() for key, value in state.items()
                }
        for group, source in zip(target.param_groups, optimizer.param_groups, strict=False):
            group["lr"] = source["lr"]


def stacked_losses(
    stack: ModelStack, x: Tensor, noise: list[Tensor], objectives: Sequence[Objective], estimator: str
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The stack's encoder and decoder losses (each the sum over models of ``-mean(surrogate)``: its gradient in a
    model's slice is that model's own loss gradient), the bounds ``[models, batch]`` and whether one surrogate
    serves both parts. Models with the same objective share one call of the estimator."""
    log_w = stack.log_weights(x, noise, estimators.stops_q_params(estimator))
    n_models, k, batch = log_w.shape
    encoder_loss = decoder_loss = log_w.new_zeros(())
    bounds: list[Tensor | None] = [None] * n_models
    shared = True
    for objective, index, rows in stack.objective_groups(objectives):
        part = log_w if rows is None else log_w[rows]
        terms = estimators.terms_from_log_weights(
            part.transpose(0, 1).reshape(k, len(index) * batch), objective, estimator
        )
        encoder_loss = encoder_loss - terms.encoder_surrogate.view(len(index), batch).mean(dim=1).sum()
        decoder_loss = decoder_loss - terms.decoder_surrogate.view(len(index), batch).mean(dim=1).sum()
        shared = shared and terms.shared
        for position, model in enumerate(index):
            bounds[model] = terms.bound.view(len(index), batch)[position]
    return encoder_loss, decoder_loss, torch.stack(bounds), shared


def stacked_gradients(
    stack: ModelStack,
    x: Tensor,
    noise: list[Tensor],
    objectives: Sequence[Objective],
    estimator: str,
    losses: Callable[..., tuple[Tensor, Tensor, Tensor, bool]] = stacked_losses,
) -> tuple[Tensor, list[Tensor]]:
    """The bounds ``[models, batch]`` and the loss gradients of the stacked parameters (in
    :meth:`ModelStack.parameters`' order; contiguous, and zero where a parameter has none): a function of the
    parameters and its inputs only, which changes no state, so it can be captured as a CUDA graph."""
    encoder_loss, decoder_loss, bounds, shared = losses(stack, x, noise, objectives, estimator)
    encoder = [stack.params[name] for name in stack.encoder_names]
    decoder = [stack.params[name] for name in stack.decoder_names]
    encoder_grads, decoder_grads = estimators.loss_gradients(encoder_loss, decoder_loss, shared, encoder, decoder)
    found = dict(zip([*stack.encoder_names, *stack.decoder_names], [*encoder_grads, *decoder_grads], strict=True))
    return bounds.detach(), [found[name] if name in found else torch.zeros_like(p) for name, p in stack.params.items()]


STEP_MODES = ("eager", "compile", "graphs")


class StackedStep:
    """A stack's training step up to the optimiser: draws nothing, sets every stacked parameter's ``.grad`` to its
    loss gradient and returns the bounds ``[models, batch]``; the caller then steps the optimiser.

    Modes: ``eager`` (:func:`stacked_gradients`); ``compile`` (its losses through ``torch.compile``, one graph per
    minibatch shape); ``graphs`` (CUDA only: :func:`stacked_gradients` captured as a CUDA graph once per shape of
    the minibatch and noise, and replayed: no launch overhead, no compilation; the inputs are copied into the
    graph's own tensors, and ``.grad`` points at the graph's gradient tensors after each replay). Off CUDA (or with
    ``capture=False``) the ``graphs`` mode runs its bookkeeping without capturing: what the tests check on a CPU.
    A capture the device refuses (:class:`CaptureRefused`, with its first cause) makes the step go on eagerly, with a
    warning; running out of memory is not a refusal and ends the run as itself.
    """

    def __init__(
        self,
        stack: ModelStack,
        objectives: Sequence[Objective],
        estimator: str,
        mode: str = "eager",
        *,
        capture: bool = True,
    ) -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"mode must be one of {', '.join(STEP_MODES)}, got {mode!r}")
        self.stack, self.objectives, self.estimator, self.mode = stack, list(objectives), estimator, mode
        self.capture = capture
        self.losses = torch.compile(stacked_losses, dynamic=False) if mode == "compile" else stacked_losses
        self._graphs: dict[tuple, _Graphed] = {}
        self.graphs_failure: str | None = None  # why a CUDA graph capture failed, where one did (then: eager)

    @property
    def description(self) -> str:
        how = {"eager": "", "compile": ", torch.compile", "graphs": ", CUDA graphs"}[self.mode]
        fallback = f" (CUDA graphs failed: {self.graphs_failure})" if self.graphs_failure else ""
        return f"stacked ({self.stack.size} models): autograd, torch.func.vmap{how}{fallback}"

    def __call__(self, x: Tensor, noise: list[Tensor]) -> Tensor:
        if self.mode == "graphs":
            key = (tuple(x.shape), *(tuple(n.shape) for n in noise))
            graphed = self._graphs.get(key)
            if graphed is None:
                try:
                    graphed = self._graphs[key] = _Graphed(self, x, noise)
                except CaptureRefused as error:  # the same step, eagerly, and say so
                    self.mode, self.graphs_failure = "eager", str(error)
                    warnings.warn(f"CUDA graph capture failed, training eagerly: {self.graphs_failure}", stacklevel=2)
                    return self(x, noise)
            bounds, grads = graphed.replay(x, noise)
        else:
            bounds, grads = stacked_gradients(self.stack, x, noise, self.objectives, self.estimator, self.losses)
        for param, grad in zip(self.stack.parameters(), grads, strict=True):
            param.grad = grad
        return bounds


class CaptureRefused(RuntimeError):
    """The device refused a CUDA graph capture; the message is the first error's first line."""


def _first_cause(error: BaseException) -> BaseException:
    """The error that started a chain: ``capture_end`` raising "operation failed due to a previous error during
    capture" while the real one is being handled has the real one as its context."""
    while error.__context__ is not None and not isinstance(error, torch.OutOfMemoryError):
        error = error.__context__
    return error


def _capture(
    run: Callable[[], tuple[Tensor, list[Tensor]]], device: torch.device
) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, list[Tensor]]]:
    """Warm ``run`` up on a side stream, then capture it as a CUDA graph on ``device`` (not the current one) and on
    a stream of that device; returns the graph and the captured call's outputs. Whatever happens, the caller's
    current stream is restored. Raises :class:`CaptureRefused`, or ``torch.OutOfMemoryError`` as itself."""
    try:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs asks
                for _ in range(3):
                    run()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=device)):
                outputs = run()
            return graph, outputs
    except RuntimeError as error:
        cause = _first_cause(error)
        if isinstance(cause, torch.OutOfMemoryError):
            raise cause from None
        raise CaptureRefused(str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__) from error


class _Graphed:
    """:func:`stacked_gradients` for one shape of inputs, captured as a CUDA graph (see :class:`StackedStep`)."""

    def __init__(self, step: StackedStep, x: Tensor, noise: list[Tensor]) -> None:
        self.x, self.noise = x.clone(), [n.clone() for n in noise]

        def run() -> tuple[Tensor, list[Tensor]]:
            return stacked_gradients(step.stack, self.x, self.noise, step.objectives, step.estimator)

        if step.capture and x.device.type == "cuda":
            self.graph, (self.bounds, self.grads) = _capture(run, x.device)
        else:
            self.graph, (self.bounds, self.grads) = None, run()
        self._run = run

    def replay(self, x: Tensor, noise: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        self.x.copy_(x)
        for static, new in zip(self.noise, noise, strict=True):
            static.copy_(new)
        if self.graph is not None:
            with torch.cuda.device(self.x.device):
                self.graph.replay()
        else:  # the same bookkeeping without CUDA: recompute into the captured outputs
            bounds, grads = self._run()
            self.bounds.copy_(bounds)
            for static, new in zip(self.grads, grads, strict=True):
                static.copy_(new)
        return self.bounds, self.grads


def step_mode(device: torch.device, compile_model: bool) -> str:
    """The :class:`StackedStep` mode of ``--compile`` on a device: CUDA graphs on CUDA, ``torch.compile`` elsewhere."""
    if not compile_model:
        return "eager"
    return "graphs" if device.type == "cuda" else "compile"


def stack_key(config: TrainConfig) -> str:
    """What runs of one stack share: every setting but :data:`PER_MODEL_SETTINGS`, and whether the run continues its
    ``init_from`` run's optimiser (one stacked optimiser has one step count: a fresh run and a continued one differ)."""
    data = config.to_dict()
    for name in (*PER_MODEL_SETTINGS, "fresh_optimizer"):  # fresh_optimizer matters only as continues_optimizer
        data.pop(name)
    data["continues_optimizer"] = continues_optimizer(config)
    return json.dumps(data, sort_keys=True)


def continues_optimizer(config: TrainConfig) -> bool:
    """Whether the run starts from its ``init_from`` run's optimiser state (Table 2 as the authors ran it)."""
    return config.init_from is not None and not config.fresh_optimizer


def check_stackable(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("a stack needs at least one run")
    first = configs[0].to_dict()
    for config in configs[1:]:
        if stack_key(config) != stack_key(configs[0]):
            other = config.to_dict()
            same = (*PER_MODEL_SETTINGS, "fresh_optimizer")
            differ = sorted(k for k in first if k not in same and first[k] != other[k])
            if continues_optimizer(config) != continues_optimizer(configs[0]):
                differ.append("whether the optimiser continues an init_from run's")
            raise ValueError(
                f"runs stacked together may differ only in {', '.join(PER_MODEL_SETTINGS)}; these differ: "
                + ", ".join(differ)
            )
