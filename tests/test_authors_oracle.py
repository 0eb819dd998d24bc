"""The authors' training step as an oracle: Burda et al.'s Theano code (github yburda/iwae) redone in NumPy float64.

The oracle is written from the authors' code alone, without torch and without this project's modules:

- the model (``iwae.py``): each layer of q is two tanh layers, then mean = linear and sigma = exp(linear), and
  ``h_j = mean + sigma * eps``; p(h_j | h_{j+1}) likewise; p(x | h_1) Bernoulli with mean = sigmoid(linear), its
  log-likelihood ``sum x log(mean) + (1 - x) log(1 - mean)``; the prior N(0, I). Weights are ``[in, out]``
  (``x.dot(W) + b``), the mean and sigma heads separate layers, the p layers in the authors' order (top first,
  p(x | h_1) last), and the minibatch repeated k times along its rows (``t_repeat``: example b's samples are rows
  ``b * k .. b * k + k - 1``);
- the gradient (``gradIminibatch_srng``): VAE ``d sum(log_ws) / k``, IWAE ``sum_i w~_i d log w_i`` with the
  normalised weights as constants: sums over the minibatch of gradients of the bound, backpropagated by hand;
- Adam (``optimizers.py``): m = 0, v = 1, beta1 = 0.99, beta2 = 0.999, t from 1, ``alpha = lr sqrt(1 - beta2^t) /
  (1 - beta1^t)``, the move ``param + alpha m / (sqrt(v) + 1e-4)`` from the moments before this step's gradient.

Our side is ``protocol = "authors"`` (BurdaAdam, summed loss) through :func:`iwae.steps.training_step`, fed the
same initial parameters, the same binarised MNIST minibatches and the same noise. The trajectories must agree for
20 steps, on Burda's architectures (one layer 784-200-200-50, two layers 784-200-200-100-100-100-50).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iwae import steps, train
from iwae.config import build_train_config
from iwae.data import DataError, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, LR = 20, 20, 1e-3
LOG_2PI = np.log(2.0 * np.pi)
CASES = [(1, "iwae", 5), (1, "vae", 1), (1, "vae", 5), (2, "iwae", 5), (2, "vae", 1), (2, "vae", 5)]
# float64: both paths agree with the oracle to ~1e-15 after 20 steps (measured: 5.6e-17 .. 8.9e-16) while the
# parameters move by ~1.2e-2 .. 1.6e-2. 1e-9 leaves room for another BLAS's summation order, and still catches a
# change as small as Adam's epsilon (1e-4 against 1e-8 moves the trajectory by ~1e-6), which 1e-5 would not.
FLOAT64_TOLERANCE = 1e-9
# float32 (the C++ step) against the float64 oracle: the largest differences sit on the output biases (up to ~7 in
# size, where a float32 ulp is 4.8e-7), a few ulps after 20 steps: measured 1.7e-6 (one layer, IWAE k=5) and
# 2.2e-6 (two layers, VAE k=1). 2e-5 is ~10 times that and ~500 times below the parameters' movement.
FLOAT32_TOLERANCE = 2e-5


# -- the oracle: NumPy only -------------------------------------------------------------------------------------
def _hidden_count(params: dict[str, np.ndarray], prefix: str) -> int:
    return sum(1 for name in params if name.startswith(f"{prefix}.h") and name.endswith(".W"))


def _tanh_chain(params, prefix, inputs):
    """``nnet.random_linear_then_tanh_chain``: the activations ``[inputs, t_1, ..., t_n]``."""
    acts = [inputs]
    for i in range(_hidden_count(params, prefix)):
        acts.append(np.tanh(acts[-1] @ params[f"{prefix}.h{i}.W"] + params[f"{prefix}.h{i}.b"]))
    return acts


def _tanh_chain_backward(params, grads, prefix, acts, d_top, need_input=True):
    """Accumulate the chain's parameter gradients for ``d_top`` (the gradient of its last activation); returns the
    gradient of its input."""
    d = d_top
    for i in reversed(range(len(acts) - 1)):
        da = d * (1.0 - acts[i + 1] ** 2)
        grads[f"{prefix}.h{i}.W"] += acts[i].T @ da
        grads[f"{prefix}.h{i}.b"] += da.sum(axis=0)
        if i > 0 or need_input:
            d = da @ params[f"{prefix}.h{i}.W"].T
    return d if need_input else None


def _linear(params, name, inputs):
    return inputs @ params[f"{name}.W"] + params[f"{name}.b"]


def _linear_backward(params, grads, name, inputs, d_out):
    grads[f"{name}.W"] += inputs.T @ d_out
    grads[f"{name}.b"] += d_out.sum(axis=0)
    return d_out @ params[f"{name}.W"].T


def _gaussian(params, prefix, inputs):
    """``GaussianSampler.mean_sigmaIx``: (activations, mean, sigma)."""
    acts = _tanh_chain(params, prefix, inputs)
    return acts, _linear(params, f"{prefix}.mean", acts[-1]), np.exp(_linear(params, f"{prefix}.sigma", acts[-1]))


def _gaussian_log_likelihood(samples, mean, sigma):
    """``GaussianSampler.log_likelihood_samplesImean_sigma``."""
    d = samples.shape[1]
    return -LOG_2PI * d / 2 - np.sum(((samples - mean) / sigma) ** 2 + 2 * np.log(sigma), axis=1) / 2


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def authors_log_weights(params, x, eps, k):
    """``log_weightsIq_samples(q_samplesIx_srng(t_repeat(x, k)))``: ``log_ws`` ``[batch * k]`` and the forward
    pass's intermediate values. ``eps[j]`` is the unit noise of q layer j, ``[batch * k, d_j]`` in the rows of the
    repeated minibatch."""
    n_layers = len(eps)
    samples = [np.repeat(x, k, axis=0)]
    q_values = []
    for j in range(n_layers):
        acts, mean, sigma = _gaussian(params, f"q{j}", samples[-1])
        samples.append(sigma * eps[j] + mean)
        q_values.append((acts, mean, sigma))
    log_ws = np.zeros(samples[0].shape[0])
    p_values = []
    for j in range(n_layers):  # q{j} with its partner p{L-1-j} (zip(q_layers, reversed(p_layers)))
        prev, nxt = samples[j], samples[j + 1]
        prefix = f"p{n_layers - 1 - j}"
        if j == 0:  # BernoulliSampler: mean = sigmoid(linear(chain(h_1)))
            acts = _tanh_chain(params, prefix, nxt)
            mean = _sigmoid(_linear(params, f"{prefix}.mean", acts[-1]))
            log_p = np.sum(prev * np.log(mean) + (1 - prev) * np.log(1 - mean), axis=1)
            p_values.append((acts, mean, None))
        else:
            acts, mean, sigma = _gaussian(params, prefix, nxt)
            log_p = _gaussian_log_likelihood(prev, mean, sigma)
            p_values.append((acts, mean, sigma))
        _, q_mean, q_sigma = q_values[j]
        log_ws += log_p - _gaussian_log_likelihood(nxt, q_mean, q_sigma)
    top = samples[-1]
    log_ws += -LOG_2PI * top.shape[1] / 2 - np.sum(top**2, axis=1) / 2  # UnitGaussianSampler
    return log_ws, (samples, q_values, p_values)


def authors_gradient(params, x, eps, k, model_type):
    """``gradIminibatch_srng``: the gradient of the bound (to be maximised) summed over the minibatch, and the
    log-weights ``[batch, k]``. Backpropagation by hand through the densities, the reparameterised samples (h_j
    feeds the densities above it and q layer j+1) and the tanh networks."""
    n_layers = len(eps)
    log_ws, (samples, q_values, p_values) = authors_log_weights(params, x, eps, k)
    log_ws_matrix = log_ws.reshape(x.shape[0], k)
    if model_type == "vae":  # T.grad(T.sum(log_ws) / num_samples)
        upstream = np.full(log_ws.shape, 1.0 / k)
    else:  # T.grad(T.dot(log_ws, w~)) with w~ the per-example normalised weights, constants
        ws = np.exp(log_ws_matrix - log_ws_matrix.max(axis=1, keepdims=True))
        upstream = (ws / ws.sum(axis=1, keepdims=True)).reshape(log_ws.shape)
    g = upstream[:, None]
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    d_samples = [None] + [np.zeros_like(h) for h in samples[1:]]  # d bound / d h_j, j = 1..L
    d_samples[-1] += -samples[-1] * g  # the prior
    for j in range(n_layers):  # the p terms: log p(h_j | h_{j+1}), h_0 = x
        prefix = f"p{n_layers - 1 - j}"
        acts, mean, sigma = p_values[j]
        if sigma is None:  # Bernoulli: d/d(logit) of the log-likelihood is x - mean
            d_top = _linear_backward(params, grads, f"{prefix}.mean", acts[-1], (samples[0] - mean) * g)
        else:
            z = (samples[j] - mean) / sigma
            d_samples[j] += -z / sigma * g
            d_top = _linear_backward(params, grads, f"{prefix}.mean", acts[-1], z / sigma * g)
            d_top += _linear_backward(params, grads, f"{prefix}.sigma", acts[-1], (z**2 - 1) * g)
        d_samples[j + 1] += _tanh_chain_backward(params, grads, prefix, acts, d_top)
    for j in reversed(range(n_layers)):  # the -log q terms, and h_{j+1} = mean + sigma * eps, from the top down
        acts, mean, sigma = q_values[j]
        z = (samples[j + 1] - mean) / sigma
        d_samples[j + 1] += z / sigma * g  # -log q's explicit dependence on its sample
        d_mean = -z / sigma * g + d_samples[j + 1]
        d_log_sigma = (1 - z**2) * g + d_samples[j + 1] * sigma * eps[j]
        d_top = _linear_backward(params, grads, f"q{j}.mean", acts[-1], d_mean)
        d_top += _linear_backward(params, grads, f"q{j}.sigma", acts[-1], d_log_sigma)
        d_input = _tanh_chain_backward(params, grads, f"q{j}", acts, d_top, need_input=j > 0)
        if j > 0:
            d_samples[j] += d_input
    return grads, log_ws_matrix


class AuthorsAdam:
    """``optimizers.Adam``: every update computed from the old values, as Theano's updates are."""

    def __init__(self, params, lr, beta_1=0.99, beta_2=0.999):
        self.lr, self.beta_1, self.beta_2 = lr, beta_1, beta_2
        self.first_moments = {name: np.zeros_like(value) for name, value in params.items()}
        self.second_moments = {name: np.ones_like(value) for name, value in params.items()}
        self.timestep = 1.0

    def update(self, params, grad):
        t, b1, b2 = self.timestep, self.beta_1, self.beta_2
        alpha = self.lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        m, v = self.first_moments, self.second_moments
        new_params = {name: p + alpha * m[name] / (np.sqrt(v[name]) + 1e-4) for name, p in params.items()}
        self.first_moments = {name: b1 * m[name] + (1 - b1) * grad[name] for name in params}
        self.second_moments = {name: b2 * v[name] + (1 - b2) * grad[name] ** 2 for name in params}
        self.timestep = t + 1
        return new_params


