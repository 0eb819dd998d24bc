"""Training with Burda et al.'s protocol: Adam, staged learning rates, minibatch 20, dynamic binarisation.

``fit(config, run_dir)`` trains a model described by a :class:`~iwae.config.TrainConfig`, writing
checkpoints (after every stage, and at epoch ends every few minutes) and per-epoch metrics into
``run_dir``. ``fit(..., resume=True)`` continues an interrupted run; on the CPU its final
parameters equal those of an uninterrupted run with the same seed. One ``torch.Generator``,
seeded from the config, drives shuffling, binarisation and the latent noise, and its state is
saved in every checkpoint.

Shape convention: minibatches ``x`` are ``[batch, x_dim]``; log-weights ``[k, batch]``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from iwae import bounds, estimators
from iwae.checkpoint import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint, save_model
from iwae.config import TrainConfig, config_differences
from iwae.data import Dataset, Split, binarize, load_dataset
from iwae.models import LatentVariableModel
from iwae.protocol import Model
from iwae.runs import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, RunError, load_config, resolve_device


@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    train_bound: float | None
    valid_bound: float | None
    seconds: float
    complete: bool
    gradients: str = "autograd"  # the step path's description (StepPath.description)


def build_model(config: TrainConfig, train_images: torch.Tensor, device: torch.device) -> LatentVariableModel:
    """A freshly initialised model (seeded): Glorot weights, output bias from the mean training pixel."""
    torch.manual_seed(config.seed)
    model = LatentVariableModel(config.model)
    model.set_output_bias(train_images.mean(dim=0))
    return model.to(device)


def load_initial_weights(model: LatentVariableModel, config: TrainConfig) -> None:
    """Start from the final weights of the finished run ``config.init_from`` (same architecture)."""
    source = Path(config.init_from)
    source_config = load_config(source)
    if source_config.model != config.model:
        raise RunError(f"--init-from {source}: its architecture differs from this run's; use the same --layers")
    if not (source / MODEL_FILE).is_file():
        raise RunError(f"--init-from {source}: no {MODEL_FILE}, the run has not finished; finish it first")
    state, _ = load_model_state(source / MODEL_FILE)
    model.load_state_dict(state)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam with the config's betas and epsilon; the fused kernel (one pass per parameter tensor, several
    times faster than the multi-tensor loop on the CPU) where the device has one."""
    lr = config.stages[0][1]
    device = next(model.parameters()).device
    kernel = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.Adam(
        model.parameters(), lr=lr, betas=(config.beta1, config.beta2), eps=config.adam_eps, **kernel
    )


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiling scope and ``torch.compile`` guard, which
    cost about 1% of a minibatch-20 step on this project's CPU."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


