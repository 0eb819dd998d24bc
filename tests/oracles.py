"""Analytic oracle: a linear-Gaussian latent model whose log p(x) and posterior are exact.

``p(z) = N(0, I_d)``, ``p(x | z) = N(W z + b, sigma^2 I_D)``, so ``p(x) = N(b, W W^T + sigma^2 I)``
and the true posterior is Gaussian. The recognition model ``q(z | x) = N(C x + c, diag(exp(2 s)))``
is deliberately imperfect, so every bound is strictly below log p(x). The model returns the same
:class:`~iwae.models.ImportanceSample` as the neural models (shapes ``[k, batch]``), so every
objective and estimator can be checked against exact mathematics; all computations are float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from iwae.models import ImportanceSample, gaussian_log_prob, standard_normal_log_prob


class LinearGaussianModel(nn.Module):
    def __init__(self, x_dim: int = 5, z_dim: int = 3, seed: int = 0, noise_std: float = 0.7):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        self.weight = nn.Parameter(torch.randn(x_dim, z_dim, generator=g, dtype=dt) * 0.8)
        self.bias = nn.Parameter(torch.randn(x_dim, generator=g, dtype=dt) * 0.3)
        self.log_noise_std = nn.Parameter(torch.tensor(math.log(noise_std), dtype=dt))
        # Encoder: start from the exact posterior mean map, then perturb it (and use a diagonal std).
        post_mean_map, post_offset, post_cov = self._posterior_maps()
        self.enc_weight = nn.Parameter(post_mean_map + 0.1 * torch.randn(z_dim, x_dim, generator=g, dtype=dt))
        self.enc_bias = nn.Parameter(post_offset + 0.1 * torch.randn(z_dim, generator=g, dtype=dt))
        self.enc_log_std = nn.Parameter(0.5 * torch.log(torch.diagonal(post_cov)) + 0.25)
        self.x_dim, self.z_dim = x_dim, z_dim

    def _posterior_maps(self) -> tuple[Tensor, Tensor, Tensor]:
        """Exact posterior ``N(A x + a, S)``: returns (A, a, S)."""
        with torch.no_grad():
            w, noise_var = self.weight, torch.exp(2 * self.log_noise_std)
            precision = torch.eye(self.weight.shape[1], dtype=w.dtype) + w.T @ w / noise_var
            cov = torch.linalg.inv(precision)
            mean_map = cov @ w.T / noise_var
            return mean_map, -mean_map @ self.bias, cov

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [self.enc_weight, self.enc_bias, self.enc_log_std]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [self.weight, self.bias, self.log_noise_std]

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)``, ``[batch]`` (differentiable in the decoder's parameters)."""
        cov = self.weight @ self.weight.T + torch.exp(2 * self.log_noise_std) * torch.eye(self.x_dim, dtype=x.dtype)
        return torch.distributions.MultivariateNormal(self.bias, covariance_matrix=cov).log_prob(x)

    def exact_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[batch, d]`` and covariance ``[d, d]`` of the true posterior p(z | x)."""
        mean_map, offset, cov = self._posterior_maps()
        return x @ mean_map.T + offset, cov

    def sample_data(self, n: int, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            z = torch.randn(n, self.z_dim, generator=generator, dtype=torch.float64)
            noise = torch.randn(n, self.x_dim, generator=generator, dtype=torch.float64)
            return z @ self.weight.T + self.bias + torch.exp(self.log_noise_std) * noise

    def forward(
        self, x: Tensor, k: int, generator: torch.Generator | None = None, *, stop_q_params: bool = False
    ) -> ImportanceSample:
        mean = x @ self.enc_weight.T + self.enc_bias  # [batch, d]
        log_std = self.enc_log_std.expand_as(mean)
        eps = torch.randn((k, *mean.shape), generator=generator, dtype=x.dtype)
        z = mean + torch.exp(log_std) * eps  # [k, batch, d]
        q_mean, q_log_std = (mean.detach(), log_std.detach()) if stop_q_params else (mean, log_std)
        log_q = gaussian_log_prob(z, q_mean, q_log_std)
        x_mean = z @ self.weight.T + self.bias
        log_px = gaussian_log_prob(x, x_mean, self.log_noise_std.expand_as(x_mean))
        return ImportanceSample([z], log_px, standard_normal_log_prob(z), log_q, [(mean, log_std)])

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        return self(x, k, generator).log_w
