"""iwae.pyro: the loss is the library's bound of the per-data-point log-weights (and Pyro's RenyiELBO on the same
draws); every estimator and objective's gradients equal iwae.estimators' on Burda's models written in Pyro
(float64, 1e-9), and a hierarchical guide's equal a plain-torch reference with detached parameter copies; the exact
posterior gives -log p(x) and zero DReG guide gradients; DReG's mean gradient is the standard estimator's, with a
lower variance; the error cases."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from gradients import SMALL, SPECS, float_model
from oracles import LinearGaussianModel
from torch import Tensor, nn
from torch.func import functional_call

from iwae import bounds, estimators
from iwae.objectives import IWAE, MIWAE

pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402  (after the skip: pyro is the optional extra)
from pyro import poutine  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from pyro.nn.module import to_pyro_module_  # noqa: E402

from iwae.pyro import IWAE_ELBO, log_likelihood  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
BOUNDS = {  # the bound each objective reports, written with iwae.bounds' functions (SPECS' parameters)
    "vae": bounds.elbo,
    "iwae": bounds.iwae_bound,
    "miwae": lambda log_w: bounds.miwae_bound(log_w, 2),
    "piwae": bounds.iwae_bound,  # PIWAE reports the decoder's bound, IWAE_k
    "ciwae": lambda log_w: bounds.ciwae_bound(log_w, 0.3),
    "power": lambda log_w: bounds.power_mean_bound(log_w, 0.5),
    "vr": lambda log_w: bounds.vr_iwae_bound(log_w, 0.4),
}


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def one_line(error: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(error.value)


# -- Burda's models written in Pyro -----------------------------------------------------------------------------
def burda_pair(lvm, record: list, size: int | None = None):
    """A Pyro model and guide over a LatentVariableModel's networks; the guide appends each run's noise
    ``(h - mean) / std`` per layer to ``record``. ``size`` subsamples the data plate: the batch out of ``size``."""

    def data_plate(x: Tensor):
        batch = x.shape[0]
        return pyro.plate("data", size or batch, subsample=torch.arange(batch) if size else None)

    def model(x: Tensor) -> None:
        pyro.module("decoder", lvm.decoder)
        with data_plate(x):
            top = len(lvm.decoder) - 1
            prior = dist.Normal(x.new_zeros(x.shape[0], lvm.config.latent_dims[-1]), 1.0)
            h = pyro.sample(f"h{top + 1}", prior.to_event(1))
            for j in reversed(range(top)):
                mean, log_std = lvm.decoder[j + 1](h)
                h = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))
            (logits,) = lvm.decoder[0](h)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module("encoder", lvm.encoder)
        noise = []
        with data_plate(x):
            inputs = x
            for j, layer in enumerate(lvm.encoder):
                mean, log_std = layer(inputs)
                inputs = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))
                noise.append(((inputs - mean) / log_std.exp()).detach())
        record.append(noise)

    return model, guide


def binary_batch(batch: int, x_dim: int, seed: int) -> Tensor:
    return (torch.rand(batch, x_dim, dtype=F64, generator=torch.Generator().manual_seed(seed)) > 0.5).to(F64)


def pyro_gradients(elbo: IWAE_ELBO, model, guide, x: Tensor, params: list[Tensor]) -> tuple[float, list[Tensor]]:
    for param in params:
        param.grad = None
    loss = elbo.loss_and_grads(model, guide, x)
    return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_equal_the_librarys_estimators_on_burdas_model(layers: int, estimator: str, name: str) -> None:
    """Same parameters, same noise, float64: iwae.pyro's gradients are batch x iwae.estimators' (whose loss is the
    minibatch's mean, Pyro's its sum) to 1e-9, and its loss is minus the summed bound. Two layers: q(h2 | h1) is
    a hierarchical guide, whose DReG and STL stop q's parameters only."""
    lvm = float_model(SMALL[layers], "tanh", F64, seed=layers)
    reference = copy.deepcopy(lvm)
    x = binary_batch(5, lvm.config.x_dim, seed=3)
    record: list = []
    model, guide = burda_pair(lvm, record)
    elbo = IWAE_ELBO(6, estimator=estimator, objective=SPECS[name], max_plate_nesting=1)
    loss, grads = pyro_gradients(elbo, model, guide, x, list(lvm.parameters()))
    terms = estimators.estimate_from_noise(reference, x, record[0], SPECS[name], estimator)
    estimators.backward(reference, terms)
    assert loss == pytest.approx(-terms.bound.sum().item(), abs=1e-9)
    for got, param in zip(grads, reference.parameters(), strict=True):
        torch.testing.assert_close(got, x.shape[0] * param.grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(SPECS))
