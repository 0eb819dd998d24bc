"""MIWAE imputation: MCAR masks, the MIWAE model beats mean imputation on a low-rank table
(``iwae impute``: tests/cli/test_analyses.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae.studies.impute import ImputeSettings, impute, mcar_mask, mean_imputation, missing_mse, train_miwae

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 0.95), st.integers(0, 1000))
def test_mcar_mask_rate_and_seed(missing: float, seed: int) -> None:
    mask = mcar_mask((400, 50), missing, torch.Generator().manual_seed(seed))
    again = mcar_mask((400, 50), missing, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again) and set(mask.unique().tolist()) <= {0.0, 1.0}
    # 20,000 Bernoulli draws: standard error of the rate <= 0.0036; 0.025 is a 7-sigma bound (failure < 1e-11).
    assert abs((1 - mask.mean().item()) - missing) < 0.025


def test_mcar_mask_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        mcar_mask((3, 3), 1.0, torch.Generator())


def test_mean_imputation_and_error_only_on_missing_entries() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    filled = mean_imputation(x, mask)
    torch.testing.assert_close(filled, torch.tensor([[1.0, 6.5], [3.0, 4.0], [2.0, 9.0]]))
    assert missing_mse(x, filled, mask) == pytest.approx(((6.5 - 2.0) ** 2 + (2.0 - 5.0) ** 2) / 2)


def low_rank_table(n: int = 300, p: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    table = z @ torch.randn(2, p, generator=g) + 0.1 * torch.randn(n, p, generator=g)
    return (table - table.mean(dim=0)) / table.std(dim=0)


def test_miwae_beats_mean_imputation_on_a_low_rank_table() -> None:
    # Rank-2 signal plus small noise: a model with a 2-D latent recovers missing entries from the observed
    # ones, so its error should be far below mean imputation's (about 1 for standardised columns).
    x = low_rank_table()
    mask = mcar_mask(tuple(x.shape), 0.5, torch.Generator().manual_seed(1))
    s = ImputeSettings(k=10, epochs=100, batch_size=32, lr=3e-3, latent_dim=2, hidden=(32,), n_impute=200,
                       n_multiple=5)  # fmt: skip
    model = train_miwae(x, mask, "gaussian", s.k, s)
    single, multiple = impute(model, x, mask, s.n_impute, s.n_multiple, torch.Generator().manual_seed(2))
    assert single.shape == x.shape and multiple.shape == (5, *x.shape)
    observed = mask.bool()
    assert torch.equal(single[observed], x[observed]) and torch.equal(multiple[0][observed], x[observed])
    mean_mse, miwae_mse = missing_mse(x, mean_imputation(x, mask), mask), missing_mse(x, single, mask)
    assert mean_mse > 0.8
    assert miwae_mse < 0.3 * mean_mse  # seeded run: 0.148 vs 1.014
    assert (multiple.std(dim=0) * (1 - mask)).sum() > 0  # SIR draws differ: a real multiple imputation


