"""Stacked training against single runs: each stacked model must follow the single run with its seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iwae import runs
from iwae.checkpoint import load_checkpoint
from iwae.config import TrainConfig
from iwae.models import ModelConfig
from iwae.stacked import (
    COMMIT_MARKER,
    STAGED_CHECKPOINT,
    ModelStack,
    StackedStep,
    check_stackable,
    fit_stacked,
    settle_staged_checkpoints,
    stacked_step,
)
from iwae.train import REFERENCE_PATH, build_model, fit, training_step

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))
TWO_LAYERS = ModelConfig(x_dim=784, latent_dims=(8, 4), hidden_dims=((32,), (16,)))


def _config(**changes) -> TrainConfig:
    base = TrainConfig(objective="iwae", k=3, model=SMALL, stages=((2, 1e-3), (1, 5e-4)), train_limit=200, valid_k=5)
    return base.replace(**changes)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
@pytest.mark.parametrize("model_config", [SMALL, TWO_LAYERS], ids=["one-layer", "two-layer"])
def test_one_stacked_step_gives_each_models_own_gradients(estimator: str, model_config: ModelConfig) -> None:
    """Float64: the stack's gradient slices equal the reference path's gradients of each model alone, for a stack
    that mixes objectives (each group shares one estimator call)."""
    configs = [
        _config(objective=objective, estimator=estimator, seed=seed, model=model_config)
        for seed, objective in enumerate(["iwae", "vae", "iwae"])
    ]
    images = torch.rand(50, 784, dtype=torch.float64)
    models = [build_model(c, images.float(), torch.device("cpu")).double() for c in configs]
    xs = [torch.bernoulli(images[i * 10 : i * 10 + 6]) for i in range(3)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(models))]
    noises = [m.draw_noise(x, 3, g) for m, x, g in zip(models, xs, generators, strict=True)]
    stack = ModelStack(models)
    bounds = stacked_step(
        stack,
        torch.stack(xs),
        [torch.stack(layer) for layer in zip(*noises, strict=True)],
        [c.objective for c in configs],
        estimator,
    )
    for index, (model, config, x) in enumerate(zip(models, configs, xs, strict=True)):
        bound = training_step(model, x, config, torch.Generator().manual_seed(index), REFERENCE_PATH)  # the same noise
        assert _close(bounds[index], bound, 1e-12)
        for name, param in model.named_parameters():
            assert _close(stack.params[f"model.{name}"].grad[index], param.grad, 1e-10), (index, name)


def test_stacked_seeds_follow_their_single_runs(tmp_path: Path, mnist) -> None:
    """Three stacked seeds (and objectives) over 3 epochs (300 steps of minibatch 20 on 2,000 images) against three
    single runs on the reference path: the same parameters to float32 rounding, the same metrics' shape."""
    configs = [
        _config(seed=seed, objective=objective, train_limit=2000)
        for seed, objective in [(0, "iwae"), (1, "iwae"), (2, "vae")]
    ]
    dirs = [tmp_path / "stack" / f"seed-{c.seed}" for c in configs]
    results = fit_stacked(configs, dirs, dataset=mnist, progress=False, device="cpu")
    assert all(r.complete and r.epochs_done == 3 for r in results)
    for config, run_dir, result in zip(configs, dirs, results, strict=True):
        single = fit(
            config, tmp_path / f"single-{config.seed}", dataset=mnist, progress=False, device="cpu", fast=False
        )
        stacked_params = load_file(run_dir / runs.MODEL_FILE)
        single_params = load_file(tmp_path / f"single-{config.seed}" / runs.MODEL_FILE)
        assert stacked_params.keys() == single_params.keys()
        for name in single_params:
            assert _close(stacked_params[name], single_params[name], 1e-4), name
        assert result.train_bound == pytest.approx(single.train_bound, abs=1e-3)
        assert result.valid_bound == pytest.approx(single.valid_bound, abs=1e-2)
        # The directory is a complete single run's: config, checkpoint, metrics, model.
        assert runs.load_config(run_dir) == config
        assert len(runs.read_metrics(run_dir)) == 3
        assert load_checkpoint(run_dir / runs.CHECKPOINT_FILE).progress["epochs_done"] == 3


def test_stacked_resume_equals_an_uninterrupted_stack_and_resumes_singly(tmp_path: Path, mnist) -> None:
    configs = [_config(seed=seed, estimator="dreg") for seed in (4, 5)]
    straight = [tmp_path / "straight" / f"seed-{c.seed}" for c in configs]
    resumed = [tmp_path / "resumed" / f"seed-{c.seed}" for c in configs]
    fit_stacked(configs, straight, dataset=mnist, progress=False, device="cpu")
    partial = fit_stacked(configs, resumed, dataset=mnist, progress=False, device="cpu", max_epochs=1)
    assert not partial[0].complete
    # A kill after the staged checkpoints were written but before the commit marker: they are dropped.
    (resumed[0] / STAGED_CHECKPOINT).write_bytes(b"torn")
    done = fit_stacked(configs, resumed, dataset=mnist, progress=False, device="cpu", resume=True)
    assert all(r.complete for r in done)
    assert not list((tmp_path / "resumed").rglob(STAGED_CHECKPOINT))
    for a, b in zip(straight, resumed, strict=True):
        first, second = load_file(a / runs.MODEL_FILE), load_file(b / runs.MODEL_FILE)
        for name in first:
            assert torch.equal(first[name], second[name]), name
        assert [m["train_bound"] for m in runs.read_metrics(a)] == [m["train_bound"] for m in runs.read_metrics(b)]
    # A stacked run's checkpoint is a single run's: one seed of an interrupted stack resumes on its own.
    alone = tmp_path / "alone"
    fit_stacked(configs, [alone / "a", alone / "b"], dataset=mnist, progress=False, device="cpu", max_epochs=2)
    fit(configs[0], alone / "a", dataset=mnist, progress=False, device="cpu", resume=True, fast=False)
    first, second = load_file(straight[0] / runs.MODEL_FILE), load_file(alone / "a" / runs.MODEL_FILE)
    for name in first:
        assert _close(first[name], second[name], 1e-4), name


