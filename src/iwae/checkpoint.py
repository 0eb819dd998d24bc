"""Checkpoints that are safe to load and written atomically.

Everything lives in one safetensors file: the model's parameters (``model.<name>``), the
optimiser's tensors (``optimizer.<param index>.<key>``), the random generator's state
(``rng_state``) and, in the string metadata, the run's configuration, the optimiser's
hyper-parameters and the training progress as JSON. Nothing is unpickled on load.
A file is written to a temporary name, flushed to disk and renamed over the old one, so an
interruption leaves either the old checkpoint or the new one, never a torn file.

:func:`atomic_write_bytes` is the package's one way to write a file that a user keeps (checkpoints, models,
``config.json``, ``eval.json``, figures, reports, CSV exports): the temporary is created exclusively in the
target's folder under a fresh random name (an existing path, or a symlink planted there, is never opened), and the
rename replaces the target itself (a symlink at the target is replaced, not followed). A failed write (a full disk
above all) removes the temporary, leaves the previous file intact and raises :class:`WriteError` with a one-line
message naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _serialise
from torch import Tensor, nn

_FULL_DISK = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# O_CREAT | O_EXCL: a new file or an error, never an existing path or the target of a symlink.
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
for _flag in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):
    _OPEN_FLAGS |= getattr(os, _flag, 0)


class WriteError(OSError):
    """Writing a file failed (a full disk, a quota, a read-only folder); the previous file, if any, is intact.

    An :class:`OSError` (``errno`` and ``filename`` are the cause's), whose ``str`` is one line: the path, the
    reason and what to do.
    """

    def __init__(self, path: Path, cause: OSError, existed: bool) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        kept = "the previous file is intact" if existed else "nothing was written"
        if cause.errno in _FULL_DISK:
            reason = "no space left on device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
            self.message = f"cannot write {path}: {reason}; free space and rerun ({kept})"
        else:
            self.message = f"cannot write {path}: {(cause.strerror or str(cause)).lower()} ({kept})"

    def __str__(self) -> str:
        return self.message


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file ``.NAME.<random>.tmp`` beside ``path``, created exclusively (mode 0o666 less the umask)."""
    for _ in range(100):
        name = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
        try:
            return os.open(name, _OPEN_FLAGS, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(path.parent))


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows (best effort: the rename has happened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` by ``data``: write an exclusively created temporary beside it, fsync, rename over ``path``.

    Never opens an existing path or follows a symlink (a symlink at ``path`` is replaced by the file). On any
    failure the temporary is removed and the previous file is left intact; an :class:`OSError` is raised as a
    :class:`WriteError` whose message is one line. The folder must exist.
    """
    path = Path(path)
    existed = os.path.lexists(path)
    try:
        handle, temporary = _create_temporary(path)
    except OSError as error:
        raise WriteError(path, error, existed) from error
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(handle, view) :]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(path, error, existed) from error
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(path: str | os.PathLike[str], fig: Any, **savefig_options: Any) -> Path:
    """Render a matplotlib figure in memory (format from the suffix, PNG by default) and write it atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:].lower() or None, **savefig_options)
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def _save_tensors_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, _serialise(contiguous, metadata=metadata))


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
