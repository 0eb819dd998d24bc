"""Fewer steps for the same model: per-stage minibatches (Smith et al.'s batch growth, scaled learning rates), k
schedules, the schedules study's comparison, and stacked sweeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from iwae import runs
from iwae.cli import main
from iwae.config import BURDA_LEARNING_RATES, TrainConfig, build_train_config, grow_batch_schedule
from iwae.lab import schedules
from iwae.lab.grid import expand_grid, load_grid, train_config
from iwae.lab.store import ResultStore
from iwae.lab.sweep import run_sweep, stack_groups, stacks_by_default
from iwae.models import ModelConfig
from iwae.train import fit, steps_before, total_steps

SMALL = ModelConfig(x_dim=784, latent_dims=(8,), hidden_dims=((32,),))


def test_batch_growth_keeps_the_first_rate_and_grows_the_minibatch_by_the_rates_fall() -> None:
    config = build_train_config({"schedule": "burda", "batch_schedule": "grow"})
    assert {lr for _, lr in config.stages} == {1e-3}
    assert [passes for passes, _ in config.stages] == [3**i for i in range(8)]
    assert config.stage_batch_sizes == (20, 28, 38, 54, 74, 105, 143, 200)
    for size, lr in zip(config.stage_batch_sizes, BURDA_LEARNING_RATES, strict=True):  # batch x rate held
        assert abs(size - 20 * 1e-3 / lr) <= 0.5
    stages, sizes = grow_batch_schedule(((2, 1e-3), (1, 1e-4)), 10)
    assert stages == ((2, 1e-3), (1, 1e-3)) and sizes == (10, 100)


@pytest.mark.parametrize(("scale", "factor"), [("none", 1.0), ("linear", 5.0), ("sqrt", math.sqrt(5.0))])
def test_a_larger_fixed_minibatch_scales_the_rates(scale: str, factor: float) -> None:
    config = build_train_config({"schedule": "burda:3", "batch_size": 100, "lr_scale": scale})
    assert [lr for _, lr in config.stages] == pytest.approx([lr * factor for lr in BURDA_LEARNING_RATES[:3]])
    assert config.stage_batch_sizes is None and config.batch_size == 100


def test_k_schedule_sets_k_per_stage_and_the_runs_k() -> None:
    config = build_train_config({"schedule": "burda:4", "k_schedule": "1,2,3,5"})
    assert config.k == 5 and [config.k_of_stage(i) for i in range(4)] == [1, 2, 3, 5]
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="end at the run's k"):
        build_train_config({"schedule": "burda:2", "k_schedule": "1,2", "k": 5})
    with pytest.raises(ValueError, match="one k per stage"):
        build_train_config({"schedule": "burda:3", "k_schedule": "1,2"})
    with pytest.raises(ValueError, match="M"):  # every stage's k must suit the objective
        build_train_config({"schedule": "burda:2", "k_schedule": "3,4", "objective": "miwae", "M": 2})


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


def test_the_study_preset_compares_five_schedules_at_one_budget() -> None:
    specs = expand_grid(load_grid("schedules-quick"))
    configs = [train_config(s.options) for s in specs]
    assert {c.total_epochs for c in configs} == {40}  # burda:4
    assert {schedules.schedule_label(c) for c in configs} == {
        "batch 20 (Burda)", "batch grows 20→28→38→54, lr 0.001", "batch 100, lr from 0.00224",
        "batch 500, lr from 0.005", "k 1→2→3→5, batch 20",
    }  # fmt: skip
    assert {c.seed for c in configs} == {0, 1}
    groups = stack_groups([s for s in specs if s.phase == "batch"])
    assert len(groups) == 8 and all(len(group) == 2 for group in groups)  # the seeds of each cell stack


def test_comparison_pools_seeds_against_the_minibatch_20_cell() -> None:
    def row(seed: int, nll: float, seconds: float, **options) -> dict:
        base = {"objective": "iwae", "k": 5, "schedule": "burda:2", "seed": seed}
        return {"status": "finished", "config": base | options, "eval": {"nll": nll}, "seconds": seconds}

    rows = [
        row(0, 90.0, 100.0), row(1, 90.4, 100.0),
        row(0, 90.1, 60.0, batch_schedule="grow"), row(1, 90.5, 60.0, batch_schedule="grow"),
        row(0, 95.0, 20.0, batch_size=500, lr_scale="sqrt"),
    ]  # fmt: skip
    table = {r["schedule"]: r for r in schedules.comparison(rows)}
    base = table["batch 20 (Burda)"]
    assert base["nll"] == pytest.approx(90.2) and base["seeds"] == 2 and base["nll_minus_batch20"] == 0
    grow = table["batch grows 20→28, lr 0.001"]
    assert grow["nll_minus_batch20"] == pytest.approx(0.1) and grow["matches_batch20"]
    assert grow["time_saved"] == pytest.approx(0.4)
    big = table["batch 500, lr from 0.005"]
    assert not big["matches_batch20"] and big["nll_sd"] is None
    text = schedules.markdown(schedules.comparison(rows))
    assert "| iwae | 5 | batch grows 20→28, lr 0.001 | 2 | 90.30 ± 0.28 |" in text and "| +0.10 | yes | 40% |" in text


def test_a_sweep_stacks_seeds_and_objectives_and_records_each_run(tmp_path: Path) -> None:
    grid = {
        "fixed": {
            "dataset": "mnist",
            "layers": 1,
            "k": 2,
            "epochs": 2,
            "train_limit": 100,
            "valid_k": 2,
            "eval_k": 4,
            "eval_limit": 10,
            "samples": False,
        },
        "axes": {"objective": ["vae", "iwae"], "seed": [0, 1]},
    }
    summary = run_sweep(grid, tmp_path / "sweep", device="cpu", progress=False, stack=True)
    assert summary["failed"] == {} and summary["ran"] == 4 and summary["stack"] is True
    rows = ResultStore.in_dir(tmp_path / "sweep").rows()
    assert {r["status"] for r in rows} == {"finished"} and len(rows) == 4
    for r in rows:
        metrics = runs.read_metrics(Path(r["run_dir"]))
        assert [m["stacked"] for m in metrics] == [4, 4]  # one stack of all four
        assert r["eval"]["nll"] is not None
    again = run_sweep(grid, tmp_path / "sweep", device="cpu", progress=False, stack=True)
    assert again["skipped"] == 4 and again["ran"] == 0


def test_cli_trains_seeds_together_with_a_line_per_seed_each_its_single_run_bit_for_bit(tmp_path: Path, capsys) -> None:
    """On a CPU the seeds share one loop, each model taking its own fast step in turn: every seed ends where its
    single run ends, bit for bit."""
    argv = ["train", "--objective", "iwae", "--k", "2", "--epochs", "1", "--train-limit", "60", "--latent-dims", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*argv, "--seeds", "3,5", "--out", str(tmp_path / "seeds")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["seed"] for line in lines] == [3, 5]
    assert lines[0]["seconds"] == lines[1]["seconds"] and lines[0]["gradients"].endswith("2 models, one after another")
    assert main([*argv, "--seed", "5", "--out", str(tmp_path / "single")]) == 0
    single, together = runs.load_model(tmp_path / "single")[0], runs.load_model(tmp_path / "seeds" / "seed-5")[0]
    pairs = zip(single.state_dict().values(), together.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for seed in (3, 5):
        assert runs.load_config(tmp_path / "seeds" / f"seed-{seed}").seed == seed
        assert (tmp_path / "seeds" / f"seed-{seed}" / runs.MODEL_FILE).is_file()
    assert main(["train", "--seeds", "1,1", "--out", str(tmp_path / "x")]) == 2  # repeated seeds: a usage error
    assert main(["train", "--seeds", "1", "--seed", "2", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_sweeps_stack_by_default_on_a_gpu_only() -> None:
    """On a CPU a stacked step costs what the fast path's single steps cost (docs/performance.md): no gain."""
    assert stacks_by_default("cpu") is False
