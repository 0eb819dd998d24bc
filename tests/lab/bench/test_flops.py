"""iwae.lab.bench.flops: the FLOP counts of Burda's models, every weight counted."""

from __future__ import annotations

import pytest
import torch

from iwae.lab import bench
from iwae.models import LatentVariableModel, ModelConfig


def test_flops_of_burda_one_layer() -> None:
    flops = bench.model_flops(ModelConfig.burda(1))
    assert flops.per_example == flops.encoder_per_example == 433_600  # 2 * (784*200 + 200*200 + 200*100)
    assert flops.per_sample == flops.decoder_per_sample == 413_600  # 2 * (50*200 + 200*200 + 200*784)
    assert flops.training_step(k=5, batch=20) == 3 * (20 * 433_600 + 100 * 413_600)


@pytest.mark.parametrize("layers", [1, 2])
def test_linear_shapes_cover_every_weight_of_the_model(layers: int) -> None:
    config = ModelConfig.burda(layers)
    model = LatentVariableModel(config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = bench.model_flops(config)
    assert flops.per_example + flops.per_sample == 2 * weights
    assert flops.encoder_per_sample == (0 if layers == 1 else 2 * 3 * 100 * 100)