def test_the_loss_is_the_bound_of_the_per_point_log_weights(name: str) -> None:
    """The log-weights are the library model's, one per particle and data point (float64); the loss is minus the
    sum over the batch of iwae.bounds' bound of them, for every objective."""
    lvm = float_model(SMALL[2], "tanh", F64, seed=0)
    x = binary_batch(4, lvm.config.x_dim, seed=1)
    record: list = []
    model, guide = burda_pair(lvm, record)
    elbo = IWAE_ELBO(6, objective=SPECS[name], max_plate_nesting=1)
    torch.manual_seed(7)
    log_w = elbo.log_weights(model, guide, x)
    with torch.no_grad():
        want = lvm.sample_with_noise(x, record[-1]).log_w
    torch.testing.assert_close(log_w, want, rtol=0, atol=1e-12)
    torch.manual_seed(7)
    loss = elbo.loss(model, guide, x)
    assert loss == pytest.approx(-BOUNDS[name](want).sum().item(), abs=1e-10)


def test_a_subsampled_data_plate_scales_the_bound_not_the_weights() -> None:
    """A batch of 4 out of 10: the loss and its gradients are 10/4 times those of the full plate on the same draws
    (Pyro's RenyiELBO instead scales each log-weight by 10/4, a different bound)."""
    lvm = float_model(SMALL[1], "tanh", F64, seed=0)
    x = binary_batch(4, lvm.config.x_dim, seed=2)
    params = list(lvm.parameters())
    elbo = IWAE_ELBO(5, estimator="dreg", max_plate_nesting=1)
    results = []
    for size in (None, 10):
        torch.manual_seed(3)
        results.append(pyro_gradients(elbo, *burda_pair(lvm, [], size=size), x, params))
    (full_loss, full_grads), (sub_loss, sub_grads) = results
    assert sub_loss == pytest.approx(2.5 * full_loss, rel=1e-12)
    for sub, full in zip(sub_grads, full_grads, strict=True):
        torch.testing.assert_close(sub, 2.5 * full, rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    assert abs(renyi.loss(*burda_pair(lvm, [], size=10), x) - sub_loss) > 1.0


def test_alpha_zero_agrees_with_pyros_renyi_elbo_on_the_same_draws() -> None:
    """Every site in the data plate: the IWAE loss and the standard estimator's gradients are RenyiELBO(alpha=0)'s
    on the same draws (the same seed), per data point as both form them."""
    lvm = float_model(SMALL[2], "tanh", F64, seed=4)
    x = binary_batch(6, lvm.config.x_dim, seed=5)
    model, guide = burda_pair(lvm, [])
    params = list(lvm.parameters())
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    ours = IWAE_ELBO(8, max_plate_nesting=1)
    for seed in range(3):
        torch.manual_seed(seed)
        want = renyi.loss(model, guide, x)
        torch.manual_seed(seed)
        assert ours.loss(model, guide, x) == pytest.approx(want, abs=1e-10)
        torch.manual_seed(seed)
        want_loss, want_grads = pyro_gradients(renyi, model, guide, x, params)
        torch.manual_seed(seed)
        loss, grads = pyro_gradients(ours, model, guide, x, params)
        assert loss == pytest.approx(want_loss, abs=1e-10)
        for got, want_grad in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, want_grad, rtol=0, atol=1e-10)


