"""The camel density: the true E[log p(x)] by quadrature, and the sampler
(``iwae camel``: tests/cli/test_analyses.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iwae.studies.camel import sample_camel, true_expected_log_density, true_log_density

pytestmark = pytest.mark.usefixtures("one_thread")


def test_true_expected_log_density() -> None:
    value = true_expected_log_density()
    assert abs(value - (-1.3585)) < 5e-4  # -1.35851...; the reproduction report quotes -1.358 (docs/references.md)
    # Cross-check with a fine grid (Riemann sum over [-8, 8]).
    grid = np.linspace(-8, 8, 200_001)
    log_p = true_log_density(grid)
    assert abs(np.sum(np.exp(log_p) * log_p) * (grid[1] - grid[0]) - value) < 1e-6


def test_density_normalised_and_sampler_matches_it() -> None:
    grid = np.linspace(-8, 8, 100_001)
    assert abs(np.exp(true_log_density(grid)).sum() * (grid[1] - grid[0]) - 1.0) < 1e-6
    x = sample_camel(20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 1)
    # Mean 0 and variance 1 + 0.25 = 1.25; standard errors 0.008 and 0.011 (6 sigma bounds: failure < 1e-8).
    assert abs(x.mean().item()) < 0.05
    assert abs(x.var().item() - 1.25) < 0.07
    assert abs(float(true_log_density(0.0)) - math.log(math.exp(-2) / (0.5 * math.sqrt(2 * math.pi)))) < 1e-12




def test_the_posterior_by_quadrature_agrees_with_importance_sampling() -> None:
    """On a 1-D-latent model (the camel's, untrained: any weights will do), the quadrature's log p(x) equals L_k at
    large k and its KL(q || posterior) equals log p(x) - ELBO, the ELBO and L_k by Monte Carlo (20,000 samples;
    6-sigma bounds from their own standard errors: failure under 1e-8 each); the posterior integrates to 1."""
    from iwae.models import LatentVariableModel
    from iwae.studies.camel import CAMEL_MODEL, Z_GRID, posterior_on_grid

    torch.manual_seed(1)
    model = LatentVariableModel(CAMEL_MODEL)
    x = torch.tensor([[-1.5], [0.0], [0.7], [2.0]])
    exact = posterior_on_grid(model, x)
    dz = Z_GRID[1] - Z_GRID[0]
    assert torch.allclose(exact["posterior"].sum(dim=0) * dz, torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert (exact["kl"] >= 0).all()
    k = 20_000
    with torch.no_grad():
        sample = model(x, k, torch.Generator().manual_seed(2))
    log_w = sample.log_w.double()  # [k, 4]
    elbo, elbo_se = log_w.mean(dim=0), log_w.std(dim=0) / math.sqrt(k)
    weights = (log_w - log_w.max(dim=0).values).exp()
    log_mean = torch.logsumexp(log_w, dim=0) - math.log(k)
    log_px_se = weights.std(dim=0) / weights.mean(dim=0) / math.sqrt(k)  # delta method
    assert ((log_mean - exact["log_px"]).abs() <= 6 * log_px_se + 1e-6).all()
    assert ((exact["log_px"] - elbo - exact["kl"]).abs() <= 6 * elbo_se + 1e-6).all()
