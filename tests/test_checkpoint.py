"""Resuming a training checkpoint (:func:`iwae.checkpoint.restore_checkpoint`) on another device type than the one
that saved it: a CPU generator's state is 5,056 bytes, a CUDA generator's 16 (seed and offset), and neither takes
the other's. The refusal says so in one line, and what to do, instead of calling the file damaged. CUDA is played
here by a generator stand-in with a CUDA generator's state and refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from iwae.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint

PROGRESS = {"epochs_done": 2, "seconds": 1.5}


class CudaGenerator:
    """What a run's ``torch.Generator(device="cuda")`` shows a checkpoint: its device and a 16-byte state, and
    ``set_state`` refusing any other size as CUDAGeneratorImpl::set_state does."""

    device = torch.device("cuda")

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        if state.numel() != 16:
            raise RuntimeError("RNG state is wrong size")
        self.state = state.clone()


def saved_run(tmp_path: Path, generator) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, generator, PROGRESS, json.dumps({"k": 1}))
    return path, model


def fresh_run() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters())


def test_a_cuda_runs_checkpoint_resumed_on_the_cpu_says_the_generator_state_is_another_device_types(
    tmp_path: Path,
) -> None:
    path, _ = saved_run(tmp_path, CudaGenerator())
    model, optimizer = fresh_run()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(path, model, optimizer, torch.Generator())
    message = str(error.value)
    assert message == (
        f"{path} was saved by a run on cuda and this run is on cpu: a generator's state does not carry across device "
        "types; resume it on a cuda device, or train the run again in a new --out"
    )
    assert "\n" not in message and "restore it from a copy" not in message
    # Refused before anything was loaded: the run is as it was.
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert not optimizer.state


def test_a_cpu_runs_checkpoint_resumed_on_cuda_says_to_resume_it_on_the_cpu(tmp_path: Path) -> None:
    path, _ = saved_run(tmp_path, torch.Generator().manual_seed(3))
    model, optimizer = fresh_run()
    with pytest.raises(CheckpointError, match=r"was saved by a run on cpu and this run is on cuda: .* resume it on "
                       r"the CPU, or train the run again in a new --out$"):  # fmt: skip
        restore_checkpoint(path, model, optimizer, CudaGenerator())


def test_a_checkpoint_resumes_on_its_own_device_type(tmp_path: Path) -> None:
    saved_generator = torch.Generator().manual_seed(3)
    path, saved_model = saved_run(tmp_path, saved_generator)
    model, optimizer = fresh_run()
    generator = torch.Generator()
    assert restore_checkpoint(path, model, optimizer, generator) == PROGRESS
    assert torch.equal(generator.get_state(), saved_generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved_model.parameters(), strict=True))
    cuda_path, _ = saved_run(tmp_path / "cuda", CudaGenerator())
    cuda_generator = CudaGenerator()
    cuda_generator.state = torch.zeros(16, dtype=torch.uint8)
    restore_checkpoint(cuda_path, *fresh_run(), cuda_generator)
    assert torch.equal(cuda_generator.state, torch.arange(16, dtype=torch.uint8))
