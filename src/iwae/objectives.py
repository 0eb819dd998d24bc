"""The bound family as registered objects: one class per objective, each a small frozen dataclass.

Shape convention: samples first. Log-weights are ``[k, batch]``; every target is ``[batch]``.

An objective says everything the estimators (:mod:`iwae.estimators`) and the training loop need about a bound:

- :meth:`Objective.encoder_target` and :meth:`Objective.decoder_target`: the bounds the encoder and the decoder
  ascend (the decoder's is also the reported value; they differ for PIWAE only);
- :meth:`Objective.dreg_coefficients`: the per-sample weights ``c_i = a_i - da_i/dlog w_i`` of the DReG
  estimator's encoder surrogate ``sum_i stop(c_i) log w_i`` (``a_i = dB/dlog w_i``; Tucker et al. 2019);
- :meth:`Objective.check`: whether its parameters fit k (a one-line ``ValueError`` if not);
- :meth:`Objective.encoder_loss_gradient` and :meth:`Objective.decoder_loss_gradient`: the gradient of the loss
  ``-mean(target)`` in the log-weights, by autograd on that small tensor unless the class has a closed form
  (IWAE, the ELBO). Explicit backpropagation (:mod:`iwae.fast`) starts from these.

Every objective is registered by name with :func:`register_objective`, like ``torch.distributions``'s
``register_kl``; the CLI's ``--objective`` choices, configuration files and the reports read the registry.
Adding an objective is one class and a test::

    @register_objective
    @dataclass(frozen=True)
    class Tempered(Objective):
        name: ClassVar[str] = "tempered"
        t: float = 0.5

        def encoder_target(self, log_w):
            return bounds.iwae_bound(self.t * log_w) / self.t

=========  ===========  ==========================================  ==============================
name       parameter    encoder target                              decoder target (if different)
=========  ===========  ==========================================  ==============================
vae                     ELBO (mean of k single-sample bounds)
iwae                    IWAE_k
miwae      M            MIWAE(M, K), K = k / M
ciwae      beta         beta ELBO + (1 - beta) IWAE_k
piwae      M            MIWAE(M, K)                                 IWAE_k (also the reported bound)
power      p            power mean L_p^k
vr         alpha        VR-IWAE(alpha) = L_{1-alpha}^k
=========  ===========  ==========================================  ==============================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from iwae import bounds

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` (an :class:`Objective` with a ``name``) available by its name."""
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    if name in OBJECTIVES and OBJECTIVES[name] is not cls:
        raise ValueError(f"an objective named {name!r} is registered already ({OBJECTIVES[name].__name__})")
    OBJECTIVES[name] = cls
    return cls


def objective_names() -> tuple[str, ...]:
    """The registered objectives' names, in registration order."""
    return tuple(OBJECTIVES)


