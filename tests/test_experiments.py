"""Grids, presets, the SQLite store under concurrent writers, resuming interrupted runs, --init-from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae import runs
from iwae.config import BURDA_STAGES
from iwae.lab import experiments
from iwae.lab.experiments import RunSpec, expand_grid, load_grid, preset_names, run_one, train_config
from iwae.lab.store import ResultStore
from iwae.models import ModelConfig
from iwae.train import build_model, fit, load_initial_weights

TINY = {
    "dataset": "mnist",
    "layers": 1,
    "latent_dims": [4],
    "train_limit": 100,
    "valid_k": 2,
    "eval_k": 4,
    "eval_limit": 20,
    "samples": False,
}


# -- grids ----------------------------------------------------------------------------------------
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


def test_grid_files_and_missing_sources(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text("[fixed]\nepochs = 1\n[axes]\nseed = [0, 1]\n")
    assert [s.name for s in expand_grid(load_grid(path))] == ["s0", "s1"]
    with pytest.raises(ValueError, match="no such preset"):
        load_grid(tmp_path / "missing.toml")
    path.write_text("[fixed\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_grid(path)


# -- the store ------------------------------------------------------------------------------------
# Run in separate interpreters that import only iwae.lab.store (no torch), so they start fast and write at once.
WRITER = """
import sys
from iwae.lab.store import ResultStore
db_path, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ResultStore(db_path)
for i in range(n):
    name = f"w{worker}-r{i}"
    store.upsert(name, config={"worker": worker, "i": i}, status="running", started="t0")
    store.upsert(name, status="finished", eval={"nll": worker * 1000 + i}, metrics=[{"epoch": 1}], seconds=i)
    store.upsert("shared", config={"last": worker}, status="running")  # every writer hits one row too
