"""Gradient estimators for the importance-weighted bound family, with every stop-gradient explicit.

Shape convention: samples first. Log-weights are ``[k, batch]``; latents ``[k, batch, d]``; every
bound and surrogate returned here is ``[batch]``.

One call of :func:`estimate` draws k samples from any model that follows :class:`iwae.protocol.Model` and
returns :class:`EstimatorTerms`: the bound to report and the surrogates whose gradients are the estimator
(maximise them). The encoder and decoder can need different surrogates (DReG, PIWAE);
:func:`surrogate_gradients` differentiates each surrogate with respect to its own parameters only, and
:func:`backward` stores the result in ``.grad``. What each bound is, and its DReG coefficients, comes from
its :class:`~iwae.objectives.Objective`.

Each estimator is one registered :class:`Estimator` (all reparameterised, h = mu + sigma * eps) that gives two
equivalent descriptions of its gradient: surrogates for autograd (:meth:`Estimator.terms`) and the loss's gradients
in the log-weights for explicit backpropagation (:meth:`Estimator.log_weight_gradients`), with ``stop_q_params``
saying how the log-weights are computed. Every backend (autograd, :mod:`iwae.fast`, the stacked step) takes these.

* ``standard``: the gradient of the target itself.
* ``stl`` (sticking the landing, Roeder et al. 2017): the target evaluated on
  ``log_w_with_q_stopped`` (log q with the encoder's parameters stopped, the samples' path kept),
  which drops the score-function term. Unbiased for the ELBO, biased for IWAE with k > 1.
* ``dreg`` (doubly reparameterised, Tucker et al. 2019): encoder surrogate
  ``sum_i stop(c_i) * log_w_with_q_stopped_i``. Writing the target as B(log w) with
  ``a_i = dB/dlog w_i``, the score term ``-E[sum_i a_i d log q(h_i)/dphi]`` equals (by
  reparameterisation) ``-E[sum_i (da_i/dlog w_i) * path_i]``, so ``c_i = a_i - da_i/dlog w_i``
  (:meth:`~iwae.objectives.Objective.dreg_coefficients`). The decoder keeps the standard gradient. Unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from iwae.objectives import Objective, as_objective
from iwae.protocol import ImportanceSample, Model, NoiseModel


@dataclass(frozen=True)
class EstimatorTerms:
    """What one estimator call returns; all ``[batch]``. Maximise the surrogates."""

    bound: Tensor  # the value to report (detached)
    encoder_surrogate: Tensor  # differentiate w.r.t. the encoder's parameters only
    decoder_surrogate: Tensor  # differentiate w.r.t. the decoder's parameters only
    shared: bool = False  # one surrogate serves both parts (a single backward pass suffices)


class LogWeightGradients(NamedTuple):
    """The loss's gradients in the log-weights, ``[k, batch]`` each, and the bound to report ``[batch]``.

    ``decoder`` is what the decoder's parameters take, ``encoder`` what the latents (and through them the encoder)
    take; they are the same tensor where one surrogate serves both. The loss is ``-mean`` over the minibatch of the
    surrogates of :class:`EstimatorTerms`: backpropagating these through log w gives the same parameter gradients.
    """

    decoder: Tensor
    encoder: Tensor
    bound: Tensor


@dataclass(frozen=True)
class Estimator:
    """One gradient estimator: its surrogates (for autograd) and its loss gradients in the log-weights (for explicit
    backpropagation), from log-weights computed with ``stop_q_params`` (log q with q's parameters stopped, the samples'
    path kept). Every training backend consumes these two and holds no estimator logic of its own."""

    name: str
    stop_q_params: bool

    def terms(self, objective: Objective, log_w: Tensor) -> EstimatorTerms:
        raise NotImplementedError

    def log_weight_gradients(self, objective: Objective, log_w: Tensor) -> LogWeightGradients:
        raise NotImplementedError


class Standard(Estimator):
    """The gradient of the objective itself."""

    def terms(self, objective: Objective, log_w: Tensor) -> EstimatorTerms:
        encoder_surrogate = objective.encoder_target(log_w)
        shared = objective.shared
        decoder_surrogate = encoder_surrogate if shared else objective.decoder_target(log_w)
        return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate, shared)

    def log_weight_gradients(self, objective: Objective, log_w: Tensor) -> LogWeightGradients:
        decoder_grad, bound = objective.decoder_loss_gradient(log_w)
        if objective.shared:
            return LogWeightGradients(decoder_grad, decoder_grad, bound)
        encoder_grad, _ = objective.encoder_loss_gradient(log_w)
        return LogWeightGradients(decoder_grad, encoder_grad, bound)


class STL(Standard):
    """Sticking the landing (Roeder et al. 2017): the standard estimator's surrogates and gradients, of
    ``log_w_with_q_stopped`` (``stop_q_params``), which drops the score-function term."""


class DReG(Estimator):
    """Doubly reparameterised (Tucker et al. 2019, eq. 7-8): the encoder's surrogate is
    ``sum_i stop(c_i) log_w_with_q_stopped_i`` with :meth:`~iwae.objectives.Objective.dreg_coefficients`."""

    def terms(self, objective: Objective, log_w: Tensor) -> EstimatorTerms:
        decoder_surrogate = objective.decoder_target(log_w)
        stopped_coefficients = objective.dreg_coefficients(log_w)
        encoder_surrogate = (stopped_coefficients * log_w).sum(dim=0)
        return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate)

    def log_weight_gradients(self, objective: Objective, log_w: Tensor) -> LogWeightGradients:
        decoder_grad, bound = objective.decoder_loss_gradient(log_w)
        return LogWeightGradients(decoder_grad, objective.dreg_coefficients(log_w).div_(-log_w.shape[1]), bound)


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(estimator: Estimator) -> Estimator:
    """Add an estimator under its name (``--estimator NAME``); adding one is this call, its class and a test."""
    if estimator.name in _REGISTRY:
        raise ValueError(f"an estimator named {estimator.name!r} is already registered")
    _REGISTRY[estimator.name] = estimator
    return estimator


register_estimator(Standard("standard", stop_q_params=False))
register_estimator(STL("stl", stop_q_params=True))
register_estimator(DReG("dreg", stop_q_params=True))

ESTIMATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)  # iwae.names repeats them for the torch-free command line


def get_estimator(estimator: str | Estimator) -> Estimator:
    """The registered estimator of that name (an :class:`Estimator` passes through)."""
    if isinstance(estimator, Estimator):
        return estimator
    if estimator not in _REGISTRY:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[estimator]


def is_registered(estimator: object) -> bool:
    """Whether ``estimator`` names a registered estimator (or is one)."""
    return isinstance(estimator, Estimator) or (isinstance(estimator, str) and estimator in _REGISTRY)


def check_estimator(estimator: str) -> None:
    get_estimator(estimator)


def stops_q_params(estimator: str | Estimator) -> bool:
    """Whether the estimator needs log q with the encoder's parameters stopped (STL, DReG)."""
    return get_estimator(estimator).stop_q_params


