"""iwae.sampling: images tiled into a grid row by row, and interpolations that start and end at the decoded
posterior means of their two examples."""

from __future__ import annotations

import numpy as np
import torch

from iwae.models import LatentVariableModel, ModelConfig
from iwae.sampling import image_grid, interpolations


def test_image_grid_tiles_row_by_row_with_padding() -> None:
    images = torch.arange(1, 6, dtype=torch.float32)[:, None].expand(5, 6) / 8  # 5 images of 2 x 3, each one value
    grid = image_grid(images, rows=2, shape=(2, 3), pad=1)
    assert grid.shape == (2 * 3 - 1, 3 * 4 - 1)  # 3 columns: ceil(5 / 2)
    for index in range(5):
        r, c = divmod(index, 3)
        np.testing.assert_array_equal(grid[3 * r : 3 * r + 2, 4 * c : 4 * c + 3], (index + 1) / 8)
    assert (grid[2, :] == 1).all() and (grid[:, 3] == 1).all()  # the padding is white
    np.testing.assert_array_equal(grid[3:, 8:], 1)  # the sixth cell, which has no image


def test_interpolations_run_from_one_posterior_mean_to_the_other() -> None:
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=12, latent_dims=(4, 3), hidden_dims=((8,), (6,)))).eval()
    x = torch.bernoulli(torch.full((4, 12), 0.5), generator=torch.Generator().manual_seed(1))
    lines = interpolations(model, x[:2], x[2:], steps=5).reshape(2, 5, 12)
    with torch.no_grad():
        start = model.decode_top(model.encode_means(x[:2])[-1], sample=False)
        end = model.decode_top(model.encode_means(x[2:])[-1], sample=False)
    torch.testing.assert_close(lines[:, 0], start)
    torch.testing.assert_close(lines[:, -1], end)
    assert not torch.allclose(lines[:, 2], start) and not torch.allclose(lines[:, 2], end)
