"""Explicit backpropagation (iwae.fast.backprop) against autograd through the estimators."""

from __future__ import annotations

import pytest
import torch
from gradients import SMALL, SPECS, assert_same_gradients, autograd_gradients, float_model
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from iwae import estimators, fast
from iwae.config import TrainConfig
from iwae.fast import backprop
from iwae.models import ModelConfig
from iwae.steps import choose_step_path, training_step


def _explicit(model, x, noise, spec, estimator="standard") -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    bound = backprop.accumulate_gradients(model, x, noise, spec, estimator)
    return bound, [p.grad.clone() for p in model.parameters()]


@settings(max_examples=80, deadline=None)
@given(
    layers=st.sampled_from([1, 2]),
    activation=st.sampled_from(backprop.ACTIVATIONS),
    likelihood=st.sampled_from(backprop.LIKELIHOODS),
    objective=st.sampled_from(sorted(SPECS)),
    estimator=st.sampled_from(estimators.ESTIMATOR_NAMES),
    k=st.sampled_from([1, 2, 4, 6]),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
# A sample of weight 0 whose prior has log_std = -674: standardised^2 overflows, and 0 * inf was NaN.
@example(layers=2, activation="softplus", likelihood="gaussian", objective="iwae", estimator="standard", k=6, batch=3,
         seed=18198)  # fmt: skip
def test_gradients_equal_autograd_in_float64(
    layers: int, activation: str, likelihood: str, objective: str, estimator: str, k: int, batch: int, seed: int
) -> None:
    spec = SPECS[objective]
    groups = getattr(spec, "M", 1)
    if k % groups:
        k = groups
    model = float_model(SMALL[layers], activation, torch.float64, seed, likelihood)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 12), dtype=torch.float64, generator=generator)
    x = x.bernoulli(generator=generator) if likelihood == "bernoulli" else x
    noise = model.draw_noise(x, k, generator)
    reference = autograd_gradients(model, x, noise, spec, estimator)
    # A random relu model with two stochastic layers can overflow exp(log_std): log w = -inf, NaN gradients.
    assume(all(torch.isfinite(t).all() for t in (reference[0], *reference[1])))
    assert_same_gradients(_explicit(model, x, noise, spec, estimator), reference, rtol=1e-9)


@pytest.mark.parametrize("estimator", estimators.ESTIMATOR_NAMES)
@pytest.mark.parametrize("objective", ["iwae", "vae", "piwae"])
@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_match_autograd_on_burda_models_in_float32(layers: int, objective: str, estimator: str) -> None:
    """Burda's architectures in float32, where the native kernels and oneDNN's layers serve both paths."""
    model = float_model(ModelConfig.burda(layers), "tanh", torch.float32, seed=3)
    generator = torch.Generator().manual_seed(5)
    x = torch.bernoulli(torch.full((6, 784), 0.2), generator=generator)
    noise = model.draw_noise(x, 4, generator)
    spec = SPECS[objective]
    explicit = _explicit(model, x, noise, spec, estimator)
    assert_same_gradients(explicit, autograd_gradients(model, x, noise, spec, estimator), rtol=1e-4)


def test_gradients_accumulate_into_existing_grads() -> None:
    model = float_model(SMALL[2], "tanh", torch.float64, seed=0)
    x = torch.bernoulli(torch.full((3, 12), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    noise = model.draw_noise(x, 4, torch.Generator().manual_seed(2))
    _, once = _explicit(model, x, noise, SPECS["iwae"])
    backprop.accumulate_gradients(model, x, noise, SPECS["iwae"])
    for param, single in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(param.grad, 2 * single)


def test_applies_to_the_library_models_and_the_plan_takes_it_unless_switched_off(monkeypatch) -> None:
    model = float_model(SMALL[1], "tanh", torch.float32, seed=0)
    for estimator in estimators.ESTIMATOR_NAMES:
        assert all(backprop.applies(model, spec, estimator) for spec in SPECS.values())
    assert not backprop.applies(model, SPECS["iwae"], "reinforce")
    assert backprop.applies(float_model(SMALL[1], "softplus", torch.float32, 0, "gaussian"), SPECS["iwae"], "standard")
    assert not backprop.applies(torch.nn.Linear(2, 2), SPECS["iwae"], "standard")
    assert fast.training_path(model, SPECS["iwae"], "standard").accumulate is not None
    monkeypatch.setenv("IWAE_FAST", "-backprop,-step")
    assert fast.training_path(model, SPECS["iwae"], "standard").accumulate is None
    monkeypatch.setenv("IWAE_FAST", "0")
    assert fast.training_path(model, SPECS["iwae"], "standard").accumulate is None


@pytest.mark.parametrize("objective", ["iwae", "vae"])
def test_training_step_takes_the_explicit_path_and_matches_autograd(objective: str, monkeypatch) -> None:
    """The default step goes through iwae.fast.backprop; with IWAE_FAST=0 through autograd; same gradients."""
    config = TrainConfig(objective=objective, k=3, model=SMALL[2])
    x = torch.bernoulli(torch.full((4, 12), 0.4), generator=torch.Generator().manual_seed(0))
    calls = []
    original = backprop.accumulate_gradients
    monkeypatch.setattr(backprop, "accumulate_gradients", lambda *args: calls.append(1) or original(*args))
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("IWAE_FAST", switch)
        model = float_model(SMALL[2], "tanh", torch.float32, seed=0)
        path = choose_step_path(model, config)
        bound = training_step(model, x, config, torch.Generator().manual_seed(4), path)
        results.append((bound, [p.grad for p in model.parameters()]))
    assert calls == [1]  # the first step only
    assert_same_gradients(results[0], results[1], rtol=1e-5)
