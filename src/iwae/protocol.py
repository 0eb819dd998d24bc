"""The model protocol: what the estimators, the training loop and evaluation need from a model.

Shape convention: samples first. A batch ``x`` is ``[batch, ...]`` (``[batch, x_dim]`` for Burda's models, images
for a convolutional one); latents drawn from q are ``[k, batch, ...]``; every per-sample log-density is
``[k, batch]``.

Any ``nn.Module`` with these methods trains with :func:`iwae.train.fit`'s loop pieces
(:func:`iwae.estimators.estimate`, :func:`iwae.estimators.backward`), is evaluated by
:func:`iwae.evaluate.estimate_log_likelihood` and studied by :func:`iwae.studies.snr.gradient_snr`;
Burda's :class:`iwae.models.LatentVariableModel` is one such model, and ``examples/conv_vae.py`` another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class ImportanceSample:
    """k samples from q for a batch, with the log-densities that make up the log-weights.

    The log-densities are ``[k, batch]``: ``log_w = log p(x | h) + log p(h) - log q(h | x)``. ``latents`` are
    the samples themselves (``latents[j]`` is h_{j+1}, ``[k, batch, d_j]``, for Burda's models); ``q_params``
    what a model wants to keep of q (Burda's models: each layer's ``(mean, log_std)``).
    """

    latents: list[Tensor]
    log_px_given_h: Tensor
    log_prior: Tensor
    log_q: Tensor
    q_params: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def log_joint(self) -> Tensor:
        """``log p(x, h) = log p(x | h) + log p(h)``, ``[k, batch]``."""
        return self.log_px_given_h + self.log_prior

    @property
    def log_w(self) -> Tensor:
        """The log-weights ``log p(x, h) - log q(h | x)``, ``[k, batch]``."""
        return self.log_px_given_h + self.log_prior - self.log_q


@runtime_checkable
class Model(Protocol):
    """A latent-variable model with a reparameterised q, as the estimators use it.

    ``model(x, k, generator, stop_q_params=...)`` draws k samples h ~ q(h | x) per example with the random source
    ``generator`` and returns their log-densities. With ``stop_q_params=True`` it evaluates ``log q(h | x)`` with
    the encoder's parameters stopped (``.detach()``) while the samples keep their path derivative: the STL and
    DReG estimators need that. ``encoder_parameters()`` are q's (phi), ``decoder_parameters()`` p's (theta);
    together they are all the parameters the estimators differentiate.
    """

    def __call__(
        self, x: Tensor, k: int, generator: torch.Generator | None = None, *, stop_q_params: bool = False
    ) -> ImportanceSample: ...

    def encoder_parameters(self) -> Iterable[nn.Parameter]: ...

    def decoder_parameters(self) -> Iterable[nn.Parameter]: ...


@runtime_checkable
class NoiseModel(Model, Protocol):
    """A :class:`Model` whose sampling is a pure function of its parameters and explicit noise.

    ``draw_noise(x, k, generator)`` draws the standard noise for a batch (a list of tensors, samples first) and
    ``sample_with_noise(x, noise, stop_q_params=...)`` is deterministic given it: ``model(x, k, generator)`` is
    ``sample_with_noise(x, draw_noise(x, k, generator))``. That is what ``torch.compile``, ``torch.func`` (vmap
    over stacked models) and CUDA graphs need: the training loop draws the noise outside the compiled step.
    """

    def draw_noise(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]: ...

    def sample_with_noise(self, x: Tensor, noise: list[Tensor], *, stop_q_params: bool = False) -> ImportanceSample: ...


class SampleWithNoise(nn.Module):
    """A :class:`NoiseModel`'s ``sample_with_noise`` as ``forward``, for :func:`torch.func.functional_call`.

    The model's parameters are under ``model.``. Stacked training (:mod:`iwae.stacked`) and the SNR study's vmapped
    repeats (:mod:`iwae.studies.snr`) take a model's sample as a pure function of its parameters and noise.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, noise: list[Tensor], stop_q_params: bool) -> ImportanceSample:
        return self.model.sample_with_noise(x, noise, stop_q_params=stop_q_params)
