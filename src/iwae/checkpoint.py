"""Checkpoints that are safe to load and written atomically.

Everything lives in one safetensors file: the model's parameters (``model.<name>``), the
optimiser's tensors (``optimizer.<param index>.<key>``), the random generator's state
(``rng_state``) and, in the string metadata, the run's configuration, the optimiser's
hyper-parameters and the training progress as JSON. Nothing is unpickled on load.
A file is written to a temporary name, flushed to disk and renamed over the old one, so an
interruption leaves either the old checkpoint or the new one, never a torn file.

:func:`atomic_write_bytes` is the package's one way to write a file that a user keeps: checkpoints, models,
``config.json``, ``eval.json``, figures, reports, CSV exports. The temporary is created exclusively in the target's
folder under a fresh random name, so an existing path or a planted symlink is never opened; the rename replaces the
target itself (a symlink there is replaced, not followed). A failed write (a full disk above all) removes the
temporary, leaves the previous file intact and raises :class:`WriteError`, one line naming the path.

Loading checks what it reads and raises :class:`CheckpointError`, one line naming the file and the fault, for: a
file that is empty, truncated, garbled or fails the checksum stored with its tensors; a checkpoint without its
training state; tensors missing from, or shaped unlike, the run's architecture (:func:`check_model_state`,
:func:`restore_checkpoint`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used: damaged, incomplete or another architecture's.

    Its message is one line naming the file and the fault.
    """


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file ``.NAME.<random>.tmp`` beside ``path``, created exclusively (mode 0o666 less the umask)."""
    for _ in range(100):
        name = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
        try:
            return os.open(name, _OPEN_FLAGS, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(path.parent))


_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")  # _create_temporary's names


def remove_temporaries(folder: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """Delete the temporaries that writes of ``names`` in ``folder`` left behind when killed mid-write (plain files
    named as :func:`atomic_write_bytes` names them; a link of that name is deleted, never followed). Call it only
    while holding the folder's lock, so that no write is in flight. Returns the paths deleted."""
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match and match.group(1) in names and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


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


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """``sha256:<hex>`` of the tensors' names, dtypes, shapes and bytes (stored in the metadata, checked on load)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{hasher.hexdigest()}"


def _save_tensors_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    metadata = {**metadata, "digest": tensors_digest(contiguous)}
    atomic_write_bytes(path, _serialise(contiguous, metadata=metadata))


_REDO = "restore it from a copy, or train the run again"
# A generator's state by its size in bytes: a CPU generator's (CPUGeneratorImplState) and a CUDA one's (seed and
# offset, CUDAGeneratorImpl::get_state). Neither sets the other's.
_GENERATOR_STATE_DEVICES = {5056: "cpu", 16: "cuda"}


def _read(path: Path, remedy: str = _REDO) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?); {remedy}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0].lower() if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated, garbled or not a safetensors file ({reason}); {remedy}") from None
    digest = metadata.get("digest")  # a file without a digest is read unchecked
    if digest is not None and digest != tensors_digest(tensors):
        raise CheckpointError(f"{path} is damaged: its tensors fail the checksum stored with them; {remedy}")
    return tensors, metadata


PER_EXAMPLE_FORMAT = "iwae-per-example-1"


def save_per_example(path: Path, values: dict[str, Tensor], images_digest: str) -> None:
    """Save an evaluation's per-example values (``[n]`` tensors by name) with the digest of the examples they were
    computed on (:func:`iwae.evaluate.examples_digest`), atomically."""
    _save_tensors_atomically(path, values, {"format": PER_EXAMPLE_FORMAT, "images": images_digest})


def load_per_example(path: Path) -> tuple[dict[str, Tensor], str]:
    """The values and the examples' digest that :func:`save_per_example` stored; :class:`CheckpointError` for a
    damaged file or another kind of file."""
    tensors, metadata = _read(path, remedy="evaluate the run again")
    if metadata.get("format") != PER_EXAMPLE_FORMAT or "images" not in metadata:
        raise CheckpointError(f"{path} is not an evaluation's per-example file (format {metadata.get('format')!r})")
    return tensors, metadata["images"]


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
    """Save the resumable training state to ``path``, atomically.

    Args:
        path: the ``.safetensors`` file; its folder is created.
        model: its parameters go under ``model.<name>``.
        optimizer: its tensors go under ``optimizer.<param index>.<key>``, its hyper-parameters and scalars into
            the metadata.
        generator: the run's random source; its state goes under ``rng_state``.
        progress: ``{"epochs_done": ..., "seconds": ...}``.
        config_json: the run's configuration, as JSON.
    """
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
    """Read a file :func:`save_checkpoint` wrote; :class:`CheckpointError` if it is damaged or lacks training state."""
    tensors, metadata = _read(path)
    model_state: dict[str, Tensor] = {}
    optimizer_entries: dict[int, dict[str, Any]] = {}
    try:
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
        progress = json.loads(metadata["progress"])
        rng_state, config_json = tensors["rng_state"], metadata["config"]
    except KeyError as error:
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks {error}); {_REDO}") from None
    except (ValueError, TypeError, AttributeError) as error:  # a malformed name or JSON metadata
        raise CheckpointError(f"{path} has malformed training state ({error}); {_REDO}") from None
    if not _valid_progress(progress):
        raise CheckpointError(f"{path} has malformed progress {metadata['progress']!r}; {_REDO}")
    return TrainingCheckpoint(model_state, optimizer_state, rng_state, progress, config_json)


def _valid_progress(progress: Any) -> bool:
    """``{"epochs_done": whole number >= 0, "seconds": finite number}``."""
    if not isinstance(progress, dict):
        return False
    epochs, seconds = progress.get("epochs_done"), progress.get("seconds", 0.0)
    whole = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0
    return whole and isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_model_state(path: Path, state: dict[str, Tensor], module: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``state`` (read from ``path``) has exactly ``module``'s tensors.

    A missing tensor, an extra one or another shape: the message names the first such tensor.
    """
    expected = module.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) of the run's architecture, such as model.{missing[0]}; "
            f"the file is incomplete or belongs to another run; {_REDO}"
        )
    if extra:
        raise CheckpointError(
            f"{path} holds {len(extra)} tensor(s) the run's architecture lacks, such as model.{extra[0]}; "
            f"the file belongs to another architecture (another --layers or --latent-dims?); {_REDO}"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: model.{name} has shape {list(state[name].shape)} where the run's architecture needs "
                f"{list(tensor.shape)}; the file belongs to another architecture; {_REDO}"
            )