def test_svi_steps_with_the_estimators_gradients() -> None:
    """SVI takes the ELBO: one SGD step moves every parameter by -lr times the gradient loss_and_grads gives on the
    same draw, and differentiable_loss has the same value and gradients."""
    lvm = float_model(SMALL[2], "tanh", F64, seed=0)
    x = binary_batch(4, lvm.config.x_dim, seed=1)
    model, guide = burda_pair(lvm, [])
    params = list(lvm.parameters())
    elbo = IWAE_ELBO(4, estimator="dreg", max_plate_nesting=1)
    torch.manual_seed(0)
    loss, grads = pyro_gradients(elbo, model, guide, x, params)
    torch.manual_seed(0)
    differentiable = elbo.differentiable_loss(model, guide, x)
    assert differentiable.item() == pytest.approx(loss, abs=1e-12)
    for got, want in zip(torch.autograd.grad(differentiable, params), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    before = [p.detach().clone() for p in params]
    for param in params:
        param.grad = None
    svi = pyro.infer.SVI(model, guide, pyro.optim.SGD({"lr": 0.01}), loss=elbo)
    torch.manual_seed(0)
    assert svi.step(x) == pytest.approx(loss, abs=1e-12)
    for old, new, grad in zip(before, params, grads, strict=True):
        torch.testing.assert_close(new.detach(), old - 0.01 * grad, rtol=0, atol=1e-12)


# -- a hierarchical guide against a plain-torch reference -------------------------------------------------------
class Encoder(nn.Module):
    """q(z1 | x) q(z2 | z1, x), Gaussian, in plain torch: the layers return (mean, log_std)."""

    def __init__(self, x_dim: int = 4, d1: int = 3, d2: int = 2):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(x_dim, 8), nn.Tanh(), nn.Linear(8, 2 * d1))
        self.second = nn.Sequential(nn.Linear(d1 + x_dim, 8), nn.Tanh(), nn.Linear(8, 2 * d2))

    def q1(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.first(x).chunk(2, dim=-1)

    def q2(self, z1: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.second(torch.cat([z1, x.expand(*z1.shape[:-1], x.shape[-1])], dim=-1)).chunk(2, dim=-1)


class Decoder(nn.Module):
    """p(z2) p(z1 | z2) p(x | z1): z2 standard normal, the rest Gaussian with networks."""

    def __init__(self, x_dim: int = 4, d1: int = 3, d2: int = 2):
        super().__init__()
        self.top = nn.Sequential(nn.Linear(d2, 8), nn.Tanh(), nn.Linear(8, 2 * d1))
        self.out = nn.Linear(d1, x_dim)
        self.log_noise = nn.Linear(d1, x_dim)
        self.d2 = d2

    def log_joint(self, x: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        mean1, log_std1 = self.top(z2).chunk(2, dim=-1)
        log_p = dist.Normal(0.0, 1.0).log_prob(z2).sum(-1) + dist.Normal(mean1, log_std1.exp()).log_prob(z1).sum(-1)
        return log_p + dist.Normal(self.out(z1), self.log_noise(z1).exp()).log_prob(x).sum(-1)


def hierarchical_pair(encoder: Encoder, decoder: Decoder, record: list):
    """The Pyro model and guide over PyroModule copies of the networks (``to_pyro_module_``); the guide appends its
    noise ``[eps1, eps2]`` to ``record``. Returns the model, the guide and the two PyroModules."""
    pyro_encoder, pyro_decoder = copy.deepcopy(encoder), copy.deepcopy(decoder)
    to_pyro_module_(pyro_encoder)  # in place, every submodule too
    to_pyro_module_(pyro_decoder)
    assert all(isinstance(module, PyroModule) for module in [*pyro_encoder.modules(), *pyro_decoder.modules()])

    def guide(x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            mean1, log_std1 = pyro_encoder.q1(x)
            z1 = pyro.sample("z1", dist.Normal(mean1, log_std1.exp()).to_event(1))
            mean2, log_std2 = pyro_encoder.q2(z1, x)
            z2 = pyro.sample("z2", dist.Normal(mean2, log_std2.exp()).to_event(1))
        record.append([((z - m) / s.exp()).detach() for z, m, s in ((z1, mean1, log_std1), (z2, mean2, log_std2))])

    def model(x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(x.shape[0], pyro_decoder.d2), 1.0).to_event(1))
            mean1, log_std1 = pyro_decoder.top(z2).chunk(2, dim=-1)
            z1 = pyro.sample("z1", dist.Normal(mean1, log_std1.exp()).to_event(1))
            likelihood = dist.Normal(pyro_decoder.out(z1), pyro_decoder.log_noise(z1).exp())
            pyro.sample("x", likelihood.to_event(1), obs=x)

    return model, guide, pyro_encoder, pyro_decoder


def hierarchical(seed: int, batch: int = 5) -> tuple[Encoder, Decoder, Tensor]:
    torch.manual_seed(seed)
    encoder, decoder = Encoder().to(F64), Decoder().to(F64)
    x = torch.randn(batch, 4, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    return encoder, decoder, x


def _prefixed(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}


def reference_gradients(
    encoder: Encoder, decoder: Decoder, x: Tensor, noise: list[Tensor], estimator: str
) -> tuple[list[Tensor], list[Tensor]]:
    """The estimator written out in plain torch for the hierarchical guide: gradients of minus the summed IWAE bound
    (the encoder's, then the decoder's).

    The samples' path runs through the live parameters; STL and DReG evaluate log q with detached copies of q's
    parameters (``torch.func.functional_call``) at those samples, so q(z2 | z1, x) still depends on z1's path.
    DReG's encoder loss is ``-sum stop(w~^2) log w`` (Tucker et al. 2019, eq. 8, for IWAE); its decoder takes
    IWAE's gradient."""
    live = dict(encoder.named_parameters())
    q_params = {name: p.detach() for name, p in live.items()} if estimator in ("stl", "dreg") else live

    def layer(params: dict[str, Tensor], name: str, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(getattr(encoder, name), _prefixed(params, f"{name}."), (inputs,)).chunk(2, dim=-1)

    def joined(z1: Tensor) -> Tensor:
        return torch.cat([z1, x.expand(*z1.shape[:-1], x.shape[-1])], dim=-1)

    eps1, eps2 = noise
    mean1, log_std1 = layer(live, "first", x)
    z1 = mean1 + log_std1.exp() * eps1
    mean2, log_std2 = layer(live, "second", joined(z1))
    z2 = mean2 + log_std2.exp() * eps2
    q_mean1, q_log_std1 = layer(q_params, "first", x)
    q_mean2, q_log_std2 = layer(q_params, "second", joined(z1))  # z1 with its path: only q's parameters stop
    log_q = dist.Normal(q_mean1, q_log_std1.exp()).log_prob(z1).sum(-1)
    log_q = log_q + dist.Normal(q_mean2, q_log_std2.exp()).log_prob(z2).sum(-1)
    log_w = decoder.log_joint(x, z1, z2) - log_q  # [k, batch]
    iwae_loss = -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])).sum()
    encoder_loss = iwae_loss
    if estimator == "dreg":
        encoder_loss = -(torch.softmax(log_w.detach(), dim=0).square() * log_w).sum()
    encoder_grads = torch.autograd.grad(encoder_loss, list(live.values()), retain_graph=True)
    decoder_grads = torch.autograd.grad(iwae_loss, list(decoder.parameters()))
    return list(encoder_grads), list(decoder_grads)


@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
def test_a_hierarchical_guide_equals_a_plain_torch_reference(estimator: str) -> None:
    """q(z2 | z1, x) written with PyroModule networks: iwae.pyro's gradients equal the estimator written out by hand
    with detached parameter copies, to 1e-9 in float64 (the guide's and the model's parameters alike)."""
    encoder, decoder, x = hierarchical(seed=0)
    record: list = []
    model, guide, pyro_encoder, pyro_decoder = hierarchical_pair(encoder, decoder, record)
    elbo = IWAE_ELBO(7, estimator=estimator, max_plate_nesting=1)
    for param in [*pyro_encoder.parameters(), *pyro_decoder.parameters()]:
        param.grad = None
    elbo.loss_and_grads(model, guide, x)
    want_encoder, want_decoder = reference_gradients(encoder, decoder, x, record[0], estimator)
    got_encoder = [p.grad for p in pyro_encoder.parameters()]
    got_decoder = [p.grad for p in pyro_decoder.parameters()]
    for got, want in zip([*got_encoder, *got_decoder], [*want_encoder, *want_decoder], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_dregs_mean_gradient_is_the_standard_estimators_with_a_lower_variance() -> None:
    """The hierarchical guide, k = 8, 200 seeds of a 50-point batch, each estimator on the same draws: the paired
    difference of the guide's gradients has mean zero (a z-test at 5 sigma on each of the 194 coordinates: with
    199 degrees of freedom P(|t| > 5) is about 1.3e-6, so under the null a false failure has probability below
    3e-4 by Bonferroni, as far as the paired differences are near normal that far in the tail: a heuristic rate,
    not a bound; the seeds are fixed, so on one platform the test gives one answer, measured max |z| 2.3), DReG's
    total variance is below half the standard estimator's (measured 0.27), and the
    model's gradients are the standard estimator's draw for draw. The same test rejects STL, biased for k > 1
    (max |z| about 100), so it can fail."""
    encoder, decoder, x = hierarchical(seed=1, batch=50)
    model, guide, pyro_encoder, pyro_decoder = hierarchical_pair(encoder, decoder, [])
    guide_params, model_params = list(pyro_encoder.parameters()), list(pyro_decoder.parameters())
    runs = 200
    draws = {}
    for estimator in ("standard", "dreg", "stl"):
        elbo = IWAE_ELBO(8, estimator=estimator, max_plate_nesting=1)
        guide_grads, model_grads = [], []
        for seed in range(runs):
            torch.manual_seed(seed)
            _, grads = pyro_gradients(elbo, model, guide, x, [*guide_params, *model_params])
            guide_grads.append(torch.cat([g.flatten() for g in grads[: len(guide_params)]]))
            model_grads.append(torch.cat([g.flatten() for g in grads[len(guide_params) :]]))
        draws[estimator] = torch.stack(guide_grads), torch.stack(model_grads)

    def max_z(estimator: str) -> float:
        difference = draws[estimator][0] - draws["standard"][0]  # [runs, coordinates], paired by seed
        return (difference.mean(0) / (difference.std(0) / math.sqrt(runs))).abs().max().item()

    assert max_z("dreg") < 5.0
    assert max_z("stl") > 5.0
    ratio = draws["dreg"][0].var(0).sum() / draws["standard"][0].var(0).sum()
    assert ratio < 0.5, ratio
    torch.testing.assert_close(draws["dreg"][1], draws["standard"][1], rtol=0, atol=1e-12)


# -- the exact posterior -------------------------------------------------------------------------------------------
class ExactPosterior(nn.Module):
    """q(z | x) = N(A x + a, L L^T), set to the linear-Gaussian model's exact posterior (full covariance)."""

    def __init__(self, oracle: LinearGaussianModel):
        super().__init__()
        mean_map, offset, cov = oracle._posterior_maps()
        self.mean_map = nn.Parameter(mean_map.clone())
        self.offset = nn.Parameter(offset.clone())
        self.scale_tril = nn.Parameter(torch.linalg.cholesky(cov))


def linear_gaussian_pair(oracle: LinearGaussianModel, posterior: ExactPosterior):
    def model(x: Tensor) -> None:
        pyro.module("oracle", oracle)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], oracle.z_dim), 1.0).to_event(1))
            mean = z @ oracle.weight.T + oracle.bias
            pyro.sample("x", dist.Normal(mean, oracle.log_noise_std.exp()).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module("posterior", posterior)
        with pyro.plate("data", x.shape[0]):
            loc = x @ posterior.mean_map.T + posterior.offset
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=posterior.scale_tril))

    return model, guide


