"""Training: resume equivalence, safe checkpoints, metrics, schedules and configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iwae import runs
from iwae.checkpoint import load_checkpoint
from iwae.config import BURDA_STAGES, TrainConfig, parse_schedule
from iwae.fast.adam import adam_step
from iwae.models import ModelConfig
from iwae.steps import StepPath, build_optimizer, clear_gradients
from iwae.train import build_model, fit, mean_bound

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))


def _config(**changes) -> TrainConfig:
    base = TrainConfig(objective="iwae", k=3, model=SMALL, stages=((2, 1e-3), (1, 5e-4)), train_limit=200, valid_k=5)
    return base.replace(**changes)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path: Path, mnist) -> None:
    config = _config()
    fit(config, tmp_path / "straight", dataset=mnist, progress=False, device="cpu")
    partial = fit(config, tmp_path / "resumed", dataset=mnist, progress=False, device="cpu", max_epochs=1)
    assert partial.epochs_done == 1 and not partial.complete
    assert not (tmp_path / "resumed" / runs.MODEL_FILE).exists()
    done = fit(config, tmp_path / "resumed", dataset=mnist, progress=False, device="cpu", resume=True)
    assert done.complete and done.epochs_done == 3
    straight = load_file(tmp_path / "straight" / runs.MODEL_FILE)
    resumed = load_file(tmp_path / "resumed" / runs.MODEL_FILE)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines_straight = runs.read_metrics(tmp_path / "straight")
    lines_resumed = runs.read_metrics(tmp_path / "resumed")
    assert [m["epoch"] for m in lines_resumed] == [1, 2, 3]
    assert [m["train_bound"] for m in lines_resumed] == [m["train_bound"] for m in lines_straight]


def test_checkpoint_is_safetensors_with_config_and_progress(tmp_path: Path, mnist) -> None:
    config = _config(stages=((1, 1e-3),))
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    state = load_checkpoint(tmp_path / "run" / runs.CHECKPOINT_FILE)
    assert state.progress["epochs_done"] == 1
    assert TrainConfig.from_json(state.config_json) == config
    assert state.optimizer_state["param_groups"][0]["eps"] == 1e-4
    assert state.optimizer_state["param_groups"][0]["betas"] == [0.9, 0.999]
    assert not list((tmp_path / "run").glob("*.tmp"))  # atomic writes leave no temporaries
    _model, loaded_config = runs.load_model(tmp_path / "run")
    assert loaded_config == config
    metrics = runs.read_metrics(tmp_path / "run")
    assert set(metrics[0]) >= {"epoch", "stage", "lr", "train_bound", "valid_L5", "seconds"}


def test_refuses_to_overwrite_or_resume_with_other_settings(tmp_path: Path, mnist) -> None:
    config = _config(stages=((1, 1e-3),))
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    with pytest.raises(runs.RunError, match="already holds a run"):
        fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    with pytest.raises(runs.RunError, match="different settings"):
        fit(config.replace(k=5), tmp_path / "run", dataset=mnist, progress=False, resume=True, device="cpu")


@pytest.mark.parametrize(("objective", "layers"), [("vae", 2), ("iwae", 1)])
def test_training_improves_the_bound(tmp_path: Path, mnist, objective: str, layers: int) -> None:
    config = TrainConfig(
        objective=objective, k=2, model=ModelConfig.burda(layers), stages=((1, 1e-3),), train_limit=1000, valid_k=5
    )
    subset = mnist.train.subset(200)
    before = mean_bound(
        build_model(config, mnist.train.images[:1000], torch.device("cpu")),
        subset,
        5,
        "dynamic",
        torch.Generator().manual_seed(0),
    )
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    model, _ = runs.load_model(tmp_path / "run")
    after = mean_bound(model, subset, 5, "dynamic", torch.Generator().manual_seed(0))
    # The output bias starts at logit(mean pixel), so the initial bound is already about -210 nats.
    assert after > before + 10


def test_burda_schedule() -> None:
    assert sum(p for p, _ in BURDA_STAGES) == 3280
    assert [lr for _, lr in BURDA_STAGES] == [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]
    assert parse_schedule("burda:4") == ((1, 1e-3), (3, 7.2e-4), (9, 5.2e-4), (27, 3.7e-4))
    assert parse_schedule(None, epochs=5, lr=3e-4) == ((5, 3e-4),)
    config = TrainConfig(stages=parse_schedule("burda:3"))
    assert config.total_epochs == 13
    assert [config.stage_of_epoch(e)[0] for e in range(13)] == [0, 1, 1, 1] + [2] * 9
    assert config.stage_ends() == {0, 3, 12}
    for bad in ("burda:0", "burda:9", "cosine"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_config_round_trip() -> None:
    config = TrainConfig(objective="vae", k=5, model=ModelConfig.burda(2), stages=parse_schedule("burda:2"), seed=3)
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["model"]["latent_dims"] == [100, 50]
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"bogus": 1})


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    """``fit(compile_model=True)`` steps through torch.compile: same bound and gradients up to rounding."""
    from iwae.steps import compile_estimate, training_step

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


def _adam_pair(config: TrainConfig) -> list[tuple[torch.nn.Module, torch.optim.Adam]]:
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        pairs.append((model, build_optimizer(model, config)))
    return pairs


def _grads_of(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


def test_adam_step_equals_optimizer_step_bit_for_bit() -> None:
    """Over several steps and a change of learning rate (a stage of Burda's schedule); state_dicts equal too."""
    config = TrainConfig(stages=((2, 1e-3), (2, 3e-4)))
    (direct_model, direct), (reference_model, reference) = _adam_pair(config)
    for step in range(6):
        for optimizer in (direct, reference):
            optimizer.param_groups[0]["lr"] = 1e-3 if step < 3 else 3e-4
        _grads_of(direct_model, step)
        _grads_of(reference_model, step)
        adam_step(direct)
        reference.step()
    for got, want in zip(direct_model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(direct.state.values(), reference.state.values(), strict=True):
        assert all(torch.equal(got[key], want[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_adam_step_leaves_what_it_does_not_cover_to_the_optimizer() -> None:
    config = TrainConfig()
    (model, optimizer), _ = _adam_pair(config)
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    for step in range(2):
        _grads_of(model, step)
        adam_step(optimizer)
    assert calls == [1, 1]  # hooks run: through optimizer.step()
    (model, optimizer), _ = _adam_pair(config)
    _grads_of(model, 0)
    adam_step(optimizer)  # the first step creates the state through optimizer.step()
    model[0].weight.grad = None
    before = model[0].weight.detach().clone()
    adam_step(optimizer)  # a parameter without a gradient: optimizer.step() skips it
    assert torch.equal(model[0].weight, before)


def test_clear_gradients_sets_every_gradient_to_none() -> None:
    (model, optimizer), _ = _adam_pair(TrainConfig())
    _grads_of(model, 0)
    clear_gradients(optimizer)
    assert all(param.grad is None for param in model.parameters())
