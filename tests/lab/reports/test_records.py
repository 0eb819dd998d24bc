"""iwae.lab.reports.records: how a setup departs from Burda's, which protocol it follows, and which runs are
averaged into one cell (only runs that differ in their seed alone)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from report_rows import STUDENT, STUDENT_DEPARTURES, line_cells, seed_row, setup_row

from iwae.config import build_train_config
from iwae.lab.reports import build_report, load_records, table1_cells
from iwae.lab.reports.records import burda_departures, group_by, protocol_of, setting_of
from iwae.lab.store import ResultStore


def _config(**settings):
    defaults = {"dataset": "mnist", "layers": None if "latent_dims" in settings else 1}
    return build_train_config(defaults | ({} if "schedule" in settings else {"epochs": 2}) | settings)


@pytest.mark.parametrize(
    ("settings", "departures"),
    [
        ({}, []),
        ({"protocol": "authors"}, []),  # the authors' code trains Burda's setup
        ({"layers": 2}, []),
        ({"dataset": "mnist-fixed"}, []),
        ({"binarization": "dynamic"}, []),  # MNIST's own
        ({"epochs": 100, "lr": 3e-4}, []),  # the budget, shown apart
        ({"activation": "relu"}, ["ReLU networks instead of tanh"]),
        ({"latent_dims": "20"}, ["latent sizes 20 instead of 50"]),
        ({"hidden_dims": "400"}, ["hidden layers 400-400 instead of 200-200"]),
        ({"latent_dims": "100,50,20"}, ["3 stochastic layers (100-50-20 units; Burda: 1 or 2 layers)"]),
        ({"batch_size": 128}, ["minibatch 128 instead of 20"]),
        ({"adam_eps": 1e-8}, ["Adam's epsilon 1e-08 instead of 1e-04"]),
        ({"schedule": "burda:3", "batch_schedule": "grow"}, ["minibatch 20, 28, 38 over the stages instead of 20"]),
        ({"schedule": "burda:2", "k_schedule": "1,5"}, ["k 1, 5 over the stages instead of k = 5 throughout"]),
        ({"binarization": "threshold"}, ["threshold binarisation instead of dynamic"]),
        ({"train_limit": 500}, ["trained on the first 500 training images (Burda: all 59,600)"]),
        ({"output_bias": "zero"}, ["the output bias starting at zero instead of the logit of the mean training pixel"]),
        (
            {"dataset": "omniglot", "train_split": "train+valid"},
            ["trained on the training and validation images (Burda: the validation images held out)"],
        ),
        ({**STUDENT, "epochs": 100}, STUDENT_DEPARTURES.split("; ")),
    ],
)
def test_burda_departures_name_each_way_a_setup_is_not_burdas(settings: dict, departures: list[str]) -> None:
    assert burda_departures(_config(**settings)) == departures


def test_protocols() -> None:
    assert protocol_of(_config()) == "default" and protocol_of(_config(protocol="authors")) == "authors"
    assert protocol_of(_config(optimizer="burda-adam")) == "mixed"


@pytest.mark.parametrize(
    "changed",
    [
        {"optimizer": "burda-adam"},
        {"beta1": 0.95},
        {"data_order": "fixed"},
        {"loss_reduction": "sum"},
        {"protocol": "authors"},
        {"binarization": "threshold"},
        {"binarization": "dynamic"},
        {"train_split": "train+valid"},
        {"activation": "relu"},
        {"latent_dims": "20"},
        {"hidden_dims": "400"},
        {"layers": None, "latent_dims": "100,50,20"},
        {"batch_size": 128},
        {"train_limit": 500},
        {"fresh_optimizer": True},  # a continued run (Table 2): its base's optimiser or a new one
    ],
)
def test_runs_that_differ_in_any_setting_but_the_seed_are_not_averaged(tmp_path: Path, changed: dict) -> None:
    base = {"objective": "iwae", "k": 5}
    if "fresh_optimizer" in changed:
        base["init_from"] = str(tmp_path / "base")
    store = ResultStore.in_dir(tmp_path)
    setup_row(store, "same-s0", tmp_path, 88.0, 20, 18, **base, seed=0)
    setup_row(store, "same-s1", tmp_path, 89.0, 20, 18, **base, seed=1)  # a seed of the same setting: averaged
    setup_row(store, "other-s2", tmp_path, 95.0, 20, 18, **base, **changed, seed=2)
    records, _ = load_records([tmp_path])
    assert sorted(len(runs) for runs in group_by(records, setting_of).values()) == [1, 2]
    markdown = build_report(records, [], "x").markdown("files")
    mean, sd = statistics.mean([88.0, 89.0]), statistics.stdev([88.0, 89.0])
    assert f"{mean:.2f} ± {sd:.2f} (n=2)" in markdown and "(n=3)" not in markdown


def test_only_runs_that_differ_in_their_seed_alone_are_averaged(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    seed_row(ResultStore.in_dir(first), "iwae-s0", first, 87.0, objective="iwae", k=5, seed=0)
    seed_row(ResultStore.in_dir(first), "iwae-s1", first, 88.0, objective="iwae", k=5, seed=1)
    seed_row(ResultStore.in_dir(second), "iwae-s0", second, 87.2, objective="iwae", k=5, seed=0)  # seed 0 rerun
    seed_row(ResultStore.in_dir(second), "iwae-sum", second, 91.0, objective="iwae", k=5, loss_reduction="sum")
    seed_row(ResultStore.in_dir(second), "iwae-b100", second, 95.0, objective="iwae", k=5, batch_size=100)
    records, _ = load_records([first, second])
    cell = table1_cells([r for r in records if r.config == records[0].config.replace(seed=r.seed)])
    assert cell[("mnist", 1, 5, "iwae")].seeds == 2
    assert cell[("mnist", 1, 5, "iwae")].nll == statistics.mean([statistics.mean([87.0, 87.2]), 88.0])

    report = build_report(records, [], "x")
    headings = [b[1] for b in report.blocks if b[0] == "h2" and b[1].startswith("Table 1")]
    assert len(headings) == 2 and any("loss_reduction=sum" in h for h in headings)  # another setting: another table
    markdown = report.markdown("files")
    assert "| 91.00 | 85.54 | +5.46 |" in markdown and "(n=2)" in markdown and "(n=3)" not in markdown
    assert "95.00 | 85.54" not in markdown  # minibatch 100 is not Burda's setup: not beside the paper's number
    assert line_cells(markdown, "| b/iwae-b100 | mnist |")[5] == "95.00"  # in the table of the other runs
