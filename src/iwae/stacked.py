"""Stacked training: several models of one architecture trained as one computation.

Seeds of one configuration, or grid cells that share the architecture, k, the minibatches and the schedule (VAE and
IWAE at the same k, say), train together: their parameters are stacked along a leading model dimension, one step
computes every model's gradients with the core's reference path (autograd through ``torch.func.vmap`` over
``torch.func.functional_call`` of each model's ``sample_with_noise``), and one Adam updates them all. On a GPU that
fills a device which one minibatch-20 model leaves idle; on a CPU the step is bound by the same matmuls as single
runs (``docs/performance.md``).

Each model keeps all that a single run has: its seed's initialisation, its own ``torch.Generator`` (shuffling,
binarisation and noise drawn in the order :func:`iwae.train.fit` draws them, so a stacked seed follows the single
run's trajectory up to rounding), its optimiser state and its run directory, into which :func:`fit_stacked` writes
what ``iwae train --seed S`` writes: evaluation, resume and reports take the directories unchanged. The runs'
checkpoints are committed together (each is written to a staged file first), so a stack killed at any moment resumes
with every run at the same epoch. As in :func:`iwae.train.fit`, everything is checked before anything is written, and
a stack in which some runs diverge stops at the end of that epoch with a :class:`~iwae.runs.DivergenceError` naming
them, before the epoch's metrics or checkpoints are written: every run keeps its last finite checkpoint.

Shape convention: samples first within each model, after the leading model dimension: minibatches
``[models, batch, ...]``, noise ``[models, k, batch, d]``, log-weights ``[models, k, batch]``, bounds
``[models, batch]``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from iwae import estimators
from iwae.checkpoint import atomic_write_text, restore_checkpoint, save_checkpoint, save_model
from iwae.config import TrainConfig
from iwae.data import Dataset, binarize
from iwae.memory import check_memory
from iwae.objectives import Objective
from iwae.protocol import SampleWithNoise
from iwae.runs import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, RunError, resolve_device
from iwae.train import (
    FitResult,
    append_metrics,
    build_model,
    build_optimizer,
    check_progress,
    check_run_dir,
    create_run_dir,
    divergence_error,
    load_initial_optimizer,
    load_initial_weights,
    minibatch_order,
    optimizer_for,
    progress_bar,
    run_data,
    scale_gradients,
    truncate_metrics,
    validation_bound,
)

STAGED_CHECKPOINT = "checkpoint.next.safetensors"
COMMIT_MARKER = "stack-commit.json"
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

    def build_optimizer(self, config: TrainConfig) -> torch.optim.Optimizer:
        """One optimiser over the stacked tensors (:func:`iwae.train.optimizer_for`: Adam or BurdaAdam): element-wise,
        so each model's slice moves as its own optimiser would."""
        return optimizer_for(self.parameters(), config)

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
    params = stack.parameters()
    if shared:
        found = dict(zip(stack.params, torch.autograd.grad(encoder_loss, params, allow_unused=True), strict=True))
    else:
        encoder = [stack.params[name] for name in stack.encoder_names]
        decoder = [stack.params[name] for name in stack.decoder_names]
        found = dict(zip(stack.encoder_names, torch.autograd.grad(encoder_loss, encoder, retain_graph=True,
                                                                  allow_unused=True), strict=True))  # fmt: skip
        found |= dict(
            zip(stack.decoder_names, torch.autograd.grad(decoder_loss, decoder, allow_unused=True), strict=True)
        )
    # Contiguous: torch 2.13's fused CPU Adam reads a strided .grad in memory order (silently wrong), and under vmap
    # the gradients can come out strided.
    grads = [
        torch.zeros_like(p) if found.get(name) is None else found[name].contiguous() for name, p in stack.params.items()
    ]
    return bounds.detach(), grads


STEP_MODES = ("eager", "compile", "graphs")


