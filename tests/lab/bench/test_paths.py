"""iwae.lab.bench.paths: which of iwae.fast's CPU paths the bench reports (malloc, native kernels, gradients)."""

from __future__ import annotations

import pytest
import torch

from iwae.fast import allocator, native
from iwae.fast import step as native_step
from iwae.lab import bench
from iwae.lab.bench import paths


@pytest.fixture
def fresh_allocator():
    """:func:`iwae.fast.allocator.configure` answers once per process: forget its answer before and after a test
    that changes ``IWAE_FAST`` (the next caller sets malloc up again, as the environment then says)."""
    allocator.configure.cache_clear()
    yield
    allocator.configure.cache_clear()


def test_native_kernels_are_the_native_status_on_the_cpu_and_not_used_elsewhere() -> None:
    on_cpu = paths.native_kernels(torch.device("cpu"))
    assert on_cpu == native.status()
    assert on_cpu.startswith(("native kernels (", "PyTorch fallback: "))
    assert on_cpu.endswith(("; oneDNN fused linear layers", "; no oneDNN fused linear layers"))
    for device in ("cuda", "cuda:1", "meta"):  # torch.device needs no such device to exist
        assert paths.native_kernels(torch.device(device)) == "not used on this device"


def test_with_compile_the_gradients_are_torch_compiles() -> None:
    settings = bench.BenchSettings(mode="test", compile=True, progress=False)
    assert paths.gradient_path(settings) == "torch.compile (iwae train --compile)"


def test_by_default_the_gradients_are_the_fast_layers_explicit_backpropagation(monkeypatch) -> None:
    monkeypatch.delenv("IWAE_FAST", raising=False)
    gradients = paths.gradient_path(bench.BenchSettings(mode="test", progress=False))
    if native_step.available():
        assert gradients == f"fast: explicit backpropagation in C++ ({native_step.status()})"
    else:
        assert gradients.startswith("fast: explicit backpropagation in Python (iwae.fast.backprop; no C++ step: ")


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ("none", "autograd (explicit backpropagation off: IWAE_FAST='none' in the environment)"),
        ("-backprop,-step", "autograd (explicit backpropagation off: IWAE_FAST='-backprop,-step' in the environment)"),
        (
            "backprop",
            "fast: explicit backpropagation in Python (iwae.fast.backprop; no C++ step: IWAE_FAST='backprop' in the "
            "environment)",
        ),
        (
            "-step",
            "fast: explicit backpropagation in Python (iwae.fast.backprop; no C++ step: IWAE_FAST='-step' in the "
            "environment)",
        ),
    ],
)
def test_the_gradients_say_which_switch_turned_a_fast_path_off(monkeypatch, switches: str, expected: str) -> None:
    monkeypatch.setenv("IWAE_FAST", switches)
    assert paths.gradient_path(bench.BenchSettings(mode="test", progress=False)) == expected


def test_the_allocator_is_set_up_as_iwae_train_sets_it(monkeypatch, fresh_allocator) -> None:
    monkeypatch.delenv("IWAE_FAST", raising=False)
    said = paths.configure_allocator()
    assert said == allocator.configure()  # once per process: the bench's answer is train's
    version = allocator._glibc_version()
    if version is None:
        assert said == "the platform's default allocator settings (not glibc)"
    else:
        assert said.startswith(f"{version} malloc with fixed thresholds: mmap above 512 MiB, trim above 1024 MiB") or (
            said.startswith(f"the platform's default allocator settings ({version} ")
        )


def test_with_the_allocator_switched_off_malloc_is_left_as_it_is(monkeypatch, fresh_allocator) -> None:
    monkeypatch.setenv("IWAE_FAST", "-allocator")
    assert paths.configure_allocator() == (
        "the platform's default allocator settings (IWAE_FAST='-allocator' in the environment)"
    )


def test_off_the_cpu_the_gradients_are_not_said_to_take_the_cpu_only_step() -> None:
    """``iwae bench --device cuda`` must not report the C++ step, which serves float32 models on the CPU only."""
    gradients = paths.gradient_path(bench.BenchSettings(mode="test", progress=False), torch.device("cuda"))
    assert "in C++" not in gradients and "not float32 on the CPU" in gradients
