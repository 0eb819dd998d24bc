"""Training objectives: each maps the k samples of a batch to a surrogate to maximise and a bound to report.

Shape convention: log-weights are ``[k, batch]``; both returned tensors are ``[batch]``.
The surrogate is what autograd differentiates; the bound is the value to log. For the
objectives here (reparameterised, standard gradient estimator) the two coincide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from iwae import bounds
from iwae.models import ImportanceSample


@dataclass(frozen=True)
class ObjectiveTerms:
    surrogate: Tensor  # [batch]; maximise (its gradient is the estimator's)
    bound: Tensor  # [batch]; the bound's value, for reporting


def vae_objective(sample: ImportanceSample) -> ObjectiveTerms:
    """VAE with k samples: the mean of k single-sample ELBOs (Monte Carlo KL, as in Burda et al.)."""
    value = bounds.elbo(sample.log_w)
    return ObjectiveTerms(surrogate=value, bound=value)


def iwae_objective(sample: ImportanceSample) -> ObjectiveTerms:
    """IWAE L_k; its reparameterised gradient is sum_i w~_i grad log w_i."""
    value = bounds.iwae_bound(sample.log_w)
    return ObjectiveTerms(surrogate=value, bound=value)


OBJECTIVES: dict[str, Callable[[ImportanceSample], ObjectiveTerms]] = {
    "vae": vae_objective,
    "iwae": iwae_objective,
}


def get_objective(name: str) -> Callable[[ImportanceSample], ObjectiveTerms]:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None
