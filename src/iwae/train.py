"""Training with Burda et al.'s protocol: Adam, staged learning rates, minibatch 20, dynamic binarisation.

``fit(config, run_dir)`` trains a model described by a :class:`~iwae.config.TrainConfig`, writing
checkpoints (after every stage, and at epoch ends every few minutes) and per-epoch metrics into
``run_dir``. ``fit(..., resume=True)`` continues an interrupted run; on the CPU its final
parameters equal those of an uninterrupted run with the same seed. One ``torch.Generator``,
seeded from the config, drives shuffling, binarisation and the latent noise, and its state is
saved in every checkpoint.

The config also says how the authors' code (github yburda/iwae) differs, item by item (``protocol = "authors"``
sets them all; docs/protocol.md): the optimiser (``torch.optim.Adam`` or :class:`~iwae.optim.BurdaAdam`,
:func:`optimizer_for`), the data order (:func:`minibatch_order`), the minibatch's loss (mean or sum,
:func:`scale_gradients`), the binarisation and the training images (:func:`run_data`). A run continued from
another (``init_from``) starts from its final weights and, unless ``fresh_optimizer``, its optimiser's state
(:func:`load_initial_optimizer`), as the authors' Table 2 did.

Everything is checked before anything is written (the run directory, its ``config.json`` and checkpoint, the
``init_from`` run, the data, the memory a step needs: :func:`iwae.memory.check_memory`), so a refused run leaves the
disk as it was. A run that diverges stops at the end of the epoch in which its summed bound (read once per epoch
anyway), its parameters or its validation bound became non-finite, with a :class:`~iwae.runs.DivergenceError`, before
that epoch's metrics or checkpoint are written: the last finite checkpoint stays.

Shape convention: minibatches ``x`` are ``[batch, x_dim]``; log-weights ``[k, batch]``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from iwae import bounds, estimators
from iwae.checkpoint import (
    WriteError,
    atomic_write_text,
    check_model_state,
    check_optimizer_state,
    load_checkpoint,
    load_model_state,
    nonfinite_tensors,
    restore_checkpoint,
    save_checkpoint,
    save_model,
)
from iwae.config import TrainConfig, config_differences
from iwae.data import Dataset, Split, binarize, for_run, load_dataset
from iwae.memory import check_memory
from iwae.models import LatentVariableModel
from iwae.optim import build_optimizer as build_optimizer_named
from iwae.protocol import Model
from iwae.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    DivergenceError,
    RunError,
    load_config,
    parse_metrics,
    resolve_device,
)


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
    """Start from the final weights of the finished run ``config.init_from`` (same architecture, all finite)."""
    source = Path(config.init_from)
    try:
        source_config = load_config(source)
    except RunError as error:
        raise RunError(f"--init-from: {error}") from None
    if source_config.model != config.model:
        raise RunError(
            f"--init-from {source}: its architecture differs from this run's; use the same --layers and --latent-dims"
        )
    if not (source / MODEL_FILE).is_file():
        raise RunError(f"--init-from {source}: no {MODEL_FILE}, the run has not finished; finish it first")
    state, _ = load_model_state(source / MODEL_FILE)
    check_model_state(source / MODEL_FILE, state, model)
    if nonfinite_tensors(state):
        raise RunError(f"--init-from {source}: {MODEL_FILE} holds non-finite parameters; start from another run")
    model.load_state_dict(state)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """:func:`optimizer_for` the model's parameters."""
    return optimizer_for(list(model.parameters()), config)


