"""The rival implementations that ``iwae bench`` times beside this library's training step.

- :class:`PlainIWAE`: the same model written the obvious way in plain PyTorch (``nn.Sequential`` tanh MLPs,
  ``torch.distributions`` with k as a leading dimension, ``logsumexp - log k``), trained with ``torch.optim.Adam``.
- :class:`PyroIWAE`: a Pyro model/guide over a :class:`PlainIWAE`'s modules, ``RenyiELBO(alpha=0)`` with
  vectorised particles, ``SVI`` and ``pyro.optim.Adam``.

Pyro is an optional dependency (``pip install 'iwae[bench]'``), heavy to import: every ``import pyro`` below is
deferred on purpose to the function that needs it, so that this module (and ``iwae bench --no-pyro``) works
without Pyro and does not pay for importing it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from iwae.config import TrainConfig
from iwae.models import LatentVariableModel, ModelConfig

PYRO_MISSING = "pyro-ppl not installed (pip install 'iwae[bench]')"
PYRO_SKIPPED = "skipped (--no-pyro)"

_PLAIN_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(_PLAIN_ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class PlainIWAE(nn.Module):
    """The IWAE written the obvious way, as a baseline: ``nn.Sequential`` MLPs and ``torch.distributions``.

    ``encoders[j]`` outputs (mean, log-std) of q(h_{j+1} | h_j); ``decoders[0]`` the Bernoulli logits of
    p(x | h_1) and ``decoders[j]`` (mean, log-std) of p(h_j | h_{j+1}): the layout of
    :class:`~iwae.models.LatentVariableModel`, so :meth:`copy_from` can take its parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.likelihood != "bernoulli":
            raise ValueError("the plain baseline has a Bernoulli observation model only")
        in_dims = (config.x_dim, *config.latent_dims[:-1])
        self.encoders = nn.ModuleList(
            _mlp((in_dim, *hidden, 2 * latent), config.activation)
            for in_dim, hidden, latent in zip(in_dims, config.hidden_dims, config.latent_dims, strict=True)
        )
        self.decoders = nn.ModuleList(
            _mlp((latent, *reversed(hidden), in_dims[j] * (1 if j == 0 else 2)), config.activation)
            for j, (hidden, latent) in enumerate(zip(config.hidden_dims, config.latent_dims, strict=True))
        )

    def q(self, j: int, inputs: Tensor) -> torch.distributions.Normal:
        mean, log_std = self.encoders[j](inputs).chunk(2, dim=-1)
        return torch.distributions.Normal(mean, log_std.exp())

    def p(self, j: int, h: Tensor) -> torch.distributions.Distribution:
        if j == 0:
            return torch.distributions.Bernoulli(logits=self.decoders[0](h))
        mean, log_std = self.decoders[j](h).chunk(2, dim=-1)
        return torch.distributions.Normal(mean, log_std.exp())

    def log_weights(self, x: Tensor, k: int, noise: Sequence[Tensor] | None = None) -> Tensor:
        """``[batch, x_dim] -> [k, batch]``; ``noise[j]`` (``[k, batch, d_j]``) replaces rsample's draws."""
        inputs, latents, log_q = x, [], 0.0
        for j in range(len(self.encoders)):
            q = self.q(j, inputs)
            h = self._draw(q, j, k, noise)
            log_q = log_q + q.log_prob(h).sum(-1)
            latents.append(h)
            inputs = h
        top = latents[-1]
        log_p = torch.distributions.Normal(torch.zeros_like(top), torch.ones_like(top)).log_prob(top).sum(-1)
        for j in range(len(latents) - 1):
            log_p = log_p + self.p(j + 1, latents[j + 1]).log_prob(latents[j]).sum(-1)
        log_p = log_p + self.p(0, latents[0]).log_prob(x).sum(-1)
        return log_p - log_q

    @staticmethod
    def _draw(q: torch.distributions.Normal, j: int, k: int, noise: Sequence[Tensor] | None) -> Tensor:
        if noise is not None:
            return q.loc + noise[j] * q.scale  # what Normal.rsample computes
        return q.rsample((k,)) if j == 0 else q.rsample()

    def loss(self, x: Tensor, k: int, noise: Sequence[Tensor] | None = None) -> Tensor:
        """Minus the mean over the batch of the IWAE bound ``logsumexp(log_w, 0) - log k``."""
        return -(torch.logsumexp(self.log_weights(x, k, noise), dim=0) - math.log(k)).mean()

    @torch.no_grad()
    def copy_from(self, model: LatentVariableModel) -> PlainIWAE:
        """Take the parameters of ``model`` (same architecture), linear layer by linear layer."""
        pairs = [*zip(self.encoders, model.encoder, strict=True), *zip(self.decoders, model.decoder, strict=True)]
        for mine, theirs in pairs:
            for a, b in zip(_linears(mine), _linears(theirs), strict=True):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
        return self


def adam_settings(config: TrainConfig) -> dict[str, Any]:
    """Learning rate, betas and epsilon of :func:`iwae.steps.build_optimizer` for ``config``."""
    return {"lr": config.stages[0][1], "betas": (config.beta1, config.beta2), "eps": config.adam_eps}


def pyro_version() -> str | None:
    """Pyro's version, or None if ``import pyro`` fails."""
    try:
        import pyro  # deferred: optional and heavy (see the module docstring)
    except ImportError:
        return None
    return pyro.__version__


def pyro_skip_reason(wanted: bool, version: str | None) -> str | None:
    """Why the Pyro baseline is left out (for its rows and the table), or None if it runs."""
    if not wanted:
        return PYRO_SKIPPED
    return PYRO_MISSING if version is None else None


class PyroIWAE:
    """Pyro's IWAE over the modules of a :class:`PlainIWAE`: ``RenyiELBO(alpha=0)`` with vectorised particles.

    Clears Pyro's global parameter store; one instance at a time.
    """

    def __init__(self, plain: PlainIWAE, k: int, config: TrainConfig):
        import pyro  # deferred: optional and heavy (see the module docstring)
        import pyro.infer
        import pyro.optim

        pyro.clear_param_store()
        self.plain = plain
        self.top_dim = config.model.latent_dims[-1]
        elbo = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        self.svi = pyro.infer.SVI(self.model, self.guide, pyro.optim.Adam(adam_settings(config)), loss=elbo)

    def model(self, x: Tensor) -> None:
        import pyro  # deferred: optional and heavy (see the module docstring)
        import pyro.distributions as dist

        pyro.module("decoders", self.plain.decoders)
        n = len(self.plain.decoders)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros((x.shape[0], self.top_dim)), 1.0)
            h = pyro.sample(f"h{n}", prior.to_event(1))
            for j in reversed(range(n - 1)):
                mean, log_std = self.plain.decoders[j + 1](h).chunk(2, dim=-1)
                h = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.plain.decoders[0](h)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        import pyro  # deferred: optional and heavy (see the module docstring)
        import pyro.distributions as dist

        pyro.module("encoders", self.plain.encoders)
        inputs = x
        with pyro.plate("data", x.shape[0]):
            for j, encoder in enumerate(self.plain.encoders):
                mean, log_std = encoder(inputs).chunk(2, dim=-1)
                inputs = pyro.sample(f"h{j + 1}", dist.Normal(mean, log_std.exp()).to_event(1))

    def step(self, x: Tensor) -> float:
        """One SVI step (zero grads, loss and gradients, Adam); returns the loss."""
        return self.svi.step(x)
