"""The names of the built-in datasets, objectives and gradient estimators, in a module that imports nothing.

The command line offers and checks them before it loads PyTorch, so that ``iwae train --help`` and a mistyped
``--objective`` answer at once. The registries are the truth (:data:`iwae.data.DATASETS`,
:func:`iwae.objectives.objective_names`, :data:`iwae.estimators.ESTIMATOR_NAMES`); ``tests/test_cli_commands.py``
checks that these lists equal them.
"""

from __future__ import annotations

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
