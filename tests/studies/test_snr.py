"""The gradient SNR study (``iwae.studies.snr``): moments, slopes, the expected trends on the linear-Gaussian oracle,
the floor-aware vectorised study (``iwae snr``: tests/cli/test_snr.py). Log-weights are ``[k, batch]``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import LinearGaussianModel

from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import IWAE
from iwae.studies.snr import (
    AdaptiveSNRStudy,
    GradientMoments,
    RepeatBlocks,
    clear_of_floor,
    gradient_snr,
    loglog_slope,
    noise_gradients,
    run_study,
    snr_floor,
    stacked_noise,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("estimator", ["standard", "dreg"])
def test_snr_through_explicit_backpropagation_equals_autograd(estimator: str, monkeypatch) -> None:
    """The library's models take iwae.fast.backprop (the same noise); IWAE_FAST=0 takes autograd."""
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=10, latent_dims=(3, 2), hidden_dims=((6,), (4,)))).double()
    x = torch.bernoulli(torch.full((4, 10), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("IWAE_FAST", switch)
        results.append(gradient_snr(model, x, 4, estimator, 5, torch.Generator().manual_seed(2), IWAE()))
    for part in ("encoder", "decoder"):
        torch.testing.assert_close(results[0][part], results[1][part], rtol=1e-8, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_moments_give_abs_mean_over_std_and_drop_constant_zeros() -> None:
    rng = np.random.default_rng(0)
    grads = rng.normal([1.0, -2.0, 0.0], [0.5, 4.0, 0.0], size=(50, 3))
    moments = GradientMoments.zeros(3)
    for row in grads:
        moments.add([torch.tensor(row[:2]), torch.tensor(row[2:])])
    snr = moments.snr().numpy()
    assert snr.shape == (2,)  # the always-zero component has no SNR
    expected = np.abs(grads[:, :2].mean(0)) / grads[:, :2].std(0, ddof=1)
    np.testing.assert_allclose(snr, expected, rtol=1e-10)


def test_loglog_slope_recovers_a_power_law() -> None:
    ks = [1, 3, 10, 30, 100]
    fit_exact = loglog_slope(ks, [2.0 * k**-0.5 for k in ks])
    assert fit_exact["slope"] == pytest.approx(-0.5) and fit_exact["stderr"] == pytest.approx(0.0, abs=1e-9)
    noise = np.random.default_rng(1).normal(0, 0.1, len(ks))
    fit_noisy = loglog_slope(ks, [math.exp(0.5 * math.log(k) + e) for k, e in zip(ks, noise, strict=True)])
    assert fit_noisy["ci95_low"] < 0.5 < fit_noisy["ci95_high"]  # a 95% interval; this seed covers it
    with pytest.raises(ValueError, match="two values"):
        loglog_slope([10], [1.0])


def test_oracle_snr_trends_match_rainforth() -> None:
    """Standard encoder SNR falls with K, the decoder's rises, DReG's encoder SNR rises.

    Seeded, so deterministic. Measured slopes: decoder +0.48, DReG encoder +0.37, standard encoder -0.21
    (its SNR drops from 0.22 at K = 1 to the floor of 200 repeats, about 0.06, by K = 10, which flattens
    the fitted line); the thresholds leave a wide margin.
    """
    model = LinearGaussianModel(x_dim=5, z_dim=3, seed=0)
    x = model.sample_data(1, torch.Generator().manual_seed(1))
    study = run_study(model, x, [1, 10, 100, 1000], ["standard", "dreg"], repeats=200, seed=0, progress=False)
    slopes = study.to_dict()["slopes"]
    assert slopes["encoder"]["standard"] < -0.1
    medians = study.medians()["standard"]["encoder"]
    assert medians[-1] < 0.5 * medians[0]
    assert slopes["decoder"]["standard"] > 0.25
    assert slopes["encoder"]["dreg"] > 0.25
    assert slopes["decoder"]["dreg"] == pytest.approx(slopes["decoder"]["standard"])  # same samples, same decoder


def test_effective_sample_size_bounds_and_the_study_reports_it() -> None:
    from iwae.models import LatentVariableModel, ModelConfig
    from iwae.studies.snr import effective_sample_size, run_study

    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((8,),)))
    x = torch.bernoulli(torch.full((4, 12), 0.4), generator=torch.Generator().manual_seed(1))
    ess = effective_sample_size(model, x, 50, torch.Generator().manual_seed(2))
    assert ess.shape == (4,) and (ess >= 1 - 1e-9).all() and (ess <= 50 + 1e-9).all()
    assert torch.equal(effective_sample_size(model, x, 1, torch.Generator()), torch.ones(4, dtype=torch.float64))
    summary = run_study(model, x, [1, 4, 16], ["standard"], repeats=3, progress=False).to_dict()
    assert summary["median_ess"][0] == 1.0 and len(summary["median_ess"]) == 3
    assert summary["ess_slope"] is not None and 0.0 <= summary["ess_slope"] <= 1.0


# -- the floor-aware, vectorised study (run_adaptive_study; the Rainforth model itself in test_rainforth.py) -------


def test_clear_of_floor_keeps_only_medians_above_factor_times_the_floor() -> None:
    floor_100, floor_10000 = snr_floor(100), snr_floor(10_000)
    assert floor_100 == pytest.approx(0.0798, abs=1e-4) and floor_10000 == pytest.approx(floor_100 / 10)
    medians = [1.0, 0.2, 0.25, 0.02, 0.03, math.nan]
    repeats = [100, 100, 100, 10_000, 10_000, 10_000]
    # factor 3: floors x 3 are 0.239 (R = 100) and 0.0239 (R = 10,000)
    assert clear_of_floor(medians, repeats) == [True, False, True, False, True, False]
    assert clear_of_floor(medians, repeats, factor=1.0) == [True, True, True, True, True, False]
    with pytest.raises(ValueError, match="repeat counts"):
        clear_of_floor([1.0], [10, 10])


def _synthetic_study(medians: list[float], repeats: list[int]) -> AdaptiveSNRStudy:
    """One estimator whose parts have constant per-parameter SNRs (the medians); one block per K (no bootstrap)."""
    ks = [1, 10, 100, 1000][: len(medians)]
    study = AdaptiveSNRStudy(ks, ["standard"], repeats[0], 1, repeats_per_k={"standard": repeats}, n_encoder=3)
    per_k = [np.full(3, m) for m in medians]
    study.snr = {"standard": {"encoder": per_k, "decoder": per_k}}
    study.blocks = {"standard": [(np.array([r]), np.zeros((1, 6)), np.ones((1, 6))) for r in repeats]}
    return study


def test_adaptive_slopes_fit_only_the_ks_clear_of_their_floor() -> None:
    # A K^-1/2 law that sinks into the floor of 1,000 repeats (0.025; 3x: 0.076) at K = 1000.
    medians = [2.0, 2.0 * 10**-0.5, 0.2, snr_floor(1000)]
    fit = _synthetic_study(medians, [1000] * 4).slopes()["encoder"]["standard"]
    assert fit["fit_ks"] == [1, 10, 100] and fit["excluded_ks"] == [1000] and fit["fit_repeats"] == [1000] * 3
    assert fit["slope"] == pytest.approx(-0.5) and "bootstrap_ci95_low" not in fit  # one block per K: no bootstrap
    # More repeats at K = 1000 lift it clear of its floor, and it enters the fit.
    fit = _synthetic_study(medians, [1000, 1000, 1000, 10**6]).slopes()["encoder"]["standard"]
    assert fit["fit_ks"] == [1, 10, 100, 1000] and fit["excluded_ks"] == []
    # Fewer than two Ks clear: no slope, and the summary says why.
    summary = _synthetic_study([0.5, 0.01, 0.01], [1000] * 3).to_dict()
    fit = summary["slope_fits"]["encoder"]["standard"]
    assert summary["slopes"]["encoder"]["standard"] is None and "1 K clear" in fit["reason"]
    assert summary["repeats_per_k"] == {"standard": [1000] * 3}
    assert summary["snr_floor_per_k"]["standard"][0] == pytest.approx(snr_floor(1000))


def test_repeat_blocks_keep_64_blocks_of_about_equal_repeats_with_the_same_sums() -> None:
    rng = np.random.default_rng(0)
    blocks = RepeatBlocks()
    sizes = [5] * 40 + [300] * 100  # two rounds of very different chunk sizes
    grads = [torch.from_numpy(rng.normal(size=(n, 3))) for n in sizes]
    for g in grads:
        blocks.add(g)
    counts, totals, totals_sq = blocks.grouped()
    everything = torch.cat(grads)
    assert len(counts) == 64 and counts.sum() == blocks.count == everything.shape[0]
    np.testing.assert_allclose(totals.sum(0), everything.sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(totals_sq.sum(0), everything.square().sum(0).numpy(), rtol=1e-12)
    assert counts.max() - counts.min() <= 300  # at most one chunk apart
    torch.testing.assert_close(blocks.moments().snr(), everything.mean(0).abs() / everything.std(0), rtol=1e-10, atol=0)
    few = RepeatBlocks()
    few.add(grads[0])
    assert len(few.grouped()[0]) == 1  # only the blocks that hold repeats


@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
def test_vmapped_gradients_equal_the_estimators_autograd_per_repeat(estimator: str) -> None:
    """noise_gradients (torch.func over stacked noise) gives, per repeat, what estimate_from_noise and
    surrogate_gradients give, for Burda's models as for any NoiseModel (float64)."""
    from iwae.estimators import estimate_from_noise, surrogate_gradients

    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=10, latent_dims=(3, 2), hidden_dims=((6,), (4,)))).double()
    x = torch.bernoulli(torch.full((2, 10), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    noise = stacked_noise(model, x, 5, 4, torch.Generator().manual_seed(2))
    assert [tuple(n.shape) for n in noise] == [(4, 5, 2, 3), (4, 5, 2, 2)]
    encoder_grads, decoder_grads = noise_gradients(model, x, noise, IWAE(), estimator)
    encoder, decoder = list(model.encoder_parameters()), list(model.decoder_parameters())
    for r in range(4):
        terms = estimate_from_noise(model, x, [n[r] for n in noise], IWAE(), estimator)
        expected_encoder, expected_decoder = surrogate_gradients(terms, encoder, decoder)
        torch.testing.assert_close(encoder_grads[r], torch.cat([g.reshape(-1) for g in expected_encoder]))
        torch.testing.assert_close(decoder_grads[r], torch.cat([g.reshape(-1) for g in expected_decoder]))
    assert all(p.grad is None for p in model.parameters())
