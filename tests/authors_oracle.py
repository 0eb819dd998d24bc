"""Burda et al.'s training step as an oracle: the authors' Theano code (github yburda/iwae) redone in NumPy float64,
written from their code alone, without torch and without this project's modules (used by
``tests/integration/test_authors_protocol.py``, which states what it redoes and how the two are compared).

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
"""

from __future__ import annotations

import numpy as np

LOG_2PI = np.log(2.0 * np.pi)


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
