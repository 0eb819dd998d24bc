"""Variational bounds as pure functions of log-weights.

Shape convention (used throughout the package): samples first. Log-weights
``log_w[i, b] = log p(x_b, h_ib) - log q(h_ib | x_b)`` have shape ``[k, batch]``;
every bound reduces the sample dimension and returns ``[batch]``.

All reductions are done in log-space with ``logsumexp``. Functions that combine
thousands of terms (``log_mean_exp_chunks``) accumulate in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def _check_log_weights(log_w: Tensor) -> None:
    if log_w.dim() < 1 or log_w.shape[0] < 1:
        raise ValueError(f"log-weights must have shape [k, batch, ...] with k >= 1, got {tuple(log_w.shape)}")


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """``log (1/k) sum_i exp(log_w_i)`` along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def elbo(log_w: Tensor) -> Tensor:
    """The VAE bound with k samples: ``mean_i log w_i``. ``[k, batch] -> [batch]``."""
    _check_log_weights(log_w)
    return log_w.mean(dim=0)


def iwae_bound(log_w: Tensor) -> Tensor:
    """The IWAE bound ``L_k = log (1/k) sum_i w_i``. ``[k, batch] -> [batch]``.

    Equal to :func:`elbo` for k = 1 (exactly: ``logsumexp`` of one term is the term).
    """
    _check_log_weights(log_w)
    if log_w.shape[0] == 1:
        return log_w[0]
    return log_mean_exp(log_w, dim=0)


def normalized_weights(log_w: Tensor) -> Tensor:
    """Self-normalised importance weights ``w~_i = w_i / sum_j w_j``. ``[k, batch] -> [k, batch]``."""
    _check_log_weights(log_w)
    return torch.softmax(log_w, dim=0)


class LogMeanExpAccumulator:
    """Streaming ``log mean exp`` over sample chunks, accumulated in float64.

    Feed chunks of shape ``[c, batch]`` with :meth:`add`; :meth:`result` returns
    ``log (1/n) sum exp`` over all ``n`` samples seen, shape ``[batch]``, in float64.
    Memory stays bounded by one chunk whatever the total number of samples.
    """

    def __init__(self) -> None:
        self._max: Tensor | None = None
        self._sum: Tensor | None = None  # sum of exp(log_w - max), float64
        self.count = 0

    def add(self, log_w_chunk: Tensor) -> None:
        _check_log_weights(log_w_chunk)
        chunk = log_w_chunk.detach().to(torch.float64)
        chunk_max = chunk.max(dim=0).values
        if self._max is None:
            new_max = chunk_max
            self._sum = torch.zeros_like(chunk_max)
        else:
            new_max = torch.maximum(self._max, chunk_max)
            self._sum = self._sum * torch.exp(self._max - new_max)
        self._sum = self._sum + torch.exp(chunk - new_max).sum(dim=0)
        self._max = new_max
        self.count += chunk.shape[0]

    def result(self) -> Tensor:
        if self._max is None or self._sum is None:
            raise ValueError("no log-weights were added")
        return self._max + torch.log(self._sum) - math.log(self.count)


def log_mean_exp_chunks(chunks: Iterable[Tensor]) -> Tensor:
    """``log mean exp`` over the concatenation of ``[c, batch]`` chunks, in float64. Returns ``[batch]``."""
    accumulator = LogMeanExpAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    return accumulator.result()
