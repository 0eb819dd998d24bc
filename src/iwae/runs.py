"""The run directory: where a training run keeps its configuration, checkpoints, metrics and results.

Layout::

    RUN/config.json              the TrainConfig (also inside every checkpoint)
    RUN/checkpoint.safetensors   latest resumable state (model, optimiser, RNG, progress)
    RUN/model.safetensors        final parameters, written when the schedule is complete
    RUN/metrics.jsonl            one JSON object per epoch
    RUN/eval.json                written by ``iwae eval`` (its latest result; each also in eval-<settings>.json)
    RUN/.lock                    held by the one process that writes the run (:func:`hold_run`)

Every file is checked as it is read: a ``config.json`` that is not a valid configuration, a model or checkpoint
that is damaged, incomplete or another architecture's (:class:`iwae.checkpoint.CheckpointError`), or a model with
non-finite parameters raises an error with a one-line message naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from iwae import locks
from iwae.checkpoint import check_model_state, load_model_state, nonfinite_tensors
from iwae.config import TrainConfig
from iwae.models import LatentVariableModel
from iwae.names import DEVICE_PATTERN

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"


class RunError(RuntimeError):
    """A run directory is missing or incomplete (the message says what to do)."""


class DivergenceError(RunError):
    """Training reached a non-finite bound or non-finite parameters, and stopped.

    Nothing non-finite was written: each run keeps its last finite checkpoint. ``run_dirs`` are the runs that
    diverged, ``epoch`` the (1-based) epoch in which they did.
    """

    def __init__(self, message: str, run_dirs: Sequence[Path] = (), epoch: int | None = None) -> None:
        super().__init__(message)
        self.run_dirs = tuple(Path(run_dir) for run_dir in run_dirs)
        self.epoch = epoch


@contextmanager
def hold_run(run_dir: str | Path) -> Iterator[None]:
    """Be the run's one writer for the block: hold ``RUN/.lock`` (created if missing; the folder must exist).
    Training of any kind (:func:`iwae.train.fit_runs`, a sweep's worker) takes it; the holding thread may take it
    again.

    Raises:
        iwae.locks.LockBusy: another process holds it: one line naming that process.
        iwae.files.LinkRefused: ``RUN/.lock`` is a symbolic link.
    """
    hint = "wait for it to end, or choose another --out"
    with locks.hold(Path(run_dir) / LOCK_FILE, what=f"run {run_dir}", hint=hint):
        yield


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device that ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` names, if this machine has it."""
    device = str(device)
    if not DEVICE_PATTERN.fullmatch(device):
        raise RunError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"--device {device} asked for CUDA, but torch sees no CUDA device; use --device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise RunError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 up")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps asked for Apple's GPU, but torch sees none; use --device cpu")
    return torch.device(device)


def load_config(run_dir: Path) -> TrainConfig:
    """The run's :class:`TrainConfig`, from ``config.json``.

    Raises:
        RunError: the file is missing or no valid configuration (the message names it).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); train one with 'iwae train'")
    try:
        return TrainConfig.from_json(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON ({error}); restore it, or train the run again") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not a valid configuration ({error}); restore it, or train the run again") from None


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[LatentVariableModel, TrainConfig]:
    """The run's final model, or its latest checkpoint if training has not finished, in eval mode on ``device``.

    Returns:
        ``(model, config)``.

    Raises:
        RunError: no config, no model file, or non-finite parameters.
        iwae.checkpoint.CheckpointError: the file lacks the architecture's tensors in their shapes.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        path = run_dir / name
        if path.is_file():
            state, _ = load_model_state(path)
            model = LatentVariableModel(config.model)
            check_model_state(path, state, model)
            nonfinite = nonfinite_tensors(state)
            if nonfinite:
                raise RunError(
                    f"{path} holds non-finite parameters ({len(nonfinite)} tensor(s), such as model.{nonfinite[0]}): "
                    "the run diverged; train it again with a lower --lr"
                )
            model.load_state_dict(state)
            return model.to(device).eval(), config
    raise RunError(f"{run_dir} has no {MODEL_FILE} or {CHECKPOINT_FILE}; train (or resume) it first")


def parse_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, one dict per epoch.

    A last line cut short (a kill mid-write) is left out; any other line that is not a JSON object with an
    ``epoch`` raises :class:`RunError`.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by an interrupted write: dropped, and rewritten when the run resumes
            raise RunError(f"{path}, line {number}, is not JSON; delete that line and resume") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunError(f"{path}, line {number}, is not an epoch's record; delete that line and resume")
        records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records (:func:`parse_metrics`); ``[]`` if it has none yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return parse_metrics(path)