def test_a_commit_interrupted_after_its_marker_rolls_forward(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        (d / runs.CHECKPOINT_FILE).write_text("old")
        (d / STAGED_CHECKPOINT).write_text("new")
    (dirs[1] / COMMIT_MARKER).write_text(json.dumps({"stack": [str(d) for d in dirs]}))
    settle_staged_checkpoints(dirs)
    assert [(d / runs.CHECKPOINT_FILE).read_text() for d in dirs] == ["new", "new"]
    assert not any((d / COMMIT_MARKER).exists() or (d / STAGED_CHECKPOINT).exists() for d in dirs)


def test_only_seed_objective_and_init_from_may_differ() -> None:
    check_stackable([_config(seed=0), _config(seed=1, objective="vae")])
    with pytest.raises(ValueError, match="k"):
        check_stackable([_config(seed=0), _config(seed=1, k=5)])
    with pytest.raises(ValueError, match="batch_size"):
        check_stackable([_config(seed=0), _config(seed=1, batch_size=10)])


def test_fused_adam_gets_contiguous_gradients() -> None:
    """torch 2.13's fused CPU Adam applies a strided ``.grad`` in memory order (silently wrong); under vmap the
    split-surrogate gradients come out strided, so the stack (and :func:`iwae.estimators.backward`) make them
    contiguous. This test fails if that guard goes."""
    configs = [_config(estimator="dreg", seed=seed) for seed in (0, 1)]
    images = torch.rand(30, 784)
    models = [build_model(c, images, torch.device("cpu")) for c in configs]
    xs = [torch.bernoulli(images[:10]) for _ in configs]
    generators = [torch.Generator().manual_seed(i) for i in range(len(models))]
    noises = [m.draw_noise(x, 3, g) for m, x, g in zip(models, xs, generators, strict=True)]
    stack = ModelStack(models)
    noise = [torch.stack(layer) for layer in zip(*noises, strict=True)]
    stacked_step(stack, torch.stack(xs), noise, [c.objective for c in configs], "dreg")
    assert all(p.grad.is_contiguous() for p in stack.parameters())


def test_the_graphs_modes_bookkeeping_matches_the_eager_step() -> None:
    """CUDA graphs are captured once per input shape and replayed on copies of the inputs; without CUDA the same
    bookkeeping (static inputs, one entry per shape, ``.grad`` pointing at the entry's gradients) recomputes
    instead of replaying. Several steps with two shapes must match the eager step exactly."""
    configs = [
        _config(estimator="dreg", seed=seed, objective=objective) for seed, objective in [(0, "iwae"), (1, "vae")]
    ]
    images = torch.rand(60, 784)
    eager_models = [build_model(c, images, torch.device("cpu")) for c in configs]
    graphed_models = [build_model(c, images, torch.device("cpu")) for c in configs]
    eager, graphed = ModelStack(eager_models), ModelStack(graphed_models)
    objectives = [c.objective for c in configs]
    steps = [StackedStep(eager, objectives, "dreg"), StackedStep(graphed, objectives, "dreg", "graphs", capture=False)]
    optimizers = [eager.build_optimizer(configs[0]), graphed.build_optimizer(configs[0])]
    generator = torch.Generator().manual_seed(0)
    for batch in (10, 7, 10, 7, 10):
        x = torch.bernoulli(images[:batch].expand(2, batch, 784), generator=generator)
        noise = [torch.randn(2, 3, batch, 8, generator=generator)]
        bounds = [step(x, noise) for step in steps]
        assert torch.equal(bounds[0], bounds[1])
        for optimizer in optimizers:
            optimizer.step()
    assert len(steps[1]._graphs) == 2  # one entry per shape
    for name in eager.params:
        assert torch.equal(eager.params[name], graphed.params[name]), name


def test_a_failed_cuda_graph_capture_falls_back_to_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that refuses the capture must not end the run: the step goes on eagerly, and says so."""
    import iwae.stacked

    def refuse(self, step, x, noise):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(iwae.stacked._Graphed, "__init__", refuse)
    configs = [_config(seed=seed) for seed in (0, 1)]
    images = torch.rand(30, 784)
    stacks = [ModelStack([build_model(c, images, torch.device("cpu")) for c in configs]) for _ in range(2)]
    objectives = [c.objective for c in configs]
    graphed, eager = (
        StackedStep(stacks[0], objectives, "standard", "graphs"),
        StackedStep(stacks[1], objectives, "standard"),
    )
    x = torch.bernoulli(images[:10].expand(2, 10, 784), generator=torch.Generator().manual_seed(0))
    noise = [torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(1))]
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        bounds = graphed(x, noise)
    assert torch.equal(bounds, eager(x, noise)) and graphed.mode == "eager"
    assert "CUDA graphs failed: operation not permitted" in graphed.description
