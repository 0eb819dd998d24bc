"""Gradient estimators (standard, STL, DReG) against exact mathematics on the linear-Gaussian oracle,
their routing of gradients on a two-layer model, their registry and their two descriptions.

Shapes: log-weights ``[k, batch]``; surrogates and bounds ``[batch]``.

The statistical tests compare estimators on common random numbers (the same seed, hence the same
samples) and test the mean of the paired difference per parameter component with a z-score; each
states its failure rate for a correct implementation.
"""

from __future__ import annotations

import pytest
import torch
from gradients import SPECS
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import LinearGaussianModel

from iwae import bounds, estimators
from iwae.estimators import ESTIMATOR_NAMES, backward, estimate, surrogate_gradients
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import IWAE, PIWAE, make_objective

TWO_LAYER = ModelConfig(x_dim=12, latent_dims=(4, 3), hidden_dims=((8,), (6,)))


def _encoder_gradients(model, x, spec, estimator, k, repeats, seed) -> torch.Tensor:
    """``[repeats, n_encoder_params]``: one flattened encoder gradient of the loss per repeat."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(repeats):
        terms = estimate(model, x, k, generator, spec, estimator)
        encoder, _ = surrogate_gradients(terms, model.encoder_parameters(), model.decoder_parameters())
        rows.append(torch.cat([g.reshape(-1) for g in encoder]))
    return torch.stack(rows)


def _paired_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z-scores of the mean of a - b per component (components with no spread are dropped)."""
    diff = a - b
    std = diff.std(0)
    keep = std > 1e-12
    return diff.mean(0)[keep] / (std[keep] / diff.shape[0] ** 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def oracle():
    model = LinearGaussianModel(x_dim=5, z_dim=3, seed=0)
    x = model.sample_data(2, torch.Generator().manual_seed(1))
    return model, x


# -- closed forms ------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(sorted(SPECS)), st.integers(0, 10_000))
def test_dreg_coefficients_equal_a_minus_its_diagonal_derivative(name: str, seed: int) -> None:
    """c_i = a_i - d a_i / d log w_i with a = d target / d log w (the identity behind DReG), by autograd."""
    spec = SPECS[name]
    generator = torch.Generator().manual_seed(seed)
    log_w = (5.0 * torch.randn(6, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    (a,) = torch.autograd.grad(spec.encoder_target(log_w).sum(), log_w, create_graph=True)
    diagonal = torch.zeros_like(log_w)
    for i in range(log_w.shape[0] if a.requires_grad else 0):  # the ELBO's a = 1/k is constant
        (row,) = torch.autograd.grad(a[i].sum(), log_w, retain_graph=True)
        diagonal[i] = row[i]
    torch.testing.assert_close(spec.dreg_coefficients(log_w), (a - diagonal).detach(), rtol=1e-9, atol=1e-12)


def test_iwae_dreg_coefficients_are_squared_normalised_weights() -> None:
    log_w = torch.randn(7, 3, dtype=torch.float64)
    expected = bounds.normalized_weights(log_w).square()
    torch.testing.assert_close(IWAE().dreg_coefficients(log_w), expected)


def test_reported_bound_and_stop_gradients(oracle) -> None:
    model, x = oracle
    for estimator in ESTIMATOR_NAMES:
        terms = estimate(model, x, 8, torch.Generator().manual_seed(2), SPECS["piwae"], estimator)
        log_w = model.log_weights(x, 8, torch.Generator().manual_seed(2))  # the same samples
        torch.testing.assert_close(terms.bound, bounds.iwae_bound(log_w).detach())  # PIWAE reports IWAE_{MK}
        assert not terms.bound.requires_grad and terms.encoder_surrogate.shape == (2,)
    terms = estimate(model, x, 8, torch.Generator().manual_seed(2), SPECS["iwae"], "stl")
    assert terms.shared  # STL of a single target: one surrogate for both parts


# -- oracle: unbiasedness, bias, variance --------------------------------------------------------


def test_dreg_encoder_gradient_has_the_standard_mean(oracle) -> None:
    model, x = oracle
    standard = _encoder_gradients(model, x, SPECS["iwae"], "standard", 16, 400, seed=3)
    dreg = _encoder_gradients(model, x, SPECS["iwae"], "dreg", 16, 400, seed=3)
    # 21 components, |z| < 4.5 each: failure rate < 21 * 6.8e-6 = 1.5e-4 for a correct estimator.
    assert _paired_z(dreg, standard).abs().max() < 4.5
    # The same test has power: it flags STL's bias at once (|z| ~ 20 here).
    stl = _encoder_gradients(model, x, SPECS["iwae"], "stl", 16, 400, seed=3)
    assert _paired_z(stl, standard).abs().max() > 6


@pytest.mark.parametrize("name", ["miwae", "ciwae", "power", "vr", "vae"])
def test_dreg_is_unbiased_for_the_bound_family(oracle, name: str) -> None:
    model, x = oracle
    standard = _encoder_gradients(model, x, SPECS[name], "standard", 8, 250, seed=4)
    dreg = _encoder_gradients(model, x, SPECS[name], "dreg", 8, 250, seed=4)
    # 21 components at |z| < 4.5: failure rate < 1.5e-4 per objective.
    assert _paired_z(dreg, standard).abs().max() < 4.5


def test_dreg_has_smaller_encoder_variance_at_k_64(oracle) -> None:
    model, x = oracle
    standard = _encoder_gradients(model, x, SPECS["iwae"], "standard", 64, 100, seed=5)
    dreg = _encoder_gradients(model, x, SPECS["iwae"], "dreg", 64, 100, seed=5)
    # The measured ratio of total variances is about 4e-4; with 100 repeats a ratio above 0.05 (or any
    # component with a larger variance) would need an estimation error of two orders of magnitude.
    assert dreg.var(0).sum() < 0.05 * standard.var(0).sum()
    assert torch.all(dreg.var(0) < standard.var(0))


def test_stl_is_unbiased_at_k_1_and_biased_for_iwae_at_k_8(oracle) -> None:
    """The standard estimator is unbiased for grad E[L_k]: it is the exact reference."""
    model, x = oracle
    standard = _encoder_gradients(model, x, SPECS["iwae"], "standard", 1, 400, seed=6)
    stl = _encoder_gradients(model, x, SPECS["iwae"], "stl", 1, 400, seed=6)
    assert _paired_z(stl, standard).abs().max() < 4.5  # failure rate < 1.5e-4 (21 components)
    standard = _encoder_gradients(model, x, SPECS["iwae"], "standard", 8, 200, seed=7)
    stl = _encoder_gradients(model, x, SPECS["iwae"], "stl", 8, 200, seed=7)
    z = _paired_z(stl, standard)
    # Measured |z| up to ~40 at 1,000 repeats (~18 at 200); a bias this large cannot come from noise.
    assert z.abs().max() > 8
    assert (z.abs() > 4.5).sum() >= 3  # not one stray component


def test_decoder_gradient_is_the_standard_one_for_every_estimator(oracle) -> None:
    model, x = oracle
    for name, spec in SPECS.items():
        reference = None
        for estimator in ESTIMATOR_NAMES:
            terms = estimate(model, x, 8, torch.Generator().manual_seed(8), spec, estimator)
            _, decoder = surrogate_gradients(terms, model.encoder_parameters(), model.decoder_parameters())
            flat = torch.cat([g.reshape(-1) for g in decoder])
            if reference is None:
                reference = flat
            torch.testing.assert_close(flat, reference, rtol=1e-10, atol=1e-12, msg=f"{name}/{estimator}")


# -- two stochastic layers --------------------------------------------------------------------


def test_two_layer_shapes_and_gradient_routing() -> None:
    torch.manual_seed(0)
    model = LatentVariableModel(TWO_LAYER)
    x = (torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    encoder_params, decoder_params = model.encoder_parameters(), model.decoder_parameters()
    for name, spec in SPECS.items():
        for estimator in ESTIMATOR_NAMES:
            terms = estimate(model, x, 4, torch.Generator().manual_seed(2), spec, estimator)
            assert terms.bound.shape == terms.encoder_surrogate.shape == terms.decoder_surrogate.shape == (3,)
            model.zero_grad(set_to_none=True)
            backward(model, terms)
            for param in [*encoder_params, *decoder_params]:
                assert param.grad is not None and torch.isfinite(param.grad).all(), (name, estimator)
            # both stochastic layers of q get a gradient, and so do both conditionals of p
            for layer in (*model.encoder, *model.decoder):
                assert layer.head.weight.grad.abs().sum() > 0, (name, estimator)
    # split surrogates: each part's gradient is its own surrogate's gradient
    terms = estimate(model, x, 4, torch.Generator().manual_seed(3), SPECS["piwae"], "standard")
    want_encoder = torch.autograd.grad(-terms.encoder_surrogate.mean(), encoder_params, retain_graph=True)
    want_decoder = torch.autograd.grad(-terms.decoder_surrogate.mean(), decoder_params, retain_graph=True)
    model.zero_grad(set_to_none=True)
    backward(model, terms)
    for param, want in zip([*encoder_params, *decoder_params], [*want_encoder, *want_decoder], strict=True):
        torch.testing.assert_close(param.grad, want)


def test_two_layer_dreg_is_unbiased() -> None:
    """DReG with a hierarchical q (log q(h2|h1) keeps h1's path): same mean as the standard estimator."""
    torch.manual_seed(1)
    model = LatentVariableModel(ModelConfig(x_dim=6, latent_dims=(3, 2), hidden_dims=((5,), (4,)))).double()
    x = (torch.rand(1, 6, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    standard = _encoder_gradients(model, x, SPECS["iwae"], "standard", 8, 300, seed=9)
    dreg = _encoder_gradients(model, x, SPECS["iwae"], "dreg", 8, 300, seed=9)
    z = _paired_z(dreg, standard)
    # ~150 components at |z| < 5: failure rate < 150 * 5.7e-7 = 1e-4.
    assert z.abs().max() < 5
    assert dreg.var(0).sum() < standard.var(0).sum()


# -- compiled, the registry, the two descriptions -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layers", "objective", "estimator"),
    [(1, "iwae", "standard"), (2, "iwae", "standard"), (1, "iwae", "dreg"), (2, "piwae", "stl")],
)
def test_estimate_from_noise_compiles_as_one_graph(layers: int, objective: str, estimator: str) -> None:
    """``iwae train --compile`` compiles :func:`estimate_from_noise` whole: no graph break, same terms."""
    from iwae.estimators import estimate_from_noise
    from iwae.models import LatentVariableModel, ModelConfig

    torch.manual_seed(layers)
    # float64: the compiled graph fuses and reorders float32 sums over 784 pixels, whose rounding differs by CPU
    # and thread count (1.8e-5 relative was seen); in float64 the same reordering stays below 1e-10.
    model = LatentVariableModel(ModelConfig.burda(layers)).double()
    x = torch.bernoulli(torch.full((5, 784), 0.3, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    noise = model.draw_noise(x, 4, torch.Generator().manual_seed(1))
    spec = PIWAE(M=2) if objective == "piwae" else make_objective(objective)
    compiled = torch.compile(estimate_from_noise, fullgraph=True)(model, x, noise, spec, estimator)
    eager = estimate_from_noise(model, x, noise, spec, estimator)
    assert compiled.shared == eager.shared == (objective != "piwae" and estimator != "dreg")
    for name in ("bound", "encoder_surrogate", "decoder_surrogate"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-10, atol=1e-9)
    # the eager path is the model's own forward with the same generator
    forward = model(x, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward.log_w, model.sample_with_noise(x, noise).log_w, rtol=0, atol=0)


def test_the_estimator_registry_names_what_the_command_line_offers() -> None:
    """iwae.names repeats the registry's names for the torch-free command line; they must agree."""
    from iwae import names

    assert names.ESTIMATOR_NAMES == estimators.ESTIMATOR_NAMES
    assert [estimators.stops_q_params(name) for name in names.ESTIMATOR_NAMES] == [False, True, True]
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        estimators.get_estimator("reinforce")


@pytest.mark.parametrize("objective", sorted(SPECS))
@pytest.mark.parametrize("estimator", estimators.ESTIMATOR_NAMES)
def test_an_estimators_two_descriptions_agree(objective: str, estimator: str) -> None:
    """Each estimator is defined once, two ways: its surrogates (autograd) and its loss's gradients in the log-weights
    (explicit backpropagation). Float64: the gradient of ``-mean(surrogate)`` with respect to log w, taken as a leaf,
    equals ``log_weight_gradients`` for the decoder's and the encoder's surrogates, and the bounds agree."""
    log_w = (torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4).requires_grad_()
    terms = estimators.terms_from_log_weights(log_w, SPECS[objective], estimator)
    grads = estimators.log_weight_gradients(log_w.detach(), SPECS[objective], estimator)
    (decoder,) = torch.autograd.grad(-terms.decoder_surrogate.mean(), log_w, retain_graph=True)
    (encoder,) = torch.autograd.grad(-terms.encoder_surrogate.mean(), log_w)
    torch.testing.assert_close(grads.decoder, decoder, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads.encoder, encoder, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads.bound, terms.bound, rtol=1e-12, atol=1e-12)
    assert (grads.encoder is grads.decoder) == (terms.shared and estimator != "dreg")
