"""iwae.models, Burda's architectures: shapes, initialisation, masks, generation, the optimised log-weights against
a reference, and dead units cut out of the weights (LatentVariableModel.without_units, the authors' chop): the model
the cut leaves is the masked model."""

from __future__ import annotations

import math

import pytest
import torch

from iwae.models import LatentVariableModel, ModelConfig, bernoulli_log_prob, gaussian_log_prob


@pytest.mark.parametrize("layers", [1, 2])
def test_log_weights_shapes_for_any_k(layers: int) -> None:
    model = LatentVariableModel(ModelConfig.burda(layers))
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    for k in (1, 7):
        sample = model(x, k, torch.Generator().manual_seed(0))
        assert sample.log_w.shape == (k, 3)
        assert [h.shape for h in sample.latents] == [(k, 3, d) for d in model.config.latent_dims]
        assert torch.isfinite(sample.log_w).all()


def test_burda_architectures() -> None:
    one, two = LatentVariableModel(ModelConfig.burda(1)), LatentVariableModel(ModelConfig.burda(2))
    shapes = [tuple(p.shape) for p in one.encoder[0].parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (100, 200), (100,)]  # mean and log-std heads
    assert next(tuple(p.shape) for p in two.encoder[1].parameters()) == (100, 100)
    assert two.decoder[1].head.weight.shape == (200, 100)  # p(h1 | h2): 50-100-100-(100 means, 100 log-stds)
    assert two.decoder[0].hidden[0].weight.shape == (200, 100)  # p(x | h1): 100-200-200-784
    assert sum(p.numel() for p in one.parameters()) == (
        784 * 200 + 200 + 200 * 200 + 200 + 200 * 100 + 100 + 50 * 200 + 200 + 200 * 200 + 200 + 200 * 784 + 784
    )


def test_glorot_initialisation_and_output_bias() -> None:
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig.burda(1))
    first = model.encoder[0].hidden[0].weight
    limit = math.sqrt(6 / (784 + 200))
    assert first.abs().max() <= limit and first.abs().max() > 0.95 * limit
    mean_head = model.encoder[0].head.weight[:50]
    assert mean_head.abs().max() <= math.sqrt(6 / (200 + 50))
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in model.encoder[0].hidden)
    mean_x = torch.tensor([0.0, 0.5, 0.9999] + [0.1] * 781)
    model.set_output_bias(mean_x)
    bias = model.decoder[0].head.bias
    assert bias[0].item() == pytest.approx(math.log(0.001 / 0.999), rel=1e-6)  # clipped
    assert bias[1].item() == pytest.approx(0.0, abs=1e-7)
    assert bias[2].item() == pytest.approx(math.log(0.999 / 0.001), rel=1e-6)


def test_log_densities_match_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    value, mean, log_std = (torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(value).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(value, mean, log_std), expected)
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64), generator=generator)
    expected = torch.distributions.Bernoulli(logits=mean).log_prob(x).sum(-1)
    torch.testing.assert_close(bernoulli_log_prob(x, mean), expected)


def test_log_weight_decomposition_one_layer() -> None:
    model = LatentVariableModel(ModelConfig(x_dim=6, latent_dims=(2,), hidden_dims=((5,),))).double()
    x = torch.bernoulli(torch.full((3, 6), 0.4, dtype=torch.float64))
    sample = model(x, 4, torch.Generator().manual_seed(1))
    h = sample.latents[0]
    mean, log_std = model.encoder[0](x)
    log_q = torch.distributions.Normal(mean, log_std.exp()).log_prob(h).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(h).sum(-1)
    log_px = torch.distributions.Bernoulli(logits=model.decoder[0](h)[0]).log_prob(x).sum(-1)
    torch.testing.assert_close(sample.log_w, log_px + log_prior - log_q)


def test_stop_q_params_keeps_value_and_path_gradient() -> None:
    model = LatentVariableModel(ModelConfig.burda(2))
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    full = model(x, 3, torch.Generator().manual_seed(2))
    stopped = model(x, 3, torch.Generator().manual_seed(2), stop_q_params=True)
    torch.testing.assert_close(full.log_q, stopped.log_q)
    head = model.encoder[1].head.weight
    (grad_full,) = torch.autograd.grad(full.log_q.sum(), head)
    (grad_stopped,) = torch.autograd.grad(stopped.log_q.sum(), head)
    assert not torch.allclose(grad_full, grad_stopped)  # the score-function part is gone


def test_unit_masks_remove_units() -> None:
    model = LatentVariableModel(ModelConfig(x_dim=8, latent_dims=(3,), hidden_dims=((4,),)))
    x = torch.bernoulli(torch.full((2, 8), 0.5))
    mask = torch.tensor([1.0, 0.0, 1.0])
    sample = model(x, 5, torch.Generator().manual_seed(0), unit_masks=[mask])
    assert torch.all(sample.latents[0][..., 1] == 0)
    all_on = model(x, 5, torch.Generator().manual_seed(0), unit_masks=[torch.ones(3)])
    torch.testing.assert_close(all_on.log_w, model(x, 5, torch.Generator().manual_seed(0)).log_w)


