"""iwae.lab.bench.training_memory (``iwae bench --memory``): training steps' peak memory against k, each measured in a
fresh process, beside the library's estimate; its settings, its refusals and its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iwae.lab.bench import memory, training_memory
from iwae.memory import step_memory
from iwae.runs import RunError


def test_peaks_are_positive_and_grow_with_k_on_both_gradient_paths(mnist, tmp_path: Path) -> None:
    """k = 500 at minibatch 20 is 10,000 sample rows of 2,518 layer outputs: about 96 MiB per float32 copy of them,
    which a step keeps at least once; k = 1 keeps 20 rows."""
    if not memory.reset_peak_rss():
        pytest.skip("the peak cannot be reset here (/proc/self/clear_refs)")
    settings = training_memory.MemorySettings(
        ks=(1, 500), layers=(1,), variants=("default", "reference"), steps=2, threads=1, device="cpu", n_train=100,
        progress=False,
    )  # fmt: skip
    result = training_memory.measure_memory(settings, mnist.train.images)
    rows = {(row["k"], row["variant"]): row for row in result["rows"]}
    assert list(rows) == [(1, "default"), (1, "reference"), (500, "default"), (500, "reference")]
    for (k, variant), row in rows.items():
        assert row["status"] == "ok" and row["peak_mb"] > 0 and row["peak_mb"] == row["rss_above_baseline_mb"]
        assert row["rss_peak_mb"] >= row["rss_baseline_mb"] + row["peak_mb"] - 1e-9
        assert row["estimate_mb"] == step_memory(training_memory.train_config(1, k, 20), 59_600) / 2**20
        assert row["estimate_over_peak"] == pytest.approx(row["estimate_mb"] / row["peak_mb"])
        assert row["gradients"].startswith("fast: " if variant == "default" else "autograd")
    for variant in ("default", "reference"):
        assert rows[500, variant]["peak_mb"] - rows[1, variant]["peak_mb"] > 40, variant
    assert result["threads"] == 1 and result["device"] == "cpu" and result["n_train"] == 100
    assert json.loads(json.dumps(result)) == result
    json_path, md_path = training_memory.write_outputs(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result
    table = md_path.read_text()
    assert "| 1 | 20 | 500 | reference |" in table and "`default`: IWAE_FAST unset" in table


def made_up_worker(calls: list[tuple[list[str], dict]], fail_k: int | None = None):
    """A stand-in for the worker: records its arguments and environment and answers invented numbers (inputs for the
    bookkeeping, not measurements); it fails at ``fail_k``."""

    def run_worker(task, data_path, arguments, what, environment=None):
        assert task == "train" and Path(data_path).is_file()
        calls.append((list(arguments), dict(environment or {})))
        k = int(arguments[arguments.index("--k") + 1])
        if k == fail_k:
            raise RuntimeError(f"{what} failed (exit -9): no output")
        return {"gradients": "made up", "allocator": "made up", "steps": 3, "rss_baseline_mb": 300.0,
                "rss_peak_mb": 300.0 + k, "rss_above_baseline_mb": float(k), "cuda_peak_mb": None,
                "cuda_above_baseline_mb": None, "seconds_per_step": 0.01, "mean_bound": -200.0}  # fmt: skip

    return run_worker


def test_each_variant_runs_with_its_switches_and_a_failed_worker_leaves_its_row_failed(mnist, monkeypatch) -> None:
    calls: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(training_memory, "run_worker", made_up_worker(calls, fail_k=7))
    settings = training_memory.MemorySettings(ks=(2, 7), layers=(2,), batches=(20, 30), threads=1, device="cpu",
                                              progress=False)  # fmt: skip
    result = training_memory.measure_memory(settings, mnist.train.images)
    assert [(r["batch"], r["k"], r["variant"]) for r in result["rows"]] == [
        (b, k, v) for b in (20, 30) for k in (2, 7) for v in ("default", "plain-malloc", "reference")
    ]
    assert [environment["IWAE_FAST"] for _, environment in calls[:3]] == [None, "-allocator", "0"]
    assert all(a[a.index("--layers") + 1] == "2" and a[a.index("--threads") + 1] == "1" for a, _ in calls)
    for row in result["rows"]:
        if row["k"] == 7:
            assert row["status"].startswith("failed: the training-memory worker (layers 2, batch")
            assert row["peak_mb"] is None and row["estimate_over_peak"] is None and row["estimate_mb"] > 0
        else:
            assert row["status"] == "ok" and row["peak_mb"] == 2.0
            width = 784 + 200 + 200 + 200 + 100 + 200 + 200 + 784 + 100 + 100 + 100 + 100 + 50 + 100 + 100 + 200
            assert row["values_per_output"] == pytest.approx(2 * 2**20 / (4 * 2 * row["batch"] * width))
    assert "failed: the training-memory worker" in training_memory.markdown(result)


def test_a_k_that_iwae_train_would_refuse_is_refused_before_anything_runs(mnist, monkeypatch) -> None:
    calls: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(training_memory, "run_worker", made_up_worker(calls))
    settings = training_memory.MemorySettings(ks=(1, 10**8), layers=(1,), device="cpu", progress=False)
    with pytest.raises(RunError, match="lower --k"):
        training_memory.measure_memory(settings, mnist.train.images)
    assert calls == []


BAD_GRIDS = [{"ks": ()}, {"ks": (5, 5)}, {"ks": (0,)}, {"layers": (3,)}, {"batches": (0,)}, {"variants": ("fast",)},
             {"steps": 0}, {"threads": 0}]  # fmt: skip


@pytest.mark.parametrize("changes", BAD_GRIDS)
def test_settings_refuse_a_bad_grid(changes: dict) -> None:
    with pytest.raises(ValueError):
        training_memory.MemorySettings(**changes)
