"""iwae.bounds: the IWAE bound and the ELBO against a float64 (mpmath) reference on random and extreme
log-weights; the bound family (MIWAE, CIWAE, PIWAE, power mean, VR-IWAE): exact identities, orderings and
limits; and every bound against the exact log p(x) of the linear-Gaussian oracle (tests/oracles.py), with
the IWAE gradient identity.

Log-weights are ``[k, batch]``; every bound is ``[batch]``.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from oracles import LinearGaussianModel

from iwae import bounds


def reference_log_mean_exp(values: np.ndarray) -> float:
    with mpmath.workdps(50):
        total = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in values)
        return float(mpmath.log(total / len(values)))


log_weight_arrays = st.integers(1, 40).flatmap(
    lambda k: arrays(
        np.float64,
        (k, 3),
        elements=st.floats(-1.2e4, 50.0, allow_nan=False, allow_infinity=False),
    )
)


@settings(max_examples=60, deadline=None)
@given(log_weight_arrays)
def test_iwae_bound_matches_high_precision_reference(log_w: np.ndarray) -> None:
    result = bounds.iwae_bound(torch.from_numpy(log_w))
    for b in range(log_w.shape[1]):
        expected = reference_log_mean_exp(log_w[:, b])
        assert result[b].item() == pytest.approx(expected, rel=1e-12, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(log_weight_arrays)
def test_elbo_is_mean_and_below_iwae(log_w: np.ndarray) -> None:
    tensor = torch.from_numpy(log_w)
    elbo, iwae = bounds.elbo(tensor), bounds.iwae_bound(tensor)
    np.testing.assert_allclose(elbo.numpy(), log_w.mean(axis=0), rtol=1e-12)
    assert torch.all(elbo <= iwae + 1e-9 * iwae.abs().clamp_min(1.0))  # Jensen, for every draw


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (1, 4), elements=st.floats(-1e4, 1e3, allow_nan=False)))
def test_k1_bounds_agree_exactly(log_w: np.ndarray) -> None:
    tensor = torch.from_numpy(log_w)
    assert torch.equal(bounds.elbo(tensor), bounds.iwae_bound(tensor))
    assert torch.equal(bounds.iwae_bound(tensor), tensor[0])


def test_stable_for_log_weights_near_minus_ten_thousand() -> None:
    log_w = torch.full((5000, 2), -1e4, dtype=torch.float32)
    log_w[0, 1] = -9990.0
    result = bounds.iwae_bound(log_w)
    assert torch.isfinite(result).all()
    assert result[0].item() == pytest.approx(-1e4, abs=1e-2)
    expected = -9990.0 + math.log1p(4999 * math.exp(-10.0)) - math.log(5000)
    assert result[1].item() == pytest.approx(expected, abs=1e-2)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 64),
    st.floats(-1e4, 0.0),
    st.integers(0, 2**31 - 1),
)
def test_chunked_accumulator_equals_one_shot(k: int, chunk: int, offset: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    log_w = (offset + 30 * torch.randn(k, 4, generator=generator, dtype=torch.float64)).to(torch.float32)
    chunked = bounds.log_mean_exp_chunks(log_w[i : i + chunk] for i in range(0, k, chunk))
    assert chunked.dtype == torch.float64
    one_shot = bounds.iwae_bound(log_w.double())
    torch.testing.assert_close(chunked, one_shot, rtol=1e-12, atol=1e-9)


def test_normalized_weights_sum_to_one() -> None:
    log_w = torch.randn(7, 3, dtype=torch.float64) * 100
    torch.testing.assert_close(bounds.normalized_weights(log_w).sum(0), torch.ones(3, dtype=torch.float64))


def test_rejects_empty_sample_dimension() -> None:
    with pytest.raises(ValueError):
        bounds.iwae_bound(torch.zeros(0, 3))


FLOATS = st.floats(min_value=-300.0, max_value=50.0, allow_nan=False, allow_infinity=False)


@st.composite
def log_weights(draw, max_k: int = 12, max_batch: int = 3, k_multiple_of: int = 1) -> torch.Tensor:
    k = draw(st.integers(1, max_k // k_multiple_of)) * k_multiple_of
    batch = draw(st.integers(1, max_batch))
    values = draw(st.lists(FLOATS, min_size=k * batch, max_size=k * batch))
    return torch.tensor(values, dtype=torch.float64).reshape(k, batch)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@settings(max_examples=30, deadline=None)
@given(log_weights(k_multiple_of=2), st.sampled_from([1, 2]))
def test_miwae_sits_between_elbo_and_iwae_of_all_samples(log_w: torch.Tensor, M: int) -> None:
    # Jensen on the log of the mean of group means: the order holds for every draw, not only in expectation.
    miwae = bounds.miwae_bound(log_w, M)
    assert torch.all(bounds.elbo(log_w) <= miwae + 1e-9)
    assert torch.all(miwae <= bounds.iwae_bound(log_w) + 1e-9)


@settings(max_examples=25, deadline=None)
@given(log_weights())
def test_miwae_limits_and_grouping(log_w: torch.Tensor) -> None:
    k = log_w.shape[0]
    _close(bounds.miwae_bound(log_w, 1), bounds.iwae_bound(log_w))
    _close(bounds.miwae_bound(log_w, k), bounds.elbo(log_w))
    if k % 2 == 0:  # contiguous groups: samples 0..K-1, then K..2K-1
        half = k // 2
        expected = (bounds.iwae_bound(log_w[:half]) + bounds.iwae_bound(log_w[half:])) / 2
        _close(bounds.miwae_bound(log_w, 2), expected)


def test_miwae_rejects_uneven_groups() -> None:
    with pytest.raises(ValueError, match="multiple of M"):
        bounds.miwae_bound(torch.zeros(6, 2), 4)


@settings(max_examples=25, deadline=None)
@given(log_weights(), st.floats(0.0, 1.0))
def test_ciwae_interpolates(log_w: torch.Tensor, beta: float) -> None:
    value = bounds.ciwae_bound(log_w, beta)
    _close(value, beta * bounds.elbo(log_w) + (1 - beta) * bounds.iwae_bound(log_w))
    assert torch.all(bounds.elbo(log_w) <= value + 1e-9) and torch.all(value <= bounds.iwae_bound(log_w) + 1e-9)


@settings(max_examples=30, deadline=None)
@given(log_weights(k_multiple_of=2))
def test_piwae_targets(log_w: torch.Tensor) -> None:
    decoder, encoder = bounds.piwae_bounds(log_w, 2)
    _close(decoder, bounds.iwae_bound(log_w))
    _close(encoder, bounds.miwae_bound(log_w, 2))


@settings(max_examples=25, deadline=None)
@given(log_weights(), st.floats(-3.0, 1.0), st.floats(-3.0, 1.0))
def test_power_mean_rises_with_p(log_w: torch.Tensor, p1: float, p2: float) -> None:
    low, high = sorted((p1, p2))
    assert torch.all(bounds.power_mean_bound(log_w, low) <= bounds.power_mean_bound(log_w, high) + 1e-7)


@settings(max_examples=30, deadline=None)
@given(log_weights(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_vr_iwae_falls_with_alpha_and_is_the_power_mean(log_w: torch.Tensor, a1: float, a2: float) -> None:
    low, high = sorted((a1, a2))
    assert torch.all(bounds.vr_iwae_bound(log_w, high) <= bounds.vr_iwae_bound(log_w, low) + 1e-7)
    _close(bounds.vr_iwae_bound(log_w, low), bounds.power_mean_bound(log_w, 1 - low))


@settings(max_examples=25, deadline=None)
@given(log_weights())
def test_special_cases_of_the_power_mean(log_w: torch.Tensor) -> None:
    _close(bounds.power_mean_bound(log_w, 1.0), bounds.iwae_bound(log_w))
    _close(bounds.vr_iwae_bound(log_w, 0.0), bounds.iwae_bound(log_w))
    assert torch.equal(bounds.power_mean_bound(log_w, 0.0), bounds.elbo(log_w))
    assert torch.equal(bounds.vr_iwae_bound(log_w, 1.0), bounds.elbo(log_w))
    _close(bounds.power_mean_bound(log_w[:1], 0.37), log_w[0])  # k = 1: every member is log w


def test_power_mean_is_accurate_near_p_zero() -> None:
    """Small p: the cumulant expansion mean + p var/2 + p^2 m3/6 (float64) is the reference, also for float32."""
    generator = torch.Generator().manual_seed(0)
    log_w = -90.0 + 4.0 * torch.randn(200, 4, generator=generator, dtype=torch.float64)
    centred = log_w - log_w.mean(0)
    for p in (1e-3, -2e-4, 1e-6, -1e-9, 1e-12):
        expansion = log_w.mean(0) + p * centred.square().mean(0) / 2 + p * p * centred.pow(3).mean(0) / 6
        _close(bounds.power_mean_bound(log_w, p), expansion, 1e-7)
        _close(bounds.power_mean_bound(log_w.float(), p).double(), expansion, 2e-4)  # float32 rounding of -90
    for p in (0.05, -0.5, 0.9):  # away from 0 the direct formula in float64 is the reference
        direct = (torch.logsumexp(p * log_w, 0) - math.log(200)) / p
        _close(bounds.power_mean_bound(log_w, p), direct, 1e-9)


def test_bounds_are_differentiable() -> None:
    log_w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    for value in (
        bounds.miwae_bound(log_w, 4),
        bounds.ciwae_bound(log_w, 0.3),
        bounds.power_mean_bound(log_w, 0.5),
        bounds.power_mean_bound(log_w, 1e-4),
        bounds.vr_iwae_bound(log_w, 0.2),
    ):
        (grad,) = torch.autograd.grad(value.sum(), log_w)
        # each is a weighted mean of log w per example: the weights d bound / d log w_i sum to 1
        _close(grad.sum(0), torch.ones(3, dtype=torch.float64))


def _mean_and_error(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.mean(0), values.std(0) / values.shape[0] ** 0.5


def test_bound_family_in_expectation_below_exact_log_p_x() -> None:
    """ELBO < MIWAE(4,4) = E IWAE_4 < IWAE_16 < log p(x); power mean rising in p; VR-IWAE falling in alpha."""
    model = LinearGaussianModel(x_dim=5, z_dim=3, seed=0)
    generator = torch.Generator().manual_seed(11)
    x = model.sample_data(4, generator)
    log_p = model.log_marginal(x).detach()
    repeats, k = 4000, 16
    with torch.no_grad():
        draws = model.log_weights(x, k * repeats, generator).reshape(repeats, k, -1)  # [R, k, batch]
    log_w = draws.transpose(0, 1).reshape(k, -1)  # [k, R * batch]: each column one repeat of one example

    def expect(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(repeats, -1)  # [R, batch]

    chain = [
        expect(bounds.elbo(log_w)),
        expect(bounds.power_mean_bound(log_w, 0.3)),
        expect(bounds.vr_iwae_bound(log_w, 0.4)),  # = power mean with p = 0.6
        expect(bounds.miwae_bound(log_w, 4)),
        expect(bounds.iwae_bound(log_w)),
    ]
    # Every draw is ordered (Jensen / power-mean inequality) except MIWAE against the power means,
    # whose order is not guaranteed; check the certain orders per draw and strictness on average.
    for lower, upper in ((0, 1), (1, 2), (0, 3), (3, 4), (2, 4)):
        assert torch.all(chain[lower] <= chain[upper] + 1e-9)
        gap_mean, gap_error = _mean_and_error(chain[upper] - chain[lower])
        # 6 standard errors of a paired mean gap: failure rate < 1e-8 per comparison.
        assert torch.all(gap_mean > 6 * gap_error), (lower, upper, gap_mean, gap_error)
    # MIWAE(4, 4) has the expectation of IWAE_4 (each group is an IWAE_4 on independent samples).
    iwae4 = expect(bounds.iwae_bound(log_w[:4]))
    diff_mean, diff_error = _mean_and_error(chain[3] - iwae4)
    assert torch.all(diff_mean.abs() < 5 * diff_error)  # failure rate < 3e-6 per example (4 examples)
    top_mean, top_error = _mean_and_error(chain[4])
    assert torch.all(top_mean < log_p + 5 * top_error)  # failure rate < 3e-7 per example
    assert torch.all(top_mean < log_p)  # the gap is far larger than the Monte Carlo error here


def _mean_bound(model, x, k, repeats, generator):
    values = torch.stack([bounds.iwae_bound(model.log_weights(x, k, generator)).detach() for _ in range(repeats)])
    return values.mean(0), values.std(0) / repeats**0.5


def test_bounds_rise_with_k_towards_log_p_x() -> None:
    model = LinearGaussianModel(x_dim=5, z_dim=3, seed=0)
    generator = torch.Generator().manual_seed(1)
    x = model.sample_data(6, generator)
    log_p = model.log_marginal(x).detach()
    l1, e1 = _mean_bound(model, x, 1, 4000, generator)
    l5, e5 = _mean_bound(model, x, 5, 1000, generator)
    l50, e50 = _mean_bound(model, x, 50, 300, generator)
    # Per example: no ordering is violated by more than 4 standard errors (failure rate < 1e-4 each).
    assert torch.all(l1 < l5 + 4 * (e1 + e5))
    assert torch.all(l5 < l50 + 4 * (e5 + e50))
    assert torch.all(l50 < log_p + 4 * e50)
    # Summed over examples the gains are strict, by far more than 4 standard errors of the sums.
    assert (l5 - l1).sum() > 4 * (e1 + e5).square().sum().sqrt()
    assert (l50 - l5).sum() > 4 * (e5 + e50).square().sum().sqrt()
    assert (log_p - l50).sum() > 0


def test_l5000_matches_log_p_x_within_monte_carlo_error() -> None:
    model = LinearGaussianModel(x_dim=5, z_dim=3, seed=2)
    generator = torch.Generator().manual_seed(3)
    x = model.sample_data(8, generator)
    log_p = model.log_marginal(x).detach()
    l5000, err = _mean_bound(model, x, 5000, 20, generator)
    gap = log_p - l5000
    # The bias of L_5000 is O(1/k) (well under 0.01 nats here); 5 standard errors: failure rate < 1e-6.
    assert torch.all(gap.abs() < 5 * err + 0.01), (gap, err)


def test_iwae_surrogate_gradient_equals_weighted_score() -> None:
    """grad L_k = sum_i w~_i grad log w_i, for encoder and decoder parameters alike."""
    model = LinearGaussianModel(x_dim=4, z_dim=2, seed=4)
    generator = torch.Generator().manual_seed(5)
    x = model.sample_data(1, generator)
    log_w = model.log_weights(x, 7, generator)[:, 0]  # [k]
    params = list(model.parameters())
    grad_bound = torch.autograd.grad(bounds.iwae_bound(log_w[:, None])[0], params, retain_graph=True)
    weights = torch.softmax(log_w.detach(), dim=0)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(log_w.shape[0]):
        grads_i = torch.autograd.grad(log_w[i], params, retain_graph=True)
        for total, g in zip(expected, grads_i, strict=True):
            total += weights[i] * g
    for got, want in zip(grad_bound, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_log_weights_are_constant_when_q_is_the_true_posterior() -> None:
    """With a 1-D latent the true posterior is a diagonal Gaussian: then every log w_i equals log p(x)."""
    model = LinearGaussianModel(x_dim=3, z_dim=1, seed=6)
    generator = torch.Generator().manual_seed(7)
    x = model.sample_data(3, generator)
    mean, cov = model.exact_posterior(x)
    mean_map, offset, _ = model._posterior_maps()
    with torch.no_grad():
        model.enc_weight.copy_(mean_map)
        model.enc_bias.copy_(offset)
        model.enc_log_std.copy_(0.5 * torch.log(torch.diagonal(cov)))
    torch.testing.assert_close(x @ model.enc_weight.T + model.enc_bias, mean)
    log_w = model.log_weights(x, 50, generator).detach()
    torch.testing.assert_close(log_w, model.log_marginal(x).detach().expand_as(log_w), rtol=0, atol=1e-9)
