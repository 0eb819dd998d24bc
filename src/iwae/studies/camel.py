"""The 1-D "camel" density: a VAE and an IWAE fitted to a two-hump mixture.

After a reproduction report of Burda et al.; its numbers and their source are in docs/references.md.

Data: ``p(x) = 0.5 N(-1, 0.5^2) + 0.5 N(1, 0.5^2)``. Model: a 1-D latent with p(z) = N(0, 1),
q(z | x) and p(x | z) Gaussian with mean and log-std from 2 x 5 tanh networks. The true
E[log p(x)] is computed by numerical integration (``scipy.integrate.quad``; about -1.3585).
Both models are scored by L_5000 on a large test sample, and their densities p_theta(x) are
estimated by exp(L_5000) on a grid of x and plotted beside the true one. With a 1-D latent, each model's
posterior p_theta(z | x) and its marginal p_theta(x) are also computed exactly, by quadrature over a grid of z
(:func:`posterior_on_grid`): the exact log p_theta(x) checks L_5000, and KL(q(z | x) || p_theta(z | x)), the
gap between log p_theta(x) and the ELBO, says how far each encoder is from its model's posterior
(``camel-posterior.png`` draws both at a few x).

Shape convention: data ``[batch, 1]``; log-weights ``[k, batch]``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae.checkpoint import atomic_save_figure
from iwae.data import Split
from iwae.evaluate import estimate_log_likelihood
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import make_objective

MEANS = (-1.0, 1.0)
STD = 0.5
CAMEL_MODEL = ModelConfig(x_dim=1, latent_dims=(1,), hidden_dims=((5, 5),), activation="tanh", likelihood="gaussian")


def true_log_density(x: np.ndarray | float) -> np.ndarray:
    """log p(x) of the mixture, computed with logaddexp."""
    x = np.asarray(x, dtype=np.float64)
    parts = [-0.5 * ((x - m) / STD) ** 2 - math.log(STD) - 0.5 * math.log(2 * math.pi) + math.log(0.5) for m in MEANS]
    return np.logaddexp(*parts)


def true_expected_log_density() -> float:
    """E_p[log p(x)] = integral of p(x) log p(x), by adaptive quadrature (-1.35851...)."""
    from scipy import integrate

    def integrand(x: float) -> float:
        log_p = float(true_log_density(x))
        return math.exp(log_p) * log_p

    value, _ = integrate.quad(integrand, -12.0, 12.0, epsabs=1e-12, epsrel=1e-10, limit=200)
    return value


def sample_camel(n: int, generator: torch.Generator) -> Tensor:
    """n draws from the mixture, ``[n, 1]`` float32."""
    hump = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return (hump * MEANS[1] + STD * torch.randn(n, generator=generator))[:, None]


@dataclass(frozen=True)
class CamelSettings:
    """The study's sizes: IWAE's and the VAE's k, training (epochs, examples, minibatch, learning rates), the test
    sample, L_k's k, the density grid's points and the seed."""

    k: int = 20
    vae_k: int = 20
    epochs: int = 200
    n_train: int = 5000
    batch_size: int = 100
    lr: float = 3e-3
    lr_final: float = 3e-4
    n_test: int = 2000
    eval_k: int = 5000
    grid_points: int = 121
    seed: int = 0


def train_camel(objective: str, k: int, data: Tensor, settings: CamelSettings, progress: bool = False):
    """Train one camel model with the objective ``objective`` and ``k`` samples; returns the model.

    ``data`` is ``[n, 1]``; Adam's learning rate decays geometrically from ``settings.lr`` to ``settings.lr_final``.
    """
    torch.manual_seed(settings.seed)
    model = LatentVariableModel(CAMEL_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, eps=1e-4)
    target = make_objective(objective).encoder_target
    generator = torch.Generator().manual_seed(settings.seed + 1)
    n = data.shape[0]
    decay = (settings.lr_final / settings.lr) ** (1.0 / max(1, settings.epochs - 1))
    for epoch in tqdm(range(settings.epochs), desc=f"camel {objective} k={k}", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * decay**epoch
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            loss = -target(model(data[order[start : start + settings.batch_size]], k, generator).log_w).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def log_likelihood(model: LatentVariableModel, x: Tensor, k: int, seed: int) -> Tensor:
    """L_k per example, ``[n]`` float64 (chunks of samples, float64 log-mean-exp)."""
    generator = torch.Generator().manual_seed(seed)
    return estimate_log_likelihood(model, Split(x), "none", k, generator, batch_size=250, max_rows=500_000)["log_lik"]


Z_GRID = np.linspace(-8.0, 8.0, 4001)  # p(z) = N(0, 1): the mass beyond 8 is under 1e-15
POSTERIOR_X = (-1.0, 0.0, 1.0)  # where camel-posterior.png draws the posteriors: the humps and the valley


@torch.no_grad()
def posterior_on_grid(model: LatentVariableModel, x: Tensor, z: np.ndarray = Z_GRID) -> dict[str, Tensor]:
    """A 1-D-latent model's posterior by quadrature over the grid ``z`` (trapezoid rule, float64).

    Args:
        model: a model with one stochastic layer of one unit (``CAMEL_MODEL``).
        x: ``[n, 1]``.
        z: the grid of latent values, evenly spaced, wide enough for p(z) and q(z | x).

    Returns:
        ``log_joint`` and ``log_q`` ``[G, n]``, log p_theta(x, z) and log q(z | x) on the grid; ``log_px`` ``[n]``,
        log p_theta(x); ``posterior`` ``[G, n]``, p_theta(z | x); ``kl`` ``[n]``, KL(q(z | x) || p_theta(z | x)) =
        log p_theta(x) - ELBO(x).
    """
    grid = torch.tensor(z, dtype=torch.float64)
    dz = float(z[1] - z[0])
    double = copy.deepcopy(model).double()
    xs = x.double()
    log_prior = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
    log_joint = double.observation_log_prob(xs, grid[:, None, None].expand(len(z), len(xs), 1)) + log_prior[:, None]
    mean, log_std = (part[:, 0] for part in double.encoder[0](xs))
    log_q = -0.5 * ((grid[:, None] - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    weights = torch.full((len(z), 1), dz, dtype=torch.float64)
    weights[[0, -1]] = dz / 2  # the trapezoid rule
    log_px = torch.logsumexp(log_joint + weights.log(), dim=0)
    log_posterior = log_joint - log_px
    q = log_q.exp()
    kl = (weights * q * (log_q - log_posterior)).sum(dim=0)
    return {"log_joint": log_joint, "log_q": log_q, "log_px": log_px, "posterior": log_posterior.exp(), "kl": kl}


def plot_posteriors(models: dict[str, LatentVariableModel], path: Path, title: str) -> Path:
    """p_theta(z | x) beside q(z | x) at :data:`POSTERIOR_X`, one row per model, as one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.tensor(POSTERIOR_X, dtype=torch.float32)[:, None]
    fig, axes = plt.subplots(len(models), len(POSTERIOR_X), figsize=(9, 2.6 * len(models)), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        exact = posterior_on_grid(model, x)
        for column, value in enumerate(POSTERIOR_X):
            axis = axes[row][column]
            axis.plot(Z_GRID, exact["posterior"][:, column].numpy(), "k-", lw=1.6, label="p_theta(z | x)")
            axis.plot(Z_GRID, exact["log_q"][:, column].exp().numpy(), "C1--", lw=1.6, label="q(z | x)")
            axis.set_xlim(-4, 4)
            kl = exact["kl"][column].item()
            axis.set_title(f"{name.upper()}, x = {value:g}: KL(q || p) = {kl:.3f}", fontsize=8)
            axis.set_xlabel("z", fontsize=8)
            axis.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


def plot_densities(grid: np.ndarray, densities: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """The true density and the ``vae`` and ``iwae`` densities over ``grid``, as one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    axis.plot(grid, np.exp(true_log_density(grid)), "k-", lw=2, label="true p(x)")
    for name, style in (("vae", "C0--"), ("iwae", "C1-")):
        axis.plot(grid, densities[name], style, label=f"{name.upper()} (exp L_5000)")
    axis.set_xlabel("x")
    axis.set_ylabel("density")
    axis.set_title(title, fontsize=9)
    axis.legend()
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


def run_camel(settings: CamelSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Train both models, score them, plot the densities and the posteriors; writes ``camel.json``, ``camel.png`` and
    ``camel-posterior.png`` to ``out_dir``."""
    from iwae.checkpoint import atomic_write_text

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(settings.seed)
    train, test = sample_camel(settings.n_train, generator), sample_camel(settings.n_test, generator)
    grid = np.linspace(-3.0, 3.0, settings.grid_points)
    grid_x = torch.tensor(grid, dtype=torch.float32)[:, None]
    result: dict = {"true": true_expected_log_density()}
    densities: dict[str, np.ndarray] = {}
    models: dict[str, LatentVariableModel] = {}
    result["exact"], result["kl_q_posterior"] = {}, {}
    for name, k in (("vae", settings.vae_k), ("iwae", settings.k)):
        model = models[name] = train_camel(name, k, train, settings, progress)
        with torch.no_grad():
            result[name] = log_likelihood(model, test, settings.eval_k, settings.seed + 2).mean().item()
            densities[name] = np.exp(log_likelihood(model, grid_x, settings.eval_k, settings.seed + 3).numpy())
        exact = posterior_on_grid(model, test)
        result["exact"][name] = exact["log_px"].mean().item()  # E over the test points of log p_theta(x)
        result["kl_q_posterior"][name] = exact["kl"].mean().item()
    # L1 distance between each learned density and the true one on the grid (trapezoid rule).
    true_density = np.exp(true_log_density(grid))
    result["l1_density"] = {name: float(np.trapezoid(np.abs(d - true_density), grid)) for name, d in densities.items()}
    result["published"] = {"true": -1.358, "iwae": -1.37, "vae": -1.52}
    result["settings"] = {**settings.__dict__}
    title = f"camel: true {result['true']:.3f}, VAE {result['vae']:.3f}, IWAE (k={settings.k}) {result['iwae']:.3f}"
    result["png"] = str(plot_densities(grid, densities, out / "camel.png", title))
    kls = ", ".join(f"{name.upper()} {value:.3f}" for name, value in result["kl_q_posterior"].items())
    posterior_title = f"camel: each model's posterior and its encoder; mean KL(q || p) over the test points: {kls}"
    result["posterior_png"] = str(plot_posteriors(models, out / "camel-posterior.png", posterior_title))
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "camel.json", json.dumps(result, indent=2) + "\n")
    return result
