"""Dead units cut out of the weights (LatentVariableModel.without_units, the authors' chop) and the authors' unit
variances (evaluate.authors_unit_variances): the model the cut leaves is the masked model, and the variances are
the authors' definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iwae.data import binarize
from iwae.evaluate import ACTIVE_THRESHOLD, activity, authors_keep, authors_unit_variances
from iwae.models import LatentVariableModel, ModelConfig

CONFIGS = {
    "one layer": ModelConfig(x_dim=12, latent_dims=(6,), hidden_dims=((5, 4),)),
    "two layers": ModelConfig(x_dim=12, latent_dims=(6, 4), hidden_dims=((5,), (3, 3))),
    "three layers, no hidden layer in the middle": ModelConfig(
        x_dim=12, latent_dims=(6, 4, 3), hidden_dims=((5,), (), (4,))
    ),
    "gaussian observations": ModelConfig(x_dim=12, latent_dims=(6, 4), hidden_dims=((5,), (3,)), likelihood="gaussian"),
}


def _model(config: ModelConfig, seed: int = 0) -> LatentVariableModel:
    torch.manual_seed(seed)
    model = LatentVariableModel(config).double()
    with torch.no_grad():
        for parameter in model.parameters():  # non-zero biases too, so that every cut row and column shows
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def _keep(config: ModelConfig, seed: int) -> list[torch.Tensor]:
    """Random masks with at least one unit kept and one cut in each layer."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for d in config.latent_dims:
        mask = torch.rand(d, generator=generator) < 0.5
        mask[0], mask[-1] = True, False
        masks.append(mask)
    return masks


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_cutting_units_out_of_the_weights_is_masking_them(name: str, seed: int) -> None:
    config = CONFIGS[name]
    model, keep = _model(config, seed), _keep(config, seed)
    smaller = model.without_units(keep)
    assert smaller.config.latent_dims == tuple(int(mask.sum()) for mask in keep)
    assert smaller.config.hidden_dims == config.hidden_dims and smaller.config.likelihood == config.likelihood
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.rand(3, config.x_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if config.likelihood == "bernoulli":
        x = x.round()
    noise = model.draw_noise(x, 7, torch.Generator().manual_seed(seed))
    masked = model.sample_with_noise(x, noise, unit_masks=[mask.double() for mask in keep])
    cut = smaller.sample_with_noise(x, [eps[..., mask] for eps, mask in zip(noise, keep, strict=True)])
    torch.testing.assert_close(cut.log_w, masked.log_w, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(cut.log_q, masked.log_q, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(cut.log_prior, masked.log_prior, rtol=1e-13, atol=1e-12)
    for h_cut, h_masked, mask in zip(cut.latents, masked.latents, keep, strict=True):
        torch.testing.assert_close(h_cut, h_masked[..., mask], rtol=1e-13, atol=1e-12)
    full = model.sample_with_noise(x, noise)
    assert (full.log_w - masked.log_w).abs().max() > 1e-3  # the cut units mattered: the check can fail


def test_keeping_every_unit_leaves_the_model_unchanged() -> None:
    config = CONFIGS["two layers"]
    model = _model(config)
    same = model.without_units([torch.ones(d, dtype=torch.bool) for d in config.latent_dims])
    assert same.config == config and same is not model
    state, copied = model.state_dict(), same.state_dict()
    assert list(copied) == list(state)
    for key, value in state.items():
        assert copied[key].dtype == value.dtype and torch.equal(copied[key], value), key
    x = torch.rand(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64).round()
    torch.testing.assert_close(
        same(x, 5, torch.Generator().manual_seed(3)).log_w, model(x, 5, torch.Generator().manual_seed(3)).log_w
    )
    with torch.no_grad():  # a copy: the cut model's weights are its own
        next(same.parameters()).zero_()
    assert next(model.parameters()).abs().sum() > 0


def test_without_units_refuses_an_empty_layer_and_wrong_masks() -> None:
    model = _model(CONFIGS["two layers"])
    with pytest.raises(ValueError, match="layers \\[1\\]"):
        model.without_units([torch.ones(6, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        model.without_units([torch.ones(6), torch.ones(5)])
    with pytest.raises(ValueError, match="one mask per stochastic layer"):
        model.without_units([torch.ones(6)])


def test_authors_unit_variances_follow_their_code(mnist) -> None:
    """yburda/iwae get_units_variances: x binarised once, one sample of h1 feeds layer 2, np.var (ddof = 0)."""
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=784, latent_dims=(8, 4), hidden_dims=((20,), (10,))))
    with torch.no_grad():
        model.encoder[0].head.weight.mul_(5)
        model.encoder[1].head.weight.mul_(5)
    images = mnist.train.images[:500]
    variances = authors_unit_variances(model, images, "dynamic", torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)  # the same draws, by hand: binarise, then one noise per layer
    x = binarize(images, "dynamic", generator)
    eps1 = torch.randn((1, 500, 8), generator=generator)[0]
    with torch.no_grad():
        mean1, log_std1 = model.encoder[0](x)
        mean2, _ = model.encoder[1](mean1 + torch.exp(log_std1) * eps1)
    expected = [np.var(mean.numpy().astype(np.float64), axis=0) for mean in (mean1, mean2)]
    assert [v.dtype for v in variances] == [torch.float64, torch.float64]
    for ours, theirs in zip(variances, expected, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-12)
        assert not np.allclose(ours.numpy(), theirs * 500 / 499, rtol=1e-4, atol=0)  # ddof = 0, not 1
    # Not our definition: layer 2's mean averaged over 100 samples of h1 varies less than one sample's.
    split = type(mnist.train)(images)
    monte_carlo, _ = activity(model, split, "dynamic", torch.Generator().manual_seed(7))
    assert monte_carlo[1].sum() < variances[1].sum()
    kept = authors_keep(variances)
    assert [bool(k.eq(v >= ACTIVE_THRESHOLD).all()) for k, v in zip(kept, variances, strict=True)] == [True, True]
    assert authors_keep([torch.tensor([0.0099, 0.01, 0.02], dtype=torch.float64)])[0].tolist() == [False, True, True]