@pytest.mark.parametrize("k", [1, 4, 32])
def test_the_exact_posterior_gives_log_px_and_zero_dreg_guide_gradients(k: int) -> None:
    """With q the exact posterior every log-weight is log p(x): the loss is -sum log p(x) for any k, and the
    guide's gradients are zero to rounding for DReG and STL (the path term vanishes) but not for the standard
    estimator (its score term is zero in expectation only)."""
    oracle = LinearGaussianModel(x_dim=5, z_dim=3, seed=0)
    posterior = ExactPosterior(oracle)
    x = oracle.sample_data(6, torch.Generator().manual_seed(1))
    model, guide = linear_gaussian_pair(oracle, posterior)
    log_px = oracle.log_marginal(x).detach()
    elbo = IWAE_ELBO(k, max_plate_nesting=1)
    assert elbo.loss(model, guide, x) == pytest.approx(-log_px.sum().item(), abs=1e-9)
    torch.testing.assert_close(log_likelihood(model, guide, x, num_samples=2 * k + 1, chunk_size=k), log_px)
    largest = {}
    for estimator in ("standard", "stl", "dreg"):
        torch.manual_seed(2)
        loss, grads = pyro_gradients(IWAE_ELBO(k, estimator=estimator), model, guide, x, list(posterior.parameters()))
        assert loss == pytest.approx(-log_px.sum().item(), abs=1e-9)
        largest[estimator] = max(g.abs().max().item() for g in grads)
    assert largest["dreg"] < 1e-10 and largest["stl"] < 1e-10, largest
    assert largest["standard"] > 1e-2, largest


