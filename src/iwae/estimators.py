"""Gradient estimators for the importance-weighted bound family, with every stop-gradient explicit.

Shape convention: samples first. Log-weights are ``[k, batch]``; latents ``[k, batch, d]``; every
bound and surrogate returned here is ``[batch]``.

One call of :func:`estimate` draws k samples and returns :class:`EstimatorTerms`: the bound to
report and the surrogates whose gradients are the estimator (maximise them). The encoder and
decoder can need different surrogates (DReG, PIWAE); :func:`surrogate_gradients` differentiates
each surrogate with respect to its own parameters only, and :func:`backward` stores the result in
``.grad``.

Objectives (k = total samples per example; MIWAE/PIWAE split them into M groups of K = k / M, see
:func:`iwae.bounds.group_log_weights`):

=========  ==========================================  ==============================
name       encoder target                              decoder target (if different)
=========  ==========================================  ==============================
vae        ELBO (mean of k single-sample bounds)
iwae       IWAE_k
miwae      MIWAE(M, K)
ciwae      beta ELBO + (1 - beta) IWAE_k
piwae      MIWAE(M, K)                                 IWAE_k (also the reported bound)
power      power mean L_p^k
vr         VR-IWAE(alpha) = L_{1-alpha}^k
=========  ==========================================  ==============================

Estimators (all reparameterised, h = mu + sigma * eps):

* ``standard``: the gradient of the target itself.
* ``stl`` (sticking the landing, Roeder et al. 2017): the target evaluated on
  ``log_w_with_q_stopped`` (log q with the encoder's parameters stopped, the samples' path kept),
  which drops the score-function term. Unbiased for the ELBO, biased for IWAE with k > 1.
* ``dreg`` (doubly reparameterised, Tucker et al. 2019): encoder surrogate
  ``sum_i stop(c_i) * log_w_with_q_stopped_i``. Writing the target as B(log w) with
  ``a_i = dB/dlog w_i``, the score term ``-E[sum_i a_i d log q(h_i)/dphi]`` equals (by
  reparameterisation) ``-E[sum_i (da_i/dlog w_i) * path_i]``, so ``c_i = a_i - da_i/dlog w_i``;
  for IWAE ``c_i = w~_i^2``, for a power mean ``c_i = (1-p) v~_i + p v~_i^2`` with
  ``v~ = softmax(p log w)``. The decoder keeps the standard gradient. Unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from iwae import bounds
from iwae.models import ImportanceSample

OBJECTIVE_NAMES: tuple[str, ...] = ("vae", "iwae", "miwae", "ciwae", "piwae", "power", "vr")
ESTIMATOR_NAMES: tuple[str, ...] = ("standard", "stl", "dreg")


@dataclass(frozen=True)
class BoundSpec:
    """An objective of the family and its parameter (M for miwae/piwae, beta, p or alpha)."""

    objective: str = "iwae"
    M: int = 1
    beta: float | None = None
    p: float | None = None
    alpha: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> BoundSpec:
        """From any object with ``objective`` (and optionally M, beta, p, alpha) attributes, e.g. a TrainConfig."""
        return cls(
            config.objective,
            getattr(config, "M", 1),
            getattr(config, "beta", None),
            getattr(config, "p", None),
            getattr(config, "alpha", None),
        )

    def check(self, k: int) -> None:
        """Raise a one-line ValueError if the parameters do not fit the objective or k."""
        name = self.objective
        if name not in OBJECTIVE_NAMES:
            raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVE_NAMES)}")
        if self.M < 1:
            raise ValueError(f"M must be >= 1, got {self.M}")
        if self.M != 1 and name not in ("miwae", "piwae"):
            raise ValueError(f"M applies to the miwae and piwae objectives only, not {name!r}")
        if name in ("miwae", "piwae") and k % self.M:
            raise ValueError(f"{name} splits k = {k} samples into M = {self.M} groups: make k a multiple of M")
        for param, owner in (("beta", "ciwae"), ("p", "power"), ("alpha", "vr")):
            value = getattr(self, param)
            if name == owner and value is None:
                raise ValueError(f"the {owner} objective needs --{param}")
            if name != owner and value is not None:
                raise ValueError(f"--{param} applies to the {owner} objective only, not {name!r}")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{param} must be finite, got {value}")
        if name == "ciwae" and not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ciwae needs 0 <= beta <= 1, got {self.beta}")
        if name == "power" and self.p > 1.0:
            raise ValueError(f"the power-mean bound is below IWAE only for p <= 1, got p = {self.p}")
        if name == "vr" and self.alpha < 0.0:
            raise ValueError(f"VR-IWAE is below IWAE only for alpha >= 0, got alpha = {self.alpha}")

    @property
    def shared(self) -> bool:
        """Whether encoder and decoder ascend the same target (all but piwae)."""
        return self.objective != "piwae"

    @property
    def power(self) -> float | None:
        """The power p of a power-mean objective (iwae: 1, vae: 0, vr: 1 - alpha), else None."""
        return {"iwae": 1.0, "vae": 0.0, "power": self.p, "vr": None if self.alpha is None else 1.0 - self.alpha}.get(
            self.objective
        )


def encoder_target(spec: BoundSpec, log_w: Tensor) -> Tensor:
    """The bound the encoder ascends: ``[k, batch] -> [batch]``."""
    name = spec.objective
    if name == "vae":
        return bounds.elbo(log_w)
    if name == "iwae":
        return bounds.iwae_bound(log_w)
    if name in ("miwae", "piwae"):
        return bounds.miwae_bound(log_w, spec.M)
    if name == "ciwae":
        return bounds.ciwae_bound(log_w, spec.beta)
    if name == "power":
        return bounds.power_mean_bound(log_w, spec.p)
    if name == "vr":
        return bounds.vr_iwae_bound(log_w, spec.alpha)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVE_NAMES)}")


def decoder_target(spec: BoundSpec, log_w: Tensor) -> Tensor:
    """The bound the decoder ascends (PIWAE: IWAE_k over all M*K samples; otherwise the encoder's)."""
    if spec.objective == "piwae":
        return bounds.iwae_bound(log_w)
    return encoder_target(spec, log_w)


def _power_dreg_coefficients(log_w: Tensor, p: float) -> Tensor:
    """``(1-p) v~ + p v~^2`` with ``v~ = softmax(p log w)``; p = 0 gives 1/k (STL for the ELBO)."""
    v = torch.softmax(p * log_w, dim=0)
    return (1.0 - p) * v + p * v * v


def dreg_coefficients(spec: BoundSpec, log_w: Tensor) -> Tensor:
    """Per-sample DReG coefficients ``c_i = a_i - da_i/dlog w_i`` (module docstring), ``[k, batch]``, detached.

    Surrogate ``sum_i c_i log_w_with_q_stopped_i`` has the target's expected encoder gradient.
    """
    stopped_log_w = log_w.detach()
    name, power = spec.objective, spec.power
    if power is not None:
        return _power_dreg_coefficients(stopped_log_w, power)
    if name in ("miwae", "piwae"):
        groups = bounds.group_log_weights(stopped_log_w, spec.M)  # [M, K, batch]
        stopped_group_weights = torch.softmax(groups, dim=1)
        return (stopped_group_weights.square() / spec.M).reshape(stopped_log_w.shape)
    if name == "ciwae":
        k = stopped_log_w.shape[0]
        stopped_normalized_weights = bounds.normalized_weights(stopped_log_w)
        return spec.beta / k + (1.0 - spec.beta) * stopped_normalized_weights.square()
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVE_NAMES)}")