def terms_from_log_weights(log_w: Tensor, objective: Objective | str, estimator: str | Estimator) -> EstimatorTerms:
    """Estimator terms from log-weights ``[k, batch]`` computed with ``stop_q_params = stops_q_params(estimator)``:
    for STL and DReG they are ``log_w_with_q_stopped`` (the same value; phi enters only through the samples'
    path)."""
    return get_estimator(estimator).terms(as_objective(objective), log_w)


def log_weight_gradients(
    log_w: Tensor, objective: Objective | str, estimator: str | Estimator
) -> LogWeightGradients:
    """The loss's gradients in log-weights ``[k, batch]`` (computed with ``stops_q_params(estimator)``) and the
    bound: what explicit backpropagation (:mod:`iwae.fast.backprop`, ``step.cpp``) pushes through the network."""
    return get_estimator(estimator).log_weight_gradients(as_objective(objective), log_w)


def terms_from_sample(sample: ImportanceSample, objective: Objective | str, estimator: str) -> EstimatorTerms:
    """:func:`terms_from_log_weights` of a sample's log-weights."""
    return terms_from_log_weights(sample.log_w, objective, estimator)


def estimate(
    model: Model, x: Tensor, k: int, generator: torch.Generator | None, objective: Objective | str, estimator: str
) -> EstimatorTerms:
    """Draw k samples per example of ``x`` ``[batch, ...]`` from ``model`` and build the estimator's terms."""
    stop = stops_q_params(estimator)
    # The standard estimator makes exactly the call of the plain training step.
    sample = model(x, k, generator, stop_q_params=True) if stop else model(x, k, generator)
    return terms_from_sample(sample, objective, estimator)


