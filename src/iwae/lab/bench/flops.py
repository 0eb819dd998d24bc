"""The FLOP model and the matmul roofline.

The FLOP model counts matmuls only: ``2 * in * out`` per row per linear layer, a training step 3x the forward pass.
The roofline times every linear layer's training matmuls on random data of a step's shapes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from iwae.lab.bench.settings import MIN_TIMED_SECONDS
from iwae.lab.bench.timing import Timed
from iwae.models import ModelConfig


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a model: ``[rows, in_dim] x [in_dim, out_dim]``.

    ``per_sample``: it runs on k * batch rows (it sees latent samples), otherwise on batch rows.
    """

    part: str  # "encoder" or "decoder"
    layer: int  # stochastic layer j of the conditional it belongs to (0-based)
    in_dim: int
    out_dim: int
    per_sample: bool

    @property
    def flops_per_row(self) -> int:
        return 2 * self.in_dim * self.out_dim

    def rows(self, k: int, batch: int) -> int:
        return k * batch if self.per_sample else batch


def linear_shapes(config: ModelConfig) -> list[LinearShape]:
    """Every linear layer of :class:`~iwae.models.LatentVariableModel` for ``config``, encoder first.

    q(h_1 | x) sees the batch; q(h_{j+1} | h_j) and every decoder network see the k samples.
    """
    in_dims = (config.x_dim, *config.latent_dims[:-1])
    obs_params = 1 if config.likelihood == "bernoulli" else 2
    shapes = []
    for j, (in_dim, hidden, latent) in enumerate(zip(in_dims, config.hidden_dims, config.latent_dims, strict=True)):
        sizes = (in_dim, *hidden, 2 * latent)
        shapes += [LinearShape("encoder", j, a, b, j > 0) for a, b in itertools.pairwise(sizes)]
    for j, (hidden, latent) in enumerate(zip(config.hidden_dims, config.latent_dims, strict=True)):
        sizes = (latent, *reversed(hidden), in_dims[j] * (obs_params if j == 0 else 2))
        shapes += [LinearShape("decoder", j, a, b, True) for a, b in itertools.pairwise(sizes)]
    return shapes


@dataclass(frozen=True)
class ModelFlops:
    """Forward-pass matmul FLOPs (2 * MACs) of a model: per example (batch rows) and per sample (k * batch rows)."""

    encoder_per_example: int
    encoder_per_sample: int
    decoder_per_sample: int

    @property
    def per_example(self) -> int:
        return self.encoder_per_example

    @property
    def per_sample(self) -> int:
        return self.encoder_per_sample + self.decoder_per_sample

    def forward(self, k: int, batch: int) -> int:
        return batch * self.per_example + k * batch * self.per_sample

    def training_step(self, k: int, batch: int) -> int:
        """Forward plus backward (gradients of inputs and of weights): 3x the forward pass."""
        return 3 * self.forward(k, batch)


def model_flops(config: ModelConfig) -> ModelFlops:
    """The forward pass's matmul FLOPs of the model ``config`` describes.

    For Burda's one-layer model: 433,600 per example (encoder 784-200-200-2x50) and 413,600 per sample
    (decoder 50-200-200-784); for the two-layer model 473,600 per example and 563,600 per sample.
    """
    shapes = linear_shapes(config)

    def total(part: str, per_sample: bool) -> int:
        return sum(s.flops_per_row for s in shapes if s.part == part and s.per_sample == per_sample)

    return ModelFlops(total("encoder", False), total("encoder", True), total("decoder", True))


def matmul_calls(rows: int, in_dim: int, out_dim: int, device: torch.device) -> dict[str, Timed]:
    """A linear layer's three training matmuls on random data, as timed calls by name.

    Forward ``addmm(b, x, W^T)`` ``[rows, in] x [in, out]``, gradient of the input ``g @ W`` and of the weight
    ``x^T @ g``.
    """
    x = torch.randn(rows, in_dim, device=device)
    weight = torch.randn(out_dim, in_dim, device=device)
    bias = torch.randn(out_dim, device=device)
    grad = torch.randn(rows, out_dim, device=device)
    name = f"{rows}x{in_dim}x{out_dim}"
    return {
        f"{name}:forward": Timed(lambda: torch.addmm(bias, x, weight.t()), MIN_TIMED_SECONDS),
        f"{name}:grad_input": Timed(lambda: grad.mm(weight), MIN_TIMED_SECONDS),
        f"{name}:grad_weight": Timed(lambda: x.t().mm(grad), MIN_TIMED_SECONDS),
    }


def roofline_calls(config: ModelConfig, k: int, batch: int, device: torch.device) -> tuple[dict[str, Timed], list[str]]:
    """The matmuls of a training step, and the call names whose median times add up to the roofline time.

    Returns:
        ``(calls, per_layer)``: the timed calls by shape (each shape once), and the call names of every linear
        layer in order (a shape used by two layers is listed twice).
    """
    calls: dict[str, Timed] = {}
    per_layer: list[str] = []
    for shape in linear_shapes(config):
        layer_calls = matmul_calls(shape.rows(k, batch), shape.in_dim, shape.out_dim, device)
        for name, timed in layer_calls.items():
            calls.setdefault(name, timed)
        per_layer += list(layer_calls)
    return calls, per_layer
