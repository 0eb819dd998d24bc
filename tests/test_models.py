"""Burda's architectures: shapes, initialisation, masks and generation."""

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