def check_optimizer_state(path: Path, optimizer_state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`CheckpointError` unless the optimiser state read from ``path`` fits ``optimizer``'s parameters:
    every parameter has an entry (or none has: before the first step), all entries hold the same keys, and each
    tensor has its parameter's shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer_state["state"]
    if state:
        keys = set().union(*(entries.keys() for entries in state.values()))
        for index in range(len(params)):
            missing = sorted(keys - set(state.get(index, {})))
            if missing:
                raise CheckpointError(f"{path} lacks the optimiser state optimizer.{index}.{missing[0]}; {_REDO}")
    for index, entries in state.items():
        for key, value in entries.items():
            if not 0 <= index < len(params) or (
                isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape
            ):
                raise CheckpointError(
                    f"{path}: optimiser state optimizer.{index}.{key} does not fit the run's parameters; {_REDO}"
                )


def check_generator_state(path: Path, rng_state: Tensor, generator: torch.Generator) -> None:
    """Raise :class:`CheckpointError` if the generator state read from ``path`` is another device type's.

    No generator takes another device type's state, so a run resumes only on a device of the type that saved it
    (not a CPU run on CUDA, or the reverse).
    """
    saved_bytes = rng_state.numel() * rng_state.element_size()
    if saved_bytes == generator.get_state().numel():
        return
    saved, current = _GENERATOR_STATE_DEVICES.get(saved_bytes), generator.device.type
    if saved is not None and saved != current:
        where = "the CPU" if saved == "cpu" else f"a {saved} device"
        raise CheckpointError(
            f"{path} was saved by a run on {saved} and this run is on {current}: a generator's state does not carry "
            f"across device types; resume it on {where}, or train the run again in a new --out"
        )


def restore_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and ``generator``, after checking that it fits.

    Returns:
        Its progress, ``{"epochs_done": ..., "seconds": ...}``.

    Raises:
        CheckpointError: the file is damaged or does not fit them.
    """
    state = load_checkpoint(path)
    check_model_state(path, state.model_state, model)
    check_optimizer_state(path, state.optimizer_state, optimizer)
    check_generator_state(path, state.rng_state, generator)
    try:
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)
        generator.set_state(state.rng_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} does not fit the run ({reason}); {_REDO}") from None
    return state.progress
