"""iwae: importance-weighted variational inference (VAE, IWAE and successors) in PyTorch.

Shape convention throughout the package: samples first. Log-weights are ``[k, batch]``,
latent samples ``[k, batch, d]``, data ``[batch, x_dim]``.
"""

__version__ = "0.1.0"
