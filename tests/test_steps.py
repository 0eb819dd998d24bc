"""iwae.steps: the training step and the one place that chooses it (the reference path, the fast layer's, the
compiled one), the summed loss, the authors' step on both paths, and clearing gradients."""

from __future__ import annotations

import pytest
import torch
from gradients import adam_pair, random_gradients

from iwae import bounds
from iwae.config import TrainConfig, build_train_config
from iwae.models import LatentVariableModel, ModelConfig
from iwae.optim import BurdaAdam
from iwae.steps import (
    REFERENCE_PATH,
    PerModelStep,
    StackedModelsStep,
    StepPath,
    build_optimizer,
    choose_step_path,
    clear_gradients,
    select_step,
    stacks,
    training_step,
)
from iwae.train import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))


def _config(**changes) -> TrainConfig:
    base = TrainConfig(objective="iwae", k=3, model=SMALL, stages=((2, 1e-3), (1, 5e-4)), train_limit=200, valid_k=5)
    return base.replace(**changes)


def test_choose_step_path_without_the_fast_layer_is_the_reference() -> None:
    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),)))
    assert choose_step_path(model, TrainConfig(), fast=False) is REFERENCE_PATH


def test_autograd_training_step_is_the_plain_step_bit_for_bit(mnist, monkeypatch) -> None:
    """The reference step (training_step's default path) is the plain one, bit for bit."""
    config = TrainConfig(objective="iwae", k=3, model=ModelConfig(784, (5,), ((16,),)))
    x = (mnist.train.images[:8] > 0.5).float()
    for objective in ("iwae", "vae"):
        torch.manual_seed(0)
        model = LatentVariableModel(config.model)
        torch.manual_seed(0)
        plain = LatentVariableModel(config.model)
        training_step(model, x, config.replace(objective=objective), torch.Generator().manual_seed(4))
        sample = plain(x, 3, torch.Generator().manual_seed(4))
        value = bounds.iwae_bound(sample.log_w) if objective == "iwae" else bounds.elbo(sample.log_w)
        (-value.mean()).backward()
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("objective", ["vae", "iwae"])
def test_the_summed_loss_has_batch_times_the_gradient_of_the_mean(objective: str, mnist) -> None:
    x = torch.bernoulli(mnist.train.images[:20], generator=torch.Generator().manual_seed(0))
    grads = {}
    for reduction in ("mean", "sum"):
        config = build_train_config({"objective": objective, "k": 5, "loss_reduction": reduction})
        for fast in (False, True):
            model = build_model(config, mnist.train.images[:100], torch.device("cpu"))
            path = choose_step_path(model, config, fast=fast)
            training_step(model, x, config, torch.Generator().manual_seed(3), path)
            grads[reduction, fast] = [p.grad.clone() for p in model.parameters()]
    for fast in (False, True):
        for mean, total in zip(grads["mean", fast], grads["sum", fast], strict=True):
            assert torch.allclose(total, 20 * mean, rtol=1e-5, atol=1e-6)


def test_the_authors_step_runs_on_the_fast_path_as_on_the_reference(mnist) -> None:
    config = build_train_config({"protocol": "authors", "objective": "iwae", "k": 5})
    x = torch.bernoulli(mnist.train.images[:20], generator=torch.Generator().manual_seed(0))
    params = {}
    for fast in (False, True):
        model = build_model(config, mnist.train.images[:100], torch.device("cpu"))
        optimizer = build_optimizer(model, config)
        assert isinstance(optimizer, BurdaAdam)
        path = choose_step_path(model, config, fast=fast) if fast else REFERENCE_PATH
        generator = torch.Generator().manual_seed(5)
        for _ in range(5):
            clear_gradients(optimizer)
            training_step(model, x, config, generator, path)
            optimizer.step()
        params[fast] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(params[False], params[True], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    """``fit(compile_model=True)`` steps through torch.compile: same bound and gradients up to rounding."""
    from iwae.steps import compile_estimate

    config = _config(k=4)
    model = build_model(config, torch.full((1, 784), 0.3), torch.device("cpu"))
    x = torch.bernoulli(torch.full((5, 784), 0.3), generator=torch.Generator().manual_seed(0))
    results = []
    for path in (StepPath(), StepPath("torch.compile", compiled_estimate=compile_estimate())):
        model.zero_grad(set_to_none=True)
        bound = training_step(model, x, config, torch.Generator().manual_seed(1), path)
        results.append((bound, [p.grad.clone() for p in model.parameters()]))
    (eager_bound, eager_grads), (compiled_bound, compiled_grads) = results
    torch.testing.assert_close(compiled_bound, eager_bound, rtol=1e-5, atol=1e-4)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4 * eager.abs().max().item())


def test_clear_gradients_sets_every_gradient_to_none() -> None:
    (model, optimizer), _ = adam_pair(TrainConfig())
    random_gradients(model, 0)
    clear_gradients(optimizer)
    assert all(param.grad is None for param in model.parameters())


def test_the_selector_stacks_on_a_gpu_and_steps_each_model_on_its_own_elsewhere() -> None:
    """auto: one vmapped step on CUDA for several models (or for --compile, as CUDA graphs); each model's own path on a
    CPU; on and off as asked. The strategies say which in their descriptions."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert stacks(4, cuda) and stacks(1, cuda, compile_model=True) and not stacks(1, cuda)
    assert not stacks(4, cpu) and not stacks(4, cpu, compile_model=True)
    assert stacks(1, cpu, stack="on") and not stacks(4, cuda, stack="off")
    with pytest.raises(ValueError, match="stack must be one of auto, on, off"):
        stacks(2, cpu, stack="yes")
    configs = [TrainConfig(seed=seed, model=ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((6,),)))
               for seed in (0, 1)]  # fmt: skip
    models = [build_model(c, torch.rand(10, 12), cpu) for c in configs]
    optimizers = [build_optimizer(m, c) for m, c in zip(models, configs, strict=True)]
    own = select_step(models, optimizers, configs, cpu)
    assert isinstance(own, PerModelStep) and own.groups == [range(0, 1), range(1, 2)]
    assert own.description.endswith("2 models, one after another")
    stacked = select_step(models, optimizers, configs, cpu, stack="on")
    assert isinstance(stacked, StackedModelsStep) and stacked.groups == [range(0, 2)]
    assert stacked.description.startswith("stacked (2 models)")