@pytest.mark.parametrize("layers", [1, 2])
def test_precomputed_first_q_gives_the_same_sample_bit_for_bit(layers: int) -> None:
    """Evaluation computes q(h_1 | x) once per minibatch and passes it to every chunk of samples."""
    model = LatentVariableModel(ModelConfig.burda(layers))
    x = torch.bernoulli(torch.full((3, 784), 0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first_q = model.encoder[0](x)
        masks = [torch.ones(d) for d in model.config.latent_dims]
        for kwargs in ({}, {"unit_masks": masks}):
            given = model(x, 4, torch.Generator().manual_seed(1), first_q=first_q, **kwargs)
            computed = model(x, 4, torch.Generator().manual_seed(1), **kwargs)
            assert torch.equal(given.log_w, computed.log_w)
            assert all(torch.equal(a, b) for a, b in zip(given.latents, computed.latents, strict=True))


def test_observed_mask_restricts_likelihood() -> None:
    model = LatentVariableModel(ModelConfig(x_dim=8, latent_dims=(3,), hidden_dims=((4,),)))
    x = torch.bernoulli(torch.full((2, 8), 0.5))
    mask = torch.zeros(2, 8)
    sample = model(x, 5, torch.Generator().manual_seed(0), observed_mask=mask)
    assert torch.all(sample.log_px_given_h == 0)


@pytest.mark.parametrize("layers", [1, 2])
def test_generation_shapes(layers: int) -> None:
    model = LatentVariableModel(ModelConfig.burda(layers))
    generator = torch.Generator().manual_seed(0)
    samples = model.sample(5, generator)
    assert samples.shape == (5, 784) and samples.min() >= 0 and samples.max() <= 1
    assert model.reconstruct(torch.zeros(4, 784), generator).shape == (4, 784)
    assert [m.shape[-1] for m in model.encode_means(torch.zeros(4, 784))] == list(model.config.latent_dims)


def test_gaussian_observations() -> None:
    config = ModelConfig(x_dim=1, latent_dims=(1,), hidden_dims=((5, 5),), likelihood="gaussian")
    model = LatentVariableModel(config)
    log_w = model.log_weights(torch.randn(10, 1), 3, torch.Generator().manual_seed(0))
    assert log_w.shape == (3, 10) and torch.isfinite(log_w).all()


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        ModelConfig(latent_dims=(50,), hidden_dims=((200,), (100,)))
    with pytest.raises(ValueError):
        ModelConfig(activation="sigmoid")


def reference_log_w(model: LatentVariableModel, x: torch.Tensor, latents: list[torch.Tensor], observed_mask=None):
    """The log-weights written the unoptimised way, with torch.distributions, on given samples."""
    normal, inputs, log_q, log_prior = torch.distributions.Normal, x, 0.0, 0.0
    for j, h in enumerate(latents):
        mean, log_std = model.encoder[j](inputs)
        log_q = log_q + normal(mean, log_std.exp()).log_prob(h).sum(-1)
        inputs = h
    log_prior = normal(0.0, 1.0).log_prob(latents[-1]).sum(-1)
    for j in range(len(latents) - 1):
        mean, log_std = model.decoder[j + 1](latents[j + 1])
        log_prior = log_prior + normal(mean, log_std.exp()).log_prob(latents[j]).sum(-1)
    per_pixel = torch.distributions.Bernoulli(logits=model.decoder[0](latents[0])[0]).log_prob(x)
    if observed_mask is not None:
        per_pixel = per_pixel * observed_mask
    return per_pixel.sum(-1) + log_prior - log_q


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_optimised_log_weights_equal_the_reference_with_gradients(layers: int, masked: bool) -> None:
    """The fast path (data term by matmul, log q from the noise, no head split) changes no value or gradient."""
    torch.manual_seed(layers)
    model = LatentVariableModel(ModelConfig.burda(layers)).double()
    x = torch.bernoulli(torch.full((3, 784), 0.3, dtype=torch.float64))
    observed = torch.bernoulli(torch.full((3, 784), 0.5, dtype=torch.float64)) if masked else None
    sample = model(x, 4, torch.Generator().manual_seed(3), observed_mask=observed)
    expected = reference_log_w(model, x, sample.latents, observed)
    torch.testing.assert_close(sample.log_w, expected)
    params = list(model.parameters())
    grads = torch.autograd.grad(torch.logsumexp(sample.log_w, 0).sum(), params, retain_graph=True)
    expected_grads = torch.autograd.grad(torch.logsumexp(expected, 0).sum(), params)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("layers", [1, 2])
def test_float32_cpu_path_matches_the_float64_reference(layers: int) -> None:
    """The model in float32 against the float64 reference."""
    torch.manual_seed(layers)
    model = LatentVariableModel(ModelConfig.burda(layers))
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    sample = model(x, 4, torch.Generator().manual_seed(3))
    reference_model = LatentVariableModel(ModelConfig.burda(layers)).double()
    reference_model.load_state_dict(model.state_dict())
    expected = reference_log_w(reference_model, x.double(), [h.detach().double() for h in sample.latents])
    torch.testing.assert_close(sample.log_w.double(), expected, rtol=0, atol=5e-4)
    # gradients of the decoder (the samples' own path differs between the two models, so only p's parameters)
    decoder = list(model.decoder.parameters())
    grads = torch.autograd.grad(torch.logsumexp(sample.log_w, 0).sum(), decoder)
    expected_grads = torch.autograd.grad(torch.logsumexp(expected, 0).sum(), list(reference_model.decoder.parameters()))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        # float32 sums with cancellation: errors relative to the tensor's largest entry
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=2e-4 * expected_grad.abs().max().item())


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
