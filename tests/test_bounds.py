"""Bounds against a float64 (mpmath) reference on random and extreme log-weights."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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
