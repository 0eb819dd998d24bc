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


# -- the bound family (Rainforth et al. 2018; Daudel et al. 2022) ---------------------------------
# For 0 < |p| < _TINY_POWER the power mean is ``mean + p var / 2`` (its expansion around p = 0, error O(p^2)).
_TINY_POWER = 1e-8


def group_log_weights(log_w: Tensor, M: int) -> Tensor:
    """Split ``[k, batch]`` log-weights into M groups of K = k / M: ``[M, K, batch]``.

    Grouping is contiguous, ``log_w.reshape(M, K, batch)``: group m holds samples m*K .. (m+1)*K - 1.
    """
    _check_log_weights(log_w)
    k = log_w.shape[0]
    if M < 1 or k % M:
        raise ValueError(f"k = {k} samples cannot be split into M = {M} equal groups; choose k a multiple of M")
    return log_w.reshape(M, k // M, *log_w.shape[1:])


def miwae_bound(log_w: Tensor, M: int) -> Tensor:
    """MIWAE(M, K): the mean over M groups of IWAE_K bounds, k = M * K. ``[k, batch] -> [batch]``.

    Grouping as in :func:`group_log_weights`. M = 1 is IWAE_k; M = k is the ELBO.
    """
    groups = group_log_weights(log_w, M)
    return log_mean_exp(groups, dim=1).mean(dim=0)


def ciwae_bound(log_w: Tensor, beta: float) -> Tensor:
    """CIWAE(beta) = beta * ELBO + (1 - beta) * IWAE_k. ``[k, batch] -> [batch]``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"CIWAE needs 0 <= beta <= 1, got {beta}")
    return beta * elbo(log_w) + (1.0 - beta) * iwae_bound(log_w)


def piwae_bounds(log_w: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """PIWAE(M, K)'s two targets, ``(decoder: IWAE_{MK}, encoder: MIWAE(M, K))``, each ``[batch]``."""
    return iwae_bound(log_w), miwae_bound(log_w, M)


def power_mean_bound(log_w: Tensor, p: float) -> Tensor:
    """The power-mean bound ``L_p^k = (1/p) log (1/k) sum_i w_i^p``. ``[k, batch] -> [batch]``.

    p = 1 is IWAE_k; p -> 0 is the ELBO (exactly at p = 0). For fixed log-weights it rises with p
    (the power-mean inequality). With ``y_i = p log w_i - max_j p log w_j``, the log-mean is taken as
    ``log1p(mean expm1(y))`` where all ``y_i > -1`` (no cancellation when p is small) and by
    ``logsumexp`` otherwise, so the division by a small p stays accurate in float32.
    """
    _check_log_weights(log_w)
    if not math.isfinite(p):
        raise ValueError(f"the power p must be finite, got {p}")
    if p == 0.0:
        return elbo(log_w)
    if abs(p) < _TINY_POWER:
        mean = log_w.mean(dim=0)
        return mean + p * (log_w - mean).square().mean(dim=0) / 2
    scaled = p * log_w
    top = scaled.max(dim=0).values
    shifted = scaled - top  # <= 0
    near = torch.log1p(torch.expm1(shifted).mean(dim=0))
    far = torch.logsumexp(shifted, dim=0) - math.log(log_w.shape[0])
    return (top + torch.where(shifted.min(dim=0).values > -1.0, near, far)) / p


def vr_iwae_bound(log_w: Tensor, alpha: float) -> Tensor:
    """VR-IWAE(alpha) = ``1/(1-alpha) log (1/k) sum_i w_i^(1-alpha)``. ``[k, batch] -> [batch]``.

    The power mean with p = 1 - alpha: alpha = 0 is IWAE_k, alpha -> 1 the ELBO; it falls as alpha rises.
    """
    return power_mean_bound(log_w, 1.0 - alpha)