# -- our model in the oracle's layout ---------------------------------------------------------------------------
def authors_parameters(model) -> dict[str, np.ndarray]:
    """Our model's parameters as the oracle's: ``[in, out]`` weights, the Gaussian heads split into mean and sigma
    layers, ``decoder[j]`` as the authors' ``p_layers[L - 1 - j]``."""

    def array(tensor):
        return tensor.detach().to(torch.float64).numpy().copy()

    params = {}

    def put(prefix, head, gaussian):
        for i, layer in enumerate(head.hidden):
            params[f"{prefix}.h{i}.W"], params[f"{prefix}.h{i}.b"] = array(layer.weight).T, array(layer.bias)
        weight, bias = array(head.head.weight), array(head.head.bias)
        if gaussian:  # our head's rows: [mean; log_std]
            d = head.out_dim
            params[f"{prefix}.mean.W"], params[f"{prefix}.mean.b"] = weight[:d].T, bias[:d]
            params[f"{prefix}.sigma.W"], params[f"{prefix}.sigma.b"] = weight[d:].T, bias[d:]
        else:
            params[f"{prefix}.mean.W"], params[f"{prefix}.mean.b"] = weight.T, bias

    n_layers = len(model.encoder)
    for j in range(n_layers):
        put(f"q{j}", model.encoder[j], True)
        put(f"p{n_layers - 1 - j}", model.decoder[j], j > 0)
    return {name: np.ascontiguousarray(value) for name, value in params.items()}