def optimizer_for(parameters: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimiser (:func:`iwae.optim.build_optimizer`: Adam, with the fused kernel where the device has
    one, or the authors' :class:`~iwae.optim.BurdaAdam`) at its first learning rate, betas and epsilon."""
    betas = (config.beta1, config.beta2)
    return build_optimizer_named(config.optimizer, parameters, config.stages[0][1], betas, config.adam_eps)


def load_initial_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, config: TrainConfig) -> None:
    """Continue the optimiser state of the run ``config.init_from`` (its last checkpoint, saved with its final
    weights), as the authors' Table 2 did: the moments and the timestep carry over; the learning rate is this run's.
    Refused where the base used another optimiser, or its checkpoint is not at its end."""
    source = Path(config.init_from)
    source_config = load_config(source)
    if source_config.optimizer != config.optimizer:
        raise RunError(
            f"--init-from {source}: it trained with {source_config.optimizer} and this run with {config.optimizer}; "
            "continue with the same --optimizer, or pass --fresh-optimizer"
        )
    checkpoint = source / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise RunError(
            f"--init-from {source}: no {CHECKPOINT_FILE} to continue its optimiser from; pass --fresh-optimizer"
        )
    saved = load_checkpoint(checkpoint)
    if saved.progress["epochs_done"] != source_config.total_epochs:
        raise RunError(
            f"--init-from {source}: its checkpoint is at epoch {saved.progress['epochs_done']} of "
            f"{source_config.total_epochs}; finish the run first, or pass --fresh-optimizer"
        )
    scratch_model = copy.deepcopy(model)  # the base's optimiser, loaded against parameters of the same shapes
    scratch = optimizer_for(list(scratch_model.parameters()), source_config)
    check_optimizer_state(checkpoint, saved.optimizer_state, scratch)
    try:
        scratch.load_state_dict(saved.optimizer_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise RunError(f"--init-from {source}: its optimiser state does not fit this run ({error})") from None
    own = dict(zip(scratch_model.parameters(), model.parameters(), strict=True))
    for param, state in scratch.state.items():
        optimizer.state[own[param]] = {key: value.clone() for key, value in state.items()}


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


def scale_gradients(parameters: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply the accumulated gradients by ``factor``: the minibatch's summed loss (``loss_reduction = "sum"``, the
    authors' code) has ``batch`` times the gradient of its mean, which every step path computes."""
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_(factor)


def minibatch_order(
    config: TrainConfig, n_train: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The examples of one pass in training order: a fresh permutation from ``generator`` (``shuffled``), or the
    data's own order (``fixed``: minibatch i of every pass is examples ``b*i .. b*i + b - 1``, the authors' code)."""
    if config.data_order == "fixed":
        return torch.arange(n_train, device=device)
    return torch.randperm(n_train, generator=generator, device=device)


def run_data(
    config: TrainConfig, data_dir: str | None = None, dataset: Dataset | None = None, progress: bool = True
) -> Dataset:
    """The run's dataset (``dataset``, else ``config.dataset`` loaded from ``data_dir``) with its binarisation and
    training split (:func:`iwae.data.for_run`)."""
    data = dataset if dataset is not None else load_dataset(config.dataset, data_dir, progress=progress)
    return for_run(data, config.binarization, config.train_split)


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


def progress_bar(config: TrainConfig, n_train: int, epochs_done: int, desc: str, enabled: bool) -> tqdm:
    """The bar of a run's minibatches over the whole schedule (each stage at its own minibatch), from where it is."""
    return tqdm(
        total=total_steps(config, n_train),
        initial=steps_before(config, n_train, epochs_done),
        unit="batch",
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
    )


def validation_bound(
    model: LatentVariableModel, config: TrainConfig, split: Split, binarization: str, epochs_done: int
) -> float:
    """The epoch's monitoring bound L_{valid_k} over ``split``, from its own generator (seeded by the run's seed and
    the epoch), so that it never changes the training trajectory."""
    device = split.images.device
    generator = torch.Generator(device=device).manual_seed(config.seed + 7919 * epochs_done)
    return mean_bound(model, split, config.valid_k, binarization, generator)


def append_metrics(
    run_dir: Path,
    config: TrainConfig,
    epoch: int,
    train_bound: float,
    valid_bound: float,
    seconds: float,
    n_train: int,
    **extra: object,
) -> None:
    """Append 0-based ``epoch``'s line to the run's ``metrics.jsonl`` (strict JSON): its stage, learning rate, the
    stage's minibatch and k where they change by stage, the bounds and the time, then ``extra``."""
    stage, lr = config.stage_of_epoch(epoch)
    record = {
        "epoch": epoch + 1,
        "stage": stage,
        "lr": lr,
        **({"batch_size": config.batch_size_of_stage(stage)} if config.stage_batch_sizes is not None else {}),
        **({"k": config.k_of_stage(stage)} if config.stage_k is not None else {}),
        "train_bound": train_bound,
        f"valid_L{config.valid_k}": valid_bound,
        "seconds": seconds,
        "examples_per_second": n_train / seconds,
        **extra,
    }
    with open(run_dir / METRICS_FILE, "a") as metrics:
        metrics.write(json.dumps(record, allow_nan=False) + "\n")


def check_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> Path | None:
    """Check, reading only, that ``run_dir`` can take this run: a new folder, or with ``resume`` a run of the same
    settings. Returns the checkpoint to resume from (None: start afresh)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run directory; choose another --out")
    if not (run_dir / CONFIG_FILE).is_file():
        return None
    if not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    differences = config_differences(load_config(run_dir), config)
    if differences:
        raise RunError(
            f"{run_dir} was started with different settings ({', '.join(differences)}); "
            "resume with the same arguments, or choose another --out"
        )
    checkpoint = run_dir / CHECKPOINT_FILE
    return checkpoint if checkpoint.is_file() else None


def create_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Create the run directory and its ``config.json`` (a resumed run's is kept)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(run_dir, error, existed=False) from error
    if not (run_dir / CONFIG_FILE).is_file():
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> Path | None:
    """:func:`check_run_dir`, then :func:`create_run_dir`; returns the checkpoint to resume from."""
    checkpoint = check_run_dir(config, run_dir, resume)
    create_run_dir(config, run_dir)
    return checkpoint


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed), and a last line
    that an interrupted write left torn."""
    if not path.is_file():
        return
    kept = [record for record in parse_metrics(path) if record["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


# -- divergence ---------------------------------------------------------------------------------------------------
def finite_parameters(parameters: Iterable[torch.Tensor]) -> bool:
    """Whether every value of ``parameters`` is finite (one host synchronisation)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all())


def divergence_error(
    run_dirs: Sequence[Path], epoch: int, lr: float, what: str, checkpoint_epoch: int | None, stack_size: int = 1
) -> DivergenceError:
    """The one-line :class:`~iwae.runs.DivergenceError` of runs (of a stack of ``stack_size``) that diverged in
    ``epoch`` (1-based); ``checkpoint_epoch`` is the epoch of their last checkpoint (None: none yet)."""
    if checkpoint_epoch is None:
        kept = "no checkpoint had been written yet"
    elif stack_size > 1:
        kept = f"every run of the stack keeps its last finite checkpoint (epoch {checkpoint_epoch})"
    else:
        kept = f"the last finite checkpoint (epoch {checkpoint_epoch}) is kept"
    if stack_size > 1:
        where = f"{len(run_dirs)} of the stack's {stack_size} runs: {', '.join(str(run_dir) for run_dir in run_dirs)}"
        others = " (the others can resume one by one with --resume)" if len(run_dirs) < stack_size else ""
    else:
        where, others = str(run_dirs[0]), ""
    return DivergenceError(
        f"training diverged in epoch {epoch} at learning rate {lr:g} ({what}) in {where}; {kept}; "
        f"train again with a lower --lr in a new --out{others}",
        run_dirs,
        epoch,
    )


def check_progress(path: Path, progress: dict, config: TrainConfig) -> tuple[int, float]:
    """The (epochs done, seconds) of a checkpoint's progress, which must lie within the run's schedule."""
    epochs_done = progress["epochs_done"]
    if epochs_done > config.total_epochs:
        raise RunError(f"{path} is at epoch {epochs_done}, past the schedule's {config.total_epochs}; restore it")
    return epochs_done, float(progress.get("seconds", 0.0))


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
    resume_from = check_run_dir(config, run_dir, resume)
    data = run_data(config, data_dir, dataset, progress)
    train_split = data.train.subset(config.train_limit)
    check_memory(config, len(train_split), torch_device)
    train_split = train_split.to(torch_device)
    valid_split = data.valid.to(torch_device)

    model = build_model(config, train_split.images, torch_device)
    if config.init_from is not None:
        load_initial_weights(model, config)
    optimizer = build_optimizer(model, config)
    if config.init_from is not None and not config.fresh_optimizer and resume_from is None:
        load_initial_optimizer(optimizer, model, config)
    path = choose_step_path(model, config, compile_model=compile_model, fast=fast)
    generator = torch.Generator(device=torch_device).manual_seed(config.seed)
    epochs_done, elapsed = 0, 0.0
    if resume_from is not None:
        state = restore_checkpoint(resume_from, model, optimizer, generator)
        epochs_done, elapsed = check_progress(resume_from, state, config)
    checkpoint_epoch = epochs_done if resume_from is not None else None
    # Everything is checked: only now is anything written.
    create_run_dir(config, run_dir)
    truncate_metrics(run_dir / METRICS_FILE, epochs_done)

    n_train = len(train_split)
    stop_epoch = config.total_epochs if max_epochs is None else min(config.total_epochs, epochs_done + max_epochs)
    stage_ends = config.stage_ends()
    desc = f"{config.objective.label()}/{config.estimator} k={config.k}"
    bar = progress_bar(config, n_train, epochs_done, desc, progress)
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
            order = minibatch_order(config, n_train, generator, torch_device)
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
            if not math.isfinite(train_bound) or not finite_parameters(model.parameters()):
                what = f"training bound {train_bound}" if not math.isfinite(train_bound) else "non-finite parameters"
                raise divergence_error([run_dir], epoch + 1, lr, what, checkpoint_epoch)
            valid_bound = validation_bound(model, config, valid_split, data.binarization, epochs_done)
            if not math.isfinite(valid_bound):
                what = f"validation bound {valid_bound}"
                raise divergence_error([run_dir], epoch + 1, lr, what, checkpoint_epoch)
            append_metrics(run_dir, config, epoch, train_bound, valid_bound, seconds, n_train)
            bar.set_postfix(epoch=epoch + 1, lr=lr, bound=f"{train_bound:.2f}", valid=f"{valid_bound:.2f}")
            epochs_done = epoch + 1
            due = time.monotonic() - last_save >= checkpoint_minutes * 60
            if epoch in stage_ends or due or epochs_done == stop_epoch:
                progress_state = {"epochs_done": epochs_done, "seconds": elapsed}
                save_checkpoint(
                    run_dir / CHECKPOINT_FILE, model, optimizer, generator, progress_state, config.to_json()
                )
                last_save, checkpoint_epoch = time.monotonic(), epochs_done
    finally:
        bar.close()
    complete = epochs_done == config.total_epochs
    if complete:
        save_model(run_dir / MODEL_FILE, model, config.to_json())
    return FitResult(run_dir, epochs_done, train_bound, valid_bound, elapsed, complete, path.description)