"""


def test_concurrent_writers_do_not_corrupt_the_database(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db)
    workers, n = 4, 40
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w), str(n)]) for w in range(workers)]
    assert [p.wait(120) for p in processes] == [0] * workers
    store = ResultStore(db)
    assert store.integrity() == "ok"
    rows = {row["name"]: row for row in store.rows()}
    assert len(rows) == workers * n + 1
    for w in range(workers):
        for i in range(n):
            row = rows[f"w{w}-r{i}"]
            assert row["status"] == "finished" and row["eval"] == {"nll": w * 1000 + i}
            assert row["config"] == {"worker": w, "i": i} and row["metrics"] == [{"epoch": 1}]
    assert rows["shared"]["config"]["last"] in range(workers)


def test_store_rejects_unknown_columns_and_statuses(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown result columns"):
        store.upsert("a", colour="red")
    with pytest.raises(ValueError, match="status must be"):
        store.upsert("a", status="done")
    store.upsert("a", config={"k": 1})
    assert store.get("a")["status"] == "pending" and store.get("b") is None


# -- running --------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_completion(tmp_path: Path, mnist) -> None:
    options = {**TINY, "objective": "iwae", "k": 2, "epochs": 3}
    run_dir = tmp_path / "run"
    partial = fit(train_config(options), run_dir, dataset=mnist, progress=False, device="cpu", max_epochs=1)
    assert not partial.complete
    summary = run_one(options, run_dir, device="cpu", dataset=mnist)  # picks up the checkpoint
    assert summary["epochs_done"] == 3
    assert [m["epoch"] for m in summary["metrics"]] == [1, 2, 3]
    assert (run_dir / runs.MODEL_FILE).is_file()
    evaluation = json.loads((run_dir / runs.EVAL_FILE).read_text())
    assert evaluation["k"] == 4 and evaluation["n_examples"] == 20 and summary["eval"]["nll"] == evaluation["nll"]
    assert summary["valid_bound"] == summary["metrics"][-1]["valid_L2"]
    again = run_one(options, run_dir, device="cpu", dataset=mnist)  # finished: nothing is retrained or re-evaluated
    assert again["eval"] == summary["eval"] and again["metrics"] == summary["metrics"]
    trained = (run_dir / runs.MODEL_FILE).stat().st_mtime_ns
    other_eval = run_one(options | {"eval_k": 6}, run_dir, device="cpu", dataset=mnist)  # re-evaluated only
    assert other_eval["eval"]["k"] == 6 and (run_dir / runs.MODEL_FILE).stat().st_mtime_ns == trained
    assert other_eval["metrics"] == summary["metrics"]


def test_execute_records_failures_and_environment(tmp_path: Path) -> None:
    spec = RunSpec("bad", "", {**TINY, "objective": "iwae", "k": 1, "epochs": 1, "init_from": str(tmp_path / "none")})
    name, status, error = experiments.execute(spec.to_dict(), tmp_path, device="cpu")
    assert (name, status) == ("bad", "failed") and "not a run directory" in error
    row = ResultStore.in_dir(tmp_path).get("bad")
    assert row["status"] == "failed" and "not a run directory" in row["error"]
    assert row["torch_version"] == torch.__version__ and row["package_version"]
    assert row["git_commit"] is None or len(row["git_commit"]) == 40


def test_init_from_starts_from_the_final_weights(tmp_path: Path, mnist) -> None:
    base_options = {**TINY, "objective": "vae", "k": 1, "epochs": 1}
    fit(train_config(base_options), tmp_path / "base", dataset=mnist, progress=False, device="cpu")
    config = train_config({**base_options, "objective": "iwae", "k": 3, "init_from": str(tmp_path / "base")})
    model = build_model(config, mnist.train.images[:100], torch.device("cpu"))
    load_initial_weights(model, config)
    base_model, _ = runs.load_model(tmp_path / "base")
    for (name, value), (_, expected) in zip(model.state_dict().items(), base_model.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
    # a run continued at a negligible learning rate ends where the base run ended
    cont = fit(config.replace(stages=((1, 1e-12),)), tmp_path / "cont", dataset=mnist, progress=False, device="cpu")
    assert cont.complete
    continued, _ = runs.load_model(tmp_path / "cont")
    for name, value in continued.state_dict().items():
        assert torch.allclose(value, base_model.state_dict()[name], atol=1e-6), name
    with pytest.raises(runs.RunError, match="architecture differs"):
        other = config.replace(model=ModelConfig(784, (5,), ((200, 200),)))
        load_initial_weights(build_model(other, mnist.train.images[:100], torch.device("cpu")), other)


def test_cli_train_accepts_init_from(tmp_path: Path) -> None:
    from iwae.cli import _train_config, build_parser

    argv = ["train", "--out", str(tmp_path / "x"), "--init-from", "some/run", "--epochs", "1"]
    args = build_parser().parse_args(argv)
    assert _train_config(args).init_from == str(Path("some/run").resolve())
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "x"), "--epochs", "1"])
    assert _train_config(args).init_from is None


def test_sweep_refuses_changed_training_settings_but_not_changed_evaluation(tmp_path: Path) -> None:
    grid = {"fixed": {**TINY, "objective": "iwae", "epochs": 2}, "axes": {"k": [1, 2]}}
    store = ResultStore.in_dir(tmp_path)
    recorded = experiments.resolved_specs(grid, tmp_path)[1]
    store.upsert(recorded.name, config=recorded.options, status="running")
    changed = {"fixed": grid["fixed"] | {"epochs": 3}, "axes": {"k": [1, 2]}}
    with pytest.raises(ValueError, match="other training settings"):
        experiments.run_sweep(changed, tmp_path, progress=False)  # refused before anything runs
    assert store.get("k1") is None and not (tmp_path / experiments.GRID_COPY).exists()
    experiments._check_same_settings(store.get("k2"), recorded.options | {"eval_k": 99}, tmp_path)  # allowed


def test_a_finished_run_of_another_grid_is_reused_not_retrained(tmp_path: Path) -> None:
    from iwae.lab.reports import load_records

    first = {"fixed": {**TINY, "objective": "iwae", "epochs": 1}, "axes": {"k": [2]}}
    (spec,) = experiments.resolved_specs(first, tmp_path)
    assert experiments.execute(spec.to_dict(), tmp_path, device="cpu")[1] == "finished"
    second = {"fixed": {**TINY, "epochs": 1}, "axes": {"objective": ["iwae"], "k": [2]}}  # same settings
    summary = experiments.run_sweep(second, tmp_path, progress=False, device="cpu")
    assert (summary["ran"], summary["reused"]) == (0, 1)
    store = ResultStore.in_dir(tmp_path)
    original, twin = store.get("k2"), store.get("iwae-k2")
    assert twin["status"] == "finished" and twin["eval"] == original["eval"] and twin["run_dir"] == original["run_dir"]
    assert (tmp_path / experiments.RUNS_SUBDIR / "iwae-k2" / runs.MODEL_FILE).is_file()  # init_from finds it
    records, _ = load_records([tmp_path])
    assert len(records) == 1  # one run, however many grids name it


def test_a_continued_run_of_a_reused_base_runs_once_and_the_sweep_can_be_repeated(tmp_path: Path) -> None:
    first = {"fixed": {**TINY, "objective": "iwae", "epochs": 1}, "axes": {"k": [2]}}
    (spec,) = experiments.resolved_specs(first, tmp_path)
    experiments.execute(spec.to_dict(), tmp_path, device="cpu")
    phases = {
        "fixed": TINY,
        "phase": [
            {"name": "base", "fixed": {"epochs": 1}, "axes": {"setting": [{"objective": "iwae", "k": 2}]}},
            {
                "name": "swap",
                "fixed": {"epochs": 1},
                "axes": {"setting": [{"objective": "vae", "k": 2, "init_from": "base-iwae-k2"}]},
            },
        ],
    }
    summary = experiments.run_sweep(phases, tmp_path, progress=False, device="cpu")
    assert (summary["ran"], summary["reused"], summary["failed"]) == (1, 1, {})
    again = experiments.run_sweep(phases, tmp_path, progress=False, device="cpu")  # nothing to do, no complaint
    assert (again["ran"], again["skipped"]) == (0, 2)
    from iwae.lab.reports import load_records, table2

    rows = table2(load_records([tmp_path])[0]).rows
    assert [row[1:3] for row in rows] == [["iwae k=2", "vae k=2"]]  # the continued run finds its (reused) base
