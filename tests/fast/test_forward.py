"""iwae.fast.forward: the models' forward pass on the fast kernels, for evaluation, against the reference model."""

from __future__ import annotations

import pytest
import torch

from iwae import fast
from iwae.data import Split
from iwae.evaluate import estimate_log_likelihood
from iwae.models import LatentVariableModel, ModelConfig


@pytest.mark.parametrize("layers", [1, 2])
def test_the_evaluation_forward_equals_the_model(layers: int) -> None:
    torch.manual_seed(layers)
    model = LatentVariableModel(ModelConfig.burda(layers)).eval()
    accelerated = fast.for_evaluation(model)
    assert (accelerated is not model) == fast.forward.applies(model)
    x = Split(torch.bernoulli(torch.full((4, 784), 0.3), generator=torch.Generator().manual_seed(0)))
    reference = estimate_log_likelihood(model, x, "none", 40, torch.Generator().manual_seed(1), batch_size=2)
    faster = estimate_log_likelihood(accelerated, x, "none", 40, torch.Generator().manual_seed(1), batch_size=2)
    for name in reference:
        torch.testing.assert_close(faster[name], reference[name], rtol=1e-5, atol=1e-3)
    for got, want in zip(accelerated.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert fast.for_evaluation(model.double()) is not None
