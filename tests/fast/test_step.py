"""The C++ training step (iwae.fast.step) against iwae.fast.backprop's Python path and autograd, in float32."""

from __future__ import annotations

import shutil

import pytest
import torch
from gradients import SMALL, SPECS, assert_same_gradients, autograd_gradients, float_model
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae import estimators
from iwae.config import TrainConfig
from iwae.fast import backprop, native, step
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import Objective
from iwae.steps import choose_step_path, training_step

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or not native.available(), reason="no C++ compiler or no native kernels"
)


def _model(config: ModelConfig, seed: int, activation: str = "tanh", likelihood: str = "bernoulli"):
    """test_backprop's model (biases away from zero) in float32, the C++ step's dtype."""
    return float_model(config, activation, torch.float32, seed, likelihood)


def _inputs(model: LatentVariableModel, k: int, batch: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch, model.config.x_dim), 0.3), generator=generator)
    return x, model.draw_noise(x, k, generator)


def _gradients(function, model, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    bound = function(model, *args)
    return bound, [param.grad.clone() for param in model.parameters()]


def _cpp_path(model, x, noise, spec: Objective, estimator: str) -> torch.Tensor:
    log_w, tape = step.forward(model, x, noise)
    grads = estimators.log_weight_gradients(log_w, spec, estimator)
    step.backward(x, noise, tape, (grads.decoder, grads.encoder), estimators.stops_q_params(estimator))
    return grads.bound


def _python_path(model, x, noise, spec: Objective, estimator: str) -> torch.Tensor:
    """iwae.fast.backprop's explicit backpropagation in Python, as it runs where the C++ step does not apply."""
    tape = backprop._Tape()
    log_w = backprop._forward(model, x, noise, tape)
    grads = estimators.log_weight_gradients(log_w, spec, estimator)
    backprop._backward(model, x, noise, tape, (grads.decoder, grads.encoder), estimators.stops_q_params(estimator))
    return grads.bound


@settings(max_examples=60, deadline=None)
@given(
    layers=st.sampled_from([1, 2]),
    objective=st.sampled_from(sorted(SPECS)),
    estimator=st.sampled_from(estimators.ESTIMATOR_NAMES),
    k=st.sampled_from([1, 2, 4, 6]),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    onednn_from=st.sampled_from([0, step.FORWARD_ONEDNN_MIN_MACS, 1 << 62]),
)
def test_equals_the_python_path_and_autograd(
    layers: int, objective: str, estimator: str, k: int, batch: int, seed: int, onednn_from: int
) -> None:
    """Every objective and estimator; every layer through oneDNN, through addmm and the native tanh, and the mix."""
    spec = SPECS[objective]
    groups = getattr(spec, "M", 1)
    k = k if k % groups == 0 else groups
    model = _model(SMALL[layers], seed)
    x, noise = _inputs(model, k, batch, seed + 1)
    saved = step.FORWARD_ONEDNN_MIN_MACS
    step.FORWARD_ONEDNN_MIN_MACS = onednn_from
    try:
        fast = _gradients(_cpp_path, model, x, noise, spec, estimator)
    finally:
        step.FORWARD_ONEDNN_MIN_MACS = saved
    assert_same_gradients(fast, _gradients(_python_path, model, x, noise, spec, estimator), rtol=1e-4)
    assert_same_gradients(fast, autograd_gradients(model, x, noise, spec, estimator), rtol=1e-4)


@pytest.mark.parametrize("estimator", estimators.ESTIMATOR_NAMES)
@pytest.mark.parametrize("objective", ["iwae", "vae", "piwae"])
@pytest.mark.parametrize("layers", [1, 2])
def test_equals_the_python_path_on_burda_models(layers: int, objective: str, estimator: str) -> None:
    """Burda's shapes at minibatch 20 with k = 50: the large layers go through oneDNN, the small ones through
    addmm, and the Bernoulli kernels run on several threads."""
    model = _model(ModelConfig.burda(layers), seed=2)
    x, noise = _inputs(model, 50, 20, seed=3)
    spec = SPECS[objective]
    want = _gradients(_python_path, model, x, noise, spec, estimator)
    assert_same_gradients(_gradients(_cpp_path, model, x, noise, spec, estimator), want, rtol=2e-4)


def test_gradients_accumulate_into_existing_grads() -> None:
    model = _model(SMALL[2], seed=0)
    x, noise = _inputs(model, 4, 3, seed=1)
    _, once = _gradients(_cpp_path, model, x, noise, SPECS["iwae"], "dreg")
    _cpp_path(model, x, noise, SPECS["iwae"], "dreg")
    for param, single in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(param.grad, 2 * single)


def test_applies_to_burda_models_in_float32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(SMALL[1], seed=0)
    x = torch.zeros(2, 12)
    assert step.available() and "C++ training step" in step.status()
    assert step.applies(model, x)
    assert not step.applies(model, x.double())
    assert not step.applies(model.double(), x)
    assert not step.applies(_model(SMALL[1], 0, activation="relu"), x)
    assert not step.applies(_model(SMALL[1], 0, likelihood="gaussian"), x)
    monkeypatch.setenv("IWAE_FAST", "0")
    assert not step.applies(model, x)


def test_training_step_takes_it_for_every_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = step.forward
    monkeypatch.setattr(step, "forward", lambda *args: calls.append(1) or original(*args))
    model = _model(SMALL[2], seed=0)
    x, _ = _inputs(model, 1, 4, seed=1)
    for spec in SPECS.values():
        config = TrainConfig(objective=spec, k=4)
        training_step(model, x, config, torch.Generator().manual_seed(0), choose_step_path(model, config))
    assert len(calls) == len(SPECS)
    relu = _model(SMALL[1], 0, activation="relu")
    config = TrainConfig(objective="iwae", k=4)
    training_step(relu, x, config, torch.Generator().manual_seed(0), choose_step_path(relu, config))
    assert len(calls) == len(SPECS)  # relu layers: the Python path


def test_network_layout_lists_every_parameter_once() -> None:
    model = _model(SMALL[2], seed=0)
    params, layers_per_network = step.network_layout(model)
    assert layers_per_network == [3, 2, 3, 2]  # q(h1|x), q(h2|h1), p(x|h1), p(h1|h2)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and len(params) == 20


def test_rejects_parameters_of_another_dtype() -> None:
    model = _model(SMALL[1], seed=0)
    x, noise = _inputs(model, 2, 3, seed=1)
    model.encoder[0].head.bias.data = model.encoder[0].head.bias.data.double()
    with pytest.raises(RuntimeError, match="float32"):
        step.forward(model, x, noise)


def test_native_tanh_is_within_two_ulps() -> None:
    values = torch.cat(
        [torch.linspace(-12, 12, 200_001), torch.logspace(-30, 1, 1_000), -torch.logspace(-30, 1, 1_000)]
    )
    exact = torch.tanh(values.double())
    got = native.tanh_(values.clone()).double()
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((got - exact).abs() / ulp).max() <= 2.0
    strided = torch.linspace(-3, 3, 20).reshape(4, 5).T  # not contiguous: torch's tanh
    torch.testing.assert_close(native.tanh_(strided.clone()), torch.tanh(strided))


@pytest.mark.parametrize(("compiler", "reason"), [("no-such-compiler", "no C++ compiler"), ("false", "cannot query")])
def test_says_why_there_is_no_cpp_step(compiler: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", compiler)
    operator = step._build_and_load()
    assert operator.forward is None and operator.backward is None and reason in operator.description
