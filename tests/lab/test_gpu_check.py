"""The GPU check at toy sizes on the CPU (``iwae gpu-check --smoke``): every part runs, and the summary says what
it measured, so the command cannot rot between the sessions that have a GPU. Its CUDA-only paths are checked here
without CUDA: a phase that fails, the agreement of device and CPU, the L_k warm-up's shape, the workers' reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iwae import data, evaluate
from iwae.cli import main
from iwae.config import TrainConfig, build_train_config
from iwae.lab import gpu_check
from iwae.models import LatentVariableModel
from iwae.train import FitResult, build_model, create_run_dir


def test_the_smoke_check_writes_its_json_and_summary(tmp_path: Path, capsys) -> None:
    assert main(["gpu-check", "--smoke", "--out", str(tmp_path / "check"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "check" / "gpu-check.json").read_text())
    assert result["errors"] == []
    assert {(r["k"], r["batch"]) for r in result["steps"]} == {(1, 20), (3, 20)}
    assert all(r["single_ms"] > 0 and r["stacked_ms"] > 0 for r in result["steps"])
    assert result["column_hours"]["column_models"] == 3
    assert result["evaluation"]["seconds_per_10000_images"] > 0
    agreement = result["agreement"]
    assert agreement["model"] == "vae-k1" and agreement["images"] == 20 and agreement["agree"]
    # The same images and the same noise on both sides: on a CPU "device" the two NLLs are the same numbers.
    assert agreement["max_abs_difference"] == 0.0 and agreement["mean_difference"] == 0.0
    column = {(r["objective"], r["k"]): r for r in result["column"]["runs"]}
    assert set(column) == {("vae", 1), ("vae", 3), ("iwae", 3)} and result["column"]["failures"] == {}
    assert all(r["passes"] == 1 and r["nll"] is not None and r["eval_examples"] == 20 for r in column.values())
    assert column[("vae", 1)]["paper_nll"] == 86.76  # Burda's Table 1, via iwae.lab.reports.published
    # Which step each run took (FitResult.gradients), from its process's report; no peak memory off CUDA.
    workers = result["column"]["workers"]
    assert set(workers) == {"1", "3"} and not any("max_memory_gb" in report for report in workers.values())
    assert all(
        r["gradients"] and r["gradients"] == workers[str(k)]["gradients"][f"{o}-k{k}"] for (o, k), r in column.items()
    )
    summary = (tmp_path / "check" / "gpu-check.md").read_text()
    assert "| vae | 1 | 1 of 1 |" in summary and "| 86.76 |" in summary and "L_10:" in summary
    assert f"- k = 1: {column[('vae', 1)]['gradients']}" in summary and "## Errors" not in summary


def test_a_failed_phase_is_recorded_and_the_json_is_rewritten_after_every_phase(
    tmp_path: Path, monkeypatch, mnist
) -> None:
    out = tmp_path / "check"
    on_disk: dict[str, dict] = {}

    def seen(phase: str) -> None:
        on_disk[phase] = json.loads((out / "gpu-check.json").read_text())

    def steps(settings, images):
        seen("steps")
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def evaluation(settings, dataset, device):
        seen("evaluation")
        return {"eval_k": 10, "timed_images": 20, "seconds_per_10000_images": 1.0}

    def column(settings, out, data_dir, seconds_left):
        seen("column")
        raise TimeoutError("killed at the time limit")

    def agreement(settings, dataset, device, run_dir):
        seen("agreement")
        return {"model": run_dir.name, "skipped": "no model"}

    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: mnist)
    monkeypatch.setattr(gpu_check, "_steps", steps)
    monkeypatch.setattr(gpu_check, "_evaluation_speed", evaluation)
    monkeypatch.setattr(gpu_check, "_train_column", column)
    monkeypatch.setattr(gpu_check, "_agreement", agreement)
    result = gpu_check.run_check(gpu_check.smoke_settings(), out)
    assert result["errors"] == [
        {"phase": "steps", "error": "RuntimeError: CUDA error: an illegal memory access was encountered"},
        {"phase": "column", "error": "TimeoutError: killed at the time limit"},
    ]
    assert result["steps"] is None and result["column_hours"] is None and result["column"] is None
    assert result["agreement"] == {"model": "vae-k1", "skipped": "no model"}
    # Each phase found on disk what the phases before it had left, failures included.
    assert on_disk["steps"]["errors"] == [] and on_disk["steps"]["evaluation"] is None
    assert on_disk["evaluation"]["errors"][0]["phase"] == "steps"
    assert on_disk["column"]["evaluation"]["seconds_per_10000_images"] == 1.0
    assert [e["phase"] for e in on_disk["agreement"]["errors"]] == ["steps", "column"]
    assert json.loads((out / "gpu-check.json").read_text())["agreement"]["skipped"] == "no model"
    summary = (out / "gpu-check.md").read_text()
    assert "## Errors" in summary and "- steps: RuntimeError: CUDA error" in summary
    assert "Device against CPU: skipped (no model)" in summary and "Not measured" in summary


def test_the_agreement_skips_a_column_run_that_has_no_model(tmp_path: Path, mnist) -> None:
    run_dir = tmp_path / "check" / "column" / "vae-k1"
    settings = gpu_check.smoke_settings()
    missing = gpu_check._agreement(settings, mnist, torch.device("cpu"), run_dir)
    assert missing["model"] == "vae-k1" and "does not exist" in missing["skipped"]
    # The k = 1 process died in its first epoch: fit_stacked had created the directory, with no model in it yet.
    create_run_dir(build_train_config({"dataset": "mnist", "objective": "vae", "k": 1}), run_dir)
    skipped = gpu_check._agreement(settings, mnist, torch.device("cpu"), run_dir)
    assert skipped["model"] == "vae-k1" and "has no model.safetensors or checkpoint.safetensors" in skipped["skipped"]


def test_the_device_and_the_cpu_take_the_same_noise_each_in_its_own_chunks(monkeypatch, mnist) -> None:
    model = build_model(TrainConfig(), mnist.train.images, torch.device("cpu")).double()
    device = torch.device("cpu")  # the "device": chunk_rows gives it 1,200 rows, the CPU 500
    monkeypatch.setattr(evaluate, "chunk_rows", lambda d: 1_200 if d is device else 500)
    received: dict[str, list[torch.Tensor]] = {"device": [], "cpu": []}

    class Recording(torch.nn.Module):
        def __init__(self, side: str) -> None:
            super().__init__()
            self.side = side

        def draw_noise(self, x, k, generator=None):
            return model.draw_noise(x, k, generator)

        def sample_with_noise(self, x, noise):
            received[self.side].append(noise[0])
            return model.sample_with_noise(x, noise)

    x = torch.bernoulli(mnist.test.images[:130].double(), generator=torch.Generator().manual_seed(1))
    on_device, on_cpu = gpu_check._paired_log_likelihoods(
        Recording("device"), Recording("cpu"), x, 30, device, torch.Generator().manual_seed(2)
    )
    # Batches of 100 and 30 images: the device's chunks are 12 samples, the CPU's 5 (the last of each shorter).
    assert [n.shape[0] for n in received["device"]] == [12, 12, 6] * 2
    assert [n.shape[0] for n in received["cpu"]] == [5, 5, 2, 5, 5, 2, 5, 1] * 2
    assert torch.equal(torch.cat(received["device"][:3]), torch.cat(received["cpu"][:8]))
    assert torch.equal(torch.cat(received["device"][3:]), torch.cat(received["cpu"][8:]))
    assert on_device.dtype == on_cpu.dtype == torch.float64 and on_device.shape == on_cpu.shape == (130,)
    torch.testing.assert_close(on_device, on_cpu, rtol=0.0, atol=1e-9)  # float64: chunking changes only rounding
    assert gpu_check._agreement_verdict(on_device, on_cpu)["agree"]


def test_the_agreement_tests_the_paired_difference_against_its_standard_error() -> None:
    on_cpu = torch.full((500,), -100.0, dtype=torch.float64)
    same = gpu_check._agreement_verdict(on_cpu.clone(), on_cpu)
    assert same["agree"] and same["mean_difference"] == 0.0 and same["standard_error"] == 0.0
    # Per-image differences of +-1 around 0: sample SD sqrt(500 / 499), standard error 1 / sqrt(499) = 0.045 nats.
    spread = torch.tensor([1.0, -1.0] * 250, dtype=torch.float64)
    noisy = gpu_check._agreement_verdict(on_cpu - spread, on_cpu)
    assert noisy["agree"] and noisy["standard_error"] == pytest.approx(1.0 / 499**0.5, rel=1e-12)
    assert noisy["max_abs_difference"] == 1.0 and noisy["nll_device"] == pytest.approx(100.0)
    shifted = gpu_check._agreement_verdict(on_cpu - spread - 0.3, on_cpu)  # 6.7 standard errors off
    assert not shifted["agree"] and shifted["mean_difference"] == pytest.approx(0.3)
    assert shifted["tolerance"] == pytest.approx(4.0 / 499**0.5 + gpu_check.ROUNDING_NATS, rel=1e-12)
    # Without spread, only the float32 rounding allowance is left.
    assert gpu_check._agreement_verdict(on_cpu - 5e-4, on_cpu)["agree"]
    assert not gpu_check._agreement_verdict(on_cpu - 5e-3, on_cpu)["agree"]
    assert not gpu_check._agreement_verdict(on_cpu - float("nan"), on_cpu)["agree"]


def test_the_evaluation_warms_up_on_the_timed_passs_chunk_shape(monkeypatch, mnist) -> None:
    shapes = []
    draw_noise = LatentVariableModel.draw_noise

    def recording(self, x, k, generator=None):
        shapes.append((k, x.shape[0]))
        return draw_noise(self, x, k, generator)

    monkeypatch.setattr(LatentVariableModel, "draw_noise", recording)
    settings = gpu_check.smoke_settings(eval_k=100, timing_images=20)
    result = gpu_check._evaluation_speed(settings, mnist, torch.device("cpu"))
    assert result["eval_k"] == 100 and result["seconds_per_10000_images"] > 0
    # 5,000 rows per chunk on the CPU at 100 images per minibatch: chunks of 50 samples of the 20 images, the
    # warm-up's one chunk included.
    assert shapes == [(50, 20)] * 3


def test_a_training_process_reports_its_step_and_on_cuda_only_its_peak_memory(tmp_path: Path, monkeypatch) -> None:
    results = [FitResult(tmp_path / name, 1, None, None, 1.0, True, f"stacked (2 models): {name}") for name in "ab"]
    on_cpu = gpu_check._worker_report(results, torch.device("cpu"))
    assert on_cpu == {"gradients": {"a": "stacked (2 models): a", "b": "stacked (2 models): b"}}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3_500_000_000)
    on_cuda = gpu_check._worker_report(results, torch.device("cuda"))
    assert on_cuda["max_memory_gb"] == 3.5 and on_cuda["gradients"] == on_cpu["gradients"]
    log = tmp_path / "column-k1.log"
    log.write_text(
        "warning: something\n"
        + gpu_check.WORKER_REPORT + json.dumps(on_cpu) + "\n"
        + gpu_check.WORKER_REPORT + json.dumps(on_cuda) + "\n"
        + "Traceback (most recent call last):\n"
    )  # fmt: skip
    assert gpu_check._read_worker_report(log) == on_cuda  # the last report
    assert gpu_check._read_worker_report(tmp_path / "none.log") == {}


