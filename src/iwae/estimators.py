"""Gradient estimators for the importance-weighted bound family, with every stop-gradient explicit.

Shape convention: samples first. Log-weights are ``[k, batch]``; latents ``[k, batch, d]``; every
bound and surrogate returned here is ``[batch]``.

One call of :func:`estimate` draws k samples from any model that follows :class:`iwae.protocol.Model` and
returns :class:`EstimatorTerms`: the bound to report and the surrogates whose gradients are the estimator
(maximise them). The encoder and decoder can need different surrogates (DReG, PIWAE);
:func:`surrogate_gradients` differentiates each surrogate with respect to its own parameters only, and
:func:`backward` stores the result in ``.grad``. What each bound is, and its DReG coefficients, comes from
its :class:`~iwae.objectives.Objective`.

Estimators (all reparameterised, h = mu + sigma * eps), in the style of google-research's
``dreg_estimators``: each returns (objective, decoder surrogate, encoder surrogate) with named stop-gradients.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iwae.objectives import Objective, as_objective, make_objective, objective_names
from iwae.protocol import ImportanceSample, Model, NoiseModel

ESTIMATOR_NAMES: tuple[str, ...] = ("standard", "stl", "dreg")


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")


def stops_q_params(estimator: str) -> bool:
    """Whether the estimator needs log q with the encoder's parameters stopped (STL, DReG)."""
    check_estimator(estimator)
    return estimator != "standard"


@dataclass(frozen=True)
class EstimatorTerms:
    """What one estimator call returns; all ``[batch]``. Maximise the surrogates."""

    bound: Tensor  # the value to report (detached)
    encoder_surrogate: Tensor  # differentiate w.r.t. the encoder's parameters only
    decoder_surrogate: Tensor  # differentiate w.r.t. the decoder's parameters only
    shared: bool = False  # one surrogate serves both parts (a single backward pass suffices)


def _standard(objective: Objective, log_w: Tensor) -> EstimatorTerms:
    encoder_surrogate = objective.encoder_target(log_w)
    shared = objective.shared
    decoder_surrogate = encoder_surrogate if shared else objective.decoder_target(log_w)
    return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate, shared)


def _stl(objective: Objective, log_w_with_q_stopped: Tensor) -> EstimatorTerms:
    decoder_surrogate = objective.decoder_target(log_w_with_q_stopped)
    shared = objective.shared
    encoder_surrogate = decoder_surrogate if shared else objective.encoder_target(log_w_with_q_stopped)
    return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate, shared)


def _dreg(objective: Objective, log_w_with_q_stopped: Tensor) -> EstimatorTerms:
    decoder_surrogate = objective.decoder_target(log_w_with_q_stopped)
    stopped_coefficients = objective.dreg_coefficients(log_w_with_q_stopped)
    encoder_surrogate = (stopped_coefficients * log_w_with_q_stopped).sum(dim=0)
    return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate)


_ESTIMATORS: dict[str, Callable[[Objective, Tensor], EstimatorTerms]] = {
    "standard": _standard,
    "stl": _stl,
    "dreg": _dreg,
}


def terms_from_log_weights(log_w: Tensor, objective: Objective | str, estimator: str) -> EstimatorTerms:
    """Estimator terms from log-weights ``[k, batch]`` computed with ``stop_q_params = stops_q_params(estimator)``:
    for STL and DReG they are ``log_w_with_q_stopped`` (the same value; phi enters only through the samples'
    path)."""
    check_estimator(estimator)
    return _ESTIMATORS[estimator](as_objective(objective), log_w)


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


def _fill_unused(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def surrogate_gradients(
    terms: EstimatorTerms, encoder_params: list[nn.Parameter], decoder_params: list[nn.Parameter]
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of ``-mean(surrogate)`` (the loss) for encoder and decoder parameters, each from its surrogate."""
    if terms.shared:
        params = [*encoder_params, *decoder_params]
        grads = _fill_unused(torch.autograd.grad(-terms.encoder_surrogate.mean(), params, allow_unused=True), params)
        return grads[: len(encoder_params)], grads[len(encoder_params) :]
    encoder_grads = torch.autograd.grad(
        -terms.encoder_surrogate.mean(), encoder_params, retain_graph=True, allow_unused=True
    )
    decoder_grads = torch.autograd.grad(-terms.decoder_surrogate.mean(), decoder_params, allow_unused=True)
    return _fill_unused(encoder_grads, encoder_params), _fill_unused(decoder_grads, decoder_params)


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
        # Contiguous: torch 2.13's fused CPU Adam reads a strided .grad in memory order, silently wrong.
        param.grad = grad.detach().contiguous() if param.grad is None else param.grad + grad.detach()


# -- the names of the previous release, kept for one release --------------------------------------------------
OBJECTIVE_NAMES: tuple[str, ...] = objective_names()  # deprecated: iwae.objectives.objective_names()


def BoundSpec(  # the old class's name, for code written against it
    objective: str = "iwae", M: int = 1, beta: float | None = None, p: float | None = None, alpha: float | None = None
) -> Objective:
    """Deprecated: ``make_objective(objective, M=..., beta=..., p=..., alpha=...)`` (:mod:`iwae.objectives`)."""
    return make_objective(objective, M=M, beta=beta, p=p, alpha=alpha)


def encoder_target(objective: Objective | str, log_w: Tensor) -> Tensor:
    """Deprecated: ``objective.encoder_target(log_w)``."""
    return as_objective(objective).encoder_target(log_w)


def decoder_target(objective: Objective | str, log_w: Tensor) -> Tensor:
    """Deprecated: ``objective.decoder_target(log_w)``."""
    return as_objective(objective).decoder_target(log_w)


def dreg_coefficients(objective: Objective | str, log_w: Tensor) -> Tensor:
    """Deprecated: ``objective.dreg_coefficients(log_w)``."""
    return as_objective(objective).dreg_coefficients(log_w)


__all__ = [
    "ESTIMATOR_NAMES",
    "EstimatorTerms",
    "backward",
    "estimate",
    "estimate_from_noise",
    "stops_q_params",
    "surrogate_gradients",
    "terms_from_log_weights",
    "terms_from_sample",
]
