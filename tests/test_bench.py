"""``iwae bench``: FLOP counts, the plain baseline against our log-weights, a tiny run's keys, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwae import bounds, fast
from iwae.cli import main
from iwae.config import TrainConfig
from iwae.fast import allocator, native
from iwae.fast import step as native_step
from iwae.lab import bench
from iwae.lab.bench import cells
from iwae.models import LatentVariableModel, ModelConfig

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
REPO = Path(__file__).resolve().parents[1]


def test_flops_of_burda_one_layer() -> None:
    flops = bench.model_flops(ModelConfig.burda(1))
    assert flops.per_example == flops.encoder_per_example == 433_600  # 2 * (784*200 + 200*200 + 200*100)
    assert flops.per_sample == flops.decoder_per_sample == 413_600  # 2 * (50*200 + 200*200 + 200*784)
    assert flops.training_step(k=5, batch=20) == 3 * (20 * 433_600 + 100 * 413_600)


@pytest.mark.parametrize("layers", [1, 2])
def test_linear_shapes_cover_every_weight_of_the_model(layers: int) -> None:
    config = ModelConfig.burda(layers)
    model = LatentVariableModel(config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = bench.model_flops(config)
    assert flops.per_example + flops.per_sample == 2 * weights
    assert flops.encoder_per_sample == (0 if layers == 1 else 2 * 3 * 100 * 100)


@pytest.mark.parametrize("layers", [1, 2])
def test_plain_log_weights_equal_ours_for_the_same_parameters_and_noise(layers: int) -> None:
    torch.manual_seed(layers)
    model = LatentVariableModel(ModelConfig.burda(layers)).double()
    plain = bench.PlainIWAE(model.config).double().copy_from(model)
    x = torch.bernoulli(torch.full((6, 784), 0.3, dtype=torch.float64))
    k = 4
    ours = model.log_weights(x, k, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)  # the same draws, in the model's order: layer 1 first
    noise = [torch.randn((k, 6, d), generator=generator, dtype=torch.float64) for d in model.config.latent_dims]
    theirs = plain.log_weights(x, k, noise)
    assert theirs.shape == ours.shape == (k, 6)
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(plain.loss(x, k, noise), -bounds.iwae_bound(ours).mean(), rtol=1e-10, atol=1e-9)


def test_pyro_skip_reasons() -> None:
    assert bench.pyro_skip_reason(False, "1.9.2") == bench.PYRO_SKIPPED
    assert bench.pyro_skip_reason(True, None) == bench.PYRO_MISSING
    assert "pip install 'iwae[bench]'" in bench.PYRO_MISSING
    assert bench.pyro_skip_reason(True, "1.9.2") is None


@pytest.fixture(scope="module")
def tiny_result(mnist) -> dict:
    """The library function on the cells the required keys need, one repeat each, L_5000 on 2 images."""
    settings = bench.BenchSettings(
        mode="test", layers=(1,), ks=(5, 50), batches=(20, 100), repeats=1, warmup=1, threads=1, device="cpu",
        pyro=False, n_train=100, eval_images=2, eval_batch_size=2, eval_repeats=3, progress=False,
    )  # fmt: skip
    return bench.run_bench(settings, mnist)


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


def test_cli_json_is_one_object_and_out_has_both_files(tiny_result: dict, monkeypatch, capsys, tmp_path) -> None:
    seen = {}

    def fake_run(settings, dataset):
        seen["settings"] = settings
        return tiny_result

    monkeypatch.setattr(bench, "run_bench", fake_run)
    code = main(["bench", "--quick", "--json", "--no-pyro", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and "| layers |" not in err
    assert json.loads(out) == tiny_result
    settings = seen["settings"]
    assert settings.mode == "quick" and not settings.pyro and settings.threads == 1 and settings.ks == (5, 50)
    assert not settings.compile and not tiny_result["compile"]
    assert json.loads((tmp_path / "bench.json").read_text()) == tiny_result
    main(["bench", "--quick", "--json", "--compile", "--no-progress"])
    assert seen["settings"].compile
    assert "| layers | k | batch |" in (tmp_path / "bench.md").read_text()


def test_cli_help_and_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["bench", "--threads", "0"]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1


def test_benchmark_script_help() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "iwae bench" in done.stdout


def test_a_repeat_runs_calls_back_to_back_for_the_minimum_time() -> None:
    """A training step's repeat is a run of consecutive steps (as a training loop takes them), not one step."""
    counts = {"step": 0, "matmul": 0}

    def call(name: str, seconds: float):
        def fn() -> None:
            counts[name] += 1
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                pass

        return fn

    calls = {
        "step": bench.Timed(call("step", 0.001), min_seconds=0.05),
        "matmul": bench.Timed(call("matmul", 0.001)),
    }
    seconds = bench.time_round_robin(calls, repeats=3, warmup=1, sync=lambda: None)
    assert counts["matmul"] == 1 + 1 + 3  # warm-up, the probe for calls per repeat, one call a repeat
    assert counts["step"] >= 1 + 1 + 3 * 2  # 0.05 s of 1 ms calls: 50 a repeat, at least 2 on a crowded machine
    assert all(0.001 <= value < 0.05 for value in seconds.values())  # seconds per call, not per repeat


def test_the_training_steps_are_timed_in_runs_of_consecutive_steps(monkeypatch) -> None:
    timed: dict[str, bench.Timed] = {}

    def capture(calls, repeats, warmup, sync):
        timed.update(calls)
        return {name: 1e-3 for name in calls}

    monkeypatch.setattr(cells, "time_round_robin", capture)  # where measure_cell looks it up
    settings = bench.BenchSettings(mode="test", layers=(1,), ks=(2,), batches=(3,), pyro=False, progress=False)
    bench.measure_cell(1, 2, 3, torch.full((4, 784), 0.3), settings, bench.PYRO_SKIPPED)
    assert timed["iwae"].min_seconds == timed["plain"].min_seconds == bench.TRAINING_MIN_SECONDS > 0
    matmuls = [value for name, value in timed.items() if name not in ("iwae", "plain")]
    assert matmuls and all(value.min_seconds == bench.MIN_TIMED_SECONDS for value in matmuls)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_pyro_step_runs_and_changes_the_parameters(layers: int) -> None:
    pytest.importorskip("pyro")
    config = TrainConfig(objective="iwae", k=3, batch_size=4, model=ModelConfig.burda(layers))
    torch.manual_seed(0)
    plain = bench.PlainIWAE(config.model).copy_from(LatentVariableModel(config.model))
    before = [p.detach().clone() for p in plain.parameters()]
    pyro_iwae = bench.PyroIWAE(plain, config.k, config)
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    losses = [pyro_iwae.step(x) for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, plain.parameters(), strict=True))


@pytest.mark.slow
def test_compiled_iwae_step_trains() -> None:
    """``iwae bench --compile`` times the step of ``iwae train --compile``: it runs and moves the parameters."""
    config = TrainConfig(objective="iwae", k=3, batch_size=4, model=ModelConfig.burda(1))
    model = bench.build_model(config, torch.full((2, 784), 0.3), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step = bench.iwae_step(model, config, compile_model=True)
    step(torch.bernoulli(torch.full((4, 784), 0.3), generator=torch.Generator().manual_seed(0)))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