class StackedStep:
    """A stack's training step up to the optimiser: draws nothing, sets every stacked parameter's ``.grad`` to its
    loss gradient and returns the bounds ``[models, batch]``; the caller then steps the optimiser.

    Modes: ``eager`` (:func:`stacked_gradients`); ``compile`` (its losses through ``torch.compile``, one graph per
    minibatch shape); ``graphs`` (CUDA only: :func:`stacked_gradients` captured as a CUDA graph once per shape of
    the minibatch and noise, and replayed: no launch overhead, no compilation; the inputs are copied into the
    graph's own tensors, and ``.grad`` points at the graph's gradient tensors after each replay). ``capture=False``
    runs the ``graphs`` mode's bookkeeping without CUDA (what the tests check on a CPU).
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
                except RuntimeError as error:  # a capture the device refuses: the same step, eagerly, and say so
                    self.mode, self.graphs_failure = "eager", str(error).splitlines()[0][:200]
                    warnings.warn(f"CUDA graph capture failed, training eagerly: {self.graphs_failure}", stacklevel=2)
                    return self(x, noise)
            bounds, grads = graphed.replay(x, noise)
        else:
            bounds, grads = stacked_gradients(self.stack, x, noise, self.objectives, self.estimator, self.losses)
        for param, grad in zip(self.stack.parameters(), grads, strict=True):
            param.grad = grad
        return bounds


class _Graphed:
    """:func:`stacked_gradients` for one shape of inputs, captured as a CUDA graph (see :class:`StackedStep`)."""

    def __init__(self, step: StackedStep, x: Tensor, noise: list[Tensor]) -> None:
        self.x, self.noise = x.clone(), [n.clone() for n in noise]

        def run() -> tuple[Tensor, list[Tensor]]:
            return stacked_gradients(step.stack, self.x, self.noise, step.objectives, step.estimator)

        if step.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs asks
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.bounds, self.grads = run()
        else:
            self.graph = None
            self.bounds, self.grads = run()
        self._run = run

    def replay(self, x: Tensor, noise: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        self.x.copy_(x)
        for static, new in zip(self.noise, noise, strict=True):
            static.copy_(new)
        if self.graph is not None:
            self.graph.replay()
        else:  # the same bookkeeping without CUDA: recompute into the captured outputs
            bounds, grads = self._run()
            self.bounds.copy_(bounds)
            for static, new in zip(self.grads, grads, strict=True):
                static.copy_(new)
        return self.bounds, self.grads


def stacked_step(
    stack: ModelStack,
    x: Tensor,
    noise: list[Tensor],
    objectives: Sequence[Objective],
    estimator: str,
) -> Tensor:
    """Set every stacked parameter's ``.grad`` to its model's loss gradient; returns the bounds ``[models, batch]``
    (an eager :class:`StackedStep`)."""
    return StackedStep(stack, objectives, estimator)(x, noise)


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


def settle_staged_checkpoints(run_dirs: Sequence[Path]) -> None:
    """Finish, or undo, a checkpoint commit that a kill interrupted. Every staged checkpoint was complete once any
    run holds the commit marker: then they move into place; without a marker they are deleted (the previous
    checkpoints stand)."""
    committed = any((run_dir / COMMIT_MARKER).is_file() for run_dir in run_dirs)
    for run_dir in run_dirs:
        staged = run_dir / STAGED_CHECKPOINT
        if staged.is_file():
            if committed:
                os.replace(staged, run_dir / CHECKPOINT_FILE)
            else:
                staged.unlink()
    for run_dir in run_dirs:
        (run_dir / COMMIT_MARKER).unlink(missing_ok=True)


def _commit_checkpoints(run_dirs: Sequence[Path], write: Callable[[int, Path], None]) -> None:
    """Write every run's checkpoint to its staged file, mark the commit, move them into place, unmark."""
    for index, run_dir in enumerate(run_dirs):
        write(index, run_dir / STAGED_CHECKPOINT)
    marker = json.dumps({"stack": [str(run_dir) for run_dir in run_dirs]}) + "\n"
    for run_dir in run_dirs:
        atomic_write_text(run_dir / COMMIT_MARKER, marker)
    for run_dir in run_dirs:
        os.replace(run_dir / STAGED_CHECKPOINT, run_dir / CHECKPOINT_FILE)
    for run_dir in run_dirs:
        (run_dir / COMMIT_MARKER).unlink(missing_ok=True)


