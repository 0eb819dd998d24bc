"""One switch per fast feature, read from the environment: ``IWAE_FAST``.

- unset, ``1`` or ``all``: every feature that applies (the default);
- ``0``, ``none`` or ``off``: none (the reference autograd path, plain PyTorch operations, default allocator);
- a comma-separated list of features, e.g. ``IWAE_FAST=backprop,adam``: those alone; ``-name`` entries
  (``IWAE_FAST=-step``) drop features from the full set.
"""

from __future__ import annotations

import os

VARIABLE = "IWAE_FAST"

FEATURES: dict[str, str] = {
    "kernels": "the C kernels of kernels.c (the Bernoulli log-likelihood of the decoder's output rows, tanh)",
    "onednn": "oneDNN's fused linear layers (torch.ops.mkldnn._linear_pointwise)",
    "backprop": "explicit backpropagation in Python (iwae.fast.backprop), without autograd's graph",
    "step": "the training step's forward and backward passes in C++ (step.cpp)",
    "adam": "the fused Adam kernel called directly (torch._fused_adam_), bit for bit Adam.step's update",
    "allocator": "glibc's malloc thresholds fixed for training commands",
}


class SwitchError(ValueError):
    """A value of ``IWAE_FAST`` that names no feature."""


def _parse(value: str) -> frozenset[str]:
    value = value.strip().lower()
    if value in ("", "1", "all", "on"):
        return frozenset(FEATURES)
    if value in ("0", "none", "off"):
        return frozenset()
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    unknown = [entry.lstrip("-") for entry in entries if entry.lstrip("-") not in FEATURES]
    if unknown:
        raise SwitchError(
            f"{VARIABLE}={value!r}: unknown feature(s) {', '.join(unknown)}; use all, none or a list of "
            f"{', '.join(FEATURES)} (a leading '-' drops one)"
        )
    if all(entry.startswith("-") for entry in entries):
        return frozenset(FEATURES) - {entry[1:] for entry in entries}
    return frozenset(entry for entry in entries if not entry.startswith("-"))


def enabled_features() -> frozenset[str]:
    """The features the environment lets run (read on every call: cheap, and tests change the environment)."""
    return _parse(os.environ.get(VARIABLE, ""))


def enabled(feature: str) -> bool:
    """Whether ``feature`` (a key of :data:`FEATURES`) is switched on."""
    if feature not in FEATURES:
        raise KeyError(f"no fast feature {feature!r}; features: {', '.join(FEATURES)}")
    return feature in enabled_features()


def why_off(feature: str) -> str:
    """The reason a switched-off feature is off, for status lines."""
    return f"{VARIABLE}={os.environ.get(VARIABLE, '')!r} in the environment"
