"""Shared test fixtures: the MNIST dataset (shipped in the package) and the shared data directory."""

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
