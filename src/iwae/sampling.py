"""Pictures of a trained model: prior samples, reconstructions and latent interpolations (one PNG).

Shape convention: images are ``[n, x_dim]`` Bernoulli means, reshaped to the dataset's image shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from iwae.checkpoint import WriteError, atomic_save_figure
from iwae.data import binarize, load_dataset
from iwae.models import LatentVariableModel
from iwae.runs import load_model, resolve_device


def image_grid(images: Tensor, rows: int, shape: tuple[int, int] = (28, 28), pad: int = 1) -> np.ndarray:
    """Tile ``[n, h*w]`` images into a ``rows x (n / rows)`` grid with ``pad`` pixels between them."""
    images = images.detach().cpu().reshape(-1, *shape).numpy()
    cols = int(np.ceil(images.shape[0] / rows))
    height, width = shape
    grid = np.ones((rows * (height + pad) - pad, cols * (width + pad) - pad), dtype=np.float32)
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        grid[r * (height + pad) : r * (height + pad) + height, c * (width + pad) : c * (width + pad) + width] = image
    return grid


@torch.no_grad()
def interpolations(model: LatentVariableModel, x_start: Tensor, x_end: Tensor, steps: int = 10) -> Tensor:
    """Decode straight lines between the top-layer posterior means of pairs of examples.

    Returns ``[pairs * steps, x_dim]``, row by row (one row per pair).
    """
    start, end = model.encode_means(x_start)[-1], model.encode_means(x_end)[-1]
    weights = torch.linspace(0, 1, steps, device=start.device)[None, :, None]
    path = start[:, None, :] * (1 - weights) + end[:, None, :] * weights  # [pairs, steps, d]
    return model.decode_top(path.reshape(-1, path.shape[-1]), sample=False)


@torch.no_grad()
def sample_figure(
    model: LatentVariableModel,
    test_images: Tensor,
    binarization: str,
    out_path: Path,
    *,
    seed: int = 0,
    n: int = 100,
    title: str = "",
    shape: tuple[int, int] = (28, 28),
) -> Path:
    """Write one PNG with three panels: prior samples, data vs reconstructions, interpolations.

    Args:
        model: the trained model.
        test_images: ``[n_test, x_dim]`` grey levels; the first 20 are binarised and reconstructed.
        binarization: the dataset's binarisation (:func:`iwae.data.binarize`).
        out_path: the PNG, written atomically.
        seed: the random source of samples, binarisation and reconstructions.
        n: how many prior samples (a square number fills the panel).
        title: the figure's title.
        shape: an image's ``(height, width)``.

    Returns:
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = model.sample(n, generator)
    x = binarize(test_images[:20].to(device), binarization, generator)
    recon = model.reconstruct(x, generator)
    pairs = torch.stack([x[:10], recon[:10], x[10:20], recon[10:20]]).reshape(-1, x.shape[-1])
    lines = interpolations(model, x[:5], x[5:10])

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1, 1, 1]})
    panels = [
        (image_grid(samples, rows=int(np.sqrt(n)), shape=shape), "samples from the prior (Bernoulli means)"),
        (image_grid(pairs, rows=4, shape=shape), "test data (rows 1, 3) and reconstructions (rows 2, 4)"),
        (image_grid(lines, rows=5, shape=shape), "interpolations between posterior means"),
    ]
    for axis, (grid, label) in zip(axes, panels, strict=True):
        axis.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(out_path.parent, error, existed=False) from error
    atomic_save_figure(out_path, fig, dpi=100)
    plt.close(fig)
    return out_path


def sample_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
) -> Path:
    """:func:`sample_figure` of a run's model on its dataset's test images; ``out`` defaults to ``RUN/samples.png``."""
    run_dir = Path(run_dir)
    model, config = load_model(run_dir, resolve_device(device))
    data = load_dataset(config.dataset, data_dir, progress=False)
    title = f"{run_dir.name}: {config.objective.label()} k={config.k}, {config.model.n_stochastic} stochastic layer(s)"
    out_path = Path(out) if out is not None else run_dir / "samples.png"
    return sample_figure(
        model, data.test.images, data.binarization, out_path, seed=seed, title=title, shape=data.image_shape
    )
