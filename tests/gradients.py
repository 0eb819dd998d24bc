"""Shared by the tests of the gradient paths (``tests/fast/test_backprop.py``, ``tests/fast/test_step.py``,
``tests/test_estimators.py``, ``tests/test_steps.py``, ``tests/fast/test_adam.py``): the objectives with their
parameters, small models, the reference gradients (autograd through :mod:`iwae.estimators`) and how two sets of
gradients are compared, and pairs of optimisers fed the same gradients."""

from __future__ import annotations

import torch

from iwae import estimators
from iwae.config import TrainConfig
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import CIWAE, IWAE, MIWAE, PIWAE, VAE, VR, Power
from iwae.steps import build_optimizer

SPECS = {
    "vae": VAE(),
    "iwae": IWAE(),
    "miwae": MIWAE(M=2),
    "piwae": PIWAE(M=2),
    "ciwae": CIWAE(beta=0.3),
    "power": Power(p=0.5),
    "vr": VR(alpha=0.4),
}
SMALL = {
    1: ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((6, 5),)),
    2: ModelConfig(x_dim=12, latent_dims=(4, 3), hidden_dims=((6, 5), (5,))),
}


def float_model(
    config: ModelConfig, activation: str, dtype: torch.dtype, seed: int, likelihood: str = "bernoulli"
) -> LatentVariableModel:
    torch.manual_seed(seed)
    config = ModelConfig(config.x_dim, config.latent_dims, config.hidden_dims, activation, likelihood)
    model = LatentVariableModel(config).to(dtype)
    with torch.no_grad():  # biases away from zero, so that every term of the gradient is exercised
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(-0.5, 0.5)
    return model


def autograd_gradients(model, x, noise, spec, estimator="standard") -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    terms = estimators.estimate_from_noise(model, x, noise, spec, estimator)
    estimators.backward(model, terms)
    return terms.bound, [p.grad.clone() for p in model.parameters()]


def assert_same_gradients(explicit, reference, rtol: float) -> None:
    """Bounds to ``rtol``; gradients to ``rtol`` of the largest gradient of any parameter. In float32 a gradient that
    cancels (a sum of terms much larger than itself) keeps the absolute rounding of its terms, which the whole
    gradient's scale bounds and its own does not (a 1.6e-3 entry of a tensor whose largest is 15, beside another
    of 89, differed by 4.8e-6 between two correct orders of summation)."""
    (explicit_bound, explicit_grads), (reference_bound, reference_grads) = explicit, reference
    torch.testing.assert_close(explicit_bound, reference_bound, rtol=rtol, atol=rtol)
    scale = max(want.abs().max().item() for want in reference_grads)
    for got, want in zip(explicit_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def adam_pair(config: TrainConfig) -> list[tuple[torch.nn.Module, torch.optim.Adam]]:
    """Two identical small networks, each with the optimiser ``config`` builds."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        pairs.append((model, build_optimizer(model, config)))
    return pairs


def random_gradients(model: torch.nn.Module, step: int) -> None:
    """Sets every parameter's ``.grad`` to a draw seeded by ``step``."""
    generator = torch.Generator().manual_seed(step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
