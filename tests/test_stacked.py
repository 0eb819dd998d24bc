"""iwae.stacked, stacked training against single runs: each stacked model must follow the single run with its seed
(continuing its base run's optimiser as a single run does), and only runs that may share a stack share one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iwae import runs
from iwae.checkpoint import load_checkpoint
from iwae.config import TrainConfig, build_train_config
from iwae.models import ModelConfig
from iwae.objectives import make_objective
from iwae.stacked import ModelStack, StackedStep, check_stackable, stacked_gradients
from iwae.steps import REFERENCE_PATH, optimizer_for, training_step
from iwae.train import STAGED_CHECKPOINT, build_model, fit, fit_runs

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))
TWO_LAYERS = ModelConfig(x_dim=784, latent_dims=(8, 4), hidden_dims=((32,), (16,)))

TINY = {"train_limit": 60, "valid_k": 2, "epochs": 2, "lr": 1e-3}


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
    step = StackedStep(stack, [c.objective for c in configs], estimator)
    bounds = step(torch.stack(xs), [torch.stack(layer) for layer in zip(*noises, strict=True)])
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
    results = fit_runs(configs, dirs, dataset=mnist, progress=False, device="cpu", stack="on")
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
    fit_runs(configs, straight, dataset=mnist, progress=False, device="cpu", stack="on")
    partial = fit_runs(configs, resumed, dataset=mnist, progress=False, device="cpu", stack="on", max_epochs=1)
    assert not partial[0].complete
    # A kill after the staged checkpoints were written but before the commit marker: they are dropped.
    (resumed[0] / STAGED_CHECKPOINT).write_bytes(b"torn")
    done = fit_runs(configs, resumed, dataset=mnist, progress=False, device="cpu", stack="on", resume=True)
    assert all(r.complete for r in done)
    assert not list((tmp_path / "resumed").rglob(STAGED_CHECKPOINT))
    for a, b in zip(straight, resumed, strict=True):
        first, second = load_file(a / runs.MODEL_FILE), load_file(b / runs.MODEL_FILE)
        for name in first:
            assert torch.equal(first[name], second[name]), name
        assert [m["train_bound"] for m in runs.read_metrics(a)] == [m["train_bound"] for m in runs.read_metrics(b)]
    # A stacked run's checkpoint is a single run's: one seed of an interrupted stack resumes on its own.
    alone = tmp_path / "alone"
    fit_runs(configs, [alone / "a", alone / "b"], dataset=mnist, progress=False, device="cpu", stack="on", max_epochs=2)
    fit(configs[0], alone / "a", dataset=mnist, progress=False, device="cpu", resume=True, fast=False)
    first, second = load_file(straight[0] / runs.MODEL_FILE), load_file(alone / "a" / runs.MODEL_FILE)
    for name in first:
        assert _close(first[name], second[name], 1e-4), name


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
    StackedStep(stack, [c.objective for c in configs], "dreg")(torch.stack(xs), noise)
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
    optimizers = [optimizer_for(eager.parameters(), configs[0]), optimizer_for(graphed.parameters(), configs[0])]
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
        raise iwae.stacked.CaptureRefused("operation not permitted when stream is capturing")

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


@pytest.mark.parametrize("protocol", ["default", "authors"])
@pytest.mark.parametrize("estimator", ["standard", "dreg"])
def test_the_lifecycle_in_the_graphs_bookkeeping_equals_eager_bit_for_bit(
    tmp_path: Path, mnist, monkeypatch: pytest.MonkeyPatch, protocol: str, estimator: str
) -> None:
    """The whole lifecycle with the CUDA-graphs step (its bookkeeping, off CUDA) against the eager stacked step: 210
    images (a partial last minibatch), VAE beside IWAE, stopped after one epoch and resumed; the same parameters,
    optimiser states and metrics, bit for bit."""
    authors = {"optimizer": "burda-adam", "beta1": 0.99, "data_order": "fixed", "loss_reduction": "sum"}
    base = _config(estimator=estimator, train_limit=210, **(authors if protocol == "authors" else {}))
    configs = [base.replace(seed=0), base.replace(seed=1, objective="vae")]
    eager = [tmp_path / "eager" / f"run{i}" for i in range(2)]
    graphed = [tmp_path / "graphs" / f"run{i}" for i in range(2)]
    options = {"dataset": mnist, "progress": False, "device": "cpu", "stack": "on"}
    fit_runs(configs, eager, **options)
    monkeypatch.setattr("iwae.steps.step_mode", lambda device, compile_model: "graphs")
    fit_runs(configs, graphed, compile_model=True, max_epochs=1, **options)
    results = fit_runs(configs, graphed, compile_model=True, resume=True, **options)
    assert "CUDA graphs" in results[0].gradients
    for a, b in zip(eager, graphed, strict=True):
        for name in ("model.safetensors", "checkpoint.safetensors"):
            left, right = load_file(a / name), load_file(b / name)
            assert left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left), name
        timing = ("seconds", "examples_per_second")
        assert [{k: v for k, v in r.items() if k not in timing} for r in runs.read_metrics(a)] == [
            {k: v for k, v in r.items() if k not in timing} for r in runs.read_metrics(b)
        ]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
@pytest.mark.parametrize("objective", ["vae", "iwae", "miwae", "piwae", "ciwae", "power", "vr"])
def test_the_captured_region_runs_on_the_meta_device(layers: int, objective: str, estimator: str) -> None:
    """What a CUDA graph captures (:func:`iwae.stacked.stacked_gradients`) runs whole on ``meta``, which refuses a
    host synchronisation (``.item()``, ``bool()``, data-dependent shapes) and any CPU tensor: so the capture has none.
    Each objective beside IWAE (two groups of models, as a sweep stacks them), each estimator, one and two layers.
    """
    settings = {"piwae": {"M": 2}, "miwae": {"M": 2}, "power": {"p": 0.5}, "vr": {"alpha": 0.5}, "ciwae": {"beta": 0.5}}
    model_config = SMALL if layers == 1 else TWO_LAYERS
    objective_list = [make_objective(objective, **settings.get(objective, {})), make_objective("iwae")]
    configs = [
        _config(model=model_config, seed=i, estimator=estimator, k=4, objective=objective)
        for i, objective in enumerate(objective_list)
    ]
    models = [build_model(c, torch.rand(20, 784), torch.device("cpu")).to("meta") for c in configs]
    stack = ModelStack(models)
    stack.objective_groups([c.objective for c in configs])  # built before a capture, as the warm-up builds it
    x = torch.empty(2, 6, 784, device="meta")
    noise = [torch.empty(2, 4, 6, d, device="meta") for d in model_config.latent_dims]
    bounds, grads = stacked_gradients(stack, x, noise, [c.objective for c in configs], estimator)
    assert bounds.shape == (2, 6) and bounds.device.type == "meta"
    assert [g.shape for g in grads] == [p.shape for p in stack.parameters()]


def test_running_out_of_memory_in_a_capture_is_not_a_refused_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error while capturing ends the step as itself; it is not taken for a refusal and trained
    around eagerly. A refusal is told by its first cause, not by ``capture_end``'s generic follow-up."""
    import iwae.stacked

    def out_of_memory(self, step, x, noise):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(iwae.stacked._Graphed, "__init__", out_of_memory)
    configs = [_config(seed=seed) for seed in (0, 1)]
    images = torch.rand(30, 784)
    stack = ModelStack([build_model(c, images, torch.device("cpu")) for c in configs])
    step = StackedStep(stack, [c.objective for c in configs], "standard", "graphs")
    x = torch.bernoulli(images[:10].expand(2, 10, 784), generator=torch.Generator().manual_seed(0))
    with pytest.raises(torch.OutOfMemoryError):
        step(x, [torch.randn(2, 3, 10, 8)])
    try:
        try:
            raise ValueError("operation not permitted when stream is capturing")
        except ValueError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as error:
        assert "not permitted" in str(iwae.stacked._first_cause(error))