def test_log_likelihood_is_the_log_mean_exp_of_its_chunks() -> None:
    """L_k in chunks: the same draws as IWAE_ELBO's log-weights chunk after chunk, 5 + 5 + 3 samples, in float64."""
    lvm = float_model(SMALL[1], "tanh", F64, seed=0)
    x = binary_batch(3, lvm.config.x_dim, seed=1)
    model, guide = burda_pair(lvm, [])
    torch.manual_seed(4)
    got = log_likelihood(model, guide, x, num_samples=13, chunk_size=5, max_plate_nesting=1)
    torch.manual_seed(4)
    chunks = [IWAE_ELBO(k, max_plate_nesting=1).log_weights(model, guide, x) for k in (5, 5, 3)]
    assert got.dtype == F64
    torch.testing.assert_close(got, bounds.log_mean_exp(torch.cat(chunks)), rtol=0, atol=1e-12)


# -- plates, guides ------------------------------------------------------------------------------------------------
def pixel_pairs(batch: int, pixels: int):
    """The same model twice: z_b, u_bp ~ N(z_b, 1), x_bp ~ N(u_bp, 0.5), written with a plate of pixels inside the
    data plate (so u is a per-pixel latent) and with the pixels as an event dimension. Same draw layout."""

    def plated_model(x: Tensor) -> None:
        with pyro.plate("data", batch, dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(batch, 1), 1.0))
            with pyro.plate("pixels", pixels, dim=-1):
                u = pyro.sample("u", dist.Normal(z, 1.0))
                pyro.sample("x", dist.Normal(u, 0.5), obs=x)

    def plated_guide(x: Tensor) -> None:
        scale = pyro.param("scale", torch.full((), 0.8, dtype=F64))
        with pyro.plate("data", batch, dim=-2):
            z = pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), scale))
            with pyro.plate("pixels", pixels, dim=-1):
                pyro.sample("u", dist.Normal((x + z) / 2, scale))

    def event_model(x: Tensor) -> None:
        with pyro.plate("data", batch):
            z = pyro.sample("z", dist.Normal(x.new_zeros(batch, 1), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(z.expand(*z.shape[:-1], pixels), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(u, 0.5).to_event(1), obs=x)

    def event_guide(x: Tensor) -> None:
        scale = pyro.param("scale", torch.full((), 0.8, dtype=F64))
        with pyro.plate("data", batch):
            z = pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), scale).to_event(1))
            pyro.sample("u", dist.Normal((x + z) / 2, scale).to_event(1))

    return (plated_model, plated_guide), (event_model, event_guide)


