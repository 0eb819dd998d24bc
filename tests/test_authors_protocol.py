"""The authors' protocol as their code ran it (github yburda/iwae), item by item: BurdaAdam (iwae.optim), the fixed
data order, the summed minibatch loss, threshold binarisation, every training image, Table 2's optimiser
continuation, and models of any depth; the command line's flags and the table2 smoke preset end to end.

The authors' whole step is checked against an independent NumPy implementation in tests/test_authors_oracle.py;
BurdaAdam's own unit tests are in tests/test_optim.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from iwae import cli, runs
from iwae.checkpoint import load_checkpoint
from iwae.config import AUTHORS_PROTOCOL, TrainConfig, build_train_config
from iwae.data import DataError, Dataset, Split, binarize, for_run
from iwae.optim import BurdaAdam
from iwae.steps import REFERENCE_PATH, build_optimizer, choose_step_path, clear_gradients, training_step
from iwae.train import build_model, fit, fit_runs, load_initial_optimizer, minibatch_order

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"train_limit": 60, "valid_k": 2, "epochs": 2, "lr": 1e-3}


# -- configuration -------------------------------------------------------------------------------------------------
def test_the_authors_protocol_sets_its_items_and_refuses_a_contradiction() -> None:
    config = build_train_config({"protocol": "authors"})
    assert {key: getattr(config, key) for key in AUTHORS_PROTOCOL} == AUTHORS_PROTOCOL
    assert (config.optimizer, config.beta1, config.data_order, config.loss_reduction) == (
        "burda-adam", 0.99, "fixed", "sum",
    )  # fmt: skip
    default = build_train_config({})
    assert (default.optimizer, default.beta1, default.data_order, default.loss_reduction) == (
        "adam", 0.9, "shuffled", "mean",
    )  # fmt: skip
    assert build_train_config({"optimizer": "burda-adam"}).beta1 == 0.99  # the authors' beta1 with their Adam
    assert build_train_config({"optimizer": "burda-adam", "beta1": 0.9}).beta1 == 0.9
    assert build_train_config({"protocol": "authors", "data_order": "fixed"}).data_order == "fixed"
    with pytest.raises(ValueError, match="protocol 'authors' sets optimizer"):
        build_train_config({"protocol": "authors", "optimizer": "adam"})
    with pytest.raises(ValueError, match="protocol must be one of"):
        build_train_config({"protocol": "paper"})
    for key, value in (("optimizer", "sgd"), ("data_order", "random"), ("loss_reduction", "max"),
                       ("binarization", "otsu"), ("train_split", "all")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            build_train_config({key: value})


def test_configs_saved_before_continuation_load_as_they_ran() -> None:
    old = build_train_config({"init_from": "/runs/base"}).to_dict()
    old.pop("fresh_optimizer")
    for key in ("optimizer", "data_order", "loss_reduction", "binarization", "train_split"):
        old.pop(key)
    loaded = TrainConfig.from_dict(old)
    assert loaded.fresh_optimizer  # such runs started a new Adam
    assert (loaded.optimizer, loaded.data_order, loaded.train_split) == ("adam", "shuffled", "train")
    fresh = build_train_config({}).to_dict()
    fresh.pop("fresh_optimizer")
    assert not TrainConfig.from_dict(fresh).fresh_optimizer
    assert TrainConfig.from_json(build_train_config({"protocol": "authors"}).to_json()).optimizer == "burda-adam"


def test_models_of_any_depth() -> None:
    three = build_train_config({"latent_dims": "100,50,20"}).model
    assert three.latent_dims == (100, 50, 20) and three.hidden_dims == ((200, 200), (100, 100), (40, 40))
    assert build_train_config({"latent_dims": [100, 50, 20], "hidden_dims": "300,100,50"}).model.hidden_dims == (
        (300, 300), (100, 100), (50, 50),
    )  # fmt: skip
    assert build_train_config({"layers": 2}).model.hidden_dims == ((200, 200), (100, 100))  # Burda's, unchanged
    assert build_train_config({"latent_dims": "20"}).model.hidden_dims == ((200, 200),)
    for settings, message in (
        ({"layers": 3}, "needs its sizes"),
        ({"layers": 2, "latent_dims": "100,50,20"}, "needs 2 size"),
        ({"latent_dims": "100,50,20", "hidden_dims": "200,100"}, "needs 3 size"),
        ({"latent_dims": "100,0"}, ">= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            build_train_config(settings)


def test_a_three_layer_model_trains_and_evaluates(tmp_path: Path, mnist) -> None:
    from iwae.evaluate import evaluate_model

    config = build_train_config({**TINY, "latent_dims": "8,6,4", "hidden_dims": "16,12,8", "k": 3, "epochs": 1})
    result = fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert result.complete and math.isfinite(result.train_bound)
    model, _ = runs.load_model(tmp_path / "run")
    assert len(model.encoder) == 3 and model.encoder[2].head.out_features == 2 * 4
    evaluation = evaluate_model(model, mnist.test.subset(20), "dynamic", k=4)
    assert math.isfinite(evaluation.nll) and len(evaluation.active_units) == 3


# -- data ----------------------------------------------------------------------------------------------------------
def test_the_fixed_order_is_the_datas_and_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    fixed = build_train_config({"data_order": "fixed"})
    assert torch.equal(minibatch_order(fixed, 7, generator, torch.device("cpu")), torch.arange(7))
    assert torch.equal(generator.get_state(), before)
    shuffled = minibatch_order(build_train_config({}), 7, generator, torch.device("cpu"))
    assert sorted(shuffled.tolist()) == list(range(7)) and not torch.equal(generator.get_state(), before)


def tiny_dataset(binarization: str = "dynamic") -> Dataset:
    images = torch.rand(10, 784, generator=torch.Generator().manual_seed(1))
    return Dataset("toy", Split(images[:8], torch.arange(8)), Split(images[8:], torch.arange(8, 10)), Split(images),
                   binarization)  # fmt: skip


def test_threshold_binarisation_and_every_training_image() -> None:
    images = torch.tensor([[0.0, 0.49, 0.5, 0.51, 1.0]])
    assert binarize(images, "threshold").tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    data = tiny_dataset()
    threshold = for_run(data, "threshold")
    assert threshold.binarization == "threshold" and threshold.train is data.train
    whole = for_run(data, None, "train+valid")
    assert len(whole.train) == 10 and whole.train.labels.tolist() == list(range(10)) and len(whole.valid) == 2
    assert for_run(whole, None, "train+valid") is whole  # applied twice: nothing more
    with pytest.raises(DataError, match="binarised already"):
        for_run(tiny_dataset("fixed"), "threshold")


def test_a_run_trains_on_the_binarisation_and_split_its_config_names(tmp_path: Path, mnist) -> None:
    config = build_train_config({**TINY, "epochs": 1, "binarization": "threshold", "train_split": "train+valid"})
    result = fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert result.complete and json.loads((tmp_path / "run" / "config.json").read_text())["binarization"] == "threshold"


# -- the summed loss -----------------------------------------------------------------------------------------------
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


# -- Table 2: continuing the base run's optimiser ------------------------------------------------------------------
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


def test_an_authors_run_resumes_bit_for_bit(tmp_path: Path, mnist) -> None:
    config = build_train_config({**TINY, "protocol": "authors", "k": 3, "epochs": 3})
    fit(config, tmp_path / "whole", dataset=mnist, progress=False, device="cpu")
    fit(config, tmp_path / "parts", dataset=mnist, progress=False, device="cpu", max_epochs=1)
    fit(config, tmp_path / "parts", dataset=mnist, progress=False, device="cpu", resume=True)
    whole, _ = runs.load_model(tmp_path / "whole")
    parts, _ = runs.load_model(tmp_path / "parts")
    for (name, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


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


# -- the command line ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--protocol", "authors", "--optimizer", "adam"], "protocol 'authors' sets optimizer"),
        (["train", "--fresh-optimizer"], "--fresh-optimizer goes with --init-from"),
        (["train", "--layers", "3"], "needs its sizes"),
        (["train", "--latent-dims", "100,50", "--hidden-dims", "200"], "needs 2 size"),
        (["eval", "RUN", "--protocol", "authors", "--units", "ours"], "--protocol authors sets --units authors"),
    ],
)
def test_contradictory_flags_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    argv = (
        [*argv, "--out", str(tmp_path / "run")]
        if argv[0] == "train"
        else [a.replace("RUN", str(tmp_path)) for a in argv]
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_the_train_flags_reach_the_config(tmp_path: Path) -> None:
    from iwae.cli import build_parser
    from iwae.cli.run import _train_config

    argv = ["train", "--out", str(tmp_path / "x"), "--protocol", "authors", "--binarization", "threshold",
            "--train-split", "train+valid", "--latent-dims", "100,50,20", "--init-from", "base",
            "--fresh-optimizer"]  # fmt: skip
    config = _train_config(build_parser().parse_args(argv))
    assert (config.optimizer, config.data_order, config.loss_reduction, config.beta1) == (
        "burda-adam",
        "fixed",
        "sum",
        0.99,
    )
    assert (config.binarization, config.train_split, config.fresh_optimizer) == ("threshold", "train+valid", True)
    assert config.model.latent_dims == (100, 50, 20)


@pytest.mark.slow
def test_table2_smoke_reproduces_the_authors_swap(tmp_path: Path, capsys) -> None:
    out = tmp_path / "table2"
    argv = ["reproduce", "table2", "--preset", "smoke", "--workers", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 4 and summary["failed"] == {} and summary["preset"] == "table2-smoke"
    swap = out / "runs" / "swap-vae-k1-from-base-iwae-k50"
    config = runs.load_config(swap)
    assert (config.objective.name, config.k, config.fresh_optimizer) == ("vae", 1, False)
    steps = {float(s["step"]) for s in load_checkpoint(swap / runs.CHECKPOINT_FILE).optimizer_state["state"].values()}
    assert steps == {2 * math.ceil(500 / 20)}  # the base's 25 steps, continued by 25
    report = (out / "report" / "report.md").read_text() if (out / "report" / "report.md").is_file() else ""
    report = report or (out / "report.md").read_text()
    assert "iwae k=50" in report and "vae k=1" in report  # each row names both phases' objective and k


def test_reproduce_with_the_authors_protocol_sets_it_on_every_run(tmp_path: Path, monkeypatch, capsys) -> None:
    from iwae.lab import reports, sweep
    from iwae.lab.grid import eval_options, expand_grid, train_config

    seen = {}

    def fake_sweep(grid, out, **options):
        seen["specs"] = expand_grid(grid)
        seen["out"] = out
        return {"runs": len(seen["specs"]), "failed": {}}

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(reports, "write_report", lambda dirs, out, title: str(out))
    monkeypatch.setattr("iwae.cli.sweep._print_table", lambda rows: None)
    monkeypatch.setattr("iwae.cli.sweep._summaries", lambda directory: [])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", "table2", "--preset", "quick", "--protocol", "authors", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "authors" and seen["out"] == str(Path("experiments") / "table2-quick-authors")
    configs = [train_config(spec.options) for spec in seen["specs"]]
    assert len(configs) == 4 and {c.optimizer for c in configs} == {"burda-adam"}  # both phases
    assert {eval_options(spec.options)["eval_units"] for spec in seen["specs"]} == {"authors"}


def test_a_continued_run_never_shares_a_stack_with_a_fresh_one() -> None:
    from iwae.stacked import check_stackable, stack_key

    fresh = build_train_config({"objective": "vae", "k": 5})
    continued = fresh.replace(objective="iwae", init_from="/runs/base")
    restarted = continued.replace(fresh_optimizer=True)
    assert stack_key(fresh) != stack_key(continued) and stack_key(fresh) == stack_key(restarted)
    check_stackable([fresh, restarted])
    with pytest.raises(ValueError, match="optimiser continues"):
        check_stackable([fresh, continued])


def test_the_student_studys_smoke_preset_reports_both_unit_counts_apart_from_burdas(tmp_path: Path, capsys) -> None:
    out = tmp_path / "student"
    argv = ["reproduce", "student", "--preset", "smoke", "--workers", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 2 and summary["failed"] == {} and summary["preset"] == "student-smoke"
    config = runs.load_config(out / "runs" / "iwae-k5")
    assert (config.model.activation, config.batch_size, config.train_split) == ("relu", 128, "train+valid")
    report = (out / "report.md").read_text()
    assert "units: per-unit KL" in report and "(covariance)" in report
    assert "ReLU networks instead of tanh" in report and "all 60,000 training images" in report


def test_train_and_eval_as_the_authors_from_the_command_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train = ["train", "--protocol", "authors", "--k", "3", "--epochs", "1", "--train-limit", "60", "--out", str(run),
             "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cli.main(train) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["complete"] and runs.load_config(run).optimizer == "burda-adam"
    evaluate = ["eval", str(run), "--protocol", "authors", "--k", "5", "--limit", "20", "--device", "cpu",
                "--no-progress"]  # fmt: skip
    assert cli.main(evaluate) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruned_by"] == "authors" and len(result["active_units_authors"]) == 1
    assert (run / "eval-test-k5-seed0-limit20-authors.json").is_file()