def authors_noise(noise: list[torch.Tensor]) -> list[np.ndarray]:
    """Our noise ``[k, batch, d]`` in the rows of the authors' repeated minibatch: row ``b * k + i`` is sample i of
    example b."""
    return [e.detach().to(torch.float64).numpy().transpose(1, 0, 2).reshape(-1, e.shape[-1]).copy() for e in noise]


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda name: np.abs(a[name] - b[name]).max())
    return float(np.abs(a[worst] - b[worst]).max()), worst


# -- the data ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minibatches():
    """The first 400 MNIST training images (grey levels, for the output bias) and 20 binarised minibatches of 20,
    in the data's order (the authors' fixed order)."""
    try:
        data = load_dataset("mnist", download=False, progress=False)
    except DataError as error:
        pytest.skip(f"MNIST is not here: {error}")
    images = data.train.images[: STEPS * BATCH].to(torch.float64)
    binary = torch.bernoulli(images, generator=torch.Generator().manual_seed(1))
    return images, [binary[i * BATCH : (i + 1) * BATCH] for i in range(STEPS)]


def run_both(layers, objective, k, dtype, minibatches, fast):
    """20 authors' steps on our side and in the oracle from the same start with the same data and noise.

    Returns (path description, our parameters after each step, the oracle's, our reported bounds, the oracle's
    log-weights), the parameters in the oracle's layout, index 0 the initial ones."""
    images, batches = minibatches
    config = build_train_config(
        {"protocol": "authors", "layers": layers, "objective": objective, "k": k, "epochs": 1, "lr": LR}
    )
    assert (config.optimizer, config.beta1, config.beta2, config.adam_eps) == ("burda-adam", 0.99, 0.999, 1e-4)
    assert (config.loss_reduction, config.data_order, config.batch_size) == ("sum", "fixed", BATCH)
    model = train.build_model(config, images.float(), torch.device("cpu")).to(dtype)
    optimizer = steps.build_optimizer(model, config)
    path = steps.choose_step_path(model, config, fast=fast)
    generator = torch.Generator().manual_seed(7)

    ours = [authors_parameters(model)]
    oracle = [ours[0]]
    adam = AuthorsAdam(oracle[0], LR)
    bounds, oracle_log_ws = [], []
    for x in batches:
        x = x.to(dtype)
        twin = torch.Generator().set_state(generator.get_state())
        eps = authors_noise(model.draw_noise(x, k, twin))
        steps.clear_gradients(optimizer)
        bounds.append(steps.training_step(model, x, config, generator, path).detach().double().numpy())
        steps.optimizer_step(optimizer, path)
        assert torch.equal(generator.get_state(), twin.get_state())  # the step drew exactly the noise we fed
        ours.append(authors_parameters(model))
        grad, log_ws = authors_gradient(oracle[-1], x.double().numpy(), eps, k, objective)
        oracle.append(adam.update(oracle[-1], grad))
        oracle_log_ws.append(log_ws)
    return path.description, ours, oracle, bounds, oracle_log_ws


