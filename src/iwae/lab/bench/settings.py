"""What ``iwae bench`` measures: :class:`BenchSettings`, the full and quick presets, and the fixed constants."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from iwae.config import BURDA_STAGES
from iwae.data import IDX_VALIDATION_IMAGES

EVAL_K = 5000
TRAIN_IMPLS = ("iwae", "plain", "pyro")
POOL_BATCHES = 4  # distinct pre-binarised minibatches cycled through by every training benchmark
BURDA_PASSES = sum(epochs for epochs, _ in BURDA_STAGES)  # 3,280 passes over the training set
BURDA_TRAIN_IMAGES = 60_000 - IDX_VALIDATION_IMAGES  # MNIST training images in Burda's split: 59,600
BURDA_BATCH = 20
MIN_TIMED_SECONDS = 2e-3  # matmul timings loop a call until one repeat takes at least this long
TRAINING_MIN_SECONDS = 0.1  # a repeat of a training step runs consecutive steps for at least this long


@dataclass(frozen=True)
class BenchSettings:
    """What ``iwae bench`` measures; :func:`full_settings` and :func:`quick_settings` are the presets."""

    mode: str = "full"
    layers: tuple[int, ...] = (1, 2)
    ks: tuple[int, ...] = (1, 5, 50)
    batches: tuple[int, ...] = (20, 100, 1000)
    repeats: int = 11
    warmup: int = 3
    threads: int | None = None  # None: torch's default
    device: str = "auto"
    pyro: bool = True
    n_train: int = 1000  # the first N training images feed the training benchmarks
    eval_images: int = 1000
    eval_batch_size: int = 100
    eval_repeats: int = 1  # L_5000 passes over the eval images; the median is reported
    compile: bool = False  # iwae's steps as `iwae train --compile` takes them
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not (self.layers and self.ks and self.batches) or min((*self.ks, *self.batches)) < 1:
            raise ValueError("the grid needs at least one layer count, k >= 1 and batch >= 1")
        if not set(self.layers) <= {1, 2}:
            raise ValueError(f"layers must be 1 or 2 (Burda's architectures), got {self.layers}")
        if min(self.eval_images, self.eval_batch_size, self.eval_repeats, self.n_train) < 1:
            raise ValueError("eval_images, eval_batch_size, eval_repeats and n_train must be >= 1")

    def grid(self) -> list[tuple[int, int, int]]:
        """(layers, k, batch) in the order measured."""
        return list(itertools.product(self.layers, self.ks, self.batches))


def full_settings(**changes: Any) -> BenchSettings:
    """The whole grid: layers 1 and 2, k in {1, 5, 50}, batch in {20, 100, 1000}, L_5000 on 1,000 images."""
    return replace(BenchSettings(), **changes)


def quick_settings(**changes: Any) -> BenchSettings:
    """The quick preset: one layer, k in {5, 50}, batch in {20, 100}, L_5000 on 20 images (5 passes).

    How long it takes: ``iwae bench --help`` (docs/cli.md#iwae-bench).
    """
    quick = BenchSettings(
        mode="quick",
        layers=(1,),
        ks=(5, 50),
        batches=(20, 100),
        repeats=7,
        warmup=2,
        eval_images=20,
        eval_batch_size=20,
        eval_repeats=5,
    )
    return replace(quick, **changes)