def test_a_plate_inside_the_data_plate_is_summed_within_each_data_point() -> None:
    """Per-pixel latents in a plate of pixels nested in the data plate are part of each data point's weight (no
    global-latent error): the loss and gradients equal those of the same model with the pixels as an event dim."""
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    results = []
    for model, guide in pixel_pairs(4, 3):
        pyro.clear_param_store()
        torch.manual_seed(5)
        elbo = IWAE_ELBO(6, estimator="dreg", max_plate_nesting=2)
        loss = elbo.loss_and_grads(model, guide, x)
        results.append((loss, pyro.param("scale").unconstrained().grad.clone()))
    (plated_loss, plated_grad), (event_loss, event_grad) = results
    assert plated_loss == pytest.approx(event_loss, abs=1e-10)
    torch.testing.assert_close(plated_grad, event_grad, rtol=0, atol=1e-10)


def test_an_autoguide_over_local_latents_agrees_with_renyi_elbo() -> None:
    """AutoNormal (per-data-point locations and scales in the data plate) works as a guide: the standard
    estimator's loss and gradients are RenyiELBO(alpha=0)'s on the same draws, and max_plate_nesting is guessed."""
    weight = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def model(x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, 0.5).to_event(1), obs=x)

    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    guide = pyro.infer.autoguide.AutoNormal(model)
    guide(x)  # initialise its parameters before the seeded draws
    params = list(guide.parameters())
    ours = IWAE_ELBO(5)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(3)
    want_loss, want_grads = pyro_gradients(renyi, model, guide, x, params)
    ours.loss(model, guide, x)  # guesses max_plate_nesting (a run of its own) before the seeded draw
    assert ours.max_plate_nesting == 1
    torch.manual_seed(3)
    loss, grads = pyro_gradients(ours, model, guide, x, params)
    assert loss == pytest.approx(want_loss, abs=1e-10)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# -- guides that a replay cannot evaluate again --------------------------------------------------------------------