def check_trajectories(ours, oracle, bounds, oracle_log_ws, objective, tolerance, label):
    # The authors' one-step lag: the first update moves by the first moments, still 0.
    for name, value in ours[0].items():
        assert np.array_equal(ours[1][name], value), f"{label}: our first step moved {name}"
        assert np.array_equal(oracle[1][name], value), f"the oracle's first step moved {name}"
    moved, _ = max_difference(ours[-1], ours[0])  # not a trivial pass: 20 steps move the parameters by ~1e-2
    assert moved > max(1e-3, 100 * tolerance), f"{label}: the parameters hardly moved ({moved:.3g})"
    for step, (bound, log_ws) in enumerate(zip(bounds, oracle_log_ws, strict=True)):
        if objective == "vae":
            expected = log_ws.mean(axis=1)
        else:
            top = log_ws.max(axis=1)
            expected = top + np.log(np.exp(log_ws - top[:, None]).mean(axis=1))
        np.testing.assert_allclose(bound, expected, rtol=tolerance, err_msg=f"{label}: the bound of step {step + 1}")
    difference, where = max_difference(ours[-1], oracle[-1])
    message = f"{label}: max |ours - oracle| after {STEPS} steps = {difference:.3g} at {where} (moved {moved:.3g})"
    print(message)
    assert difference < tolerance, message


