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


def gradient_path(settings: BenchSettings) -> str:
    """How the iwae training steps get their gradients (:func:`iwae.steps.training_step`'s choice)."""
    if settings.compile:
        return "torch.compile (iwae train --compile)"
    return training_path(LatentVariableModel(ModelConfig.burda(1)), IWAE(), "standard").description
