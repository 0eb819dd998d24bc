"""Explicit backpropagation: the estimators' gradients written out layer by layer, without autograd's graph.

Shape convention: samples first. ``x`` is ``[batch, x_dim]``; the noise and latents of stochastic layer j are
``[k, batch, d_j]``; log-weights and their gradient are ``[k, batch]``.

:func:`accumulate_gradients` computes what :func:`iwae.estimators.estimate` followed by
:func:`iwae.estimators.backward` computes, for every objective and estimator, on a
:class:`~iwae.models.LatentVariableModel` (Bernoulli or Gaussian observations; tanh, relu or softplus layers):

1. the forward pass of :meth:`~iwae.models.LatentVariableModel.sample_with_noise`, keeping each layer's output;
2. the loss's gradients in the log-weights ``[k, batch]`` (:func:`iwae.estimators.log_weight_gradients`): the
   decoder's, and the encoder's where it differs;
3. the chain rule by hand: a matmul per weight and input gradient, a row sum per bias, the activation's derivative
   from its saved outputs, and closed forms for the Gaussian densities (``h = mean + exp(log_std) * eps``; ``log q``
   written with ``eps``, or with q's parameters stopped for STL and DReG). The decoder's parameters take the
   decoder's gradient; the latents, and through them the encoder, take the encoder's.

The arithmetic is autograd's (the tests compare them in float64 and float32); what goes is autograd's bookkeeping,
which matters at Burda's minibatch 20 (docs/performance.md#what-makes-the-difference). Elsewhere training goes
through autograd; ``IWAE_FAST=-backprop`` turns this path off (:mod:`iwae.fast.switches`). On Burda's models
(Bernoulli observations, tanh layers) in float32 on the CPU the passes run in C++ (:mod:`iwae.fast.step`), for which
this module is the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from iwae import estimators
from iwae.fast import native
from iwae.fast import step as native_step
from iwae.models import (
    LatentVariableModel,
    MLPHead,
    gaussian_log_prob,
    gaussian_log_prob_of_noise,
    standard_normal_log_prob,
)
from iwae.objectives import Objective, as_objective

ACTIVATIONS = ("tanh", "relu", "softplus")  # hidden activations whose derivative native.activation_backward has
LIKELIHOODS = ("bernoulli", "gaussian")


def applies(model: torch.nn.Module, objective: Objective | str, estimator: str) -> bool:
    """Whether :func:`accumulate_gradients` serves this model with this estimator (any registered objective)."""
    return (
        estimators.is_registered(estimator)
        and isinstance(model, LatentVariableModel)
        and model.config.likelihood in LIKELIHOODS
        and model.config.activation in ACTIVATIONS
    )


def _accumulate(param: torch.nn.Parameter, grad: Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad.add_(grad)


def hidden_outputs(head: MLPHead, inputs: Tensor) -> list[Tensor]:
    """:meth:`iwae.models.MLPHead.hidden_outputs` with each layer as one oneDNN primitive, the activation fused in,
    where :func:`iwae.fast.native.fused_linear` applies (CPU float32); the same values up to float32 rounding."""
    outputs = [inputs]
    fused = head.activation_name in native.FUSED_ACTIVATIONS and native.fused_linear_applies(inputs)
    for layer in head.hidden:
        if fused:
            outputs.append(native.fused_linear(outputs[-1], layer.weight, layer.bias, head.activation_name))
        else:
            outputs.append(head.activation(native.fused_linear(outputs[-1], layer.weight, layer.bias)))
    return outputs


def _head_outputs(head: MLPHead, outputs: list[Tensor]) -> tuple[Tensor, ...]:
    return head.split_head(native.fused_linear(outputs[-1], head.head.weight, head.head.bias))


def _mlp_backward(
    head: MLPHead, outputs: list[Tensor], grad_head: Tensor, *, params: bool, input_grad: bool
) -> Tensor | None:
    """Backpropagate ``grad_head``, the loss's gradient with respect to the linear head's outputs, through ``head``:
    accumulate its weights' and biases' gradients (if ``params``) and return the gradient with respect to its
    inputs (if ``input_grad``)."""
    layers = [*head.hidden, head.head]
    grad = grad_head
    for index in reversed(range(len(layers))):
        layer = layers[index]
        if index < len(layers) - 1:
            grad = native.activation_backward(head.activation_name, grad, outputs[index + 1])
        if params:
            _accumulate(layer.weight, native.linear_weight_grad(grad, outputs[index]))
            _accumulate(layer.bias, grad.reshape(-1, grad.shape[-1]).sum(dim=0))
        if index > 0 or input_grad:
            grad = native.linear_input_grad(grad, layer.weight)
    return grad if input_grad else None


def _decoder_backward(
    head: MLPHead,
    outputs: list[Tensor],
    head_grad_of: Callable[[Tensor], Tensor],
    decoder_grad: Tensor,
    encoder_grad: Tensor,
) -> Tensor:
    """Backpropagate a term of log w through one of the decoder's networks: its parameters take the gradient that
    ``decoder_grad`` ``[k, batch]`` (the log-weights' gradient) gives, its input the one that ``encoder_grad`` gives
    (one pass when they are the same tensor). ``head_grad_of`` maps the log-weights' gradient to the head's."""
    if encoder_grad is decoder_grad:
        return _mlp_backward(head, outputs, head_grad_of(decoder_grad), params=True, input_grad=True)
    _mlp_backward(head, outputs, head_grad_of(decoder_grad), params=True, input_grad=False)
    return _mlp_backward(head, outputs, head_grad_of(encoder_grad), params=False, input_grad=True)


class _Tape:
    """What the forward pass keeps for the backward pass (for the model's L stochastic layers)."""

    def __init__(self) -> None:
        self.encoder_outputs: list[list[Tensor]] = []  # per layer j: hidden_outputs of q(h_j | h_{j-1})
        self.stds: list[Tensor] = []  # q's exp(log_std): [batch, d] for the first layer, [k, batch, d] above
        self.latents: list[Tensor] = []  # h_j, [k, batch, d_j]
        self.prior_outputs: list[list[Tensor]] = []  # per j < L-1: hidden_outputs of p(h_j | h_{j+1})
        self.prior_params: list[tuple[Tensor, Tensor]] = []  # per j < L-1: (mean, log_std) of p(h_j | h_{j+1})
        self.observation_outputs: list[Tensor] = []  # hidden_outputs of p(x | h_1)
        self.observation_pre: Tensor | None = None  # Bernoulli: W f of the output layer, before its bias
        self.observation_params: tuple[Tensor, Tensor] | None = None  # Gaussian: (mean, log_std), [k, batch, x_dim]


@torch.no_grad()
def _forward(model: LatentVariableModel, x: Tensor, noise: list[Tensor], tape: _Tape) -> Tensor:
    """The log-weights ``[k, batch]`` that :meth:`~iwae.models.LatentVariableModel.sample_with_noise` gives;
    fills ``tape``."""
    inputs, log_q = x, x.new_zeros(())
    for head, eps in zip(model.encoder, noise, strict=True):
        outputs = hidden_outputs(head, inputs)
        mean, log_std = _head_outputs(head, outputs)
        std = torch.exp(log_std)
        inputs = mean + std * eps
        log_q = log_q + gaussian_log_prob_of_noise(eps, log_std)
        tape.encoder_outputs.append(outputs)
        tape.stds.append(std)
        tape.latents.append(inputs)
    latents = tape.latents
    log_prior = standard_normal_log_prob(latents[-1])
    for j in range(len(latents) - 1):
        outputs = hidden_outputs(model.decoder[j + 1], latents[j + 1])
        mean, log_std = _head_outputs(model.decoder[j + 1], outputs)
        log_prior = log_prior + gaussian_log_prob(latents[j], mean, log_std)
        tape.prior_outputs.append(outputs)
        tape.prior_params.append((mean, log_std))
    observation = model.decoder[0]
    tape.observation_outputs = hidden_outputs(observation, latents[0])
    if model.config.likelihood == "bernoulli":
        tape.observation_pre = native.fused_linear(tape.observation_outputs[-1], observation.head.weight)
        log_px = native.bernoulli_log_prob_rows(tape.observation_pre, observation.head.bias, x)
    else:
        tape.observation_params = _head_outputs(observation, tape.observation_outputs)
        log_px = gaussian_log_prob(x, *tape.observation_params)
    return log_px + log_prior - log_q


def _gaussian_head_grad(log_w_grad: Tensor, standardised: Tensor, inv_std: Tensor) -> Tensor:
    """The gradient of a term ``log N(value; mean, exp(log_std))`` of log w with respect to ``(mean, log_std)``,
    concatenated as the head outputs them, given the log-weights' gradient ``[k, batch]``;
    ``standardised = (value - mean) * inv_std``."""
    unit_grad = log_w_grad.unsqueeze(-1)
    scaled = unit_grad * standardised  # first: a sample of weight 0 gives 0, even where standardised^2 overflows
    return torch.cat([scaled * inv_std, scaled * standardised - unit_grad], dim=-1)


def _standardise(value: Tensor, mean: Tensor, log_std: Tensor) -> tuple[Tensor, Tensor]:
    inv_std = torch.exp(-log_std)
    return (value - mean) * inv_std, inv_std


@torch.no_grad()
def _backward(
    model: LatentVariableModel,
    x: Tensor,
    noise: list[Tensor],
    tape: _Tape,
    gradients: tuple[Tensor, Tensor],
    stop_q_params: bool,
) -> None:
    """Accumulate every parameter's gradient of the loss, given the decoder's and the encoder's gradients in the
    log-weights; ``stop_q_params``: log q with q's parameters stopped (STL, DReG)."""
    decoder_grad, encoder_grad = gradients
    grad = encoder_grad.unsqueeze(-1)  # [k, batch, 1], broadcast over each layer's units
    latents = tape.latents
    observation = model.decoder[0]

    def observation_head_grad(log_w_grad: Tensor) -> Tensor:
        if tape.observation_params is not None:  # Gaussian observations
            return _gaussian_head_grad(log_w_grad, *_standardise(x, *tape.observation_params))
        return native.bernoulli_log_prob_rows_grad(tape.observation_pre, observation.head.bias, x, log_w_grad)

    latent_grads = [
        _decoder_backward(observation, tape.observation_outputs, observation_head_grad, decoder_grad, encoder_grad)
    ]
    latent_grads.extend(torch.zeros_like(h) for h in latents[1:])
    for j, (mean, log_std) in enumerate(tape.prior_params):  # log N(h_j; mean, exp(log_std)), (mean, log_std) of h_j+1
        standardised, inv_std = _standardise(latents[j], mean, log_std)

        def prior_head_grad(log_w_grad: Tensor, standardised=standardised, inv_std=inv_std) -> Tensor:
            return _gaussian_head_grad(log_w_grad, standardised, inv_std)

        latent_grads[j] -= grad * standardised * inv_std
        latent_grads[j + 1] += _decoder_backward(
            model.decoder[j + 1], tape.prior_outputs[j], prior_head_grad, decoder_grad, encoder_grad
        )
    latent_grads[-1] -= grad * latents[-1]  # log N(h_L; 0, I)
    for j in reversed(range(len(latents))):  # h_j = mean + std * eps
        eps, std, head, outputs = noise[j], tape.stds[j], model.encoder[j], tape.encoder_outputs[j]
        if stop_q_params:  # -log q(h_j) with q's parameters stopped, through h_j: (h_j - mean) / std^2 = eps / std
            stopped_score = grad * eps / std
            latent_grads[j] += stopped_score
            grad_log_std = latent_grads[j] * eps * std
        else:  # -log q = sum(log_std) + a function of eps
            grad_log_std = latent_grads[j] * eps * std + grad
        if j == 0:  # the first layer's q (of x alone) is shared by the k samples, and x is data
            head_grad = torch.cat([latent_grads[0].sum(dim=0), grad_log_std.sum(dim=0)], dim=-1)
            _mlp_backward(head, outputs, head_grad, params=True, input_grad=False)
            continue
        head_grad = torch.cat([latent_grads[j], grad_log_std], dim=-1)
        if stop_q_params:  # the stopped parameters of q(h_j | h_j-1) still depend on h_j-1, through q's network
            _mlp_backward(head, outputs, head_grad, params=True, input_grad=False)
            head_grad = head_grad + torch.cat([-stopped_score, grad * (1.0 - eps * eps)], dim=-1)
            latent_grads[j - 1] += _mlp_backward(head, outputs, head_grad, params=False, input_grad=True)
        else:
            latent_grads[j - 1] += _mlp_backward(head, outputs, head_grad, params=True, input_grad=True)


def accumulate_gradients(
    model: LatentVariableModel, x: Tensor, noise: list[Tensor], objective: Objective | str, estimator: str = "standard"
) -> Tensor:
    """Add the estimator's loss gradients (``-mean`` of each surrogate) to every parameter's ``.grad``.

    Where :func:`iwae.fast.step.applies` (Burda's models in float32 on the CPU) the forward and backward passes run
    in C++, and only the log-weights' gradients here.

    Args:
        model: a model that :func:`applies` to.
        x: the minibatch, ``[batch, x_dim]``.
        noise: :meth:`~iwae.models.LatentVariableModel.draw_noise`'s noise, one ``[k, batch, d_j]`` per layer.
        objective: a registered objective or its name.
        estimator: a registered estimator's name.

    Returns:
        The bound to report, ``[batch]``, as :func:`iwae.estimators.estimate` gives it.
    """
    method = estimators.get_estimator(estimator)
    objective = as_objective(objective)
    if native_step.applies(model, x):
        log_w, native_tape = native_step.forward(model, x, noise)
        grads = method.log_weight_gradients(objective, log_w)
        native_step.backward(x, noise, native_tape, (grads.decoder, grads.encoder), method.stop_q_params)
        return grads.bound
    tape = _Tape()
    log_w = _forward(model, x, noise, tape)
    grads = method.log_weight_gradients(objective, log_w)
    _backward(model, x, noise, tape, (grads.decoder, grads.encoder), method.stop_q_params)
    return grads.bound
