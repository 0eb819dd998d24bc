"""The run lifecycle: N >= 1 runs trained with Burda et al.'s protocol (Adam, staged learning rates, minibatch 20,
dynamic binarisation), each into its own run directory.

:func:`fit_runs` is the one epoch loop of the package; :func:`fit` is it for one run. For each run it writes
``config.json``, per-epoch metrics and checkpoints (after every stage, at epoch ends every few minutes, at a
``deadline`` and at the end; the runs' checkpoints committed together), and the final model. ``resume=True`` continues
interrupted runs; on the CPU their final parameters equal those of uninterrupted ones. One ``torch.Generator`` per run,
seeded from its config, drives shuffling, binarisation and the latent noise; its state is in every checkpoint. The
step (one model's fast path, or one vmapped step for all) is :func:`iwae.steps.select_step`'s choice.

The config also says how the authors' code (github yburda/iwae) differs (``protocol = "authors"``;
docs/protocol.md): the optimiser (:func:`iwae.steps.optimizer_for`), the data order (:func:`minibatch_order`), the
minibatch's loss (mean or sum), the binarisation and the training images (:func:`run_data`). A run continued from
another (``init_from``) starts from its final weights and, unless ``fresh_optimizer``, its optimiser's state
(:func:`load_initial_optimizer`), as the authors' Table 2 did.

Everything is checked before anything is written (run directories and the names in them, none a symbolic link;
configs and checkpoints, the ``init_from`` runs, the data, the memory: :func:`iwae.memory.check_memory`), so a refused
call leaves the disk as it was. Then the call becomes each run's one writer (:func:`take_runs`: the run's lock, and a
second look at its files, which must be as they were checked). Runs that diverge (a non-finite bound or parameter, or a
bound no sound model gives: :func:`implausible_bound`) stop at the end of that epoch with a
:class:`~iwae.runs.DivergenceError`, before its metrics or checkpoints are written: the last finite checkpoints stay.

Shape convention: minibatches ``x`` are ``[batch, x_dim]``; log-weights ``[k, batch]``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from iwae import bounds
from iwae.checkpoint import (
    WriteError,
    atomic_write_text,
    check_model_state,
    check_optimizer_state,
    load_checkpoint,
    load_model_state,
    nonfinite_tensors,
    remove_temporaries,
    restore_checkpoint,
    save_checkpoint,
    save_model,
)
from iwae.config import TrainConfig, config_differences
from iwae.data import Dataset, Split, binarize, for_run, load_dataset
from iwae.files import append_text, check_derived, check_name_lengths, resolved
from iwae.memory import check_memory
from iwae.models import LatentVariableModel
from iwae.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EVAL_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    DivergenceError,
    RunError,
    hold_run,
    load_config,
    parse_metrics,
    read_metrics,
    resolve_device,
)
from iwae.stacked import check_stackable, continues_optimizer
from iwae.steps import Step, build_optimizer, optimizer_for, select_step


@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    train_bound: float | None
    valid_bound: float | None
    seconds: float
    complete: bool
    gradients: str = "autograd"  # the step's description (iwae.steps.select_step)


def build_model(config: TrainConfig, train_images: torch.Tensor, device: torch.device) -> LatentVariableModel:
    """A freshly initialised model (seeded): Glorot weights, zero biases, and the output bias from the mean training
    pixel (Burda's) unless ``config.output_bias`` is ``"zero"``."""
    torch.manual_seed(config.seed)
    model = LatentVariableModel(config.model)
    if config.output_bias == "data-mean":
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


def progress_bar(
    config: TrainConfig, n_train: int, epochs_done: int, desc: str, enabled: bool, passes_per_epoch: int = 1
) -> tqdm:
    """The bar of the minibatches over the whole schedule (each stage at its own minibatch), from where the runs
    are; ``passes_per_epoch``: the groups of models that take their own pass each epoch."""
    return tqdm(
        total=total_steps(config, n_train) * passes_per_epoch,
        initial=steps_before(config, n_train, epochs_done) * passes_per_epoch,
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
    append_text(run_dir / METRICS_FILE, json.dumps(record, allow_nan=False) + "\n", "the run's metrics")


def check_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> Path | None:
    """Check, reading only, that ``run_dir`` can take this run: a new folder, or with ``resume`` a run of the same
    settings. Returns the checkpoint to resume from (None: start afresh)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run directory; choose another --out")
    if not (run_dir / CONFIG_FILE).is_file():
        if (run_dir / METRICS_FILE).exists():
            raise RunError(
                f"{run_dir} holds a {METRICS_FILE} but no {CONFIG_FILE}, so it is no run to continue and no new "
                "folder; remove the file, or choose another --out"
            )
        return None
    if not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    differences = config_differences(load_config(run_dir), config)
    if differences:
        raise RunError(
            f"{run_dir} was started with different settings ({', '.join(differences)}); "
            "resume with the same arguments, or choose another --out"
        )
    read_metrics(run_dir)  # a damaged metrics file is refused now, not after the first epoch
    checkpoint = run_dir / CHECKPOINT_FILE
    return checkpoint if checkpoint.is_file() else None


def check_run_names(run_dir: Path) -> None:
    """Refuse, reading only, a run directory that is a loop of links or a link to nothing, whose name is too long,
    or in which one of the names its writers create (:data:`RUN_NAMES`) is a symbolic link."""
    resolved(run_dir, "--out")
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunError(f"{run_dir} is a symbolic link to nothing; remove it, or choose another --out")
    check_name_lengths(run_dir, "--out")
    for name in RUN_NAMES:
        check_derived(run_dir / name, "the run's")


def run_state(run_dir: Path) -> tuple[tuple[int, ...] | None, ...]:
    """What a writer changes in a run directory: (inode, size, mtime) of each of its files (None: missing), read
    once before the checks and again under the run's lock, so that a run another process wrote in between is
    refused instead of overwritten; and the folder's own (inode, whether it is a link), so that a folder swapped for
    a link in between is refused too."""
    state: list[tuple[int, ...] | None] = []
    try:
        folder = os.lstat(run_dir)
        state.append((folder.st_ino, int(os.path.islink(run_dir))))
    except OSError:
        state.append(None)
    for name in (CONFIG_FILE, CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE):
        try:
            stat = os.lstat(run_dir / name)
            state.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


def create_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Create the run directory and its ``config.json`` (a resumed run's is kept)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(run_dir, error, existed=False) from error
    if not (run_dir / CONFIG_FILE).is_file():
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def take_runs(
    configs: Sequence[TrainConfig], run_dirs: Sequence[Path], states: Sequence[tuple], held: ExitStack
) -> None:
    """Become the one writer of every run (:func:`iwae.runs.hold_run`, held until ``held`` closes), create the new
    ones, and delete what an earlier writer killed mid-write left behind. ``states`` are the runs'
    :func:`run_state` as they were checked.

    Raises:
        iwae.locks.LockBusy: another process holds a run.
        RunError: another process wrote to a run after it was checked.
    """
    for run_dir, state in zip(run_dirs, states, strict=True):  # every run held and unchanged before any is written
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WriteError(run_dir, error, existed=False) from error
        held.enter_context(hold_run(run_dir))
        now = run_state(run_dir)
        if state[0] is None and now[0] is not None and not now[0][1]:  # a new folder, made just now, no link
            now = (None, *now[1:])
        if now != state:
            raise RunError(
                f"{run_dir} changed while this call checked it: another process wrote to it; "
                "rerun (with --resume to continue what it wrote), or choose another --out"
            )
    for config, run_dir in zip(configs, run_dirs, strict=True):
        remove_temporaries(run_dir, TEMPORARY_NAMES)
        create_run_dir(config, run_dir)


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed), and a last line
    that an interrupted write left torn."""
    if not path.is_file():
        return
    kept = [record for record in parse_metrics(path) if record["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


# -- divergence ---------------------------------------------------------------------------------------------------
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




# -- checkpoints of N runs, committed together ---------------------------------------------------------------------
STAGED_CHECKPOINT = "checkpoint.next.safetensors"
COMMIT_MARKER = "stack-commit.json"
# Every name the run's writers create in it: none may be a symbolic link (check_run_names), and the temporaries of
# the whole-file ones are deleted when a writer takes the run (take_runs).
TEMPORARY_NAMES = (CONFIG_FILE, CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, STAGED_CHECKPOINT, COMMIT_MARKER,
                   EVAL_FILE)  # fmt: skip
RUN_NAMES = (*TEMPORARY_NAMES, LOCK_FILE)


def settle_staged_checkpoints(run_dirs: Sequence[Path]) -> None:
    """Finish, or undo, a checkpoint commit that a kill interrupted. Every staged checkpoint was complete once any
    run holds the commit marker: then they move into place; without a marker they are deleted (the previous
    checkpoints stand)."""
    def is_file(path: Path) -> bool:  # a plain file: a planted link is never taken for one
        return path.is_file() and not path.is_symlink()

    committed = any(is_file(run_dir / COMMIT_MARKER) for run_dir in run_dirs)
    for run_dir in run_dirs:
        staged = run_dir / STAGED_CHECKPOINT
        if is_file(staged) and committed:
            os.replace(staged, run_dir / CHECKPOINT_FILE)
        elif os.path.lexists(staged):
            staged.unlink()
    for run_dir in run_dirs:
        (run_dir / COMMIT_MARKER).unlink(missing_ok=True)


def interrupted_commit(run_dir: Path) -> bool:
    """Whether a kill interrupted a checkpoint commit in ``run_dir`` (:func:`settle_staged_checkpoints` settles)."""
    return any(os.path.lexists(run_dir / name) for name in (STAGED_CHECKPOINT, COMMIT_MARKER))


def commit_checkpoints(run_dirs: Sequence[Path], write: Callable[[int, Path], None]) -> None:
    """Write every run's checkpoint to its staged file, mark the commit, move them into place, unmark: a kill at
    any moment leaves every run at the same epoch (:func:`settle_staged_checkpoints`)."""
    for index, run_dir in enumerate(run_dirs):
        write(index, run_dir / STAGED_CHECKPOINT)
    marker = json.dumps({"stack": [str(run_dir) for run_dir in run_dirs]}) + "\n"
    for run_dir in run_dirs:
        atomic_write_text(run_dir / COMMIT_MARKER, marker)
    for run_dir in run_dirs:
        os.replace(run_dir / STAGED_CHECKPOINT, run_dir / CHECKPOINT_FILE)
    for run_dir in run_dirs:
        (run_dir / COMMIT_MARKER).unlink(missing_ok=True)


# -- the lifecycle -------------------------------------------------------------------------------------------------
@dataclass
class _Runs:
    """N >= 1 runs, checked and built, before anything is written."""

    configs: list[TrainConfig]
    run_dirs: list[Path]
    data: Dataset
    train_split: Split
    valid_split: Split
    models: list[LatentVariableModel]
    optimizers: list[torch.optim.Optimizer]
    generators: list[torch.Generator]
    epochs_done: int
    elapsed: float
    checkpoint_epoch: int | None  # the epoch of the runs' last checkpoint (None: none yet)
    previous: list[tuple[float | None, float | None]]  # each run's last (training, validation) bound, if any


def _prepare(
    configs: list[TrainConfig],
    run_dirs: list[Path],
    resume: bool,
    device: torch.device,
    data_dir: str | None,
    dataset: Dataset | None,
    progress: bool,
) -> _Runs:
    """Check and build the runs, reading only."""
    check_stackable(configs)
    if len(run_dirs) != len(configs) or len({resolved(run_dir, "--out") for run_dir in run_dirs}) != len(run_dirs):
        raise ValueError("training several runs needs one distinct run directory per configuration")
    config = configs[0]
    resume_from = [check_run_dir(c, run_dir, resume) for c, run_dir in zip(configs, run_dirs, strict=True)]
    if len({path is None for path in resume_from}) > 1:
        raise RunError("some runs of this stack have a checkpoint and some have not; resume them one by one")
    data = run_data(config, data_dir, dataset, progress)
    train_split = data.train.subset(config.train_limit)
    check_memory(config, len(train_split), device, models=len(configs))
    train_split = train_split.to(device)
    valid_split = data.valid.to(device)

    models = [build_model(c, train_split.images, device) for c in configs]
    for model, c in zip(models, configs, strict=True):
        if c.init_from is not None:
            load_initial_weights(model, c)
    optimizers = [build_optimizer(model, c) for model, c in zip(models, configs, strict=True)]
    if resume_from[0] is None and continues_optimizer(config):  # all or none (check_stackable)
        for model, optimizer, c in zip(models, optimizers, configs, strict=True):
            load_initial_optimizer(optimizer, model, c)
    generators = [torch.Generator(device=device).manual_seed(c.seed) for c in configs]
    epochs_done, elapsed = 0, 0.0
    if resume_from[0] is not None:
        states = [
            check_progress(path, restore_checkpoint(path, model, optimizer, generator), config)
            for model, optimizer, generator, path in zip(models, optimizers, generators, resume_from, strict=True)
        ]
        if len({epochs for epochs, _ in states}) != 1:
            raise RunError("the runs of this stack were saved at different epochs; resume them one by one")
        epochs_done, elapsed = states[0]
    checkpoint_epoch = epochs_done if resume_from[0] is not None else None
    last = [[r for r in read_metrics(run_dir) if r["epoch"] == epochs_done] for run_dir in run_dirs]
    previous = [
        (records[-1].get("train_bound"), records[-1].get(f"valid_L{c.valid_k}")) if records else (None, None)
        for records, c in zip(last, configs, strict=True)
    ]
    return _Runs(configs, run_dirs, data, train_split, valid_split, models, optimizers, generators, epochs_done,
                 elapsed, checkpoint_epoch, previous)  # fmt: skip


# A bound that no sound model gives (docs/cli.md, "Divergence stops the run"). The data are binary and the decoder
# Bernoulli, so log p(x) <= 0 and E[L_k] <= log p(x): a mean bound over the images above CEILING_NATS is no estimate
# of one. Below FLOOR_COIN_FLIPS times the bound of a model that gives every pixel probability 1/2 (-D log 2), or a
# fall from the previous epoch's bound by more than JUMP_NATS and JUMP_FRACTION of it, the run has blown up even
# where every number is still finite (an Adam step at a far too large rate, say).
CEILING_NATS = 1.0
FLOOR_COIN_FLIPS = 10.0
JUMP_NATS = 100.0
JUMP_FRACTION = 0.5


def implausible_bound(bound: float, previous: float | None, n_pixels: int, binary: bool = True) -> str | None:
    """Why an epoch's mean bound (nats per image of ``n_pixels``) means the run diverged, or None if it is
    plausible: non-finite; and, for binary images under a Bernoulli decoder (``binary``; a density of continuous
    data may be above 1, and its scale is the data's), above :data:`CEILING_NATS`, below :data:`FLOOR_COIN_FLIPS` x
    -D log 2, or fallen from ``previous`` (the run's bound the epoch before, None: none) by more than both
    :data:`JUMP_NATS` and :data:`JUMP_FRACTION` of its size."""
    if not math.isfinite(bound):
        return f"{bound}"
    if not binary:
        return None
    if bound > CEILING_NATS:
        return f"{bound:.6g} nats, above 0, which no model of binary images can give"
    floor = -FLOOR_COIN_FLIPS * n_pixels * math.log(2)
    if bound < floor:
        return f"{bound:.6g} nats, below {floor:.0f} ({FLOOR_COIN_FLIPS:g} times a coin flip per pixel)"
    if previous is not None and previous - bound > max(JUMP_NATS, JUMP_FRACTION * abs(previous)):
        return f"{bound:.6g} nats, down from {previous:.6g} the epoch before"
    return None


def _divergence(runs: _Runs, indices: list[int], epoch: int, lr: float, what: str) -> DivergenceError:
    run_dirs = [runs.run_dirs[i] for i in indices]
    return divergence_error(run_dirs, epoch, lr, what, runs.checkpoint_epoch, len(runs.models))


def _train_epoch(runs: _Runs, step: Step, epoch: int, bar: tqdm) -> tuple[list[float], float]:
    """One pass over the training images for every model (each group of the step's in turn): each model's mean
    training bound and the seconds it took. Raises a :class:`~iwae.runs.DivergenceError` where a bound or a
    parameter is non-finite."""
    config, models = runs.configs[0], runs.models
    stage, lr = config.stage_of_epoch(epoch)
    batch_size, k = config.batch_size_of_stage(stage), config.k_of_stage(stage)
    images = runs.train_split.images
    n_train, device = len(images), images.device
    step.set_lr(lr)
    started = time.perf_counter()
    for model in models:
        model.train()
    bound_sums = torch.zeros(len(models), dtype=torch.float64, device=device)
    orders = [minibatch_order(config, n_train, g, device) for g in runs.generators]
    for group in step.groups:  # a whole pass of each group in turn; one group for a single run or a stack
        generators = [runs.generators[i] for i in group]
        group_sums = bound_sums[group.start : group.stop]  # a view, taken once per pass
        for start in range(0, n_train, batch_size):
            xs = [
                binarize(images[orders[i][start : start + batch_size]], runs.data.binarization, g)
                for i, g in zip(group, generators, strict=True)
            ]
            group_sums += step(group, xs, generators, k)
            bar.update(1)
    seconds = time.perf_counter() - started
    step.sync()
    train_bounds = (bound_sums / n_train).tolist()
    finite = step.finite_models()
    n_pixels, binary = images.shape[1], config.model.likelihood == "bernoulli"
    reasons = [
        implausible_bound(bound, previous, n_pixels, binary) if ok else "non-finite parameters"
        for bound, ok, (previous, _) in zip(train_bounds, finite, runs.previous, strict=True)
    ]
    diverged = [i for i, reason in enumerate(reasons) if reason is not None]
    if diverged:
        reason = reasons[diverged[0]]
        what = reason if reason == "non-finite parameters" else f"training bound {reason}"
        what = what if len(models) == 1 else f"{what}, in the first of them"
        raise _divergence(runs, diverged, epoch + 1, lr, what)
    return train_bounds, seconds


def _validate(runs: _Runs, epoch: int, lr: float) -> list[float]:
    """Each model's validation bound after 0-based ``epoch``; a non-finite one is a divergence."""
    valid_bounds = []
    for model, config in zip(runs.models, runs.configs, strict=True):
        model.eval()
        valid_bounds.append(validation_bound(model, config, runs.valid_split, runs.data.binarization, epoch))
    n_pixels, binary = runs.valid_split.images.shape[1], runs.configs[0].model.likelihood == "bernoulli"
    reasons = [
        implausible_bound(bound, previous, n_pixels, binary)
        for bound, (_, previous) in zip(valid_bounds, runs.previous, strict=True)
    ]
    diverged = [i for i, reason in enumerate(reasons) if reason is not None]
    if diverged:
        what = f"validation bound {reasons[diverged[0]]}"
        what = what if len(runs.models) == 1 else f"{what}, in the first of them"
        raise _divergence(runs, diverged, epoch + 1, lr, what)
    return valid_bounds


def fit_runs(
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
    fast: bool = True,
    stack: str = "auto",
    deadline: float | None = None,
) -> list[FitResult]:
    """Train (or resume) N >= 1 runs together, one :class:`FitResult` each; see the module docstring.

    The runs may differ in seed, objective and ``init_from`` only (:func:`iwae.stacked.check_stackable`); they share
    the minibatch loop, each with its own generator, optimiser and run directory, and their checkpoints are committed
    together. :func:`iwae.steps.select_step` chooses the step.

    Args:
        dataset: an already loaded dataset (otherwise ``config.dataset`` is loaded from ``data_dir``).
        max_epochs: stop after this many epochs in this call (the runs can be resumed later).
        compile_model: ``torch.compile`` (CUDA graphs for a stack on CUDA); only rounding differs from eager.
        fast: let :mod:`iwae.fast` serve what it can; False runs the reference path.
        stack: ``auto``, ``on`` or ``off``: one vmapped step for all models (:func:`iwae.steps.stacks`).
        deadline: a ``time.monotonic()`` value: stop, checkpointed, after the first epoch that ends past it.

    Returns:
        One :class:`FitResult` per run; ``seconds`` is the runs' common training time.
    """
    configs = list(configs)
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    torch_device = resolve_device(device)
    for run_dir in run_dirs:
        check_run_names(run_dir)
    with ExitStack() as held:
        if resume and any(run_dir.is_dir() and interrupted_commit(run_dir) for run_dir in run_dirs):
            existing = [run_dir for run_dir in run_dirs if run_dir.is_dir()]
            for run_dir in existing:  # a kill interrupted a commit: settled by the runs' writer, before the checks
                held.enter_context(hold_run(run_dir))
            settle_staged_checkpoints(existing)
        states = [run_state(run_dir) for run_dir in run_dirs]
        runs = _prepare(configs, run_dirs, resume, torch_device, data_dir, dataset, progress)
        step = select_step(runs.models, runs.optimizers, configs, torch_device, compile_model=compile_model,
                           fast=fast, stack=stack)  # fmt: skip
        # Everything is checked: only now is anything written, by the runs' one writer.
        take_runs(configs, run_dirs, states, held)
        for run_dir in run_dirs:
            truncate_metrics(run_dir / METRICS_FILE, runs.epochs_done)
        return _train(runs, step, progress, checkpoint_minutes, max_epochs, deadline)


def _train(
    runs: _Runs, step: Step, progress: bool, checkpoint_minutes: float, max_epochs: int | None, deadline: float | None
) -> list[FitResult]:
    """The epoch loop of :func:`fit_runs`, once the runs are checked and held."""
    configs, run_dirs, models = runs.configs, runs.run_dirs, runs.models
    config = configs[0]
    n_train, n_models = len(runs.train_split), len(models)
    epochs_done, elapsed = runs.epochs_done, runs.elapsed
    stop_epoch = config.total_epochs if max_epochs is None else min(config.total_epochs, epochs_done + max_epochs)
    stage_ends = config.stage_ends()
    desc = f"{'+'.join(sorted({c.objective.label() for c in configs}))}/{config.estimator} k={config.k}"
    desc = desc if n_models == 1 else f"{n_models} runs: {desc}"
    bar = progress_bar(config, n_train, epochs_done, desc, progress, passes_per_epoch=len(step.groups))
    last_save = time.monotonic()
    train_bounds: list[float] | None = None
    valid_bounds: list[float] | None = None

    def write_checkpoint(index: int, path: Path) -> None:
        progress_state = {"epochs_done": epochs_done, "seconds": elapsed}
        save_checkpoint(path, models[index], runs.optimizers[index], runs.generators[index], progress_state,
                        configs[index].to_json())  # fmt: skip

    try:
        for epoch in range(epochs_done, stop_epoch):
            lr = config.stage_of_epoch(epoch)[1]
            train_bounds, seconds = _train_epoch(runs, step, epoch, bar)
            elapsed += seconds
            valid_bounds = _validate(runs, epoch, lr)
            extra = {"stacked": n_models} if n_models > 1 else {}
            for index, c in enumerate(configs):
                append_metrics(run_dirs[index], c, epoch, train_bounds[index], valid_bounds[index], seconds, n_train,
                               **extra)  # fmt: skip
            if n_models == 1:
                postfix = {"bound": f"{train_bounds[0]:.2f}", "valid": f"{valid_bounds[0]:.2f}"}
            else:
                postfix = {"bound": f"{max(train_bounds):.2f}"}
            bar.set_postfix(epoch=epoch + 1, lr=lr, **postfix)
            runs.previous = list(zip(train_bounds, valid_bounds, strict=True))
            epochs_done = epoch + 1
            late = deadline is not None and time.monotonic() >= deadline
            due = time.monotonic() - last_save >= checkpoint_minutes * 60
            if epoch in stage_ends or due or late or epochs_done == stop_epoch:
                commit_checkpoints(run_dirs, write_checkpoint)
                last_save, runs.checkpoint_epoch = time.monotonic(), epochs_done
            if late:
                break
    finally:
        bar.close()
    complete = epochs_done == config.total_epochs
    results = []
    for index, (model, c, run_dir) in enumerate(zip(models, configs, run_dirs, strict=True)):
        if complete:
            save_model(run_dir / MODEL_FILE, model, c.to_json())
        train_bound = None if train_bounds is None else train_bounds[index]
        valid_bound = None if valid_bounds is None else valid_bounds[index]
        results.append(FitResult(run_dir, epochs_done, train_bound, valid_bound, elapsed, complete, step.description))
    return results


def fit(config: TrainConfig, run_dir: str | Path, **options) -> FitResult:
    """Train (or resume) one run: :func:`fit_runs` of one; the same keyword arguments."""
    return fit_runs([config], [run_dir], **options)[0]
