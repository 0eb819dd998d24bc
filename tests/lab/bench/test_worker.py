"""The ``L_5000`` timing worker of ``iwae bench`` (:mod:`iwae.lab.bench.worker`): it times L_k in the chunks
``iwae eval`` takes on the device, not the CPU's 5,000 rows everywhere."""

from __future__ import annotations

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