# -- the tests --------------------------------------------------------------------------------------------------
def test_oracle_gradient_matches_finite_differences() -> None:
    """The hand-written backward pass against central differences of the bound it differentiates, on a tiny
    two-layer model: sum over examples of log mean_i w_i (IWAE) and of mean_i log w_i (VAE)."""
    rng = np.random.default_rng(0)
    shapes = {"q0": (5, 4, 3), "q1": (3, 3, 2), "p0": (2, 3, 3), "p1": (3, 4, 5)}  # in, hidden, out
    params = {}
    for prefix, (n_in, n_hidden, n_out) in shapes.items():
        heads = ("mean",) if prefix == "p1" else ("mean", "sigma")  # p1 is p(x | h_1), Bernoulli
        layers = [("h0", n_in, n_hidden), ("h1", n_hidden, n_hidden), *((head, n_hidden, n_out) for head in heads)]
        for name, fan_in, fan_out in layers:
            params[f"{prefix}.{name}.W"] = rng.normal(0.0, 0.6, (fan_in, fan_out))
            params[f"{prefix}.{name}.b"] = rng.normal(0.0, 0.3, fan_out)
    batch, k = 3, 4
    x = (rng.random((batch, 5)) < 0.5).astype(np.float64)
    eps = [rng.standard_normal((batch * k, 3)), rng.standard_normal((batch * k, 2))]

    def bound(values, model_type):
        log_ws = authors_log_weights(values, x, eps, k)[0].reshape(batch, k)
        if model_type == "vae":
            return log_ws.mean(axis=1).sum()
        top = log_ws.max(axis=1, keepdims=True)
        return (top[:, 0] + np.log(np.exp(log_ws - top).mean(axis=1))).sum()

    errors = []
    for model_type in ("iwae", "vae"):
        grads, _ = authors_gradient(params, x, eps, k, model_type)
        for name, value in params.items():
            for index in np.ndindex(value.shape):
                shifted = {n: v.copy() for n, v in params.items()}
                shifted[name][index] = value[index] + 1e-6
                up = bound(shifted, model_type)
                shifted[name][index] = value[index] - 1e-6
                numeric = (up - bound(shifted, model_type)) / 2e-6
                errors.append(abs(numeric - grads[name][index]) / max(1.0, abs(numeric)))
    assert max(errors) < 1e-7, f"the oracle's gradient differs from central differences by up to {max(errors):.3g}"


@pytest.mark.parametrize("layers, objective, k", CASES)
def test_float64_chosen_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """The path fit chooses for a float64 model: iwae.fast's explicit backpropagation in Python (not autograd:
    the C++ step serves float32 only)."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float64, minibatches, fast=True)
    assert description.startswith("fast: explicit backpropagation in Python"), description
    label = f"float64 {description.split(' (')[0]}, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT64_TOLERANCE, label)


@pytest.mark.parametrize("layers, objective, k", CASES)
def test_float64_reference_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """The reference path (iwae.estimators and autograd), which ``fast = False`` runs."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float64, minibatches, fast=False)
    assert description == "autograd"
    label = f"float64 autograd, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT64_TOLERANCE, label)


@pytest.mark.parametrize("layers, objective, k", [(1, "iwae", 5), (2, "vae", 1)])
def test_float32_fast_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """What a run on the CPU trains with: float32, the fast path (the C++ step where it builds), against the
    float64 oracle fed the same float32 start and noise."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float32, minibatches, fast=True)
    assert description.startswith("fast: explicit backpropagation"), description
    label = f"float32 {description.split(' (')[0]}, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT32_TOLERANCE, label)
