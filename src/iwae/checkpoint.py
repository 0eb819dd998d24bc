"""Checkpoints that are safe to load and written atomically.

Everything lives in one safetensors file: the model's parameters (``model.<name>``), the
optimiser's tensors (``optimizer.<param index>.<key>``), the random generator's state
(``rng_state``) and, in the string metadata, the run's configuration, the optimiser's
hyper-parameters and the training progress as JSON. Nothing is unpickled on load.
A file is written to a temporary name, flushed to disk and renamed over the old one, so an
interruption leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _save_tensors_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_file(contiguous, str(tmp), metadata=metadata)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata


def save_model(path: Path, model: nn.Module, config_json: str) -> None:
    """Save a model's parameters with its configuration (JSON) in the metadata."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    _save_tensors_atomically(path, tensors, {"config": config_json, "format": "iwae-model-1"})


def load_model_state(path: Path) -> tuple[dict[str, Tensor], str]:
    """The parameters and the configuration JSON stored by :func:`save_model` or :func:`save_checkpoint`."""
    tensors, metadata = _read(path)
    state = {name[len("model.") :]: value for name, value in tensors.items() if name.startswith("model.")}
    return state, metadata.get("config", "{}")


@dataclass
class TrainingCheckpoint:
    """What :func:`load_checkpoint` returns: state to restore and the progress it was saved at."""

    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    rng_state: Tensor
    progress: dict[str, Any]
    config_json: str


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    progress: dict[str, Any],
    config_json: str,
) -> None:
    tensors: dict[str, Tensor] = {f"model.{name}": value for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng_state"] = generator.get_state()
    metadata = {
        "format": "iwae-checkpoint-1",
        "config": config_json,
        "progress": json.dumps(progress),
        "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    _save_tensors_atomically(path, tensors, metadata)


def load_checkpoint(path: Path) -> TrainingCheckpoint:
    tensors, metadata = _read(path)
    model_state: dict[str, Tensor] = {}
    optimizer_entries: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("model."):
            model_state[name[len("model.") :]] = value
        elif name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_entries.setdefault(int(index), {})[key] = value
    for index, values in json.loads(metadata.get("optimizer_scalars", "{}")).items():
        optimizer_entries.setdefault(int(index), {}).update(values)
    optimizer_state = {
        "state": optimizer_entries,
        "param_groups": json.loads(metadata["optimizer_param_groups"]),
    }
    return TrainingCheckpoint(
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_state=tensors["rng_state"],
        progress=json.loads(metadata["progress"]),
        config_json=metadata["config"],
    )
