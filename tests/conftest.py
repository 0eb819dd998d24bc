"""Shared test fixtures: the MNIST dataset (shipped in the package), the shared data directory, one intra-op
thread, and a tiny benchmark's result (for tests/lab/bench/test_run.py and tests/cli/test_bench.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("IWAE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and thousands of tiny backward passes: one intra-op thread avoids the threads'
    synchronisation cost. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (set IWAE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist():
    from iwae.data import load_dataset

    return load_dataset("mnist", progress=False)


@pytest.fixture(scope="session")
def tiny_result(mnist) -> dict:
    """The library function on the cells the required keys need, one repeat each, L_5000 on 2 images."""
    from iwae.lab import bench

    settings = bench.BenchSettings(
        mode="test", layers=(1,), ks=(5, 50), batches=(20, 100), repeats=1, warmup=1, threads=1, device="cpu",
        pyro=False, n_train=100, eval_images=2, eval_batch_size=2, eval_repeats=3, progress=False,
    )  # fmt: skip
    return bench.run_bench(settings, mnist)
