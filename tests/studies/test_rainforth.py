"""Rainforth et al.'s Gaussian model (``iwae.studies.rainforth``): exact bounds and gradients, and the slopes' signs
on a small configuration (``iwae snr --model rainforth``: tests/cli/test_snr.py). Log-weights are ``[k, batch]``.

Every test is seeded, so deterministic; the tolerances are stated in standard errors (SE) where they are
statistical."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iwae.cli import snr as snr_cli
from iwae.objectives import IWAE
from iwae.protocol import NoiseModel
from iwae.studies import rainforth
from iwae.studies.snr import noise_gradients, run_adaptive_study, stacked_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def test_problem_is_seeded_and_starts_near_the_optimum() -> None:
    problem = rainforth.make_problem(0)
    model = problem.model
    assert isinstance(model, NoiseModel)
    assert problem.data.shape == (rainforth.N_DATA, rainforth.DIM) == (1024, 20)
    assert snr_cli.RAINFORTH_DATA == rainforth.N_DATA
    torch.testing.assert_close(problem.mu_opt, problem.data.mean(0))
    optimum = problem.optimum()
    for name in ("mu", "A", "b"):
        offset = getattr(model, name).detach() - optimum[name]
        assert 0.005 < float(offset.std()) < 0.015  # N(0, 0.01^2) per entry
    assert [p.numel() for p in model.encoder_parameters()] == [400, 20] and model.mu.numel() == 20
    again = rainforth.make_problem(0)
    assert torch.equal(again.data, problem.data) and torch.equal(again.model.A, model.A)
    assert not torch.equal(rainforth.make_problem(1).data, problem.data)


def test_bounds_approach_the_exact_log_marginal() -> None:
    """L_1's Monte Carlo mean is the analytic ELBO (within 5 SE) and IWAE_1000 is within 0.02 nats of
    log N(x; mu, 2I) (measured: 0.004 at most, seed 0)."""
    problem = rainforth.make_problem(0)
    model, x = problem.model, problem.data[:4]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        log_w = model(x, 100_000, generator).log_w  # L_1 draws: [100000, 4]
        stderr = log_w.std(0) / math.sqrt(log_w.shape[0])
        assert ((log_w.mean(0) - model.elbo(x)).abs() < 5 * stderr).all()
        k = 1000
        iwae = torch.stack([model(x, k, generator).log_w.logsumexp(0) - math.log(k) for _ in range(50)]).mean(0)
    log_px = model.log_marginal(x)
    expected = torch.distributions.MultivariateNormal(model.mu.detach(), 2 * torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(log_px.detach(), expected.log_prob(x))
    assert ((iwae - log_px).abs() < 0.02).all()
    assert ((log_px - model.elbo(x)) > 0.3).all()  # the ELBO is far below: the test has teeth


def test_gradients_approach_the_analytic_ones() -> None:
    """Mean gradients over the repeats (loss = -mean over the batch). At K = 1 every estimator is unbiased for the
    analytic ELBO's gradient (within 5 SE, all 440 parameters). At K = 1000 the decoder's is within 0.01 of the
    limit ``-(x - mu) / 2`` (measured: 0.002, SE 0.0013), where at K = 1 it is 0.2 away: b is moved 0.1 off the
    optimum in every dimension so that the two differ."""
    problem = rainforth.make_problem(0)
    model, x = problem.model, problem.data[:1]
    with torch.no_grad():
        model.b += 0.1
    generator = torch.Generator().manual_seed(2)
    params = [*model.encoder_parameters(), *model.decoder_parameters()]
    elbo_gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-model.elbo(x).mean(), params)])
    limit = -model.log_marginal_gradient_mu(x).mean(0)
    for estimator in ("standard", "stl", "dreg"):
        noise = stacked_noise(model, x, 1, 20_000, generator)
        grads = torch.cat(noise_gradients(model, x, noise, IWAE(), estimator), dim=1)
        stderr = grads.std(0) / math.sqrt(grads.shape[0])
        assert ((grads.mean(0) - elbo_gradient).abs() < 5 * stderr + 1e-12).all(), estimator
        assert float((grads.mean(0)[-20:] - limit).abs().max()) > 0.1
    _, decoder = noise_gradients(model, x, stacked_noise(model, x, 1000, 200, generator), IWAE(), "standard")
    assert float((decoder.mean(0) - limit).abs().max()) < 0.01


class OnDevice(torch.Tensor):
    """A stand-in for a tensor on a GPU, which the CPU build cannot make: ``.numpy()`` raises as it does on a CUDA
    tensor, and ``.cpu()`` brings it back as a plain tensor. Everything else computes as on the CPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor")
        result = super().__torch_function__(func, types, args, kwargs or {})
        return result.as_subclass(torch.Tensor) if func is torch.Tensor.cpu else result


def test_the_gradient_checks_take_the_data_off_the_device_before_numpy() -> None:
    """``iwae snr --model rainforth --device cuda`` ran the whole study, then failed in ``gradient_checks`` on the
    ``.numpy()`` of a CUDA tensor and wrote nothing."""
    problem = rainforth.make_problem(0)
    x = problem.data[:4]
    n_encoder = sum(p.numel() for p in problem.model.encoder_parameters())
    means = {"standard": [np.zeros(n_encoder + rainforth.DIM)] * 2}
    stderrs = {"standard": [np.ones(n_encoder + rainforth.DIM)] * 2}

    def checks(data: torch.Tensor) -> dict:
        generator = torch.Generator().manual_seed(3)
        return rainforth.gradient_checks(problem.model, data, [1, 3], means, stderrs, n_encoder, generator, draws=5)

    on_device = checks(x.as_subclass(OnDevice))
    assert on_device == checks(x)
    assert len(on_device["decoder_limit"]) == rainforth.DIM and on_device["iwae_estimate_k"] == 3


def test_small_study_has_the_expected_slope_signs() -> None:
    """K = 1, 4, 16, repeats grown from 2,000 to at most 10^6 samples per K. Seed 0 measures decoder +0.48,
    standard encoder -0.52, DReG encoder +0.15; over seeds 0-19 (problem and draws) these ranged over
    [+0.37, +0.50], [-0.58, -0.34] and [+0.11, +0.19], so the thresholds below failed for none of the 20."""
    problem = rainforth.make_problem(0)
    study = run_adaptive_study(
        problem.model, problem.data[:1], [1, 4, 16], ["standard", "dreg"], 2000,
        rel_error=0.2, max_samples=10**6, seed=0, progress=False,
    )  # fmt: skip
    fits = study.slopes()
    assert fits["decoder"]["standard"]["slope"] > 0.25
    assert fits["encoder"]["standard"]["slope"] < -0.25 and fits["encoder"]["standard"]["fit_ks"] == [1, 4, 16]
    assert fits["encoder"]["dreg"]["slope"] > 0.0
    low, high = fits["encoder"]["standard"]["bootstrap_ci95_low"], fits["encoder"]["standard"]["bootstrap_ci95_high"]
    assert low < fits["encoder"]["standard"]["slope"] < high
    assert study.repeats_per_k["standard"][0] > 2000  # grew: the standard encoder's SNR is about 0.07 at K = 1
    assert study.repeats_per_k["dreg"] == [2000] * 3  # DReG's is high enough from the start


