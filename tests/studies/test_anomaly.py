"""Anomaly scores: AUROC against a brute-force pairwise count, the scores' identities, ROC curve
(``iwae anomaly``: tests/cli/test_analyses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae.models import LatentVariableModel, ModelConfig
from iwae.studies.anomaly import SCORES, anomaly_scores, auroc, average_ranks, roc_curve, scores_from_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=60).filter(
        lambda rows: 0 < sum(label for _, label in rows) < len(rows)
    )
)
def test_auroc_matches_brute_force_with_ties(rows: list[tuple[int, bool]]) -> None:
    scores = np.array([s for s, _ in rows], dtype=float) / 2  # small integer range: many ties
    labels = np.array([int(label) for _, label in rows])
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    fpr, tpr = roc_curve(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)  # area under the curve


def test_average_ranks() -> None:
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        auroc(np.array([1.0, 2.0]), np.array([1, 1]))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 10_000))
def test_score_identities(n_samples: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    log_px, log_prior, log_q = (torch.randn(n_samples, batch, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    s = scores_from_sample(log_px, log_prior, log_q)
    torch.testing.assert_close(s["vae"], s["vae_kl"] + s["vae_recon"])
    for part in ("", "_kl", "_recon"):  # Jensen: -log mean exp <= -mean, equality for L = 1
        assert torch.all(s["iwae" + part] <= s["vae" + part] + 1e-9)
        if n_samples == 1:
            torch.testing.assert_close(s["iwae" + part], s["vae" + part])
    # s_iwae = -log mean exp(log w) (the negated L_L bound).
    log_w = log_px + log_prior - log_q
    torch.testing.assert_close(s["iwae"], -(torch.logsumexp(log_w, 0) - np.log(n_samples)))


def test_scores_of_a_model_agree_with_its_samples() -> None:
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=6, latent_dims=(2,), hidden_dims=((8,),)))
    images = torch.rand(7, 6, generator=torch.Generator().manual_seed(0))
    scores = anomaly_scores(model, images, "dynamic", 1, torch.Generator().manual_seed(1), batch_size=3)
    assert set(scores) == set(SCORES) and all(v.shape == (7,) for v in scores.values())
    torch.testing.assert_close(scores["iwae"], scores["vae"])  # L = 1