@pytest.mark.usefixtures("one_thread")
def test_a_stack_continues_its_bases_optimisers_as_single_runs_do(tmp_path: Path, mnist) -> None:
    bases = []
    for seed in (0, 1):
        base = build_train_config({**TINY, "protocol": "authors", "objective": "vae", "k": 1, "seed": seed})
        fit(base, tmp_path / f"base{seed}", dataset=mnist, progress=False, device="cpu")
        bases.append(base.replace(objective="iwae", k=3, init_from=str(tmp_path / f"base{seed}"), stages=((1, 1e-3),)))
    for config in bases:
        fit(config, tmp_path / f"single{config.seed}", dataset=mnist, progress=False, device="cpu", fast=False)
    stacks = [tmp_path / f"stack{c.seed}" for c in bases]
    fit_runs(bases, stacks, dataset=mnist, progress=False, device="cpu", stack="on")
    for config in bases:
        single, _ = runs.load_model(tmp_path / f"single{config.seed}")
        stacked, _ = runs.load_model(tmp_path / f"stack{config.seed}")
        for (name, a), (_, b) in zip(single.state_dict().items(), stacked.state_dict().items(), strict=True):
            assert torch.allclose(a, b, atol=1e-5), name
        moved = load_checkpoint(tmp_path / f"stack{config.seed}" / runs.CHECKPOINT_FILE).optimizer_state["state"]
        assert {float(state["step"]) for state in moved.values()} == {3 * 3}


def test_a_continued_run_never_shares_a_stack_with_a_fresh_one() -> None:
    from iwae.stacked import stack_key

    fresh = build_train_config({"objective": "vae", "k": 5})
    continued = fresh.replace(objective="iwae", init_from="/runs/base")
    restarted = continued.replace(fresh_optimizer=True)
    assert stack_key(fresh) != stack_key(continued) and stack_key(fresh) == stack_key(restarted)
    check_stackable([fresh, restarted])
    with pytest.raises(ValueError, match="optimiser continues"):
        check_stackable([fresh, continued])
