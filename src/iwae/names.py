"""The built-in names and protocol choices, in a module that imports nothing heavy.

Datasets, objectives, gradient estimators, activations, devices, the seeds' range, and the choices of the training
and evaluation protocols. The command line offers and checks them before it loads PyTorch, so that
``iwae train --help`` and a mistyped ``--objective`` answer at once. The registries are the truth
(:data:`iwae.data.DATASETS`, :func:`iwae.objectives.objective_names`, :data:`iwae.estimators.ESTIMATOR_NAMES`,
the keys of :data:`iwae.models.ACTIVATIONS`); ``tests/test_names.py`` and ``tests/test_settings.py`` check that
these lists equal them. The protocol choices below have no other home: the training settings (:mod:`iwae.settings`), the
configuration (:mod:`iwae.config`), the data (:mod:`iwae.data`), evaluation (:mod:`iwae.evaluate`), the lab and the
command line take them from here.
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
ACTIVATION_NAMES: tuple[str, ...] = ("tanh", "relu", "softplus")  # the hidden layers' (iwae.models.ACTIVATIONS)
MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED: the configuration checks them, and the command line before torch
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # the devices iwae.runs.resolve_device takes

# The training protocol's choices (iwae.config.TrainConfig; docs/protocol.md), the first of each the default.
OPTIMIZERS: tuple[str, ...] = ("adam", "burda-adam")  # torch.optim.Adam, or the authors' iwae.optim.BurdaAdam
DATA_ORDERS: tuple[str, ...] = ("shuffled", "fixed")  # fixed: the authors' order
LOSS_REDUCTIONS: tuple[str, ...] = ("mean", "sum")  # the minibatch's loss; sum: the authors' code
BINARIZATIONS: tuple[str, ...] = ("dynamic", "threshold")  # for grey-level data (None in a config: the dataset's own)
TRAIN_SPLITS: tuple[str, ...] = ("train", "train+valid")  # Burda's 59,600 MNIST images, or all 60,000
OUTPUT_BIASES: tuple[str, ...] = ("data-mean", "zero")  # the decoder's output bias at the start; data-mean: Burda's
PROTOCOLS: tuple[str, ...] = ("default", "authors")
BATCH_SCHEDULES: tuple[str, ...] = ("fixed", "grow")  # grow: Smith et al.'s growing minibatch (iwae.config)
LR_SCALES: tuple[str, ...] = ("none", "linear", "sqrt")  # the learning rates scaled for a minibatch other than 20
# Evaluation: whose inactive units the pruned NLL leaves out (iwae.evaluate), and the authors' L_k minibatch
# (measure_marginal_log_likelihood in yburda/iwae).
UNIT_DEFINITIONS: tuple[str, ...] = ("ours", "authors")
EVAL_SPLITS: tuple[str, ...] = ("test", "train", "valid")  # the splits an evaluation reads, the first the default
AUTHORS_EVAL_BATCH = 20
# Whether runs that train together take one vmapped step (iwae.steps.stacks): iwae train --stack, iwae sweep --stack.
STACK_CHOICES: tuple[str, ...] = ("auto", "on", "off")
