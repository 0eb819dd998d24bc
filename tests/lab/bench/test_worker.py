"""The workers of ``iwae bench`` (:mod:`iwae.lab.bench.worker`): the ``L_5000`` one times L_k in the chunks
``iwae eval`` takes on the device, not the CPU's 5,000 rows everywhere; the training one takes iwae train's steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from iwae import evaluate
from iwae.lab.bench import worker


def test_the_worker_times_l_k_in_the_chunks_iwae_eval_takes_on_the_device(tmp_path: Path, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 784, generator=generator)
    data_path = tmp_path / "images.npz"
    np.savez(data_path, images=images.numpy(), mean_x=images.mean(0).numpy())
    asked: list[str] = []

    def rows_on(device: torch.device) -> int:  # iwae eval's chunk size for the device, 250,000 on CUDA
        asked.append(device.type)
        return 2_000

    max_rows = []

    def recording(*args, **kwargs):
        max_rows.append(kwargs.get("max_rows"))
        return evaluate.estimate_log_likelihood(*args, **kwargs)

    monkeypatch.setattr(worker, "chunk_rows", rows_on)
    monkeypatch.setattr(worker, "estimate_log_likelihood", recording)
    result = worker.eval_worker(str(data_path), 20, torch.get_num_threads(), "cpu", 100, 0, repeats=2)
    assert asked == ["cpu"] and max_rows == [2_000] * 3  # the warm-up and both timed passes
    assert result["chunk_rows"] == 2_000 and result["images"] == 3 and np.isfinite(result["mean_log_lik"])


def test_the_training_worker_takes_iwae_trains_steps_and_reports_its_peak(tmp_path: Path, capsys) -> None:
    """``python -m iwae.lab.bench.worker train`` (here in this process): the step iwae train chooses, a JSON line."""
    images = torch.rand(30, 784, generator=torch.Generator().manual_seed(0))
    data_path = tmp_path / "train.npz"
    np.savez(data_path, images=images.numpy(), mean_x=images.mean(0).numpy())
    argv = ["train", str(data_path), "--k", "3", "--layers", "2", "--batch-size", "4", "--steps", "2", "--threads", "1"]
    assert worker.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {key: result[key] for key in ("layers", "k", "batch", "steps", "threads")} == {
        "layers": 2, "k": 3, "batch": 4, "steps": 2, "threads": 1,
    }  # fmt: skip
    assert result["gradients"].startswith(("fast: ", "autograd")) and np.isfinite(result["mean_bound"])
    assert result["rss_peak_mb"] > 0 and result["rss_above_baseline_mb"] >= 0 and result["cuda_peak_mb"] is None