@dataclass(frozen=True)
class EstimatorTerms:
    """What one estimator call returns; all ``[batch]``. Maximise the surrogates."""

    bound: Tensor  # the value to report (detached)
    encoder_surrogate: Tensor  # differentiate w.r.t. the encoder's parameters only
    decoder_surrogate: Tensor  # differentiate w.r.t. the decoder's parameters only
    shared: bool = False  # one surrogate serves both parts (a single backward pass suffices)


def terms_from_sample(sample: ImportanceSample, spec: BoundSpec, estimator: str) -> EstimatorTerms:
    """Estimator terms from a sample drawn with ``stop_q_params = (estimator != "standard")``."""
    shared = spec.shared
    if estimator == "standard":
        log_w = sample.log_w
        encoder_surrogate = encoder_target(spec, log_w)
        decoder_surrogate = encoder_surrogate if shared else decoder_target(spec, log_w)
        return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate, shared)
    log_w_with_q_stopped = sample.log_w  # same value as log_w; phi enters only through the samples' path
    decoder_surrogate = decoder_target(spec, log_w_with_q_stopped)
    if estimator == "stl":
        encoder_surrogate = decoder_surrogate if shared else encoder_target(spec, log_w_with_q_stopped)
        return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate, shared)
    if estimator == "dreg":
        stopped_coefficients = dreg_coefficients(spec, log_w_with_q_stopped)
        encoder_surrogate = (stopped_coefficients * log_w_with_q_stopped).sum(dim=0)
        return EstimatorTerms(decoder_surrogate.detach(), encoder_surrogate, decoder_surrogate)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")


def estimate(
    model: nn.Module, x: Tensor, k: int, generator: torch.Generator | None, spec: BoundSpec, estimator: str
) -> EstimatorTerms:
    """Draw k samples per example of ``x`` ``[batch, x_dim]`` and build the estimator's terms."""
    if estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")
    # The standard estimator makes exactly the call of the plain training step.
    stop = estimator != "standard"
    sample = model(x, k, generator, stop_q_params=True) if stop else model(x, k, generator)
    return terms_from_sample(sample, spec, estimator)


def estimate_from_noise(
    model: nn.Module, x: Tensor, noise: list[Tensor], spec: BoundSpec, estimator: str
) -> EstimatorTerms:
    """:func:`estimate` for the noise ``model.draw_noise`` drew: deterministic, so ``iwae train --compile``
    compiles it (model, bound and surrogates) as one graph forward and one backward."""
    sample = model.sample_with_noise(x, noise, stop_q_params=estimator != "standard")
    return terms_from_sample(sample, spec, estimator)


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


def backward(model: nn.Module, terms: EstimatorTerms) -> None:
    """Accumulate the loss gradients ``-mean(surrogate)`` into ``.grad`` of the model's parameters.

    A shared surrogate takes one ``loss.backward()`` (bit-for-bit the plain training step); split
    surrogates route each gradient to its own part. ``model`` needs ``encoder_parameters()`` and
    ``decoder_parameters()``.
    """
    if terms.shared:
        (-terms.encoder_surrogate.mean()).backward()
        return
    encoder_params, decoder_params = model.encoder_parameters(), model.decoder_parameters()
    encoder_grads, decoder_grads = surrogate_gradients(terms, encoder_params, decoder_params)
    for param, grad in zip([*encoder_params, *decoder_params], [*encoder_grads, *decoder_grads], strict=True):
        param.grad = grad.detach() if param.grad is None else param.grad + grad.detach()
