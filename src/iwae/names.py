"""The names of the built-in datasets, objectives and gradient estimators, the devices and the seeds' range, in a
module that imports nothing heavy.

The command line offers and checks them before it loads PyTorch, so that ``iwae train --help`` and a mistyped
``--objective`` answer at once. The registries are the truth (:data:`iwae.data.DATASETS`,
:func:`iwae.objectives.objective_names`, :data:`iwae.estimators.ESTIMATOR_NAMES`); ``tests/test_cli_commands.py``
checks that these lists equal them.
"""

from __future__ import annotations

import re

DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    "omniglot",
    "omniglot-lake",
    "omniglot-small",
    "mnist-fixed",
)
OBJECTIVE_NAMES: tuple[str, ...] = ("vae", "iwae", "miwae", "piwae", "ciwae", "power", "vr")
ESTIMATOR_NAMES: tuple[str, ...] = ("standard", "stl", "dreg")
MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED: the configuration checks them, and the command line before torch
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # the devices iwae.runs.resolve_device takes