@dataclass(frozen=True)
class StepPath:
    """How a run's training steps get their gradients and update the parameters.

    ``accumulate(model, x, noise)`` adds the estimator's loss gradients to ``.grad`` and returns the bound
    ``[batch]`` (None: the reference path, :func:`iwae.estimators.estimate` and autograd); ``optimizer_step``
    replaces ``optimizer.step()`` (None: ``optimizer.step()``). ``description`` says which path runs, for the
    run's summary and the benchmark; it starts with ``fast:`` where :mod:`iwae.fast` serves the gradients.
    """

    description: str = "autograd"
    accumulate: Callable[[Model, torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None
    optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None
    compiled_estimate: Callable[..., estimators.EstimatorTerms] | None = None


REFERENCE_PATH = StepPath()


def choose_step_path(model: Model, config: TrainConfig, *, compile_model: bool = False, fast: bool = True) -> StepPath:
    """The step path of a run, decided once: ``torch.compile`` of the reference path with ``compile_model``; else
    what :mod:`iwae.fast` serves (with ``fast``, its switches permitting); else the reference path."""
    if compile_model:
        return StepPath("torch.compile", compiled_estimate=compile_estimate())
    if not fast:
        return REFERENCE_PATH
    # The one place the core consults the speed layer. Imported here, not at the top: iwae.fast sits above the core
    # (it imports the models and this module) and is optional for every other use of the package.
    from iwae import fast as fast_layer

    return fast_layer.training_path(model, config.objective, config.estimator)


def training_step(
    model: Model,
    x: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    path: StepPath = REFERENCE_PATH,
    k: int | None = None,
) -> torch.Tensor:
    """Draw k samples (``config.k`` unless given: a k schedule's stage) for minibatch ``x`` ``[batch, ...]``, add
    the estimator's loss gradient to ``.grad``.

    Returns the reported bound ``[batch]``; the caller clears gradients before and steps the optimiser after
    (:func:`optimizer_step`). Every path draws the same noise from ``generator``: the reference path
    (:func:`iwae.estimators.estimate` and :func:`iwae.estimators.backward`; vae/iwae with the standard estimator
    are then exactly ``-surrogate.mean()`` backpropagated once), a compiled
    :func:`iwae.estimators.estimate_from_noise`, or the fast layer's ``accumulate``.
    """
    k = config.k if k is None else k
    if path.accumulate is not None:
        return path.accumulate(model, x, model.draw_noise(x, k, generator))
    if path.compiled_estimate is not None:
        noise = model.draw_noise(x, k, generator)
        terms = path.compiled_estimate(model, x, noise, config.objective, config.estimator)
    else:
        terms = estimators.estimate(model, x, k, generator, config.objective, config.estimator)
    estimators.backward(model, terms)
    return terms.bound


def optimizer_step(optimizer: torch.optim.Optimizer, path: StepPath = REFERENCE_PATH) -> None:
    """``optimizer.step()``, or the path's replacement for it."""
    if path.optimizer_step is not None:
        path.optimizer_step(optimizer)
    else:
        optimizer.step()


def compile_estimate() -> Callable[..., estimators.EstimatorTerms]:
    """:func:`iwae.estimators.estimate_from_noise` through ``torch.compile``: the model, bound and surrogates
    as one graph forward and one backward (``iwae train --compile``)."""
    return torch.compile(estimators.estimate_from_noise)


@torch.no_grad()
def mean_bound(
    model: LatentVariableModel,
    split: Split,
    k: int,
    binarization: str,
    generator: torch.Generator,
    batch_size: int = 100,
) -> float:
    """Mean IWAE bound L_k over a split (binarised once with ``generator``)."""
    total = 0.0
    for start in range(0, len(split), batch_size):
        x = binarize(split.images[start : start + batch_size], binarization, generator)
        total += bounds.iwae_bound(model.log_weights(x, k, generator)).double().sum().item()
    return total / len(split)


def total_steps(config: TrainConfig, n_train: int) -> int:
    """Minibatches in the whole schedule, each stage at its own minibatch size."""
    return sum(
        passes * math.ceil(n_train / config.batch_size_of_stage(i)) for i, (passes, _) in enumerate(config.stages)
    )


def steps_before(config: TrainConfig, n_train: int, epochs_done: int) -> int:
    """Minibatches in the schedule's first ``epochs_done`` epochs."""
    return sum(math.ceil(n_train / config.batch_size_of_stage(config.stage_of_epoch(e)[0])) for e in range(epochs_done))


def prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> Path | None:
    """Create the run directory, or check the one to resume; return the checkpoint to resume from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    checkpoint = run_dir / CHECKPOINT_FILE
    if config_path.is_file():
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        saved = TrainConfig.from_json(config_path.read_text())
        differences = config_differences(saved, config)
        if differences:
            raise RunError(
                f"{run_dir} was started with different settings ({', '.join(differences)}); "
                "resume with the same arguments, or choose another --out"
            )
        return checkpoint if checkpoint.is_file() else None
    atomic_write_text(config_path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return None


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def fit(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    data_dir: str | None = None,
    dataset: Dataset | None = None,
    progress: bool = True,
    checkpoint_minutes: float = 2.0,
    max_epochs: int | None = None,
    compile_model: bool = False,
    fast: bool = True,
) -> FitResult:
    """Train (or resume) a run; see the module docstring.

    Args:
        dataset: an already loaded dataset (otherwise ``config.dataset`` is loaded from ``data_dir``).
        max_epochs: stop after this many epochs in this call (the run can be resumed later).
        compile_model: take training steps through :func:`compile_estimate` (the noise is still drawn
            eagerly from the run's generator, so only rounding differs from the eager path).
        fast: let :mod:`iwae.fast` serve what it can (:func:`choose_step_path`); False runs the reference path.
    """
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    resume_from = prepare_run_dir(config, run_dir, resume)
    data = dataset if dataset is not None else load_dataset(config.dataset, data_dir, progress=progress)
    train_split = data.train.subset(config.train_limit).to(torch_device)
    valid_split = data.valid.to(torch_device)

    model = build_model(config, train_split.images, torch_device)
    if config.init_from is not None:
        load_initial_weights(model, config)
    optimizer = build_optimizer(model, config)
    path = choose_step_path(model, config, compile_model=compile_model, fast=fast)
    generator = torch.Generator(device=torch_device).manual_seed(config.seed)
    epochs_done, elapsed = 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)
        generator.set_state(state.rng_state)
        epochs_done, elapsed = state.progress["epochs_done"], state.progress["seconds"]
    truncate_metrics(run_dir / METRICS_FILE, epochs_done)

    n_train = len(train_split)
    stop_epoch = config.total_epochs if max_epochs is None else min(config.total_epochs, epochs_done + max_epochs)
    stage_ends = config.stage_ends()
    bar = tqdm(
        total=total_steps(config, n_train),
        initial=steps_before(config, n_train, epochs_done),
        unit="batch",
        desc=f"{config.objective.label()}/{config.estimator} k={config.k}",
        disable=not progress,
        dynamic_ncols=True,
    )
    last_save = time.monotonic()
    train_bound = valid_bound = None
    try:
        for epoch in range(epochs_done, stop_epoch):
            stage, lr = config.stage_of_epoch(epoch)
            batch_size, k = config.batch_size_of_stage(stage), config.k_of_stage(stage)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            model.train()
            bound_sum = torch.zeros((), dtype=torch.float64, device=torch_device)
            order = torch.randperm(n_train, generator=generator, device=torch_device)
            for start in range(0, n_train, batch_size):
                x = binarize(train_split.images[order[start : start + batch_size]], data.binarization, generator)
                clear_gradients(optimizer)
                batch_bound = training_step(model, x, config, generator, path, k)
                optimizer_step(optimizer, path)
                bound_sum += batch_bound.detach().sum()
                bar.update(1)
            seconds = time.perf_counter() - started
            elapsed += seconds
            model.eval()
            train_bound = bound_sum.item() / n_train
            # Monitoring draws from its own generator, so it never changes the training trajectory.
            valid_generator = torch.Generator(device=torch_device).manual_seed(config.seed + 7919 * epochs_done)
            valid_bound = mean_bound(model, valid_split, config.valid_k, data.binarization, valid_generator)
            record = {
                "epoch": epoch + 1,
                "stage": stage,
                "lr": lr,
                **({"batch_size": batch_size} if config.stage_batch_sizes is not None else {}),
                **({"k": k} if config.stage_k is not None else {}),
                "train_bound": train_bound,
                f"valid_L{config.valid_k}": valid_bound,
                "seconds": seconds,
                "examples_per_second": n_train / seconds,
            }
            with open(run_dir / METRICS_FILE, "a") as metrics:
                metrics.write(json.dumps(record) + "\n")
            bar.set_postfix(epoch=epoch + 1, lr=lr, bound=f"{train_bound:.2f}", valid=f"{valid_bound:.2f}")
            epochs_done = epoch + 1
            due = time.monotonic() - last_save >= checkpoint_minutes * 60
            if epoch in stage_ends or due or epochs_done == stop_epoch:
                progress_state = {"epochs_done": epochs_done, "seconds": elapsed}
                save_checkpoint(
                    run_dir / CHECKPOINT_FILE, model, optimizer, generator, progress_state, config.to_json()
                )
                last_save = time.monotonic()
    finally:
        bar.close()
    complete = epochs_done == config.total_epochs
    if complete:
        save_model(run_dir / MODEL_FILE, model, config.to_json())
    return FitResult(run_dir, epochs_done, train_bound, valid_bound, elapsed, complete, path.description)
