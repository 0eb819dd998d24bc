"""Which of :mod:`iwae.fast`'s CPU paths ``iwae bench`` ran: every call bench makes into :mod:`iwae.fast` is here.

- :func:`configure_allocator`: malloc set up for the training steps as ``iwae train`` sets it, and how;
- :func:`native_kernels`: :mod:`iwae.fast.native`'s CPU paths (the result's ``native_kernels``);
- :func:`gradient_path`: how the iwae steps get their gradients (the result's ``gradients``).
"""

from __future__ import annotations

import torch

from iwae.fast import allocator, native, training_path
from iwae.lab.bench.settings import BenchSettings
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import IWAE


def configure_allocator() -> str:
    """Set malloc up as ``iwae train`` does (:func:`iwae.fast.allocator.configure`); says how it is set up."""
    return allocator.configure()


def native_kernels(device: torch.device) -> str:
    """Which of :mod:`iwae.fast.native`'s CPU paths the iwae steps take on ``device``."""
    return native.status() if device.type == "cpu" else "not used on this device"


def gradient_path(settings: BenchSettings, device: torch.device | str = "cpu") -> str:
    """How the iwae training steps get their gradients on ``device`` (:func:`iwae.steps.choose_step_path`'s
    choice; the model is described on ``meta`` where ``device`` is not the CPU, which nothing allocates)."""
    if settings.compile:
        return "torch.compile (iwae train --compile)"
    model = LatentVariableModel(ModelConfig.burda(1))
    if torch.device(device).type != "cpu":
        model = model.to("meta")  # off the CPU: what the fast layer says of a model that is not on the CPU
    return training_path(model, IWAE(), "standard").description
