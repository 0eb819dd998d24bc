"""Evaluation: active units, the pruned model, L_k streaming and eval output."""

from __future__ import annotations

import pytest
import torch

from iwae import bounds
from iwae.data import binarize
from iwae.evaluate import activity, count_active, estimate_log_likelihood, evaluate_model
from iwae.models import LatentVariableModel, ModelConfig


def _model_with_dead_units(dead: int = 10) -> LatentVariableModel:
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=784, latent_dims=(20,), hidden_dims=((50,),)))
    with torch.no_grad():
        head = model.encoder[0].head
        head.weight[:20] *= 10  # strongly input-dependent means...
        head.weight[:dead] = 0  # ...except for the first `dead` units, whose mean is constant
    return model


def test_active_units_counts_input_dependent_means(mnist) -> None:
    model = _model_with_dead_units(10)
    split = mnist.test.subset(300)
    variances, kls = activity(model, split, "dynamic", torch.Generator().manual_seed(0))
    assert count_active(variances) == [10]
    assert torch.all(variances[0][:10] < 1e-12)
    assert variances[0].shape == (20,) and kls[0].shape == (20,)


def test_pruned_model_and_result_fields(mnist) -> None:
    model = _model_with_dead_units(10)
    result = evaluate_model(model, mnist.test.subset(40), "dynamic", k=64, authors_split=mnist.train)
    assert result.active_units == [10] and result.active_units_authors == [10]
    assert result.n_examples == 40 and result.k == 64
    assert result.nll > 0 and result.nll_active_only is not None
    assert abs(result.nll_active_only - result.nll) < 5 * result.nll_std_err
    assert result.elbo == pytest.approx(result.recon_log_lik - result.kl)
    assert -result.nll >= result.elbo - 1e-6  # L_64 >= ELBO on the same samples' average
    assert len(result.log_activity) == 1 and len(result.log_activity[0]) == 20


@pytest.mark.parametrize("layers", [1, 2])
def test_streamed_estimate_equals_one_shot_logsumexp_of_the_same_samples(mnist, layers: int) -> None:
    torch.manual_seed(1)
    model = LatentVariableModel(ModelConfig.burda(layers))
    split, k, batch, max_rows = mnist.test.subset(12), 50, 6, 42  # chunks of 7 samples, the last one of 1
    streamed = estimate_log_likelihood(
        model, split, "dynamic", k, torch.Generator().manual_seed(0), batch_size=batch, max_rows=max_rows
    )
    generator = torch.Generator().manual_seed(0)
    expected = []
    with torch.no_grad():
        for start in range(0, len(split), batch):
            x = binarize(split.images[start : start + batch], "dynamic", generator)
            log_w = torch.cat([model(x, min(7, k - done), generator).log_w for done in range(0, k, 7)])
            expected.append(bounds.iwae_bound(log_w.double()))
    assert streamed["log_lik"].dtype == torch.float64
    torch.testing.assert_close(streamed["log_lik"], torch.cat(expected), rtol=1e-6, atol=1e-4)
    assert (streamed["log_lik"] >= streamed["recon"] - streamed["kl"] - 1e-6).all()


def test_removing_units_that_equal_the_prior_and_feed_nothing_leaves_log_weights_unchanged(mnist) -> None:
    model = _model_with_dead_units(10)
    with torch.no_grad():
        model.encoder[0].head.weight[20:30] = 0  # their std is exp(0) = 1: q equals the prior N(0, 1)
        model.decoder[0].hidden[0].weight[:, :10] = 0  # and they no longer reach the decoder
    x = mnist.test.images[:5]
    mask = torch.cat([torch.zeros(10), torch.ones(10)])
    pruned = model(x, 16, torch.Generator().manual_seed(0), unit_masks=[mask])
    full = model(x, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pruned.log_w, full.log_w, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_compiled_evaluation_matches_eager(mnist) -> None:
    """``--compile`` draws the same noise from the same generator: the same NLL up to rounding."""
    model = _model_with_dead_units(10)
    split = mnist.test.subset(6)
    eager = evaluate_model(model, split, "dynamic", k=40, batch_size=3, prune_inactive=False)
    compiled = evaluate_model(model, split, "dynamic", k=40, batch_size=3, prune_inactive=False, compile_model=True)
    assert compiled.nll == pytest.approx(eager.nll, abs=1e-3)
    assert compiled.active_units == eager.active_units and compiled.kl == pytest.approx(eager.kl, abs=1e-3)
