"""The importance-weighted posterior q_IW (Cremer, Morris and Duvenaud 2017) and a 2-D latent picture of it.

Sampling-importance-resampling (SIR): draw h_1..h_k ~ q(h | x), pick h_j with probability
w~_j = softmax(log w)_j. For k = 1 this is q itself; as k grows the draw's distribution approaches the
true posterior p(h | x). :func:`sir_sample` works for any model returning an
:class:`~iwae.models.ImportanceSample` (every stochastic layer is resampled jointly) and any k.

For a model with a single 2-D stochastic layer, :func:`posterior_grid` evaluates the true posterior
on a grid (log p(x, z) normalised over the grid with ``logsumexp``), q's density on the same grid,
and :func:`total_variation` compares either with a histogram of q_IW's draws.

Shape convention: samples first. Data ``[batch, x_dim]``; proposals ``[k, batch, d]``; SIR draws
``[n, batch, d]``; grid quantities ``[batch, G, G]`` (rows index z_2, columns z_1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae.checkpoint import atomic_save_figure
from iwae.models import LatentVariableModel, gaussian_log_prob, standard_normal_log_prob


@torch.no_grad()
def sir_sample(
    model: torch.nn.Module,
    x: Tensor,
    k: int,
    n: int,
    generator: torch.Generator | None = None,
    *,
    max_rows: int = 200_000,
) -> list[Tensor]:
    """``n`` independent draws from q_IW with ``k`` proposals each, per example.

    Returns one tensor per stochastic layer, ``[n, batch, d_j]``. Draws are made in chunks so that at
    most about ``max_rows`` proposals (``chunk * k * batch``) are held at once.
    """
    if k < 1 or n < 1:
        raise ValueError(f"k and n must be >= 1, got k={k}, n={n}")
    batch = x.shape[0]
    chunk = max(1, min(n, max_rows // max(1, k * batch)))
    draws: list[list[Tensor]] = []
    for done in range(0, n, chunk):
        size = min(chunk, n - done)
        sample = model(x, size * k, generator)
        log_w = sample.log_w.reshape(size, k, batch).double()  # [size, k, batch]
        probs = torch.softmax(log_w, dim=1).permute(0, 2, 1).reshape(size * batch, k)
        picked = torch.multinomial(probs, 1, generator=generator).reshape(size, batch)  # index in 0..k-1
        for j, latent in enumerate(sample.latents):
            latent = latent.reshape(size, k, batch, latent.shape[-1])
            index = picked[:, None, :, None].expand(size, 1, batch, latent.shape[-1])
            chosen = latent.gather(1, index).squeeze(1)  # [size, batch, d]
            if len(draws) <= j:
                draws.append([])
            draws[j].append(chosen)
    return [torch.cat(layer, dim=0) for layer in draws]


# -- the 2-D picture ------------------------------------------------------------------------------
@dataclass
class Grid:
    """A G x G grid per example: ``z1[b]``, ``z2[b]`` are ``[G]`` cell centres (equal-width cells)."""

    z1: Tensor  # [batch, G]
    z2: Tensor  # [batch, G]

    @property
    def size(self) -> int:
        return self.z1.shape[1]

    def points(self) -> Tensor:
        """All cell centres, ``[G * G, batch, 2]`` (row-major: z_2 varies slowest)."""
        g = self.size
        zz1 = self.z1[:, None, :].expand(-1, g, g)
        zz2 = self.z2[:, :, None].expand(-1, g, g)
        return torch.stack([zz1, zz2], dim=-1).reshape(self.z1.shape[0], g * g, 2).permute(1, 0, 2)

    def histogram(self, draws: Tensor) -> tuple[Tensor, Tensor]:
        """Fraction of ``[n, batch, 2]`` draws in each cell, ``[batch, G, G]``, and the fraction outside."""
        n, batch, _ = draws.shape
        g = self.size
        lo1, lo2 = self.z1[:, :1], self.z2[:, :1]  # [batch, 1]
        w1, w2 = self.z1[:, 1:2] - self.z1[:, :1], self.z2[:, 1:2] - self.z2[:, :1]
        i1 = torch.floor((draws[..., 0].T - lo1) / w1 + 0.5).long()  # [batch, n]
        i2 = torch.floor((draws[..., 1].T - lo2) / w2 + 0.5).long()
        inside = (i1 >= 0) & (i1 < g) & (i2 >= 0) & (i2 < g)
        flat = torch.where(inside, i2 * g + i1, torch.zeros_like(i1))
        counts = torch.zeros(batch, g * g, dtype=torch.float64, device=draws.device)
        counts.scatter_add_(1, flat, inside.double())
        return (counts / n).reshape(batch, g, g), 1.0 - inside.double().mean(dim=1)


def model_log_joint(model: LatentVariableModel, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``z [m, batch, 2] -> log p(x, z) [m, batch]`` for a model with one stochastic layer."""

    def log_joint(z: Tensor) -> Tensor:
        return model.observation_log_prob(x, z) + standard_normal_log_prob(z)

    return log_joint