def fit_stacked(
    configs: Sequence[TrainConfig],
    run_dirs: Sequence[str | Path],
    *,
    resume: bool = False,
    device: str = "auto",
    data_dir: str | None = None,
    dataset: Dataset | None = None,
    progress: bool = True,
    checkpoint_minutes: float = 2.0,
    max_epochs: int | None = None,
    compile_model: bool = False,
    deadline: float | None = None,
) -> list[FitResult]:
    """Train (or resume) several runs as one stack; one :class:`~iwae.train.FitResult` per run, whose ``seconds``
    is the stack's training time. The runs may differ in seed, objective and ``init_from`` only
    (:func:`check_stackable`); ``compile_model`` takes the steps through CUDA graphs on CUDA and ``torch.compile``
    elsewhere (:func:`step_mode`). With
    ``deadline`` (a ``time.monotonic()`` value), training stops, checkpointed, after the first epoch that ends past
    it; resume continues from there."""
    configs = list(configs)
    check_stackable(configs)
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if len(run_dirs) != len(configs) or len({run_dir.resolve() for run_dir in run_dirs}) != len(run_dirs):
        raise ValueError("a stack needs one distinct run directory per configuration")
    config = configs[0]
    torch_device = resolve_device(device)
    if resume:
        settle_staged_checkpoints([run_dir for run_dir in run_dirs if run_dir.is_dir()])
    resume_from = [check_run_dir(c, run_dir, resume) for c, run_dir in zip(configs, run_dirs, strict=True)]
    if len({path is None for path in resume_from}) > 1:
        raise RunError("some runs of this stack have a checkpoint and some have not; resume them one by one")
    data = run_data(config, data_dir, dataset, progress)
    train_split = data.train.subset(config.train_limit)
    check_memory(config, len(train_split), torch_device, models=len(configs))
    train_split = train_split.to(torch_device)
    valid_split = data.valid.to(torch_device)

    models = [build_model(c, train_split.images, torch_device) for c in configs]
    for model, c in zip(models, configs, strict=True):
        if c.init_from is not None:
            load_initial_weights(model, c)
    own_optimizers = [build_optimizer(model, c) for model, c in zip(models, configs, strict=True)]
    continued = resume_from[0] is None and continues_optimizer(config)  # all or none (check_stackable)
    if continued:
        for model, own, c in zip(models, own_optimizers, configs, strict=True):
            load_initial_optimizer(own, model, c)
    generators = [torch.Generator(device=torch_device).manual_seed(c.seed) for c in configs]
    epochs_done, elapsed = 0, 0.0
    if resume_from[0] is not None:
        progress_states = [
            check_progress(path, restore_checkpoint(path, model, own, generator), config)
            for model, own, generator, path in zip(models, own_optimizers, generators, resume_from, strict=True)
        ]
        if len({epochs for epochs, _ in progress_states}) != 1:
            raise RunError("the runs of this stack were saved at different epochs; resume them one by one")
        epochs_done, elapsed = progress_states[0]
    checkpoint_epoch = epochs_done if resume_from[0] is not None else None

    stack = ModelStack(models)
    optimizer = stack.build_optimizer(config)
    if resume_from[0] is not None or continued:
        stack.import_optimizer_states(optimizer, models, own_optimizers)
    # Everything is checked: only now is anything written.
    for c, run_dir in zip(configs, run_dirs, strict=True):
        create_run_dir(c, run_dir)
        truncate_metrics(run_dir / METRICS_FILE, epochs_done)
    step = StackedStep(stack, [c.objective for c in configs], config.estimator, step_mode(torch_device, compile_model))

    n_train = len(train_split)
    stop_epoch = config.total_epochs if max_epochs is None else min(config.total_epochs, epochs_done + max_epochs)
    stage_ends = config.stage_ends()
    names = sorted({c.objective.label() for c in configs})
    desc = f"{len(configs)} stacked: {'+'.join(names)}/{config.estimator} k={config.k}"
    bar = progress_bar(config, n_train, epochs_done, desc, progress)
    last_save = time.monotonic()
    train_bounds: list[float] | None = None
    valid_bounds: list[float] | None = None

    def write_checkpoint(index: int, path: Path) -> None:
        stack.export_optimizer_state(optimizer, index, models[index], own_optimizers[index])
        progress_state = {"epochs_done": epochs_done, "seconds": elapsed}
        save_checkpoint(
            path, models[index], own_optimizers[index], generators[index], progress_state, configs[index].to_json()
        )

    def divergence(indices: list[int], epoch: int, lr: float, what: str) -> RunError:
        return divergence_error([run_dirs[i] for i in indices], epoch, lr, what, checkpoint_epoch, len(models))

    try:
        for epoch in range(epochs_done, stop_epoch):
            stage, lr = config.stage_of_epoch(epoch)
            batch_size, k = config.batch_size_of_stage(stage), config.k_of_stage(stage)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            bound_sums = torch.zeros(len(models), dtype=torch.float64, device=torch_device)
            orders = [minibatch_order(config, n_train, g, torch_device) for g in generators]
            for start in range(0, n_train, batch_size):
                # Each model draws from its own generator in the order a single run draws: binarisation, then noise.
                xs, noises = [], []
                for model, order, generator in zip(models, orders, generators, strict=True):
                    x = binarize(train_split.images[order[start : start + batch_size]], data.binarization, generator)
                    xs.append(x)
                    noises.append(model.draw_noise(x, k, generator))
                bounds = step(torch.stack(xs), [torch.stack(layer) for layer in zip(*noises, strict=True)])
                if config.loss_reduction == "sum":
                    scale_gradients(stack.parameters(), xs[0].shape[0])
                optimizer.step()
                bound_sums += bounds.sum(dim=1)
                bar.update(1)
            seconds = time.perf_counter() - started
            elapsed += seconds
            stack.write_to(models)
            train_bounds = (bound_sums / n_train).tolist()
            finite = stack.finite_models()
            diverged = [i for i, ok in enumerate(finite) if not (ok and math.isfinite(train_bounds[i]))]
            if diverged:
                raise divergence(diverged, epoch + 1, lr, "non-finite training bound or parameters")
            valid_bounds = []
            for model, c in zip(models, configs, strict=True):
                model.eval()
                valid_bounds.append(validation_bound(model, c, valid_split, data.binarization, epochs_done))
            diverged = [i for i, bound in enumerate(valid_bounds) if not math.isfinite(bound)]
            if diverged:
                raise divergence(diverged, epoch + 1, lr, "non-finite validation bound")
            for index, c in enumerate(configs):
                append_metrics(
                    run_dirs[index], c, epoch, train_bounds[index], valid_bounds[index], seconds, n_train,
                    stacked=len(models),
                )  # fmt: skip
            bar.set_postfix(epoch=epoch + 1, lr=lr, bound=f"{max(train_bounds):.2f}")
            epochs_done = epoch + 1
            late = deadline is not None and time.monotonic() >= deadline
            due = time.monotonic() - last_save >= checkpoint_minutes * 60
            if epoch in stage_ends or due or late or epochs_done == stop_epoch:
                _commit_checkpoints(run_dirs, write_checkpoint)
                last_save, checkpoint_epoch = time.monotonic(), epochs_done
            if late:
                break
    finally:
        bar.close()
    complete = epochs_done == config.total_epochs
    results = []
    for index, (model, c, run_dir) in enumerate(zip(models, configs, run_dirs, strict=True)):
        if complete:
            save_model(run_dir / MODEL_FILE, model, c.to_json())
        results.append(
            FitResult(
                run_dir,
                epochs_done,
                None if train_bounds is None else train_bounds[index],
                None if valid_bounds is None else valid_bounds[index],
                elapsed,
                complete,
                step.description,
            )
        )
    return results
