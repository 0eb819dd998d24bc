"""Latent-variable models with one or more stochastic layers (Burda et al. 2016, section 5).

Shape convention: samples first. An input batch ``x`` is ``[batch, x_dim]``; latents drawn
from q are ``[k, batch, d]``; every per-sample log-density is ``[k, batch]``.

The generative model is ``p(x, h_1..h_L) = p(h_L) prod_j p(h_j | h_{j+1}) p(x | h_1)`` with
``p(h_L) = N(0, I)``; the recognition model is ``q(h_1 | x) prod_j q(h_{j+1} | h_j)``. Every
conditional is an MLP (tanh by default) followed by a Gaussian head (mean = linear,
std = exp(linear)) or, for the observation, a Bernoulli head on logits (or a Gaussian head).
Everything here is plain PyTorch, differentiable by autograd and ``torch.func``-friendly: this is the reference
path. :mod:`iwae.fast` holds the CPU fast paths, which read these modules' parameters and are tested against them.
The models follow :class:`iwae.protocol.NoiseModel`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwae.protocol import ImportanceSample

LOG_2PI = math.log(2.0 * math.pi)


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "softplus": F.softplus}
LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model; ``hidden_dims[j]`` are the hidden sizes of q(h_{j+1} | h_j).

    The generative network for p(h_j | h_{j+1}) mirrors q's hidden sizes in reverse order.
    """

    x_dim: int = 784
    latent_dims: tuple[int, ...] = (50,)
    hidden_dims: tuple[tuple[int, ...], ...] = ((200, 200),)
    activation: str = "tanh"
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        def sizes(value: object) -> bool:  # a tuple of whole numbers >= 1
            if not isinstance(value, tuple):
                return False
            return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)

        if not sizes((self.x_dim,)):
            raise ValueError(f"x_dim must be a whole number >= 1, got {self.x_dim!r}")
        if not sizes(self.latent_dims):
            raise ValueError(f"latent_dims must be whole numbers >= 1, got {self.latent_dims!r}")
        if not isinstance(self.hidden_dims, tuple) or not all(sizes(h) for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be tuples of whole numbers >= 1, got {self.hidden_dims!r}")
        if len(self.latent_dims) != len(self.hidden_dims) or not self.latent_dims:
            raise ValueError("latent_dims and hidden_dims need one entry per stochastic layer")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")

    @property
    def n_stochastic(self) -> int:
        return len(self.latent_dims)

    @classmethod
    def burda(cls, layers: int, x_dim: int = 784) -> ModelConfig:
        """Burda et al.'s architectures with one or two stochastic layers (ICLR 2016, section 5)."""
        if layers == 1:
            return cls(x_dim=x_dim, latent_dims=(50,), hidden_dims=((200, 200),))
        if layers == 2:
            return cls(x_dim=x_dim, latent_dims=(100, 50), hidden_dims=((200, 200), (100, 100)))
        raise ValueError(f"Burda's architectures have 1 or 2 stochastic layers, got {layers}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a model configuration is an object, got {data!r}")
        data = dict(data)
        try:
            data["latent_dims"] = tuple(data["latent_dims"])
            data["hidden_dims"] = tuple(tuple(h) for h in data["hidden_dims"])
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed model configuration {data!r} ({error})") from None


def glorot_uniform_(weight: Tensor) -> None:
    """Glorot-uniform initialisation, +-sqrt(6 / (n_in + n_out)), in place."""
    n_out, n_in = weight.shape
    limit = math.sqrt(6.0 / (n_in + n_out))
    with torch.no_grad():
        weight.uniform_(-limit, limit)


def _linear(layer: nn.Linear, inputs: Tensor, detach_params: bool) -> Tensor:
    if detach_params:
        return F.linear(inputs, layer.weight.detach(), layer.bias.detach())
    return layer(inputs)


def gaussian_log_prob(value: Tensor, mean: Tensor, log_std: Tensor, mask: Tensor | None = None) -> Tensor:
    """Diagonal Gaussian log-density summed over the last dimension (only over ``mask`` if given)."""
    z = (value - mean) * torch.exp(-log_std)
    per_dim = -0.5 * z * z - log_std - 0.5 * LOG_2PI
    if mask is not None:
        per_dim = per_dim * mask
    return per_dim.sum(dim=-1)


def gaussian_log_prob_of_noise(eps: Tensor, log_std: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`gaussian_log_prob` of ``mean + exp(log_std) * eps``, written with the standardised noise ``eps``."""
    per_dim = -0.5 * eps * eps - log_std - 0.5 * LOG_2PI
    if mask is not None:
        per_dim = per_dim * mask
    return per_dim.sum(dim=-1)


def standard_normal_log_prob(value: Tensor, mask: Tensor | None = None) -> Tensor:
    per_dim = -0.5 * value * value - 0.5 * LOG_2PI
    if mask is not None:
        per_dim = per_dim * mask
    return per_dim.sum(dim=-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_d x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)``; ``x`` broadcasts against ``logits``."""
    per_dim = x * logits - F.softplus(logits)
    if mask is not None:
        per_dim = per_dim * mask
    return per_dim.sum(dim=-1)


class MLPHead(nn.Module):
    """An MLP (hidden layers with an activation) followed by a linear head of ``n_params * out_dim``.

    The head's outputs are split into ``n_params`` tensors of size ``out_dim`` (mean and log-std
    for a Gaussian, logits for a Bernoulli). All weights start Glorot-uniform, biases at zero.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, n_params: int, activation: str):
        super().__init__()
        sizes = (in_dim, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(sizes[-1], n_params * out_dim)
        self.out_dim = out_dim
        self.n_params = n_params
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        for layer in self.hidden:
            glorot_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for part in self.head.weight.split(out_dim, dim=0):  # each head initialised as its own layer
            glorot_uniform_(part)
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: Tensor, detach_params: bool = False) -> tuple[Tensor, ...]:
        return self.split_head(_linear(self.head, self.features(inputs, detach_params), detach_params))

    def features(self, inputs: Tensor, detach_params: bool = False) -> Tensor:
        """The last hidden layer's activations, the input of the linear head."""
        return self.hidden_outputs(inputs, detach_params)[-1]

    def hidden_outputs(self, inputs: Tensor, detach_params: bool = False) -> list[Tensor]:
        """``[inputs, hidden_1, ..., hidden_n]``: each hidden layer's activations (the head's input is the last)."""
        outputs = [inputs]
        for layer in self.hidden:
            outputs.append(self.activation(_linear(layer, outputs[-1], detach_params)))
        return outputs

    def split_head(self, outputs: Tensor) -> tuple[Tensor, ...]:
        # A one-parameter head is returned whole: split() would cost a copy in the backward pass.
        return (outputs,) if self.n_params == 1 else outputs.split(self.out_dim, dim=-1)


class LatentVariableModel(nn.Module):
    """Burda-style VAE/IWAE model: the same network serves every objective in :mod:`iwae.objectives`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        act = config.activation
        in_dims = (config.x_dim, *config.latent_dims[:-1])
        self.encoder = nn.ModuleList(
            MLPHead(in_dim, hidden, latent, 2, act)
            for in_dim, hidden, latent in zip(in_dims, config.hidden_dims, config.latent_dims, strict=True)
        )
        # decoder[j] models p(h_j | h_{j+1}) for j >= 1 and decoder[0] models p(x | h_1).
        obs_params = 1 if config.likelihood == "bernoulli" else 2
        self.decoder = nn.ModuleList(
            MLPHead(
                config.latent_dims[j],
                tuple(reversed(config.hidden_dims[j])),
                in_dims[j],
                obs_params if j == 0 else 2,
                act,
            )
            for j in range(config.n_stochastic)
        )

    # -- parameters -------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def set_output_bias(self, mean_x: Tensor) -> None:
        """Burda's initialisation: output bias = logit(mean training pixel clipped to [0.001, 0.999])."""
        if self.config.likelihood != "bernoulli":
            return
        p = mean_x.detach().to(torch.float64).clamp(0.001, 0.999)
        with torch.no_grad():
            self.decoder[0].head.bias.copy_(torch.log(p) - torch.log1p(-p))

    # -- densities --------------------------------------------------------------------------
    def observation_log_prob(self, x: Tensor, h1: Tensor, observed_mask: Tensor | None = None) -> Tensor:
        """``log p(x | h_1)`` over observed entries: x ``[batch, x_dim]``, h1 ``[k, batch, d]`` -> ``[k, batch]``."""
        if self.config.likelihood == "bernoulli":
            return self._bernoulli_log_prob(x, h1, observed_mask)
        params = self.decoder[0](h1)
        return gaussian_log_prob(x, params[0], params[1], observed_mask)

    def _bernoulli_log_prob(self, x: Tensor, h1: Tensor, observed_mask: Tensor | None) -> Tensor:
        """:func:`bernoulli_log_prob` on the decoder's logits ``l = W f + b``, in one pass over them.

        The data term goes by matmul, ``sum_d x_d l_d = f . (W^T x) + b . x``: one
        ``[batch, x_dim] x [x_dim, hidden]`` product per example replaces a pass over the
        ``[k, batch, x_dim]`` logits (and its backward), leaving ``sum_d softplus(l_d)`` as the only
        element-wise work on them. Same value up to rounding.
        """
        decoder = self.decoder[0]
        weight, bias = decoder.head.weight, decoder.head.bias
        features = decoder.features(h1)  # [k, batch, hidden]
        observed_x = x if observed_mask is None else x * observed_mask
        data_term = (features * (observed_x @ weight)).sum(dim=-1) + observed_x @ bias
        normaliser = F.softplus(F.linear(features, weight, bias))
        if observed_mask is not None:
            normaliser = normaliser * observed_mask
        return data_term - normaliser.sum(dim=-1)

    def forward(
        self,
        x: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        *,
        stop_q_params: bool = False,
        unit_masks: list[Tensor] | None = None,
        observed_mask: Tensor | None = None,
        first_q: tuple[Tensor, Tensor] | None = None,
    ) -> ImportanceSample:
        """Draw k reparameterised samples h ~ q(h | x) and evaluate their log-densities: the noise of
        :meth:`draw_noise` through :meth:`sample_with_noise`.

        Args:
            x: ``[batch, x_dim]``.
            k: number of samples per example.
            generator: the random source for the Gaussian noise (seeded runs pass one).
            stop_q_params: evaluate ``log q(h | x)`` with the encoder's parameters stopped while the
                samples keep their path derivative (used by the STL and DReG estimators).
            unit_masks: per stochastic layer, a ``[d_j]`` 0/1 mask; masked-out units are clamped to 0
                (the prior mean) and left out of every density, i.e. the model with those units removed.
            observed_mask: ``[batch, x_dim]`` 0/1; only observed entries enter ``log p(x | h)``.
            first_q: ``self.encoder[0](x)``, q(h_1 | x)'s (mean, log_std) ``[batch, d_1]`` each, where the caller
                has them already: evaluation draws many chunks of samples for the same x.
        """
        noise = self.draw_noise(x, k, generator)
        return self.sample_with_noise(
            x, noise, stop_q_params=stop_q_params, unit_masks=unit_masks, observed_mask=observed_mask, first_q=first_q
        )

    def draw_noise(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """The standard-normal noise of :meth:`forward` for the batch ``x``: ``[k, batch, d_j]`` per stochastic
        layer, in layer order."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        dtype = self.encoder[0].head.weight.dtype
        batch = x.shape[0]
        return [
            torch.randn((k, batch, d), generator=generator, device=x.device, dtype=dtype)
            for d in self.config.latent_dims
        ]

    def sample_with_noise(
        self,
        x: Tensor,
        noise: list[Tensor],
        *,
        stop_q_params: bool = False,
        unit_masks: list[Tensor] | None = None,
        observed_mask: Tensor | None = None,
        first_q: tuple[Tensor, Tensor] | None = None,
    ) -> ImportanceSample:
        """:meth:`forward` for given noise (``h_j = mean_j + std_j * noise[j]``): deterministic, so it can be
        compiled as one graph (``iwae train --compile``)."""
        inputs = x
        latents: list[Tensor] = []
        q_params: list[tuple[Tensor, Tensor]] = []
        log_q = x.new_zeros(())
        for j, (layer, eps) in enumerate(zip(self.encoder, noise, strict=True)):
            mean, log_std = first_q if j == 0 and first_q is not None else layer(inputs)
            h = mean + torch.exp(log_std) * eps
            mask = None if unit_masks is None else unit_masks[j].to(h.dtype)
            if mask is not None:
                h = h * mask
            if stop_q_params:
                if j == 0:
                    q_mean, q_log_std = mean.detach(), log_std.detach()
                else:
                    q_mean, q_log_std = layer(inputs, detach_params=True)
                log_q = log_q + gaussian_log_prob(h, q_mean, q_log_std, mask)
            else:  # (h - mean) / std is eps itself: the same density with fewer passes over [k, batch, d]
                log_q = log_q + gaussian_log_prob_of_noise(eps, log_std, mask)
            latents.append(h)
            q_params.append((mean, log_std))
            inputs = h
        log_prior = self._log_prior(latents, unit_masks)
        log_px = self.observation_log_prob(x, latents[0], observed_mask)
        return ImportanceSample(latents, log_px, log_prior, log_q, q_params)

    def _log_prior(self, latents: list[Tensor], unit_masks: list[Tensor] | None) -> Tensor:
        def mask_of(j: int) -> Tensor | None:
            return None if unit_masks is None else unit_masks[j].to(latents[j].dtype)

        top = len(latents) - 1
        log_prior = standard_normal_log_prob(latents[top], mask_of(top))
        for j in range(top):
            mean, log_std = self.decoder[j + 1](latents[j + 1])
            log_prior = log_prior + gaussian_log_prob(latents[j], mean, log_std, mask_of(j))
        return log_prior

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``log p(x, h_i) - log q(h_i | x)`` for k samples: ``[batch, x_dim] -> [k, batch]``."""
        return self(x, k, generator).log_w

    # -- pruning ------------------------------------------------------------------------------
    def without_units(self, keep: list[Tensor]) -> LatentVariableModel:
        """A smaller copy of this model with the units that ``keep`` marks False cut out of the weight matrices.

        As the authors' ``chop_units_with_variance_under_threshold`` (github yburda/iwae, iwae.py): for each layer j,
        the rows of cut units go from q(h_j | h_{j-1})'s mean and log-std and, where p(h_{j-1} | h_j) outputs a latent
        layer, from its mean and log-std; the columns of cut units go from the first layer of every network that
        takes them as input. The result is the model of ``forward(..., unit_masks=keep)``, where a cut unit is
        clamped to 0 and left out of every density.

        Args:
            keep: per stochastic layer, a ``[d_j]`` boolean (or 0/1) mask of the units to keep; at least one per
                layer (a :class:`ModelConfig` has no empty layer).

        Returns:
            A new model with the smaller ``latent_dims``, its parameters new tensors on this model's device and dtype.
        """
        dims = self.config.latent_dims
        if len(keep) != len(dims):
            raise ValueError(f"keep needs one mask per stochastic layer ({len(dims)}), got {len(keep)}")
        masks = []
        for j, (mask, d) in enumerate(zip(keep, dims, strict=True)):
            if tuple(mask.shape) != (d,):
                raise ValueError(f"keep[{j}] must have shape ({d},), got {tuple(mask.shape)}")
            masks.append(mask.detach().to(torch.bool).cpu())
        empty = [j for j, mask in enumerate(masks) if not bool(mask.any())]
        if empty:
            raise ValueError(f"every stochastic layer needs a unit kept; layers {empty} (from 0) would have none")
        config = ModelConfig(
            x_dim=self.config.x_dim,
            latent_dims=tuple(int(mask.sum().item()) for mask in masks),
            hidden_dims=self.config.hidden_dims,
            activation=self.config.activation,
            likelihood=self.config.likelihood,
        )

        def cut(head: MLPHead, inputs: Tensor | None, outputs: Tensor | None) -> dict[str, Tensor]:
            """The head's parameters with the input columns ``~inputs`` and output units ``~outputs`` removed."""
            layers = [*head.hidden, head.head]
            params: dict[str, Tensor] = {}
            for i, layer in enumerate(layers):
                name = f"hidden.{i}" if i < len(head.hidden) else "head"
                weight, bias = layer.weight.detach(), layer.bias.detach()
                if i == 0 and inputs is not None:
                    weight = weight[:, inputs.to(weight.device)]
                if name == "head" and outputs is not None:  # n_params blocks of out_dim rows, each cut alike
                    rows = outputs.to(weight.device).repeat(head.n_params)
                    weight, bias = weight[rows], bias[rows]
                params[f"{name}.weight"], params[f"{name}.bias"] = weight.clone(), bias.clone()
            return params

        state: dict[str, Tensor] = {}
        for j in range(len(dims)):
            below = masks[j - 1] if j > 0 else None  # the layer below this one (None: x, never cut)
            for key, value in cut(self.encoder[j], below, masks[j]).items():
                state[f"encoder.{j}.{key}"] = value
            for key, value in cut(self.decoder[j], masks[j], below).items():
                state[f"decoder.{j}.{key}"] = value
        with torch.device("meta"):  # no initialisation (nor draws from the global generator): the cut weights go in
            smaller = LatentVariableModel(config)
        smaller.load_state_dict(state, assign=True)
        return smaller.train(self.training)

    # -- generation ---------------------------------------------------------------------------
    def observation_mean(self, h1: Tensor) -> Tensor:
        """E[x | h_1]: Bernoulli means (sigmoid of logits) or the Gaussian mean."""
        params = self.decoder[0](h1)
        return torch.sigmoid(params[0]) if self.config.likelihood == "bernoulli" else params[0]

    def decode_top(self, h_top: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """From the top latent layer down to E[x | h_1], sampling (or taking means of) the layers between."""
        h = h_top
        for j in reversed(range(1, self.config.n_stochastic)):
            mean, log_std = self.decoder[j](h)
            if sample:
                h = mean + torch.exp(log_std) * torch.randn(
                    mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
                )
            else:
                h = mean
        return self.observation_mean(h)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of E[x | h_1] with h from the prior: ``[n, x_dim]``."""
        device = next(self.parameters()).device
        top = torch.randn((n, self.config.latent_dims[-1]), generator=generator, device=device)
        return self.decode_top(top, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """E[x | h_1] for one h ~ q(h | x) per example: ``[batch, x_dim]``."""
        return self.observation_mean(self(x, 1, generator).latents[0][0])

    @torch.no_grad()
    def encode_means(self, x: Tensor) -> list[Tensor]:
        """Deterministic encoding: the mean of each layer of q given the mean of the layer below."""
        inputs, means = x, []
        for layer in self.encoder:
            mean, _ = layer(inputs)
            means.append(mean)
            inputs = mean
        return means
