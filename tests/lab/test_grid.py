"""Grids and presets (iwae.lab.grid): axes, bundled axis values, phases, the shipped presets, grid files, and bad
grids refused with a message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae.config import BURDA_STAGES
from iwae.lab.grid import expand_grid, load_grid, preset_names, train_config


def test_axes_product_names_and_fixed_settings() -> None:
    grid = {
        "fixed": {"dataset": "mnist", "epochs": 2, "lr": 3e-4},
        "axes": {"objective": ["vae", "iwae"], "k": [1, 5, 50]},
    }
    specs = expand_grid(grid)
    assert [s.name for s in specs] == ["vae-k1", "vae-k5", "vae-k50", "iwae-k1", "iwae-k5", "iwae-k50"]
    assert specs[4].options == {"dataset": "mnist", "epochs": 2, "lr": 3e-4, "objective": "iwae", "k": 5}
    config = train_config(specs[4].options)
    assert config.stages == ((2, 3e-4),) and config.k == 5 and config.objective.name == "iwae"


def test_bundled_axis_values_and_phases() -> None:
    grid = load_grid("table2-quick")
    specs = expand_grid(grid)
    assert [s.phase for s in specs] == ["base", "base", "swap", "swap"]
    swap = {s.name: s.options for s in specs if s.phase == "swap"}
    assert swap["swap-iwae-k50-from-base-vae-k1"]["init_from"] == "base-vae-k1"
    # as the authors' experiment2 ran it: the IWAE (k = 50) continues as a VAE with k = 1, with its optimiser state
    assert swap["swap-vae-k1-from-base-iwae-k50"] == {
        "dataset": "mnist",
        "layers": 1,
        "eval_k": 5000,
        "eval_limit": 1000,
        "seed": 0,
        "epochs": 9,
        "lr": 1e-4,
        "objective": "vae",
        "k": 1,
        "init_from": "base-iwae-k50",
    }
    continued = train_config(swap["swap-vae-k1-from-base-iwae-k50"])
    assert continued.stages == ((9, 1e-4),) and not continued.fresh_optimizer
    for preset in ("table2-smoke", "table2-full"):
        pairs = {
            (s.options["objective"], s.options["k"], s.options.get("init_from")) for s in expand_grid(load_grid(preset))
        }
        assert pairs == {("vae", 1, None), ("iwae", 50, None), ("iwae", 50, "base-vae-k1"), ("vae", 1, "base-iwae-k50")}
    full = {s.name: train_config(s.options) for s in expand_grid(load_grid("table2-full"))}
    assert full["base-iwae-k50"].stages == BURDA_STAGES and full["swap-iwae-k50-from-base-vae-k1"].stages == (
        (2187, 1e-4),
    )


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"axes": {"k": [1, 1]}}, "same name"),
        ({"axes": {"kk": [1]}}, "unknown grid settings"),
        ({"axes": {"k": []}}, "non-empty list"),
        ({"fixed": {"schedule": "burda", "epochs": 3}}, "either a schedule or a number of epochs"),
        ({"axes": {"k": [0]}}, "k must be >= 1"),
        ({"phase": [{"name": "a"}], "axes": {"k": [1]}}, "inside the phases"),
    ],
)
def test_bad_grids_are_refused_with_a_message(grid: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_grid(grid)


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["k", "seed", "batch_size", "valid_k"]),
        st.lists(st.integers(1, 60), min_size=1, max_size=4, unique=True),
        min_size=1,
        max_size=3,
    )
)
def test_expansion_is_the_full_product_with_unique_names(axes: dict[str, list[int]]) -> None:
    specs = expand_grid({"fixed": {"epochs": 1}, "axes": axes})
    assert len(specs) == math.prod(len(values) for values in axes.values())
    assert len({s.name for s in specs}) == len(specs)
    combos = {tuple(s.options[key] for key in axes) for s in specs}
    assert len(combos) == len(specs)
    assert all(s.options["epochs"] == 1 for s in specs)


def test_presets_expand_to_the_documented_grids() -> None:
    assert set(preset_names()) >= {"table1-smoke", "table1-quick", "table1-full", "table2-quick", "ksweep"}
    full = expand_grid(load_grid("table1-full"))
    assert len(full) == 24
    assert {train_config(s.options).stages for s in full} == {BURDA_STAGES}
    assert {(s.options["dataset"], s.options["layers"]) for s in full} == {
        ("mnist", 1),
        ("mnist", 2),
        ("omniglot", 1),
        ("omniglot", 2),
    }
    quick = expand_grid(load_grid("table1-quick"))
    assert sorted((s.options["objective"], s.options["k"]) for s in quick) == sorted(
        (o, k) for o in ("vae", "iwae") for k in (1, 5, 50)
    )
    assert {train_config(s.options).total_epochs for s in quick} == {13}  # one equal budget
    assert [s.options["k"] for s in expand_grid(load_grid("ksweep"))] == [1, 5, 20, 30, 50, 100]
    student = [train_config(s.options) for s in expand_grid(load_grid("student-full"))]
    assert [c.k for c in student] == [1, 5, 20, 30, 50, 100]
    assert {
        (c.model.activation, c.model.hidden_dims, c.batch_size, c.total_epochs, c.stages[0][1], c.train_split)
        for c in student
    } == {("relu", ((200, 200),), 128, 100, 1e-3, "train+valid")}
    assert len(expand_grid(load_grid("table1-smoke"))) == 4
    compared = [train_config(s.options) for s in expand_grid(load_grid("estimators"))]
    assert {(c.k, c.total_epochs) for c in compared} == {(64, 4)}  # one equal budget for the six
    rows = [
        (c.objective.name, c.estimator, getattr(c.objective, "M", 1), getattr(c.objective, "beta", None))
        for c in compared
    ]
    assert sorted(rows) == [
        ("ciwae", "standard", 1, 0.05),
        ("iwae", "dreg", 1, None),
        ("iwae", "standard", 1, None),
        ("iwae", "stl", 1, None),
        ("miwae", "standard", 8, None),
        ("piwae", "standard", 8, None),
    ]
    binarised = {s.name: train_config(s.options) for s in expand_grid(load_grid("binarization"))}
    assert {name: (c.objective.name, c.k, c.binarization) for name, c in binarised.items()} == {
        "vae-k1-threshold": ("vae", 1, "threshold"),
        "vae-k1-dynamic": ("vae", 1, "dynamic"),
        "iwae-k50-threshold": ("iwae", 50, "threshold"),
        "iwae-k50-dynamic": ("iwae", 50, "dynamic"),
    }
    assert {c.total_epochs for c in binarised.values()} == {40}


def test_grid_files_and_missing_sources(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text("[fixed]\nepochs = 1\n[axes]\nseed = [0, 1]\n")
    assert [s.name for s in expand_grid(load_grid(path))] == ["s0", "s1"]
    with pytest.raises(ValueError, match="no such preset"):
        load_grid(tmp_path / "missing.toml")
    path.write_text("[fixed\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_grid(path)