def model_log_q(model: LatentVariableModel, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``z [m, batch, 2] -> log q(z | x) [m, batch]`` for a model with one stochastic layer."""
    mean, log_std = model.encoder[0](x)

    def log_q(z: Tensor) -> Tensor:
        return gaussian_log_prob(z, mean, log_std)

    return log_q


@torch.no_grad()
def log_density_values(fn: Callable[[Tensor], Tensor], grid: Grid, chunk: int = 2500) -> Tensor:
    """A log-density evaluated at every cell centre, unnormalised: ``[batch, G * G]`` in float64."""
    points = grid.points()
    values = torch.cat([fn(points[s : s + chunk]) for s in range(0, points.shape[0], chunk)], dim=0)
    return values.double().T


def normalise_on_grid(values: Tensor, size: int) -> Tensor:
    """``[batch, G * G]`` log-values -> ``[batch, G, G]`` log-probabilities summing to one over the grid."""
    return (values - torch.logsumexp(values, dim=1, keepdim=True)).reshape(-1, size, size)


@torch.no_grad()
def evaluate_on_grid(fn: Callable[[Tensor], Tensor], grid: Grid, chunk: int = 2500) -> Tensor:
    """A log-density evaluated at every cell centre, normalised over the grid: ``[batch, G, G]`` log-probs."""
    return normalise_on_grid(log_density_values(fn, grid, chunk), grid.size)


@torch.no_grad()
def q_iw_log_density(
    model: torch.nn.Module,
    x: Tensor,
    log_w_points: Tensor,
    log_q_points: Tensor,
    k: int,
    n_outer: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte Carlo estimate of q_IW's marginal density at given points, ``[batch, P]`` log-values.

    The SIR draw lands at z with density ``q_IW(z) = q(z) E[k w(z) / (w(z) + S)]``, where
    ``S = sum_{j=1}^{k-1} w_j`` over k - 1 other proposals from q (Cremer et al. 2017). The
    expectation is averaged over ``n_outer`` draws of S shared by all points, in log-space.
    ``log_w_points``, ``log_q_points``: ``[batch, P]``; k = 1 returns q exactly.
    """
    if k == 1:
        return log_q_points
    batch = x.shape[0]
    log_w = model(x, n_outer * (k - 1), generator).log_w.reshape(n_outer, k - 1, batch).double()
    log_s = torch.logsumexp(log_w, dim=1).T  # [batch, n_outer]
    ratio = log_w_points[..., None] - torch.logaddexp(log_w_points[..., None], log_s[:, None, :])  # [batch, P, m]
    return log_q_points + math.log(k) + torch.logsumexp(ratio, dim=-1) - math.log(n_outer)


def _centred_grid(lo: Tensor, hi: Tensor, size: int) -> Grid:
    """A grid of ``size`` cell centres spanning ``[lo, hi]`` per example (``lo``, ``hi``: ``[batch, 2]``)."""
    steps = torch.linspace(0, 1, size, dtype=lo.dtype, device=lo.device)
    z1 = lo[:, :1] + (hi[:, :1] - lo[:, :1]) * steps
    z2 = lo[:, 1:] + (hi[:, 1:] - lo[:, 1:]) * steps
    return Grid(z1, z2)


def _heavy_box(log_joint: Callable[[Tensor], Tensor], grid: Grid, mass_floor: float) -> tuple[Tensor, Tensor]:
    """Centre and half-width (``[batch, 2]``, ``[batch, 1]``) of the square box around the cells of ``grid``
    where the grid-normalised true posterior exceeds ``mass_floor``, widened by one cell each way."""
    batch = grid.z1.shape[0]
    heavy = (evaluate_on_grid(log_joint, grid) > math.log(mass_floor)).reshape(batch, -1)  # [batch, S*S]
    points = grid.points().permute(1, 0, 2)  # [batch, S*S, 2]
    big = torch.finfo(points.dtype).max
    lo = torch.where(heavy[..., None], points, torch.full_like(points, big)).min(dim=1).values
    hi = torch.where(heavy[..., None], points, torch.full_like(points, -big)).max(dim=1).values
    cell = torch.stack([grid.z1[:, 1] - grid.z1[:, 0], grid.z2[:, 1] - grid.z2[:, 0]], dim=1)
    half = ((hi - lo) / 2 + cell).max(dim=1, keepdim=True).values
    return (lo + hi) / 2, half


@torch.no_grad()
def fit_grid(
    log_joint: Callable[[Tensor], Tensor],
    batch: int,
    *,
    size: int = 60,
    search_radius: float = 6.0,
    search_size: int = 100,
    mass_floor: float = 1e-5,
    pad: float = 1.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Grid:
    """A per-example square window focused on the true posterior.

    A search grid on ``[-R, R]^2`` locates the cells where the grid-normalised posterior exceeds
    ``mass_floor``; a second search grid over that box refines it; the final window is the refined
    box scaled by ``pad``. q and q_IW are compared with the posterior inside this window, their
    mass outside it counting fully towards the distance.
    """
    bound = torch.full((batch, 2), search_radius, dtype=dtype, device=device)
    centre, half = _heavy_box(log_joint, _centred_grid(-bound, bound, search_size), mass_floor)
    centre, half = _heavy_box(log_joint, _centred_grid(centre - half, centre + half, search_size), mass_floor)
    return _centred_grid(centre - pad * half, centre + pad * half, size)


def cell_area(grid: Grid) -> Tensor:
    """Area of one cell per example, ``[batch]``."""
    return (grid.z1[:, 1] - grid.z1[:, 0]) * (grid.z2[:, 1] - grid.z2[:, 0])


def pool(probs: Tensor, factor: int) -> Tensor:
    """Sum ``[batch, G, G]`` cell probabilities over ``factor x factor`` blocks (G divisible by ``factor``)."""
    batch, g, _ = probs.shape
    return probs.reshape(batch, g // factor, factor, g // factor, factor).sum(dim=(2, 4))


def total_variation(log_probs: Tensor, hist: Tensor, outside: Tensor | None = None) -> Tensor:
    """TV between grid distributions ``[batch, G, G]``; mass a histogram puts outside the grid counts fully."""
    tv = 0.5 * (torch.exp(log_probs) - hist).abs().sum(dim=(1, 2))
    if outside is not None:
        tv = tv + 0.5 * outside
    return tv


@dataclass
class PosteriorReport:
    """Distances on the grid between the true posterior and q_IW, per k (keys ``str(k)``), one value per digit.

    The grid is a window around the true posterior (see :func:`fit_grid`).
    ``tv_density``: total variation between the grid-normalised true posterior and q_IW's cell
    probabilities, density x cell area (Monte Carlo over ``n_outer`` draws of the other proposals;
    k = 1 is q exactly), q_IW's mass outside the window (``1 - mass_in_window``) counting fully.
    ``tv_hist``: the same against a histogram of ``n_draws`` SIR draws (on 3 x 3 blocks of cells), which
    carries Monte Carlo noise of about ``tv_hist_floor`` (the TV of a histogram of as many exact draws
    from the grid posterior).
    """

    ks: list[int]
    n_draws: int
    n_outer: int
    grid_size: int
    tv_density: dict[str, list[float]]
    mass_in_window: dict[str, list[float]]
    tv_hist: dict[str, list[float]]
    tv_hist_floor: list[float]
    recon_log_lik_q: list[float]
    recon_log_lik_q_iw: list[float]
    labels: list[int | None]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_tv_density"] = {k: float(np.mean(v)) for k, v in self.tv_density.items()}
        data["mean_tv_hist"] = {k: float(np.mean(v)) for k, v in self.tv_hist.items()}
        data["mean_tv_hist_floor"] = float(np.mean(self.tv_hist_floor))
        data["mean_recon_log_lik_q"] = float(np.mean(self.recon_log_lik_q))
        data["mean_recon_log_lik_q_iw"] = float(np.mean(self.recon_log_lik_q_iw))
        return data


def _grid_draws(log_probs: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Histogram of ``n`` exact draws from a grid distribution: the Monte Carlo floor of the TV estimate."""
    batch = log_probs.shape[0]
    probs = torch.exp(log_probs).reshape(batch, -1)
    picks = torch.multinomial(probs, n, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(1, picks, torch.ones_like(picks, dtype=probs.dtype))
    return (counts / n).reshape_as(log_probs)


def require_2d(model: LatentVariableModel) -> None:
    """Raise a one-line ``ValueError`` unless the model has one stochastic layer with a 2-D latent."""
    dims = model.config.latent_dims
    if len(dims) != 1 or dims[0] != 2:
        raise ValueError(
            f"the posterior picture needs one stochastic layer with a 2-D latent, this run has latent_dims={dims}; "
            "train one with 'iwae train --latent-dims 2 --objective iwae --k 50'"
        )


@torch.no_grad()
def posterior_study(
    model: LatentVariableModel,
    x: Tensor,
    ks: list[int],
    *,
    n_draws: int = 1000,
    n_outer: int = 100,
    grid_size: int = 60,
    seed: int = 0,
    labels: list[int | None] | None = None,
    progress: bool = False,
) -> tuple[PosteriorReport, dict[str, Tensor]]:
    """True posterior, q and q_IW (for each k) on a grid for each example of ``x`` (``[batch, x_dim]``).

    Args:
        model: a model with one 2-D stochastic layer (:func:`require_2d`).
        x: ``[batch, x_dim]`` binarised examples.
        ks: the proposal counts of q_IW.
        n_draws: SIR draws per example for the histograms.
        n_outer: draws of the other proposals in q_IW's density (:func:`q_iw_log_density`).
        grid_size: G, cells per side of the window (:func:`fit_grid`).
        seed: the random source.
        labels: the examples' digits, for the report.
        progress: show a progress bar.

    Returns:
        ``(report, arrays)``; the arrays for plotting are ``log_post``, ``log_q``, ``log_qiw_<k>`` and
        ``hist_<k>`` (``[batch, G, G]``), ``z1``/``z2`` (``[batch, G]``), ``recon_q`` and ``recon_q_iw``
        (``[batch, x_dim]``).
    """
    require_2d(model)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    log_joint = model_log_joint(model, x)
    search = min(150, max(60, 2 * grid_size))
    grid = fit_grid(log_joint, x.shape[0], size=grid_size, search_size=search, dtype=x.dtype, device=x.device)
    log_area = torch.log(cell_area(grid)).double()[:, None]
    joint_values = log_density_values(log_joint, grid)
    q_values = log_density_values(model_log_q(model, x), grid)
    log_post = normalise_on_grid(joint_values, grid_size)
    arrays: dict[str, Tensor] = {"log_post": log_post, "z1": grid.z1, "z2": grid.z2}
    # q's and q_IW's probability of each cell: density x cell area (not renormalised over the window).
    arrays["log_q"] = (q_values + log_area).reshape(-1, grid_size, grid_size)
    hist_pool = 3 if grid_size % 3 == 0 else 1  # histograms are compared on 3 x 3 blocks of cells (less noise)
    coarse_post = torch.log(pool(torch.exp(log_post), hist_pool))
    tv_density: dict[str, list[float]] = {}
    tv_hist: dict[str, list[float]] = {}
    q_mass: dict[str, list[float]] = {}
    for k in tqdm(ks, desc="q_IW", disable=not progress):
        qiw_values = q_iw_log_density(model, x, joint_values - q_values, q_values, k, n_outer, generator)
        cells = torch.exp(qiw_values + log_area).reshape(-1, grid_size, grid_size)
        arrays[f"log_qiw_{k}"] = torch.log(cells)
        inside = cells.sum(dim=(1, 2))
        q_mass[str(k)] = inside.tolist()
        tv_density[str(k)] = total_variation(log_post, cells, (1 - inside).clamp_min(0)).tolist()
        hist, outside = grid.histogram(sir_sample(model, x, k, n_draws, generator)[0])
        arrays[f"hist_{k}"] = hist
        tv_hist[str(k)] = total_variation(coarse_post, pool(hist, hist_pool), outside).tolist()
    floor = total_variation(coarse_post, pool(_grid_draws(log_post, n_draws, generator), hist_pool))
    # Reconstructions: E[x | z] for one draw from q and one from q_IW with the largest k.
    z_q = sir_sample(model, x, 1, 1, generator)[0][0]
    z_iw = sir_sample(model, x, max(ks), 1, generator)[0][0]
    arrays["recon_q"], arrays["recon_q_iw"] = model.observation_mean(z_q), model.observation_mean(z_iw)
    # Expected reconstruction log-likelihood E log p(x | z) under q and under q_IW (200 draws each).
    recon_q = model.observation_log_prob(x, sir_sample(model, x, 1, 200, generator)[0]).double().mean(dim=0)
    recon_iw = model.observation_log_prob(x, sir_sample(model, x, max(ks), 200, generator)[0]).double().mean(dim=0)
    report = PosteriorReport(
        ks=list(ks),
        n_draws=n_draws,
        n_outer=n_outer,
        grid_size=grid_size,
        tv_density=tv_density,
        mass_in_window=q_mass,
        tv_hist=tv_hist,
        tv_hist_floor=floor.tolist(),
        recon_log_lik_q=recon_q.tolist(),
        recon_log_lik_q_iw=recon_iw.tolist(),
        labels=labels if labels is not None else [None] * x.shape[0],
    )
    return report, arrays


def plot_posteriors(x: Tensor, arrays: dict[str, Tensor], ks: list[int], path: Path) -> Path:
    """One row per example: the digit, the true posterior, q, and q_IW's histograms for each k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = x.shape[0]
    cols = 3 + len(ks)
    fig, axes = plt.subplots(batch, cols, figsize=(2.3 * cols, 2.3 * batch), squeeze=False)
    for b in range(batch):
        z1, z2 = arrays["z1"][b].cpu().numpy(), arrays["z2"][b].cpu().numpy()
        extent = (z1[0], z1[-1], z2[0], z2[-1])
        axes[b, 0].imshow(x[b].reshape(28, 28).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        panels = [("true posterior", torch.exp(arrays["log_post"][b])), ("q(z|x)", torch.exp(arrays["log_q"][b]))]
        panels += [(f"q_IW k={k} (SIR draws)", arrays[f"hist_{k}"][b]) for k in ks]
        for c, (title, image) in enumerate(panels, start=1):
            axes[b, c].imshow(image.cpu().numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
            axes[b, c].contour(z1, z2, torch.exp(arrays["log_post"][b]).cpu().numpy(), levels=4, colors="w",
                               linewidths=0.5)  # fmt: skip
            if b == 0:
                axes[b, c].set_title(title, fontsize=9)
        for axis in axes[b]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_title("data", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=90)
    plt.close(fig)
    return path


def plot_reconstructions(x: Tensor, arrays: dict[str, Tensor], k: int, path: Path) -> Path:
    """Three rows: the data, E[x|z] with z ~ q, E[x|z] with z ~ q_IW (k proposals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iwae.sampling import image_grid

    rows = torch.cat([x, arrays["recon_q"], arrays["recon_q_iw"]], dim=0)
    fig, axis = plt.subplots(figsize=(1.2 * x.shape[0] + 1, 4))
    axis.imshow(image_grid(rows, rows=3), cmap="gray", vmin=0, vmax=1)
    axis.set_title(f"data / reconstruction from q / from q_IW (k={k})", fontsize=9)
    axis.axis("off")
    atomic_save_figure(path, fig, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def posterior_run(
    run_dir: str | Path,
    *,
    ks: list[int],
    digits: int = 4,
    n_draws: int = 1000,
    n_outer: int = 100,
    grid_size: int = 60,
    out_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """The posterior study on the first ``digits`` test examples of a run (binarised once); writes PNGs and JSON."""
    from iwae.checkpoint import atomic_write_text
    from iwae.data import binarize, load_dataset
    from iwae.runs import load_model, resolve_device

    torch_device = resolve_device(device)
    model, config = load_model(Path(run_dir), torch_device)
    require_2d(model)
    data = load_dataset(config.dataset, data_dir, progress=progress)
    test = data.test.subset(digits).to(torch_device)
    x = binarize(test.images, data.binarization, torch.Generator(device=torch_device).manual_seed(seed))
    labels = None if test.labels is None else [int(v) for v in test.labels.tolist()]
    report, arrays = posterior_study(
        model, x, ks, n_draws=n_draws, n_outer=n_outer, grid_size=grid_size, seed=seed, labels=labels, progress=progress
    )
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "posterior"
    out.mkdir(parents=True, exist_ok=True)
    result = report.to_dict()
    result["run"] = str(run_dir)
    result["posterior_png"] = str(plot_posteriors(x, arrays, ks, out / "posterior.png"))
    result["reconstructions_png"] = str(plot_reconstructions(x, arrays, max(ks), out / "reconstructions.png"))
    atomic_write_text(out / "posterior.json", json.dumps(result, indent=2) + "\n")
    return result
