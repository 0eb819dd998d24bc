"""The models' forward pass on the CPU fast paths, for evaluation: :func:`for_evaluation`.

Shape convention: samples first (``[k, batch, d]`` latents, ``[k, batch]`` log-densities), as in :mod:`iwae.models`.

:func:`for_evaluation` returns a copy of a model whose networks take oneDNN's fused linear layers and whose Bernoulli
log-likelihood takes :mod:`iwae.fast.native`'s row kernel, for L_k's gradient-free forward passes: the same values up
to float32 rounding (``tests/fast/test_forward.py``), faster on a CPU (docs/performance.md#what-makes-the-difference).
:func:`iwae.evaluate.evaluate_model` takes it as its ``accelerate`` argument; ``iwae eval`` and sweeps pass it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from iwae.fast import backprop, native, switches
from iwae.models import LatentVariableModel, MLPHead


class FastMLPHead(MLPHead):
    """:class:`~iwae.models.MLPHead` with each layer through :func:`iwae.fast.native.fused_linear`."""

    def hidden_outputs(self, inputs: Tensor, detach_params: bool = False) -> list[Tensor]:
        if detach_params:
            return super().hidden_outputs(inputs, detach_params)
        return backprop.hidden_outputs(self, inputs)

    def forward(self, inputs: Tensor, detach_params: bool = False) -> tuple[Tensor, ...]:
        if detach_params:
            return super().forward(inputs, detach_params)
        features = self.hidden_outputs(inputs)[-1]
        return self.split_head(native.fused_linear(features, self.head.weight, self.head.bias))


class FastLatentVariableModel(LatentVariableModel):
    """:class:`~iwae.models.LatentVariableModel` with the Bernoulli log-likelihood through the C row kernel."""

    def _bernoulli_log_prob(self, x: Tensor, h1: Tensor, observed_mask: Tensor | None) -> Tensor:
        if observed_mask is not None or not (native.applies_to(x) and native.applies_to(h1)):
            return super()._bernoulli_log_prob(x, h1, observed_mask)
        decoder = self.decoder[0]
        pre = native.fused_linear(decoder.features(h1), decoder.head.weight)
        return native.bernoulli_log_prob_rows(pre, decoder.head.bias, x)


def applies(model: torch.nn.Module) -> bool:
    """Whether :func:`for_evaluation` changes anything for ``model``: one of :mod:`iwae.models`' models (exactly
    that class), its parameters float32 on the CPU, and the C kernels or oneDNN's layers switched on."""
    return (
        type(model) is LatentVariableModel
        and native.model_on_cpu_float32(model)
        and (switches.enabled("kernels") or switches.enabled("onednn"))
    )


def for_evaluation(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` on the fast paths where :func:`applies`, else ``model`` itself. The copy holds copies of
    the parameters: use it to evaluate, not to train."""
    if not applies(model):
        return model
    fast = copy.deepcopy(model)
    fast.__class__ = FastLatentVariableModel
    for head in (*fast.encoder, *fast.decoder):
        head.__class__ = FastMLPHead
    return fast
