"""The run directory: where a training run keeps its configuration, checkpoints, metrics and results.

Layout::

    RUN/config.json              the TrainConfig (also inside every checkpoint)
    RUN/checkpoint.safetensors   latest resumable state (model, optimiser, RNG, progress)
    RUN/model.safetensors        final parameters, written when the schedule is complete
    RUN/metrics.jsonl            one JSON object per epoch
    RUN/eval.json                written by ``iwae eval``
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from iwae.checkpoint import load_model_state
from iwae.config import TrainConfig
from iwae.models import LatentVariableModel

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


class RunError(RuntimeError):
    """A run directory is missing or incomplete (the message says what to do)."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {device} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def load_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); train one with 'iwae train'")
    return TrainConfig.from_json(path.read_text())


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[LatentVariableModel, TrainConfig]:
    """The run's final model, or its latest checkpoint if training has not finished."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        path = run_dir / name
        if path.is_file():
            state, _ = load_model_state(path)
            model = LatentVariableModel(config.model)
            model.load_state_dict(state)
            return model.to(device).eval(), config
    raise RunError(f"{run_dir} has no {MODEL_FILE} or {CHECKPOINT_FILE}; train (or resume) it first")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
