"""iwae.train, the run lifecycle: resume equivalence, safe checkpoints, metrics, the epoch loop's minibatch order,
per-stage minibatches and k, continuing a base run's optimiser (Table 2), runs of every objective and
estimator and of any depth, and the commit of a stack's staged checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from lock_holders import held_by_another_thread
from safetensors.torch import load_file

from iwae import runs
from iwae.checkpoint import load_checkpoint
from iwae.config import TrainConfig, build_train_config
from iwae.estimators import ESTIMATOR_NAMES
from iwae.locks import LockBusy
from iwae.models import ModelConfig
from iwae.objectives import make_objective, objective_names
from iwae.steps import build_optimizer
from iwae.train import (
    COMMIT_MARKER,
    JUMP_NATS,
    STAGED_CHECKPOINT,
    build_model,
    fit,
    implausible_bound,
    load_initial_optimizer,
    mean_bound,
    minibatch_order,
    run_state,
    settle_staged_checkpoints,
    steps_before,
    take_runs,
    total_steps,
)

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))

TINY = {"train_limit": 60, "valid_k": 2, "epochs": 2, "lr": 1e-3}


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


def test_output_bias_starts_at_the_data_mean_or_at_zero_and_nothing_else_changes(mnist) -> None:
    images = mnist.train.images[:500]
    burda = build_model(_config(), images, torch.device("cpu"))
    zero = build_model(_config(output_bias="zero"), images, torch.device("cpu"))
    mean = images.mean(dim=0).clamp(0.001, 0.999)
    torch.testing.assert_close(burda.decoder[0].head.bias, torch.log(mean) - torch.log1p(-mean))
    assert torch.count_nonzero(zero.decoder[0].head.bias) == 0
    others = [name for name, _ in burda.named_parameters() if name != "decoder.0.head.bias"]
    assert len(others) > 1 and all(torch.equal(burda.get_parameter(n), zero.get_parameter(n)) for n in others)


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


@pytest.mark.usefixtures("one_thread")
def test_a_three_layer_model_trains_and_evaluates(tmp_path: Path, mnist) -> None:
    from iwae.evaluate import evaluate_model

    config = build_train_config({**TINY, "latent_dims": "8,6,4", "hidden_dims": "16,12,8", "k": 3, "epochs": 1})
    result = fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert result.complete and math.isfinite(result.train_bound)
    model, _ = runs.load_model(tmp_path / "run")
    assert len(model.encoder) == 3 and model.encoder[2].head.out_features == 2 * 4
    evaluation = evaluate_model(model, mnist.test.subset(20), "dynamic", k=4)
    assert math.isfinite(evaluation.nll) and len(evaluation.active_units) == 3


def test_the_fixed_order_is_the_datas_and_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    fixed = build_train_config({"data_order": "fixed"})
    assert torch.equal(minibatch_order(fixed, 7, generator, torch.device("cpu")), torch.arange(7))
    assert torch.equal(generator.get_state(), before)
    shuffled = minibatch_order(build_train_config({}), 7, generator, torch.device("cpu"))
    assert sorted(shuffled.tolist()) == list(range(7)) and not torch.equal(generator.get_state(), before)


@pytest.mark.usefixtures("one_thread")
def test_a_run_trains_on_the_binarisation_and_split_its_config_names(tmp_path: Path, mnist) -> None:
    config = build_train_config({**TINY, "epochs": 1, "binarization": "threshold", "train_split": "train+valid"})
    result = fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert result.complete and json.loads((tmp_path / "run" / "config.json").read_text())["binarization"] == "threshold"


@pytest.mark.usefixtures("one_thread")
def test_init_from_continues_the_base_runs_optimiser(tmp_path: Path, mnist) -> None:
    base = build_train_config({**TINY, "protocol": "authors", "objective": "vae", "k": 1})
    fit(base, tmp_path / "base", dataset=mnist, progress=False, device="cpu")
    saved = load_checkpoint(tmp_path / "base" / runs.CHECKPOINT_FILE).optimizer_state["state"]
    steps_per_pass = math.ceil(60 / 20)
    assert {float(state["step"]) for state in saved.values()} == {2 * steps_per_pass}

    swap = base.replace(objective="iwae", k=5, init_from=str(tmp_path / "base"), stages=((1, 1e-4),))
    model = build_model(swap, mnist.train.images[:60], torch.device("cpu"))
    optimizer = build_optimizer(model, swap)
    load_initial_optimizer(optimizer, model, swap)
    for index, param in enumerate(model.parameters()):
        state = optimizer.state[param]
        assert torch.equal(state["exp_avg"], saved[index]["exp_avg"]), index
        assert torch.equal(state["exp_avg_sq"], saved[index]["exp_avg_sq"]), index
        assert float(state["step"]) == 2 * steps_per_pass

    fit(swap, tmp_path / "swap", dataset=mnist, progress=False, device="cpu")
    after = load_checkpoint(tmp_path / "swap" / runs.CHECKPOINT_FILE).optimizer_state["state"]
    assert {float(state["step"]) for state in after.values()} == {3 * steps_per_pass}  # the step count carried on

    fresh = swap.replace(fresh_optimizer=True)
    fit(fresh, tmp_path / "fresh", dataset=mnist, progress=False, device="cpu")
    restarted = load_checkpoint(tmp_path / "fresh" / runs.CHECKPOINT_FILE).optimizer_state["state"]
    assert {float(state["step"]) for state in restarted.values()} == {steps_per_pass}

    other = swap.replace(optimizer="adam", beta1=0.9)
    with pytest.raises(runs.RunError, match="--fresh-optimizer"):
        load_initial_optimizer(build_optimizer(model, other), model, other)


@pytest.mark.usefixtures("one_thread")
def test_an_authors_run_resumes_bit_for_bit(tmp_path: Path, mnist) -> None:
    config = build_train_config({**TINY, "protocol": "authors", "k": 3, "epochs": 3})
    fit(config, tmp_path / "whole", dataset=mnist, progress=False, device="cpu")
    fit(config, tmp_path / "parts", dataset=mnist, progress=False, device="cpu", max_epochs=1)
    fit(config, tmp_path / "parts", dataset=mnist, progress=False, device="cpu", resume=True)
    whole, _ = runs.load_model(tmp_path / "whole")
    parts, _ = runs.load_model(tmp_path / "parts")
    for (name, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.usefixtures("one_thread")
def test_every_objective_and_estimator_trains(tmp_path: Path, mnist) -> None:
    small = ModelConfig(x_dim=784, latent_dims=(4,), hidden_dims=((16,),))
    data = dataclasses.replace(mnist, valid=mnist.valid.subset(20))
    extra = {"miwae": {"M": 2}, "piwae": {"M": 2}, "ciwae": {"beta": 0.05}, "power": {"p": 0.5}, "vr": {"alpha": 0.5}}
    for objective in objective_names():
        for estimator in ESTIMATOR_NAMES:
            config = TrainConfig(
                objective=make_objective(objective, **extra.get(objective, {})), estimator=estimator, k=4, model=small,
                stages=((1, 1e-3),), train_limit=40, valid_k=2,
            )  # fmt: skip
            result = fit(config, tmp_path / f"{objective}-{estimator}", dataset=data, progress=False, device="cpu")
            assert result.complete and math.isfinite(result.train_bound), (objective, estimator)


def test_a_grown_schedule_trains_each_stage_at_its_minibatch_and_k(tmp_path: Path, mnist) -> None:
    config = TrainConfig(
        objective="iwae", k=3, model=SMALL, stages=((1, 1e-3), (2, 1e-3)), stage_batch_sizes=(20, 50),
        stage_k=(1, 3), train_limit=200, valid_k=5,
    )  # fmt: skip
    assert total_steps(config, 200) == 10 + 2 * 4 and steps_before(config, 200, 2) == 14
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    metrics = runs.read_metrics(tmp_path / "run")
    assert [(m["batch_size"], m["k"]) for m in metrics] == [(20, 1), (50, 3), (50, 3)]
    resumed = tmp_path / "resumed"  # resume across the change of minibatch and k: the same run
    fit(config, resumed, dataset=mnist, progress=False, device="cpu", max_epochs=1)
    fit(config, resumed, dataset=mnist, progress=False, device="cpu", resume=True)
    assert [m["train_bound"] for m in runs.read_metrics(resumed)] == [m["train_bound"] for m in metrics]


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


# -- the divergence rule and the one writer --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bound", "previous", "says"),
    [
        (-95.0, None, None),
        (-95.0, -96.0, None),
        (-250.0, -200.0, None),  # a 50-nat fall: within the rule (100 nats and half its size)
        (-0.5, None, None),  # log p(x) <= 0 but an estimate may sit a little above it on near-deterministic data
        (float("nan"), None, "nan"),
        (float("-inf"), -90.0, "-inf"),
        (2.0, None, "above 0"),
        (-4e28, -90.0, "below -5434"),
        (-5435.0, None, "below -5434"),
        (-400.0, -95.0, "down from -95"),
        (-1402.26, -824.196, "down from -824.196"),  # 578 nats: more than 100 and than half of 824
        (-1200.0, -824.196, None),  # 376 nats: less than half of 824
    ],
)
def test_a_bound_no_sound_model_gives_is_a_divergence(bound: float, previous: float | None, says: str | None) -> None:
    reason = implausible_bound(bound, previous, n_pixels=784)
    assert (reason is None) if says is None else (says in reason), reason


def test_only_a_non_finite_bound_is_implausible_for_continuous_data() -> None:
    # A Gaussian decoder's density can exceed 1 and its scale is the data's: no ceiling, floor or jump applies.
    assert implausible_bound(4.47, None, 16, binary=False) is None
    assert implausible_bound(-1e9, 10.0, 16, binary=False) is None
    assert implausible_bound(float("nan"), None, 16, binary=False) == "nan"


def test_the_jump_rule_needs_both_its_nats_and_its_fraction() -> None:
    assert implausible_bound(-90.0 - JUMP_NATS - 1, -90.0, 784) is not None  # far more than half of 90
    assert implausible_bound(-1000.0 - JUMP_NATS + 1, -1000.0, 7840) is None  # less than 100 nats
    assert implausible_bound(-2000.0 - 499.0, -2000.0, 7840) is None  # more than 100 nats, less than half of 2000
    assert implausible_bound(-2000.0 - 1001.0, -2000.0, 7840) is not None


def test_a_finite_blow_up_stops_the_run_before_its_epoch_is_written(tmp_path: Path, mnist) -> None:
    config = _config(stages=((3, 1.0),))  # Adam at rate 1: the bound leaves any plausible range, finite
    with pytest.raises(runs.DivergenceError, match=r"diverged in epoch 1 at learning rate 1 \(training bound"):
        fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert not (tmp_path / "run" / runs.METRICS_FILE).exists()


def test_a_second_writer_is_refused_and_changes_nothing(tmp_path: Path, mnist) -> None:
    config = _config(stages=((2, 1e-3),))
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu", max_epochs=1)
    before = run_state(tmp_path / "run")
    with held_by_another_thread(tmp_path / "run" / runs.LOCK_FILE), pytest.raises(LockBusy, match="is in use by pid"):
        fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu", resume=True)
    assert run_state(tmp_path / "run") == before
    assert fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu", resume=True).complete


def test_a_stack_one_of_whose_runs_is_held_writes_none_of_them(tmp_path: Path) -> None:
    configs = [_config(seed=0), _config(seed=1)]
    run_dirs = [tmp_path / "seed-0", tmp_path / "seed-1"]
    states = [run_state(run_dir) for run_dir in run_dirs]
    run_dirs[1].mkdir()
    states[1] = run_state(run_dirs[1])
    with held_by_another_thread(run_dirs[1] / runs.LOCK_FILE), ExitStack() as held, pytest.raises(LockBusy):
        take_runs(configs, run_dirs, states, held)
    assert not (run_dirs[0] / runs.CONFIG_FILE).exists() and not (run_dirs[1] / runs.CONFIG_FILE).exists()


def test_a_run_folder_swapped_for_a_link_after_its_check_is_refused(tmp_path: Path) -> None:
    run_dir, elsewhere = tmp_path / "seed-0", tmp_path / "elsewhere"
    checked = run_state(run_dir)  # a new folder, as the checks saw it
    elsewhere.mkdir()
    run_dir.symlink_to(elsewhere, target_is_directory=True)
    with ExitStack() as held, pytest.raises(runs.RunError, match="changed while this call checked it"):
        take_runs([_config()], [run_dir], [checked], held)
    assert not (elsewhere / runs.CONFIG_FILE).exists()


def test_a_run_written_between_its_check_and_its_lock_is_refused(tmp_path: Path) -> None:
    config = _config()
    run_dir = tmp_path / "run"
    checked = run_state(run_dir)  # a new run, as the checks saw it
    run_dir.mkdir()
    (run_dir / runs.CONFIG_FILE).write_text("{}")  # another writer got there first
    with ExitStack() as held, pytest.raises(runs.RunError, match="changed while this call checked it"):
        take_runs([config], [run_dir], [checked], held)
    assert (run_dir / runs.CONFIG_FILE).read_text() == "{}"


def test_the_temporaries_of_a_killed_write_go_when_the_run_is_next_taken(tmp_path: Path, mnist) -> None:
    config = _config(stages=((2, 1e-3),))
    run_dir = tmp_path / "run"
    fit(config, run_dir, dataset=mnist, progress=False, device="cpu", max_epochs=1)
    killed = run_dir / ".checkpoint.safetensors.0123456789abcdef.tmp"  # a kill mid-write leaves one of these
    killed.write_bytes(b"\0" * 1000)
    kept = [run_dir / ".notes.0123456789abcdef.tmp", run_dir / "checkpoint.safetensors.tmp"]  # not the run's
    for path in kept:
        path.write_text("mine")
    fit(config, run_dir, dataset=mnist, progress=False, device="cpu", resume=True)
    assert not killed.exists() and all(path.read_text() == "mine" for path in kept)