def _loss_gradient_by_autograd(target, log_w: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        leaf = log_w.detach().requires_grad_()
        value = target(leaf)
        (grad,) = torch.autograd.grad(-value.mean(), leaf)
    return grad, value.detach()


@dataclass(frozen=True)
class Objective:
    """A bound of the importance-weighted family; subclasses set ``name`` and implement :meth:`encoder_target`.

    Parameters are the dataclass's fields (``MIWAE(M=5)``); :meth:`to_dict` and :func:`objective_from_dict` carry
    an objective in configuration files as ``{"name": ..., <parameters>}``.
    """

    name: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()  # parameters that configuration files and the CLI must name

    # -- the bound ---------------------------------------------------------------------------------------------
    def encoder_target(self, log_w: Tensor) -> Tensor:
        """The bound the encoder ascends: ``[k, batch] -> [batch]``."""
        raise NotImplementedError

    def decoder_target(self, log_w: Tensor) -> Tensor:
        """The bound the decoder ascends, which is also the value reported; the encoder's unless overridden."""
        return self.encoder_target(log_w)

    @property
    def shared(self) -> bool:
        """Whether encoder and decoder ascend the same target (one surrogate, one backward pass)."""
        return type(self).decoder_target is Objective.decoder_target

    @property
    def power(self) -> float | None:
        """The exponent p where the target is the power mean ``L_p^k`` (IWAE 1, the ELBO 0), else None."""
        return None

    def check(self, k: int) -> None:
        """Raise a one-line ``ValueError`` if the parameters do not fit k samples per example."""

    # -- what the estimators need ------------------------------------------------------------------------------
    def dreg_coefficients(self, log_w: Tensor) -> Tensor:
        """Per-sample DReG coefficients ``c_i = a_i - da_i/dlog w_i``, ``[k, batch]``, detached.

        The surrogate ``sum_i c_i log_w_with_q_stopped_i`` has the target's expected encoder gradient. The
        default covers power means, ``c_i = (1-p) v~_i + p v~_i^2`` with ``v~ = softmax(p log w)``.
        """
        if self.power is None:
            raise NotImplementedError(f"the {self.name} objective has no DReG coefficients")
        p = self.power
        v = torch.softmax(p * log_w.detach(), dim=0)
        return (1.0 - p) * v + p * v * v

    def encoder_loss_gradient(self, log_w: Tensor) -> tuple[Tensor, Tensor]:
        """``(d(-mean encoder_target)/dlog_w [k, batch], encoder_target [batch])``, both detached."""
        return _loss_gradient_by_autograd(self.encoder_target, log_w)

    def decoder_loss_gradient(self, log_w: Tensor) -> tuple[Tensor, Tensor]:
        """``(d(-mean decoder_target)/dlog_w [k, batch], decoder_target [batch])``, both detached."""
        if self.shared:
            return self.encoder_loss_gradient(log_w)
        return _loss_gradient_by_autograd(self.decoder_target, log_w)

    # -- configuration -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <parameters>}``, the form configuration files carry (:func:`objective_from_dict`)."""
        return {"name": self.name, **asdict(self)}

    def label(self) -> str:
        """``name`` with its parameters, as reports print it: ``miwae(M=5)``."""
        params = ", ".join(f"{key}={value:g}" for key, value in asdict(self).items())
        return f"{self.name}({params})" if params else self.name


def _require_finite(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@register_objective
@dataclass(frozen=True)
class VAE(Objective):
    """The ELBO with k samples: the mean of k single-sample bounds (Monte Carlo KL, as in Burda et al.)."""

    name: ClassVar[str] = "vae"

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.elbo(log_w)

    @property
    def power(self) -> float:
        return 0.0

    def encoder_loss_gradient(self, log_w: Tensor) -> tuple[Tensor, Tensor]:
        k, batch = log_w.shape
        return torch.full_like(log_w, -1.0 / (k * batch)), bounds.elbo(log_w).detach()


@register_objective
@dataclass(frozen=True)
class IWAE(Objective):
    """The IWAE bound ``L_k = log (1/k) sum_i w_i`` (Burda et al. 2016)."""

    name: ClassVar[str] = "iwae"

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.iwae_bound(log_w)

    @property
    def power(self) -> float:
        return 1.0

    def encoder_loss_gradient(self, log_w: Tensor) -> tuple[Tensor, Tensor]:
        """Closed form: ``(-w~ / batch [k, batch], L_k [batch])``, both detached.

        The normalised weights are ``exp(log_w - logsumexp(log_w))``, rounded as autograd rounds them (a softmax
        rounds differently). Why a closed form: docs/performance.md#what-makes-the-difference.
        """
        k, batch = log_w.shape
        log_w = log_w.detach()
        log_sum = torch.logsumexp(log_w, dim=0)
        return (log_w - log_sum).exp_().div_(-batch), log_sum - math.log(k)


@register_objective
@dataclass(frozen=True)
class MIWAE(Objective):
    """MIWAE(M, K): the mean over M groups of IWAE_K bounds, k = M * K (Rainforth et al. 2018)."""

    name: ClassVar[str] = "miwae"
    M: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.M, bool) or not isinstance(self.M, int) or self.M < 1:
            raise ValueError(f"M must be a whole number >= 1, got {self.M!r}")

    def check(self, k: int) -> None:
        if k % self.M:
            raise ValueError(f"{self.name} splits k = {k} samples into M = {self.M} groups: make k a multiple of M")

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.miwae_bound(log_w, self.M)

    def dreg_coefficients(self, log_w: Tensor) -> Tensor:
        groups = bounds.group_log_weights(log_w.detach(), self.M)  # [M, K, batch]
        return (torch.softmax(groups, dim=1).square() / self.M).reshape(log_w.shape)


@register_objective
@dataclass(frozen=True)
class PIWAE(MIWAE):
    """PIWAE(M, K): the encoder ascends MIWAE(M, K), the decoder IWAE_{MK}, which is reported (Rainforth et al.)."""

    name: ClassVar[str] = "piwae"

    def decoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.iwae_bound(log_w)

    def decoder_loss_gradient(self, log_w: Tensor) -> tuple[Tensor, Tensor]:
        return IWAE().encoder_loss_gradient(log_w)


@register_objective
@dataclass(frozen=True)
class CIWAE(Objective):
    """CIWAE(beta) = beta ELBO + (1 - beta) IWAE_k (Rainforth et al. 2018)."""

    name: ClassVar[str] = "ciwae"
    required: ClassVar[tuple[str, ...]] = ("beta",)
    beta: float = 0.5

    def __post_init__(self) -> None:
        _require_finite("beta", self.beta)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ciwae needs 0 <= beta <= 1, got {self.beta}")

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.ciwae_bound(log_w, self.beta)

    def dreg_coefficients(self, log_w: Tensor) -> Tensor:
        k = log_w.shape[0]
        return self.beta / k + (1.0 - self.beta) * bounds.normalized_weights(log_w.detach()).square()


@register_objective
@dataclass(frozen=True)
class Power(Objective):
    """The power-mean bound ``L_p^k = (1/p) log (1/k) sum_i w_i^p``, p <= 1 (1 is IWAE, 0 the ELBO)."""

    name: ClassVar[str] = "power"
    required: ClassVar[tuple[str, ...]] = ("p",)
    p: float = 0.5

    def __post_init__(self) -> None:
        _require_finite("p", self.p)
        if self.p > 1.0:
            raise ValueError(f"the power-mean bound is below IWAE only for p <= 1, got p = {self.p}")

    @property
    def power(self) -> float:
        return self.p

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.power_mean_bound(log_w, self.p)


@register_objective
@dataclass(frozen=True)
class VR(Objective):
    """VR-IWAE(alpha) = ``L_{1-alpha}^k``, alpha >= 0 (0 is IWAE, 1 the ELBO; Daudel et al. 2022)."""

    name: ClassVar[str] = "vr"
    required: ClassVar[tuple[str, ...]] = ("alpha",)
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _require_finite("alpha", self.alpha)
        if self.alpha < 0.0:
            raise ValueError(f"VR-IWAE is below IWAE only for alpha >= 0, got alpha = {self.alpha}")

    @property
    def power(self) -> float:
        return 1.0 - self.alpha

    def encoder_target(self, log_w: Tensor) -> Tensor:
        return bounds.vr_iwae_bound(log_w, self.alpha)


def _objective_class(name: str) -> type[Objective]:
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


def make_objective(name: str, **params: Any) -> Objective:
    """The registered objective ``name`` with its parameters.

    Args:
        name: a registered name (:func:`objective_names`).
        **params: the objective's parameters; ``None`` values are left out, so the flat
            ``M``/``beta``/``p``/``alpha`` settings of a grid or the CLI pass straight through, and ``M=1``
            is accepted by every objective.

    Raises:
        ValueError: an unknown name, a parameter of another objective, or a required one missing.
    """
    cls = _objective_class(name)
    known = {f.name for f in fields(cls)}
    given = {key: value for key, value in params.items() if value is not None}
    for key in sorted(set(given) - known):
        if key == "M" and given[key] == 1:
            continue  # M = 1 is every objective's default grouping
        owners = [n for n, c in OBJECTIVES.items() if key in {f.name for f in fields(c)}]
        where = f"the {' and '.join(owners)} objective{'s' if len(owners) > 1 else ''} only" if owners else "nothing"
        raise ValueError(f"{key} applies to {where}, not {name!r}")
    missing = [param for param in cls.required if param not in given]
    if missing:
        raise ValueError(f"the {name} objective needs {', '.join(missing)} (--{missing[0]})")
    return cls(**{key: value for key, value in given.items() if key in known})


def objective_from_dict(data: dict[str, Any] | str) -> Objective:
    """An objective from :meth:`Objective.to_dict`'s form (or a bare name)."""
    if isinstance(data, str):
        return make_objective(data)
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"an objective is written as {{'name': ..., parameters}}, got {data!r}")
    params = {key: value for key, value in data.items() if key != "name"}
    return make_objective(data["name"], **params)


def as_objective(value: Objective | str | dict[str, Any]) -> Objective:
    """An :class:`Objective` as it is, or one built from a name or a dict."""
    return value if isinstance(value, Objective) else objective_from_dict(value)
