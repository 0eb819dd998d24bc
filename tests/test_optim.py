"""The optimisers of :mod:`iwae.optim`: :class:`BurdaAdam` is the authors' update (scalar oracles in plain floats),
and its multi-tensor step (``torch._foreach_*``, a handful of calls per step whatever the number of parameters) is
the per-tensor step it replaced, bit for bit on the CPU in float32 and float64, with the same state and checkpoints;
without the ``torch._foreach_*`` operations it falls back to the per-tensor step.

The authors' whole training step is checked against an independent NumPy implementation in
tests/integration/test_authors_protocol.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from iwae import optim
from iwae.checkpoint import restore_checkpoint, save_checkpoint
from iwae.optim import BurdaAdam


def authors_adam(grads: list[float], lr: float, b1: float = 0.99, b2: float = 0.999, eps: float = 1e-4) -> list[float]:
    """The authors' update for a scalar parameter starting at 0, in plain floats: the move from the moments before
    each gradient, m0 = 0, v0 = 1, t from 1. (Ascent on the bound = descent on the loss: the signs below are the
    loss's.)"""
    p, m, v, path = 0.0, 0.0, 1.0, []
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - alpha * m / (math.sqrt(v) + eps)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        path.append(p)
    return path


class PerTensorBurdaAdam(BurdaAdam):
    """The oracle: BurdaAdam's step as it was written before the multi-tensor step, one parameter at a time."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.initial_state(param))
                t = float(state["step"]) + 1.0  # the authors' timestep: 1 at the first update
                m, v = state["exp_avg"], state["exp_avg_sq"]
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                # The move first, from the old moments; then the moments take this step's gradient.
                param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                grad = param.grad
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                state["step"] += 1
        return loss


SHAPES = [(200, 784), (200,), (100, 200), (100,), (50, 100), (50,), (100, 50), (100,), (784, 100), (784,), (), (3, 1)]


def twins(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two identical lists of parameters (one layer's shapes, a scalar and a strided one), weights ~ N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    first = [(0.1 * torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]
    first[-1] = torch.randn(1, 3, generator=generator, dtype=dtype).t()  # a non-contiguous parameter
    first = [p.requires_grad_() for p in first]
    return first, [p.detach().clone().requires_grad_() for p in first]


def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Two parameter groups with their own rates, the second with the paper's Adam betas."""
    return [{"params": params[:8]}, {"params": params[8:], "lr": 3e-3, "betas": (0.9, 0.999)}]


def take_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1) -> None:
    """Gradients ~ N(0, 1) (the same for every optimiser given the same seed); parameter 2 gets none at steps 1 and
    3, so its timestep lags the others'; the rates change at step 3 (a new stage)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if step == 3:
            for group in optimizer.param_groups:
                group["lr"] *= 0.72
        for index, param in enumerate(params):
            grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.grad = None if index == 2 and step in (1, 3) else grad
        optimizer.step()


def assert_same_bits(a: BurdaAdam, a_params: list[torch.Tensor], b: BurdaAdam, b_params: list[torch.Tensor]) -> None:
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
        state_p, state_q = a.state[p], b.state[q]
        assert set(state_p) == set(state_q) == {"step", "exp_avg", "exp_avg_sq"}
        for key in state_p:
            assert state_p[key].dtype == state_q[key].dtype and state_p[key].device == state_q[key].device
            assert torch.equal(state_p[key], state_q[key]), key


def test_burda_adam_is_the_authors_update_and_its_first_step_moves_nothing() -> None:
    param = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = BurdaAdam([param], lr=0.01)
    grads = [3.0, -1.0, 0.5, 2.0, -4.0]
    path = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        path.append(param.item())
    assert path[0] == 0.0  # the one-step lag: the first move uses m = 0
    assert path[1] != 0.0
    assert path == pytest.approx(authors_adam(grads, 0.01), rel=1e-12, abs=1e-15)
    state = optimizer.state[param]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and float(state["step"]) == len(grads)
    # v started at 1, not 0
    expected_v = 1.0
    for g in grads:
        expected_v = 0.999 * expected_v + 0.001 * g * g
    assert state["exp_avg_sq"].item() == pytest.approx(expected_v, rel=1e-12)


def test_burda_adam_takes_each_stages_learning_rate_and_keeps_its_state() -> None:
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = BurdaAdam([param], lr=1e-3)
    lrs = [1e-3, 1e-3, 7.2e-4, 7.2e-4, 5.2e-4]
    grads = [0.3, -0.2, 0.7, 0.1, -0.5]
    for lr, g in zip(lrs, grads, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        param.grad = torch.full((3,), g, dtype=torch.float64)
        optimizer.step()
    p, m, v = 0.0, 0.0, 1.0
    for t, (lr, g) in enumerate(zip(lrs, grads, strict=True), start=1):
        p -= lr * math.sqrt(1 - 0.999**t) / (1 - 0.99**t) * m / (math.sqrt(v) + 1e-4)
        m, v = 0.99 * m + 0.01 * g, 0.999 * v + 0.001 * g * g
    assert param.tolist() == pytest.approx([p] * 3, rel=1e-12)
    with pytest.raises(ValueError, match="learning rate"):
        BurdaAdam([param], lr=float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_multi_tensor_step_is_the_per_tensor_step_bit_for_bit(dtype: torch.dtype) -> None:
    """Element-wise operations in the same order on the same numbers: the same bits, whatever the CPU or its number
    of threads, in float32 as in float64."""
    params, oracle_params = twins(dtype)
    optimizer, oracle = BurdaAdam(groups(params)), PerTensorBurdaAdam(groups(oracle_params))
    assert optim._foreach_available()
    for seed in (1, 2):
        take_steps(optimizer, params, 5, seed)
        take_steps(oracle, oracle_params, 5, seed)
        assert_same_bits(optimizer, params, oracle, oracle_params)
    assert float(optimizer.state[params[0]]["step"]) == 10 and float(optimizer.state[params[2]]["step"]) == 6
    assert not torch.equal(params[0], twins(dtype)[0][0])  # the parameters moved


def test_the_step_takes_a_handful_of_multi_tensor_calls_whatever_the_number_of_parameters(monkeypatch) -> None:
    calls: list[str] = []

    def counted(name: str, operation: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return operation(*args, **kwargs)

        return call

    for name in optim._FOREACH_OPERATIONS:
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    counts = []
    for n in (1, len(SHAPES)):
        params, _ = twins(torch.float32)
        optimizer = BurdaAdam(params[:n])
        calls.clear()
        take_steps(optimizer, params[:n], 1)
        counts.append(len(calls))
    # sqrt, + eps, the move, m's two operations, v's two, the step counts: one call each.
    assert counts == [8, 8]
    assert calls.count("_foreach_mul_") == 2 and calls.count("_foreach_addcdiv_") == 1


def test_without_the_multi_tensor_operations_the_step_falls_back_to_one_parameter_at_a_time(monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise AssertionError("a torch._foreach_* operation was called")

    monkeypatch.delattr(torch, "_foreach_addcmul_")  # a torch without one of them
    for name in optim._FOREACH_OPERATIONS[:-1]:
        monkeypatch.setattr(torch, name, refused)
    assert not optim._foreach_available()
    params, oracle_params = twins(torch.float32)
    optimizer, oracle = BurdaAdam(groups(params)), PerTensorBurdaAdam(groups(oracle_params))
    take_steps(optimizer, params, 5)
    take_steps(oracle, oracle_params, 5)
    assert_same_bits(optimizer, params, oracle, oracle_params)


def test_a_checkpoint_of_the_per_tensor_step_resumes_on_the_multi_tensor_step_bit_for_bit(tmp_path: Path) -> None:
    """The state keeps its keys, dtypes and devices (``step`` a float32 scalar on the CPU), so checkpoints written
    before the multi-tensor step resume on it, and the two go on as one."""
    torch.manual_seed(0)
    model, oracle_model = nn.Linear(5, 3), nn.Linear(5, 3)
    oracle_model.load_state_dict(model.state_dict())
    oracle = PerTensorBurdaAdam(oracle_model.parameters())
    take_steps(oracle, list(oracle_model.parameters()), 4)
    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, oracle_model, oracle, generator, {"epochs_done": 1, "seconds": 0.0}, json.dumps({}))
    optimizer = BurdaAdam(model.parameters())
    assert restore_checkpoint(path, model, optimizer, torch.Generator())["epochs_done"] == 1
    state = optimizer.state[model.weight]
    assert state["step"].shape == () and state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
    take_steps(optimizer, list(model.parameters()), 3, seed=7)
    take_steps(oracle, list(oracle_model.parameters()), 3, seed=7)
    assert_same_bits(optimizer, list(model.parameters()), oracle, list(oracle_model.parameters()))
