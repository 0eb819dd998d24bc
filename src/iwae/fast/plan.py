"""What the fast layer serves for a training run, decided once: :func:`training_path` and :func:`status`.

The core's step selector (:func:`iwae.steps.choose_step_path`) asks :func:`training_path` once per model; everything
else in the core runs the reference path. Nothing here imports the selector back. Each feature has one switch
(:mod:`iwae.fast.switches`) and says here whether it applies and why not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from iwae.fast import adam, backprop, native, switches
from iwae.fast import step as native_step
from iwae.models import LatentVariableModel
from iwae.objectives import Objective


class FastPath(NamedTuple):
    """What the fast layer serves a model: which path and why, the gradients' ``accumulate(model, x, noise) ->
    bound`` and the optimiser's step (None where it serves none); the core wraps it as an
    :class:`iwae.steps.StepPath`."""

    description: str
    accumulate: Callable[..., torch.Tensor] | None
    optimizer_step: Callable[[torch.optim.Optimizer], None] | None


def gradient_path(model: torch.nn.Module, objective: Objective, estimator: str) -> tuple[str, bool]:
    """(description, served): how the fast layer would compute this run's gradients."""
    if not isinstance(model, LatentVariableModel):
        return "autograd (not one of iwae.models' models)", False
    if not backprop.applies(model, objective, estimator):
        return "autograd (the model's activation or likelihood has no explicit backpropagation)", False
    if native_step.serves(model):
        return f"fast: explicit backpropagation in C++ ({native_step.status()})", True
    if switches.enabled("backprop"):
        if not native.model_on_cpu_float32(model):  # say so without building the CPU-only C++ step to describe it
            why = "the model is not float32 on the CPU"
        else:
            why = native_step.status() if switches.enabled("step") else switches.why_off("step")
        return f"fast: explicit backpropagation in Python (iwae.fast.backprop; no C++ step: {why})", True
    return f"autograd (explicit backpropagation off: {switches.why_off('backprop')})", False


def training_path(model: torch.nn.Module, objective: Objective, estimator: str) -> FastPath:
    """The fast layer's :class:`FastPath` for this model, objective and estimator: explicit
    backpropagation (in C++ where it builds) for :mod:`iwae.models`' models, the direct Adam call; the reference
    autograd step where nothing applies."""
    description, served = gradient_path(model, objective, estimator)
    accumulate = partial(_accumulate, objective=objective, estimator=estimator) if served else None
    optimizer_step = adam.adam_step if switches.enabled("adam") and adam.available() else None
    return FastPath(description, accumulate, optimizer_step)


def _accumulate(
    model: LatentVariableModel, x: torch.Tensor, noise: list[torch.Tensor], *, objective: Objective, estimator: str
) -> torch.Tensor:
    return backprop.accumulate_gradients(model, x, noise, objective, estimator)


def status() -> dict[str, str]:
    """Every fast feature and whether it runs here: ``"on: ..."`` or ``"off: why"`` (builds the native code)."""
    report = {}
    for feature, what in switches.FEATURES.items():
        if not switches.enabled(feature):
            report[feature] = f"off: {switches.why_off(feature)}"
            continue
        if feature == "kernels":
            report[feature] = ("on: " if native.available() else "off: ") + native.status().split(";")[0]
        elif feature == "onednn":
            report[feature] = "on: " + what if native.fused_linear_works() else "off: oneDNN's op is missing or differs"
        elif feature == "step":
            report[feature] = ("on: " if native_step.available() else "off: ") + native_step.status()
        elif feature == "adam":
            report[feature] = "on: " + what if adam.available() else "off: this PyTorch lacks torch._fused_adam_"
        elif feature == "allocator":
            report[feature] = "on: applied by the commands that train (iwae.fast.allocator.configure)"
        else:
            report[feature] = "on: " + what
    return report


__all__ = ["FastPath", "gradient_path", "status", "training_path"]
