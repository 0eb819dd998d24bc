"""iwae.fast.allocator: glibc's thresholds fixed once, so freed tensor memory is reused instead of faulted in again."""

from __future__ import annotations

import pytest
import torch

from iwae.fast import allocator, native

resource = pytest.importorskip("resource")

GLIBC = allocator._glibc_version() is not None
APPLIES = GLIBC and not native.switched_off()


def _faults_per_allocation(numel: int, repeats: int) -> float:
    for _ in range(repeats):  # settle the heap first
        torch.empty(numel).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.empty(numel).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


@pytest.mark.skipif(not APPLIES, reason="glibc only, and not with IWAE_FAST=0")
def test_a_large_tensor_freed_and_allocated_again_is_not_faulted_in_again() -> None:
    # 160 MB: above glibc's largest dynamic mmap threshold (32 MiB), so by default each allocation is a fresh
    # mmap whose ~39,000 pages are faulted in by the fill.
    described = allocator.configure()
    assert "fixed thresholds" in described
    assert _faults_per_allocation(40_000_000, repeats=20) < 100


def test_configure_is_applied_once_and_says_what_it_did() -> None:
    assert allocator.configure() is allocator.configure()
    assert allocator.configure().startswith("glibc" if APPLIES else "the platform's default")


def test_it_leaves_the_allocator_alone_when_switched_off_or_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    unapplied = allocator.configure.__wrapped__  # the function itself, without the once-per-process cache
    monkeypatch.setenv("IWAE_FAST", "0")
    assert unapplied() == "the platform's default allocator settings (IWAE_FAST='0' in the environment)"
    monkeypatch.delenv("IWAE_FAST")
    monkeypatch.setattr(allocator, "_glibc_version", lambda: None)
    assert unapplied() == "the platform's default allocator settings (not glibc)"