def dropout_pair(x_dim: int = 3):
    """``local_model`` with a guide whose mean passes through dropout in training mode: randomness outside
    ``pyro.sample``, so a replay of the guide at its own samples gives another log q."""
    net = nn.Sequential(nn.Linear(x_dim, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()

    def guide(x: Tensor) -> None:
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(net(x), 1.0).to_event(1))

    def model(x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            mean = z.sum(-1, keepdim=True).expand(*z.shape[:-1], x_dim)
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)

    return model, guide


def test_the_standard_estimator_takes_its_draws_own_graph_so_a_random_guide_is_fine() -> None:
    model, guide = dropout_pair()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    elbo = IWAE_ELBO(num_particles=5, max_plate_nesting=1)  # given: no first run of the guide to guess it
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    for seed in range(3):
        losses = []
        for measure in (elbo.loss, elbo.loss_and_grads, renyi.loss):
            pyro.set_rng_seed(seed)
            losses.append(measure(model, guide, x))
        assert losses[0] == pytest.approx(losses[1], abs=1e-9) and losses[0] == pytest.approx(losses[2], abs=1e-9)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_a_guide_that_a_replay_evaluates_differently_is_refused_by_the_estimators_that_stop_q(estimator: str) -> None:
    model, guide = dropout_pair()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="another log q when replayed") as refused:
        IWAE_ELBO(num_particles=5, estimator=estimator).loss_and_grads(model, guide, x)
    assert one_line(refused)


def test_a_flow_that_inverts_only_its_own_values_is_refused_in_one_line_by_dreg() -> None:
    flow = dist.transforms.Planar(2).double()

    def guide(x: Tensor) -> None:
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert math.isfinite(IWAE_ELBO(num_particles=3).loss_and_grads(local_model, guide, x))  # standard: no replay
    with pytest.raises(ValueError, match="cannot evaluate log q at a copy of its own samples") as refused:
        IWAE_ELBO(num_particles=3, estimator="dreg").loss_and_grads(local_model, guide, x)
    assert one_line(refused)


# -- errors --------------------------------------------------------------------------------------------------------
def local_model(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def local_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))


def global_model(x: Tensor) -> None:
    shift = pyro.sample("shift", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(shift.unsqueeze(-2).expand(*shift.shape[:-1], x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def global_guide(x: Tensor) -> None:
    pyro.sample("shift", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    local_guide(x)


def discrete_model(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
        pyro.sample("x", dist.Normal(c.unsqueeze(-1).expand(*c.shape, 2), 1.0).to_event(1), obs=x)


def discrete_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))


def empty_guide(x: Tensor) -> None:
    pass


def extra_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))
        pyro.sample("extra", dist.Normal(x, 1.0).to_event(1))


def sampling_x_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(x, 1.0).to_event(1))


