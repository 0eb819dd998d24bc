"""Rainforth et al.'s Gaussian model, the test bed of ``iwae snr --model rainforth`` (:mod:`iwae.studies.snr`).

Source: Rainforth et al., "Tighter variational bounds are not necessarily better" (ICML 2018), section 4.

Generative model ``z ~ N(mu, I)``, ``x | z ~ N(z, I)`` in D = 20 dimensions, so ``x ~ N(mu, 2 I)`` and the true
posterior is ``N((x + mu) / 2, I / 2)``. Inference network ``q(z | x) = N(A x + b, (2/3) I)``: A is D x D, b a
D-vector, the variance is fixed (not a parameter). Encoder parameters (phi): A, b; decoder parameter (theta): mu.

The data: a true ``mu_true ~ N(0, I)`` and N = 1,024 points ``x_n ~ N(mu_true, 2 I)``, all drawn from one seeded
generator. The optimum of the marginal likelihood is ``mu* = mean_n x_n``; with q's variance fixed the best q mean
is still the posterior mean, so ``A* = I / 2`` and ``b* = mu* / 2`` (for IWAE_K at every K, by symmetry). As in
Rainforth et al. the study's parameters are that optimum with every entry of A, b and mu perturbed by an
independent draw from ``N(0, 0.01^2)`` (``perturbation``; seeded, the same generator after the data).

The study takes the gradient for one data point, the first of the data set (``--batch-size B``: a fixed
minibatch of the first B, the loss their mean). That is our reading of their section 4: SNRs of one data
point's gradient, not of the full data set's. Everything is float64. The model follows
:class:`iwae.protocol.NoiseModel` (noise ``[k, batch, D]``), so the estimators of :mod:`iwae.estimators`
differentiate it, and :func:`torch.func.vmap` takes it whole over repeats. Shapes: ``x`` is ``[batch, D]``,
latents ``[k, batch, D]``, log-densities ``[k, batch]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iwae.models import LOG_2PI, gaussian_log_prob
from iwae.protocol import ImportanceSample

DIM = 20
N_DATA = 1024
Q_VARIANCE = 2.0 / 3.0
PERTURBATION = 0.01


class RainforthGaussian(nn.Module):
    """``p(z) = N(mu, I)``, ``p(x | z) = N(z, I)``, ``q(z | x) = N(A x + b, q_variance I)``; float64."""

    def __init__(self, mu: Tensor, A: Tensor, b: Tensor, q_variance: float = Q_VARIANCE) -> None:
        super().__init__()
        dim = mu.shape[-1]
        if mu.shape != (dim,) or A.shape != (dim, dim) or b.shape != (dim,):
            raise ValueError(
                f"expected mu [D], A [D, D], b [D]; got {tuple(mu.shape)}, {tuple(A.shape)}, {tuple(b.shape)}"
            )
        if not q_variance > 0:
            raise ValueError(f"q's variance must be > 0, got {q_variance}")
        dt = torch.float64
        self.mu = nn.Parameter(mu.detach().to(dt).clone())
        self.A = nn.Parameter(A.detach().to(dt).clone())
        self.b = nn.Parameter(b.detach().to(dt).clone())
        self.q_variance = float(q_variance)
        self.dim = dim

    # -- the protocol -----------------------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        """q's parameters (phi): ``[A, b]``."""
        return [self.A, self.b]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """p's parameter (theta): ``[mu]``."""
        return [self.mu]

    def draw_noise(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Standard normal noise ``[k, batch, D]`` (one tensor)."""
        return [torch.randn((k, x.shape[0], self.dim), generator=generator, dtype=x.dtype, device=x.device)]

    def sample_with_noise(self, x: Tensor, noise: list[Tensor], *, stop_q_params: bool = False) -> ImportanceSample:
        (eps,) = noise
        mean = x @ self.A.T + self.b  # [batch, D]
        log_std = torch.full_like(mean, 0.5 * math.log(self.q_variance))
        z = mean + math.sqrt(self.q_variance) * eps  # [k, batch, D]
        log_q = gaussian_log_prob(z, mean.detach() if stop_q_params else mean, log_std)
        zeros = torch.zeros_like(mean)
        log_prior = gaussian_log_prob(z, self.mu, zeros)
        log_px_given_z = gaussian_log_prob(x, z, zeros)
        return ImportanceSample([z], log_px_given_z, log_prior, log_q, [(mean, log_std)])

    def forward(
        self, x: Tensor, k: int, generator: torch.Generator | None = None, *, stop_q_params: bool = False
    ) -> ImportanceSample:
        return self.sample_with_noise(x, self.draw_noise(x, k, generator), stop_q_params=stop_q_params)

    # -- exact quantities -------------------------------------------------------------------------------------
    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = log N(x; mu, 2 I)``, ``[batch]``."""
        return gaussian_log_prob(x, self.mu, torch.full_like(x, 0.5 * math.log(2.0)))

    def elbo(self, x: Tensor) -> Tensor:
        """Exact ELBO (IWAE_1's expectation), ``[batch]``.

        With ``m = A x + b`` and ``s^2`` q's variance:
        ``-D log(2 pi) / 2 - |m - mu|^2 / 2 - |x - m|^2 / 2 - D s^2 + D log(s^2) / 2 + D / 2``.
        """
        m = x @ self.A.T + self.b
        d, s2 = self.dim, self.q_variance
        return (
            -0.5 * d * LOG_2PI
            - 0.5 * (m - self.mu).square().sum(-1)
            - 0.5 * (x - m).square().sum(-1)
            + d * (0.5 * math.log(s2) + 0.5 - s2)
        )

    def log_marginal_gradient_mu(self, x: Tensor) -> Tensor:
        """``d/dmu log p(x) = (x - mu) / 2`` per example, ``[batch, D]``: the limit of IWAE_K's decoder gradient."""
        return (x - self.mu.detach()) / 2.0


@dataclass(frozen=True)
class RainforthProblem:
    """The seeded data set, the true mean, the optimum and the perturbed model (see the module docstring)."""

    data: Tensor  # [N, D]
    mu_true: Tensor  # [D]
    mu_opt: Tensor  # [D], the mean of the data
    model: RainforthGaussian

    def optimum(self) -> dict[str, Tensor]:
        dim = self.mu_opt.shape[0]
        return {"mu": self.mu_opt, "A": torch.eye(dim, dtype=torch.float64) / 2.0, "b": self.mu_opt / 2.0}


def make_problem(
    seed: int = 0, dim: int = DIM, n_data: int = N_DATA, perturbation: float = PERTURBATION
) -> RainforthProblem:
    """Draw ``mu_true``, the data and the perturbation from one generator seeded with ``seed``, in that order."""
    if dim < 1 or n_data < 1:
        raise ValueError(f"dim and n_data must be >= 1, got {dim} and {n_data}")
    if not perturbation >= 0:
        raise ValueError(f"the perturbation must be >= 0, got {perturbation}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    mu_true = torch.randn(dim, generator=g, dtype=dt)
    data = mu_true + math.sqrt(2.0) * torch.randn(n_data, dim, generator=g, dtype=dt)
    mu_opt = data.mean(dim=0)
    A_opt, b_opt = torch.eye(dim, dtype=dt) / 2.0, mu_opt / 2.0
    # Perturb every entry of the optimum (A, b, mu in that order) by N(0, perturbation^2).
    A = A_opt + perturbation * torch.randn(dim, dim, generator=g, dtype=dt)
    b = b_opt + perturbation * torch.randn(dim, generator=g, dtype=dt)
    mu = mu_opt + perturbation * torch.randn(dim, generator=g, dtype=dt)
    return RainforthProblem(data, mu_true, mu_opt, RainforthGaussian(mu, A, b))


def gradient_checks(
    model: RainforthGaussian,
    x: Tensor,
    ks: list[int],
    mean_gradients: dict[str, list],
    stderr_gradients: dict[str, list],
    n_encoder: int,
    generator: torch.Generator | None = None,
    draws: int = 100,
) -> dict:
    """What the study's mean gradients should approach, beside what they measured (loss = ``-mean`` over the batch).

    Args:
        model: the perturbed model.
        x: ``[batch, D]``, the study's data points.
        ks: the study's K values.
        mean_gradients: per estimator, per K, the mean gradient (encoder's entries first, then the decoder's).
        stderr_gradients: the same layout, their standard errors.
        n_encoder: how many entries of a gradient are the encoder's.
        generator: the random source of the IWAE bound's estimates.
        draws: estimates averaged for the IWAE bound at the largest K.

    As K grows the expected IWAE_K gradient tends to that of ``log p(x)``: the decoder's to
    ``-mean_n (x_n - mu) / 2`` (``decoder_limit``), the encoder's to 0. Per estimator and K: the largest absolute
    deviation of the decoder's mean gradient from the limit, and in standard errors (``decoder_max_abs_z``), and
    the root-mean-square of the encoder's mean gradient. Also the exact ``log p(x)``, the exact ELBO, and the
    IWAE bound at the largest K averaged over ``draws`` estimates (all averaged over the batch)."""
    limit = -model.log_marginal_gradient_mu(x).mean(dim=0).detach().cpu().numpy()
    checks: dict = {"decoder_limit": limit.tolist(), "per_estimator": {}}
    for est, means in mean_gradients.items():
        rows: dict[str, list[float]] = {"decoder_max_abs_error": [], "decoder_max_abs_z": [], "encoder_rms_mean": []}
        for mean, stderr in zip(means, stderr_gradients[est], strict=True):
            error = abs(mean[n_encoder:] - limit)
            rows["decoder_max_abs_error"].append(float(error.max()))
            rows["decoder_max_abs_z"].append(float((error / stderr[n_encoder:]).max()))
            rows["encoder_rms_mean"].append(float((mean[:n_encoder] ** 2).mean() ** 0.5))
        checks["per_estimator"][est] = rows
    with torch.no_grad():
        k = max(ks)
        estimates = [model(x, k, generator).log_w.logsumexp(0).mean() - math.log(k) for _ in range(draws)]
        checks.update(
            log_px_exact=float(model.log_marginal(x).mean()),
            elbo_exact=float(model.elbo(x).mean()),
            iwae_estimate_k=k,
            iwae_estimate=float(torch.stack(estimates).mean()),
        )
    return checks
