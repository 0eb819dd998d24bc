"""iwae.protocol: a model written outside the package trains, is evaluated and studied through the public API;
the shipped convolutional VAE example runs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

import iwae
from iwae.data import Split
from iwae.studies.snr import gradient_snr

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conv_vae.py"


def _example():
    spec = importlib.util.spec_from_file_location("conv_vae", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_models_follow_the_protocol() -> None:
    assert isinstance(iwae.LatentVariableModel(iwae.ModelConfig(12, (3,), ((8,),))), iwae.NoiseModel)
    assert isinstance(_example().ConvVAE(), iwae.Model)
    assert not isinstance(torch.nn.Linear(2, 2), iwae.Model)


def test_a_custom_model_trains_evaluates_and_is_studied() -> None:
    torch.manual_seed(0)
    model = _example().ConvVAE(latent=4)
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((6, 784), 0.3), generator=generator)
    for estimator in iwae.ESTIMATOR_NAMES:
        for objective in (iwae.IWAE(), iwae.PIWAE(M=2)):
            model.zero_grad(set_to_none=True)
            terms = iwae.estimate(model, x, 4, generator, objective, estimator)
            iwae.backward(model, terms)
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    log_lik = iwae.estimate_log_likelihood(model, Split(x), "none", 20, generator, batch_size=3)["log_lik"]
    assert log_lik.shape == (6,) and torch.isfinite(log_lik).all()
    snr = gradient_snr(model, x, 4, "dreg", 3, generator)
    assert set(snr) == {"encoder", "decoder"}


def test_the_example_trains_on_a_tiny_subset(shared_data: Path) -> None:
    result = _example().main(
        ["--data-dir", str(shared_data), "--train-limit", "60", "--test-limit", "10", "--eval-k", "10", "--k", "4"]
    )
    assert math.isfinite(result["test_nll"]) and result["n_test"] == 10