def observing_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=x)


def sequential_model(x: Tensor) -> None:
    for b in pyro.plate("data", x.shape[0]):
        z = pyro.sample(f"z{b}", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample(f"x{b}", dist.Normal(z, 1.0).to_event(1), obs=x[b])


def sequential_guide(x: Tensor) -> None:
    for b in pyro.plate("data", x.shape[0]):
        pyro.sample(f"z{b}", dist.Normal(x[b], 1.0).to_event(1))


def scaled_model(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=0.5):  # KL annealing written on the latent only
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def extra_dims_model(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.expand(5, *z.shape), 1.0).to_event(1), obs=x)  # a batch dim left of them all


def undeclared_model(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0], dim=-1):
        with pyro.plate("pairs", 2, dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2, x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])  # outside the plate of pairs, with its dim


def undeclared_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0], dim=-1), pyro.plate("pairs", 2, dim=-2):
        pyro.sample("z", dist.Normal(x.T, 1.0))


@pytest.mark.parametrize(
    ("model", "guide", "match"),
    [
        (global_model, global_guide, "latent site 'shift' sits outside plate 'data'"),
        (discrete_model, discrete_guide, "guide site 'c' is not reparameterisable"),
        (local_model, empty_guide, "the model samples site 'z' but the guide does not"),
        (local_model, extra_guide, "the guide samples site 'extra' but the model does not"),
        (local_model, sampling_x_guide, "the model observes site 'x', which the guide samples"),
        (local_model, observing_guide, "the guide observes site 'y'"),
        (sequential_model, sequential_guide, "the data plate 'data' is sequential"),
        (scaled_model, local_guide, "sites have different scales"),
        (extra_dims_model, local_guide, "site 'x' has batch shape \\(5, 4, 3\\), more dims than its plates allow"),
        (undeclared_model, undeclared_guide, "site 'x' has a batch dim -2 of size 2 that no plate declares"),
    ],
)
def test_a_model_it_cannot_weight_per_data_point_is_one_line_error(model, guide, match: str) -> None:
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for call in (IWAE_ELBO(4).loss, IWAE_ELBO(4, estimator="dreg").loss_and_grads):
        with pytest.raises(ValueError, match=match) as error:
            call(model, guide, x)
        assert one_line(error)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_particles": 0}, "num_particles \\(k\\) must be a whole number >= 1"),
        ({"num_particles": 2.0}, "num_particles \\(k\\) must be a whole number >= 1"),
        ({"num_particles": 4, "estimator": "reinforce"}, "unknown estimator 'reinforce'"),
        ({"num_particles": 4, "objective": "elbo"}, "unknown objective 'elbo'"),
        ({"num_particles": 5, "objective": MIWAE(M=2)}, "make k a multiple of M"),
        ({"num_particles": 4, "max_plate_nesting": -1}, "max_plate_nesting must be None or a whole number"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        IWAE_ELBO(**kwargs)
    assert one_line(error)


def test_an_estimator_that_does_not_apply_to_the_objective_fails_at_construction() -> None:
    class Tempered(IWAE):  # a bound with no DReG coefficients (no power, no override)
        @property
        def power(self) -> None:
            return None

    with pytest.raises(ValueError, match="the dreg estimator does not apply to the iwae objective") as error:
        IWAE_ELBO(4, estimator="dreg", objective=Tempered())
    assert one_line(error)
    IWAE_ELBO(4, estimator="stl", objective=Tempered())  # STL needs no coefficients


def test_importing_iwae_and_its_core_does_not_import_pyro() -> None:
    """Pyro is optional and heavy: only iwae.pyro imports it."""
    code = (
        "import sys, iwae, iwae.bounds, iwae.objectives, iwae.estimators, iwae.models, iwae.train, iwae.evaluate\n"
        "sys.exit('pyro' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
