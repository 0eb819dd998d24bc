"""The flat training settings, each declared once: its name, its ``iwae train`` option, how that option's text is
read, its choices, its default, its help, and its simple checks. Imports nothing heavy (the standard library and
:mod:`iwae.names`): the command line builds its parser from this table before it loads PyTorch.

A *flat setting* is a key that :func:`iwae.config.build_train_config` takes: a :class:`~iwae.config.TrainConfig`
field (``k``, ``data_order``, ...; ``field=True``) or a key it builds fields from (``objective`` with ``M``,
``beta``, ``p`` and ``alpha``; ``layers``, ``latent_dims``, ``hidden_dims`` and ``activation``; ``schedule``,
``epochs``, ``lr``, ``batch_schedule``, ``lr_scale`` and ``k_schedule``; ``protocol``). Every one is a
:class:`Setting` in :data:`SETTINGS`, in the order of ``iwae train --help``. What reads the table:

- ``iwae train``'s parser: one option per setting with ``flag=True`` (:func:`iwae.cli.common.add_setting`), and
  ``iwae.cli.run.TRAIN_SETTINGS``, the arguments it hands to the builder;
- :class:`~iwae.config.TrainConfig`, which checks each of its fields with :meth:`Setting.check`, and
  :func:`~iwae.config.build_train_config`, which checks every setting it is given the same way, takes the defaults
  of the keys it builds from :data:`DEFAULTS`, and knows the keys :func:`setting_names` lists (so do a sweep grid
  and a report's rows); ``tests/test_settings.py`` checks that :data:`DEFAULTS` are the configuration's defaults;
- ``docs/cli.md``, whose ``iwae train --help`` text ``tests/test_settings.py`` checks against the table
  (``python docs/_ext/cli_help.py`` rewrites it).

The options of ``iwae train`` that are not settings (``--out``, ``--resume``, ``--max-epochs``, ``--compile``,
``--seeds``, ``--checkpoint-minutes``, ``--device``, ``--data-dir``, ``--no-progress``) stay explicit
``add_argument`` calls in ``iwae.cli.run.register``: they say how one call runs, not what the run is, so they are
neither in a run's ``config.json`` nor keys of a sweep grid, and a table of them would be argparse again.
``--init-from`` and ``--fresh-optimizer`` are settings (``TrainConfig`` fields), which the command line reads
from the table and then resolves (the run's path; ``--fresh-optimizer`` only beside ``--init-from``).

A table rather than ``dataclasses.field(metadata=...)`` on ``TrainConfig``: the configuration imports PyTorch (its
model, objective and estimator), which ``iwae --help`` and usage errors must not wait for; and half of the settings
are not fields of it (the objective's parameters, the model's sizes, the schedule's parts).

The simple checks are a setting's :class:`Kind` (a whole number, a fraction, ...) and its choices, each a
:class:`Check`. A value breaking one is a one-line ``ValueError``: ``"k must be >= 1, got 0"`` names the part that
failed; a setting that may be left out (default ``None``) names the whole:
``"train_limit must be a whole number >= 1, got -5"``. The names of a registry that can grow at run time
(objectives, estimators, activations: the setting's ``registry``) are the registry's to check. Checks that relate
settings (a schedule's length, an objective's parameters against ``k``, the protocol's settings) stay with the
builder and the configuration. The argparse types of the settings' options (:func:`positive_int`, ...) are here
too, beside the checks they mirror; the command modules import them from ``iwae.cli.common``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

from iwae.names import (
    ACTIVATION_NAMES,
    BATCH_SCHEDULES,
    BINARIZATIONS,
    DATA_ORDERS,
    DATASET_NAMES,
    ESTIMATOR_NAMES,
    LOSS_REDUCTIONS,
    LR_SCALES,
    MAX_SEED,
    OBJECTIVE_NAMES,
    OPTIMIZERS,
    OUTPUT_BIASES,
    PROTOCOLS,
    TRAIN_SPLITS,
)


# -- reading a value from the command line's text (argparse types) ------------------------------------------------
# Each returns the value or raises argparse.ArgumentTypeError, whose message argparse prints as it is. The iwae.cli
# modules import them from iwae.cli.common.
def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def _comma_separated(text: str, expected: str) -> list[int]:
    """Whole numbers separated by commas (empty items skipped); else ``expected`` in the argparse error."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1, in the order given."""
    values = _comma_separated(text, "comma-separated whole numbers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def seed(text: str) -> int:
    """argparse type: a seed, a whole number 0..:data:`iwae.names.MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number 0..{MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed 0..{MAX_SEED}, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated seeds (0..:data:`iwae.names.MAX_SEED`), in the order given."""
    values = _comma_separated(text, "comma-separated whole numbers such as 0,1,2")
    if not values or len(set(values)) != len(values) or not 0 <= min(values) <= max(values) <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected distinct seeds 0..{MAX_SEED}, got {text!r}")
    return values


def _number(text: str, accept: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def schedule(text: str) -> str:
    """argparse type: ``burda`` or ``burda:S``, S a whole number (the range is checked with the configuration)."""
    name, colon, count = text.partition(":")
    if name != "burda" or (colon and not count.isdecimal()):
        raise argparse.ArgumentTypeError(f"expected 'burda' or 'burda:S' with S = 1..8 stages, got {text!r}")
    return text


# -- what a value must be ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One simple check of a value: ``test(value)`` is true, else the value is not ``expected`` (``"a whole
    number"``, ``">= 1"``, ``"one of mean, sum"``), which the error says."""

    test: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class Kind:
    """The values a setting takes: ``parse`` reads one from the command line's text (an argparse type; ``None``: a
    switch, given or not), and ``checks``, in order, test a value given any other way (a grid, ``config.json``)."""

    parse: Callable[[str], Any] | None
    checks: tuple[Check, ...] = ()


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _wholes(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_whole(v) and v >= 1 for v in value)


IS_WHOLE = Check(_whole, "a whole number")
IS_NAME = Check(lambda v: isinstance(v, str), "a name")
COUNT = Kind(positive_int, (IS_WHOLE, Check(lambda v: v >= 1, ">= 1")))
SEED = Kind(seed, (IS_WHOLE, Check(lambda v: 0 <= v <= MAX_SEED, f"0..{MAX_SEED}")))
FRACTION = Kind(fraction, (Check(lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),))
POSITIVE = Kind(positive_float, (Check(lambda v: _finite(v) and v > 0, "a finite number > 0"),))
NUMBER = Kind(float, (Check(_finite, "a finite number"),))  # the objective checks its parameters' ranges
COUNTS = Kind(positive_int_list)  # '100,50' or [100, 50]: the builder reads them, and checks them against each other
STAGE_VALUES = Kind(None, (Check(_wholes, "whole numbers >= 1"),))  # one per stage; not on the command line
SCHEDULE = Kind(schedule, (Check(lambda v: isinstance(v, str), "'burda' or 'burda:S'"),))
NAME = Kind(str)  # with the setting's choices
PATH = Kind(str, (Check(lambda v: isinstance(v, str), "a run directory's path"),))
SWITCH = Kind(None, (Check(lambda v: isinstance(v, bool), "true or false"),))


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Setting:
    """One flat training setting.

    ``name`` is its key for :func:`iwae.config.build_train_config` and a sweep grid, and the ``dest`` of its
    command-line option ``--name`` (underscores as dashes) where ``flag``. ``help`` may hold ``{default}`` and
    ``{choices}``, filled in by :meth:`help_text`. ``default`` is the value it takes when left out (``None``: it
    may be left out, or its default depends on other settings, which ``help`` says). ``field``: a
    :class:`~iwae.config.TrainConfig` field of this name holds the value as given, and the configuration checks it.
    ``group``: the options of one group exclude each other on the command line. ``registry``: where the names are
    registered (``module.attribute``, torch-side), of which ``choices`` is the copy the command line offers
    (``tests/test_settings.py`` holds them equal); the registry, which may grow at run time, checks the names
    itself, so a value needs only be a name here.
    """

    name: str
    help: str
    _: KW_ONLY
    default: Any = None
    kind: Kind = NAME
    choices: tuple[str, ...] | None = None
    field: bool = False
    flag: bool = True
    group: str | None = None
    metavar: str | None = None
    registry: str | None = None
    label: str | None = None  # how its errors name it, where not by ``name``

    @property
    def option(self) -> str:
        """The command line's option, ``--batch-size`` for ``batch_size``."""
        return "--" + self.name.replace("_", "-")

    @property
    def checks(self) -> tuple[Check, ...]:
        """The kind's checks, then the choices' (for a registry's names: that the value is a name)."""
        if self.choices is None:
            return self.kind.checks
        if self.registry is not None:
            return (*self.kind.checks, IS_NAME)
        return (*self.kind.checks, Check(lambda v: v in self.choices, f"one of {', '.join(self.choices)}"))

    def help_text(self) -> str:
        """``help`` with its default and choices filled in."""
        return self.help.format(default=_shown(self.default), choices=", ".join(self.choices or ()))

    def check(self, value: Any) -> None:
        """Raise a one-line ``ValueError`` unless ``value`` passes the checks (``None`` passes where it is the
        default): the part that failed (``"k must be >= 1, got 0"``), or where the setting may be left out the
        whole (``"train_limit must be a whole number >= 1, got -5"``)."""
        if value is None and self.default is None:
            return
        checks = self.checks
        for check in checks:
            if not check.test(value):
                expected = " ".join(c.expected for c in checks) if self.default is None else check.expected
                raise ValueError(f"{self.label or self.name} must be {expected}, got {value!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting("dataset", "{choices} (default {default})", default="mnist", choices=DATASET_NAMES, field=True,
            metavar="DATASET"),
    Setting("objective", "bound to train: {choices} (default {default}; miwae/piwae need --M, ciwae --beta, power "
            "--p, vr --alpha)", default="iwae", choices=OBJECTIVE_NAMES, metavar="OBJECTIVE",
            registry="iwae.objectives.OBJECTIVES"),
    Setting("estimator", "gradient estimator: {choices} (default {default})", default="standard",
            choices=ESTIMATOR_NAMES, field=True, metavar="ESTIMATOR", registry="iwae.estimators.ESTIMATOR_NAMES"),
    Setting("M", "miwae/piwae: split the k samples into M groups (default {default})", default=1, kind=COUNT),
    Setting("beta", "ciwae: weight of the ELBO, 0..1", kind=NUMBER),
    Setting("p", "power: the power-mean exponent (<= 1; 1 is IWAE, 0 the ELBO)", kind=NUMBER),
    Setting("alpha", "vr: the VR-IWAE alpha (>= 0; 0 is IWAE, 1 the ELBO)", kind=NUMBER),
    Setting("k", "samples per example (default {default}, or the --k-schedule's last)", default=1, kind=COUNT,
            field=True),
    Setting("layers", "stochastic layers: Burda's nets for {default} (default) and 2; more need --latent-dims",
            default=1, kind=COUNT),
    Setting("epochs", "one stage of N passes at --lr", kind=COUNT, group="schedule"),
    Setting("schedule", "'{default}' (3,280 passes, default) or 'burda:S' (its first S stages)", default="burda",
            kind=SCHEDULE, group="schedule"),
    Setting("lr", "learning rate with --epochs (default {default})", default=1e-3, kind=POSITIVE,
            label="the learning rate"),
    Setting("batch_size", "examples per minibatch (default {default}, Burda's)", default=20, kind=COUNT, field=True),
    Setting("beta1", "Adam beta1 (default {default}, the paper's; 0.99 with --optimizer burda-adam, the authors' "
            "code)", default=0.9, kind=FRACTION, field=True, label="beta1 (Adam)"),
    Setting("beta2", "Adam beta2 (default {default})", default=0.999, kind=FRACTION, field=True, flag=False,
            label="beta2 (Adam)"),
    Setting("adam_eps", "Adam's epsilon (default {default}, Burda's)", default=1e-4, kind=POSITIVE, field=True,
            flag=False),
    Setting("optimizer", "{default} (default: torch.optim.Adam, as the paper describes) or burda-adam (the authors' "
            "code: second moments start at 1, the update lags one step; iwae.optim.BurdaAdam)", default="adam",
            choices=OPTIMIZERS, field=True),
    Setting("data_order", "{default} (default: a fresh permutation every pass) or fixed (the authors' code: "
            "minibatch i of every pass is examples 20i..20i+19)", default="shuffled", choices=DATA_ORDERS,
            field=True),
    Setting("loss_reduction", "the minibatch's loss: {default} (default) or sum over its examples (the authors' "
            "code)", default="mean", choices=LOSS_REDUCTIONS, field=True),
    Setting("protocol", "authors: the authors' code as it ran (--optimizer burda-adam, --beta1 0.99, --data-order "
            "fixed, --loss-reduction sum; see docs/protocol.md); {default} (default): each setting as given",
            default="default", choices=PROTOCOLS),
    Setting("binarization", "grey-level data: dynamic (default: a fresh Bernoulli draw at every use) or threshold "
            "(pixel >= 0.5, fixed)", choices=BINARIZATIONS, field=True),  # None: the dataset's own
    Setting("train_split", "{default} (default: Burda's 59,600 MNIST images) or train+valid (all 60,000)",
            default="train", choices=TRAIN_SPLITS, field=True),
    Setting("output_bias", "the decoder's output bias at the start: {default} (default, Burda's: the logit of the "
            "mean training pixel) or zero", default="data-mean", choices=OUTPUT_BIASES, field=True),
    Setting("seed", f"the run's random seed, 0..{MAX_SEED} (default {{default}})", default=0, kind=SEED,
            field=True, group="seed"),
    Setting("batch_schedule", "grow: keep the first stage's learning rate and grow the minibatch by the factor it "
            "would have fallen (Smith et al. 2018); {default} (default): one minibatch size", default="fixed",
            choices=BATCH_SCHEDULES),
    Setting("lr_scale", "scale the schedule's learning rates for a --batch-size other than Burda's 20 (default "
            "{default})", default="none", choices=LR_SCALES),
    Setting("k_schedule", "one k per stage of the schedule, ending at --k", kind=COUNTS, metavar="K,K,..."),
    Setting("train_limit", "train on the first N training examples only", kind=COUNT, field=True),
    Setting("activation", "the hidden layers' activation (default {default})", default="tanh",
            choices=ACTIVATION_NAMES, registry="iwae.models.ACTIVATIONS"),
    Setting("latent_dims", "latent sizes, one per stochastic layer: '2', '100,50', '100,50,20' (any depth)",
            kind=COUNTS),
    Setting("hidden_dims", "with --latent-dims: each stochastic layer's two hidden layers' size, e.g. '200,100,40' "
            "(default: Burda's for 1 and 2 layers, else twice each latent size)", kind=COUNTS),
    Setting("valid_k", "samples per example of the validation bound L_k after every epoch (default {default})",
            default=50, kind=COUNT, field=True, flag=False),
    Setting("stage_batch_sizes", "the minibatch of each stage (default: batch_size throughout)", kind=STAGE_VALUES,
            field=True, flag=False),
    Setting("stage_k", "the samples per example of each stage, ending at k (default: k throughout)",
            kind=STAGE_VALUES, field=True, flag=False),
    Setting("init_from", "continue a finished run: its final weights and its optimiser's state (Burda's Table 2, "
            "as the authors' code ran it)", kind=PATH, field=True, metavar="RUN"),
    Setting("fresh_optimizer", "with --init-from: start a new optimiser instead of continuing the run's",
            default=False, kind=SWITCH, field=True),
)  # fmt: skip
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in SETTINGS}
COMMAND_LINE: tuple[Setting, ...] = tuple(setting for setting in SETTINGS if setting.flag)  # iwae train's
CONFIG_FIELDS: tuple[Setting, ...] = tuple(setting for setting in SETTINGS if setting.field)  # TrainConfig's


def setting_names() -> set[str]:
    """The flat settings :func:`iwae.config.build_train_config` takes."""
    return set(BY_NAME)


def check_setting(name: str, value: Any) -> None:
    """:meth:`Setting.check` of the setting ``name``: a one-line ``ValueError`` for a value that breaks it."""
    BY_NAME[name].check(value)


def check_settings(values: Mapping[str, Any]) -> None:
    """Check each setting in ``values`` that the table declares (``None`` standing for one left out)."""
    for name, value in values.items():
        if name in BY_NAME and value is not None:
            BY_NAME[name].check(value)