def estimate_from_noise(
    model: NoiseModel, x: Tensor, noise: list[Tensor], objective: Objective | str, estimator: str
) -> EstimatorTerms:
    """:func:`estimate` for the noise ``model.draw_noise`` drew: a pure function of the parameters and the
    noise, so ``torch.compile`` (``iwae train --compile``) and ``torch.func`` take it whole."""
    sample = model.sample_with_noise(x, noise, stop_q_params=stops_q_params(estimator))
    return terms_from_sample(sample, objective, estimator)


def loss_gradients(
    encoder_loss: Tensor,
    decoder_loss: Tensor,
    shared: bool,
    encoder_params: list[Tensor],
    decoder_params: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of the encoder's loss for the encoder's parameters and of the decoder's for the decoder's (one
    pass where ``shared``): contiguous, and zero where a parameter has none.

    Contiguous because torch 2.13's fused CPU Adam reads a strided ``.grad`` in memory order (silently wrong), and
    gradients under ``torch.func.vmap`` can come out strided."""
    if shared:
        params = [*encoder_params, *decoder_params]
        grads = torch.autograd.grad(encoder_loss, params, allow_unused=True)
        encoder_grads, decoder_grads = grads[: len(encoder_params)], grads[len(encoder_params) :]
    else:
        encoder_grads = torch.autograd.grad(encoder_loss, encoder_params, retain_graph=True, allow_unused=True)
        decoder_grads = torch.autograd.grad(decoder_loss, decoder_params, allow_unused=True)

    def filled(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(p) if g is None else g.contiguous() for g, p in zip(grads, params, strict=True)]

    return filled(encoder_grads, encoder_params), filled(decoder_grads, decoder_params)


def surrogate_gradients(
    terms: EstimatorTerms, encoder_params: list[nn.Parameter], decoder_params: list[nn.Parameter]
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of ``-mean(surrogate)`` (the loss) for encoder and decoder parameters, each from its surrogate."""
    encoder_loss = -terms.encoder_surrogate.mean()
    decoder_loss = encoder_loss if terms.shared else -terms.decoder_surrogate.mean()
    return loss_gradients(encoder_loss, decoder_loss, terms.shared, encoder_params, decoder_params)


def backward(model: Model, terms: EstimatorTerms) -> None:
    """Accumulate the loss gradients ``-mean(surrogate)`` into ``.grad`` of the model's parameters.

    A shared surrogate takes one ``loss.backward()`` (bit-for-bit the plain training step); split
    surrogates route each gradient to its own part, through the model's ``encoder_parameters()`` and
    ``decoder_parameters()``.
    """
    if terms.shared:
        (-terms.encoder_surrogate.mean()).backward()
        return
    encoder_params, decoder_params = list(model.encoder_parameters()), list(model.decoder_parameters())
    encoder_grads, decoder_grads = surrogate_gradients(terms, encoder_params, decoder_params)
    for param, grad in zip([*encoder_params, *decoder_params], [*encoder_grads, *decoder_grads], strict=True):
        param.grad = grad.detach() if param.grad is None else param.grad + grad.detach()


__all__ = [
    "ESTIMATOR_NAMES",
    "Estimator",
    "EstimatorTerms",
    "LogWeightGradients",
    "backward",
    "estimate",
    "estimate_from_noise",
    "get_estimator",
    "is_registered",
    "log_weight_gradients",
    "loss_gradients",
    "register_estimator",
    "stops_q_params",
    "surrogate_gradients",
    "terms_from_log_weights",
    "terms_from_sample",
]
