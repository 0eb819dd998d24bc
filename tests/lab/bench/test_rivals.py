"""iwae.lab.bench.rivals: the plain PyTorch baseline against our log-weights, and the Pyro rival."""

from __future__ import annotations

import math

import pytest
import torch

from iwae import bounds
from iwae.config import TrainConfig
from iwae.lab import bench
from iwae.models import LatentVariableModel, ModelConfig


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
