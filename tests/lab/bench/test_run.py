"""iwae.lab.bench.run: a tiny benchmark's keys and values (the ``tiny_result`` fixture, in tests/conftest.py)."""

from __future__ import annotations

import json
import math

import pytest

from iwae import fast
from iwae.fast import allocator, native
from iwae.fast import step as native_step
from iwae.lab import bench

REQUIRED_KEYS = {
    "roofline_fraction_k50",
    "speedup_vs_pyro_k5_b20",
    "speedup_vs_pyro_k50_b20",
    "speedup_vs_plain_k5_b20",
    "speedup_vs_plain_k50_b20",
    "eval_s_per_1000_k5000",
    "eval_peak_rss_mb",
    "threads",
    "device",
    "torch_version",
    "rows",
}


FINITE_KEYS = REQUIRED_KEYS - {"speedup_vs_pyro_k5_b20", "speedup_vs_pyro_k50_b20", "device", "torch_version", "rows"}


def test_tiny_bench_has_the_required_keys_and_finite_values(tiny_result: dict) -> None:
    assert set(tiny_result) >= REQUIRED_KEYS
    for key in FINITE_KEYS:
        assert math.isfinite(tiny_result[key]), key
    assert tiny_result["speedup_vs_pyro_k5_b20"] is None and tiny_result["speedup_vs_pyro_k50_b20"] is None
    assert tiny_result["threads"] == 1 and tiny_result["device"] == "cpu"
    assert tiny_result["eval_images"] == 2 and tiny_result["eval_scaled"]
    evaluation = tiny_result["rows"][-1]
    assert len(evaluation["seconds_per_pass"]) == 3 and evaluation["seconds"] in evaluation["seconds_per_pass"]
    assert tiny_result["native_kernels"] == native.status()
    assert tiny_result["allocator"] == allocator.configure()
    assert tiny_result["allocator"] in bench.markdown(tiny_result)
    explicit = fast.enabled("backprop") or fast.enabled("step")  # the default for Burda's model
    expected = "fast: explicit backpropagation" if explicit else "autograd"
    assert tiny_result["gradients"].startswith(expected)
    assert ("in C++" in tiny_result["gradients"]) == native_step.available()
    train = [r for r in tiny_result["rows"] if r["task"] == "train"]
    assert len(train) == 4 * 3  # iwae, plain, pyro per cell
    for row in train:
        if row["impl"] == "pyro":
            assert row["status"] == bench.PYRO_SKIPPED and row["ms_per_step"] is None and row["gflops"] is None
        else:
            assert row["status"] == "ok" and row["ms_per_step"] > 0 and math.isfinite(row["gflops"])
    roofline = [r for r in tiny_result["rows"] if r["task"] == "matmul-roofline"]
    assert len(roofline) == 4 and all(r["gflops"] > 0 for r in roofline)
    assert {r["task"] for r in tiny_result["rows"]} == {"train", "matmul-roofline", "eval"}
    assert json.loads(json.dumps(tiny_result)) == tiny_result
    assert bench.PYRO_SKIPPED in bench.markdown(tiny_result)
    for cell in tiny_result["comparisons"]:  # 2,980 steps a pass, 3,280 passes
        iwae_row = next(r for r in train if r["impl"] == "iwae" and (r["k"], r["batch"]) == (cell["k"], cell["batch"]))
        expected = iwae_row["ms_per_step"] * 2980 * 3280 / 3.6e6 if cell["batch"] == 20 else None
        assert cell["burda_schedule_hours"] == pytest.approx(expected)
    assert "Burda's schedule (3,280 passes over 59,600 images" in bench.markdown(tiny_result)
    assert native.status() in bench.markdown(tiny_result)


def test_a_failed_worker_is_one_error_naming_it_with_its_exit_code_and_last_line(tmp_path) -> None:
    from iwae.lab.bench.run import run_worker

    with pytest.raises(RuntimeError, match=r"^the test's worker failed \(exit 1\): .*No such file"):
        run_worker("train", tmp_path / "missing.npz", ["--k", "1"], "the test's worker", {"IWAE_FAST": None})
