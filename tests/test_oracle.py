"""The linear-Gaussian oracle: bounds against the exact log p(x), and the IWAE gradient identity."""

from __future__ import annotations

import torch
from oracles import LinearGaussianModel

from iwae import bounds


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
