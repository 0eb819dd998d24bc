"""How much memory training steps need, and refusing runs that would need more than the device has.

The estimate counts, per sample row (k x minibatch rows), every layer output of Burda's networks kept for the backward
pass, with their gradients and the estimator's temporaries, plus the parameters' copies; it is meant to refuse what
cannot fit (a mistyped ``--k``), not to predict the peak to the megabyte.
"""

from __future__ import annotations

import itertools
import math
import os

import torch

from iwae.config import TrainConfig
from iwae.models import ModelConfig
from iwae.runs import RunError

# A training step keeps, per sample row (k x minibatch rows), every layer's outputs of the encoder and decoder for the
# backward pass, their gradients and the estimator's temporaries: about this many float32 values per layer output, a
# margin above the measured ratio (results/memory-k: 1.64 to 1.81 on the default CPU step, whose malloc keeps freed
# blocks, at k = 500 and 5,000; docs/cli.md#iwae-train), so that a refused run would have needed at least most of the
# machine's memory.
STEP_COPIES = 2.0
PARAMETER_COPIES = 8  # parameters, gradients, Adam's two moments, the fast path's and the checkpoint's copies


def parameter_count(model: ModelConfig) -> int:
    """The weights and biases of Burda's architecture ``model`` (:class:`iwae.models.LatentVariableModel`)."""
    return sum((a + 1) * b for sizes in layer_sizes(model) for a, b in itertools.pairwise(sizes))


def layer_sizes(model: ModelConfig) -> list[tuple[int, ...]]:
    """The sizes through each network of ``model``: for layer j, q's (input, hidden..., 2 x latent) and p's (latent,
    hidden reversed..., its output)."""
    in_dims = (model.x_dim, *model.latent_dims[:-1])
    observed = 1 if model.likelihood == "bernoulli" else 2
    networks = []
    for j, (in_dim, hidden, latent) in enumerate(zip(in_dims, model.hidden_dims, model.latent_dims, strict=True)):
        networks.append((in_dim, *hidden, 2 * latent))
        networks.append((latent, *reversed(hidden), (observed if j == 0 else 2) * in_dim))
    return networks


def step_memory(config: TrainConfig, n_train: int, models: int = 1) -> int:
    """Bytes that training steps of ``models`` models of ``config`` need at their largest (the largest k x minibatch
    of the schedule over ``n_train`` examples): an estimate, see :data:`STEP_COPIES`."""
    rows = max(
        100 * config.valid_k,  # the validation bound's minibatch (iwae.train.mean_bound)
        *(config.k_of_stage(s) * min(config.batch_size_of_stage(s), n_train) for s in range(len(config.stages))),
    )
    width = sum(sum(sizes) for sizes in layer_sizes(config.model))
    return int(models * 4 * (STEP_COPIES * rows * width + PARAMETER_COPIES * parameter_count(config.model)))


def device_memory(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes: a GPU's own, else the machine's physical memory (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units, such as ``28.6 TB``."""
    units = ("bytes", "KB", "MB", "GB", "TB", "PB")
    power = min(int(math.log10(max(n, 1)) // 3), len(units) - 1)
    return f"{n / 1000**power:.3g} {units[power]}"


def check_memory(config: TrainConfig, n_train: int, device: torch.device, models: int = 1) -> None:
    """Raise :class:`~iwae.runs.RunError` if training steps would need more memory than ``device`` has
    (:func:`step_memory`); the message gives the estimate and what to change."""
    need, have = step_memory(config, n_train, models), device_memory(device)
    if have is not None and need > have:
        k = max(config.k_of_stage(s) for s in range(len(config.stages)))
        batch = min(max(config.batch_size_of_stage(s) for s in range(len(config.stages))), n_train)
        stack = f"{models} models x " if models > 1 else ""
        machine = "this GPU has" if device.type == "cuda" else "this machine has"
        raise RunError(
            f"a training step would need about {format_bytes(need)} of memory ({stack}k {k} x minibatch {batch} "
            f"samples, {parameter_count(config.model):,} parameters) and {machine} {format_bytes(have)}; "
            "lower --k or --batch-size (or --latent-dims)"
        )
