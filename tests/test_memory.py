"""iwae.memory: the parameter count of Burda's architectures, and refusing a run whose training steps would need more
memory than the device has, in one line that says what to change."""

from __future__ import annotations

import pytest
import torch

from iwae import memory
from iwae.config import TrainConfig, build_train_config
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import RunError


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig.burda(1),
        ModelConfig.burda(2),
        ModelConfig(x_dim=12, latent_dims=(6, 4, 3), hidden_dims=((5,), (), (4,))),
        ModelConfig(x_dim=12, latent_dims=(6, 4), hidden_dims=((5,), (3, 3)), likelihood="gaussian"),
    ],
    ids=["burda-1", "burda-2", "three-layers", "gaussian"],
)
def test_the_parameter_count_is_the_models(config: ModelConfig) -> None:
    assert memory.parameter_count(config) == sum(p.numel() for p in LatentVariableModel(config).parameters())


def test_a_run_that_cannot_fit_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    config = build_train_config({"k": 5})
    need = memory.step_memory(config, 60_000)
    assert memory.step_memory(config, 60_000, models=3) == 3 * need
    assert memory.step_memory(config.replace(k=500), 60_000) > need  # k x minibatch above the validation rows
    monkeypatch.setattr(memory, "device_memory", lambda device: need)
    memory.check_memory(config, 60_000, torch.device("cpu"))  # exactly enough: allowed
    with pytest.raises(RunError) as refused:
        memory.check_memory(config, 60_000, torch.device("cpu"), models=2)
    message = str(refused.value)
    assert "\n" not in message and "2 models x k 5 x minibatch 20 samples" in message
    assert f"this machine has {memory.format_bytes(need)}" in message and "lower --k or --batch-size" in message
    monkeypatch.setattr(memory, "device_memory", lambda device: None)  # unknown: nothing refused
    memory.check_memory(TrainConfig(k=10**9), 60_000, torch.device("cpu"))


def test_format_bytes_uses_decimal_units() -> None:
    assert [memory.format_bytes(n) for n in (0, 999, 1000, 28.6e12, 5e18)] == [
        "0 bytes", "999 bytes", "1 KB", "28.6 TB", "5e+03 PB",
    ]  # fmt: skip
