"""Run configuration: frozen, typed dataclasses that are saved inside every checkpoint.

The library never reads ``sys.argv``. :func:`build_train_config` is the one place where flat settings (the CLI's
arguments, a sweep grid's keys, a report's database row) become a :class:`TrainConfig`. The flat settings are
declared in :mod:`iwae.settings` (torch-free): their defaults, choices and simple checks, which the builder and
:class:`TrainConfig` apply; what relates settings to each other is checked here.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from iwae.estimators import check_estimator
from iwae.models import ModelConfig
from iwae.names import MAX_SEED as MAX_SEED  # the seeds' range, which iwae.settings checks
from iwae.objectives import IWAE, Objective, as_objective, make_objective
from iwae.optim import BURDA_BETAS
from iwae.settings import CONFIG_FIELDS, DEFAULTS, check_setting, check_settings
from iwae.settings import setting_names as setting_names  # the flat settings build_train_config takes

# Burda et al.'s schedule: stage i = 0..7 runs 3^i passes at 1e-3 * 10^(-i/7), rounded as in their code.
BURDA_LEARNING_RATES = (1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4)
BURDA_STAGES: tuple[tuple[int, float], ...] = tuple((3**i, lr) for i, lr in enumerate(BURDA_LEARNING_RATES))


def parse_schedule(spec: str | None = None, epochs: int | None = None, lr: float | None = None):
    """Resolve a schedule to stages ``((passes, learning_rate), ...)``.

    ``"burda"`` is Burda's 8 stages (3,280 passes); ``"burda:S"`` its first S stages;
    ``epochs=N`` (with ``lr``, default 1e-3) a single stage of N passes.
    """
    check_settings({"schedule": spec, "epochs": epochs, "lr": lr})
    if epochs is not None:
        if spec is not None:
            raise ValueError("give either a schedule or a number of epochs, not both")
        return ((epochs, DEFAULTS["lr"] if lr is None else lr),)
    spec = spec or DEFAULTS["schedule"]
    name, colon, count = str(spec).partition(":")
    if name != "burda" or (colon and not count.strip().isdecimal()):
        raise ValueError(f"unknown schedule {spec!r}; use 'burda' or 'burda:S' (S = 1..8 stages)")
    n_stages = len(BURDA_STAGES) if not colon else int(count)
    if not 1 <= n_stages <= len(BURDA_STAGES):
        raise ValueError(f"burda:S needs 1 <= S <= 8, got {spec!r}")
    stages = BURDA_STAGES[:n_stages]
    if lr is not None:
        raise ValueError("--lr goes with --epochs; Burda's schedule sets its own learning rates")
    return stages


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# An objective's parameters as flat keys beside its name (``"objective": "miwae", "M": 5``), which the builder and
# TrainConfig.from_dict take.
LEGACY_OBJECTIVE_KEYS = ("M", "beta", "p", "alpha")
BURDA_ADAM_BETA1 = BURDA_BETAS[0]  # the authors' Adam (optimizers.py): 0.99; torch's and the paper's is 0.9
# What ``protocol = "authors"`` sets: the authors' code (github yburda/iwae) as it ran; see docs/protocol.md.
AUTHORS_PROTOCOL: dict[str, Any] = {
    "optimizer": "burda-adam",
    "beta1": BURDA_ADAM_BETA1,
    "data_order": "fixed",
    "loss_reduction": "sum",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the seed, the run is reproducible).

    ``objective`` is an :class:`~iwae.objectives.Objective` (``IWAE()``, ``MIWAE(M=5)``, ...); a bare name such as
    ``"vae"`` is turned into the registered objective without parameters. Every other field but ``model`` and
    ``stages`` is a setting of :mod:`iwae.settings`, whose checks it passes (``tests/test_settings.py`` holds the
    defaults here equal to the table's).
    """

    dataset: str = "mnist"
    objective: Objective = field(default_factory=IWAE)
    k: int = 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig.burda(1))
    stages: tuple[tuple[int, float], ...] = BURDA_STAGES
    batch_size: int = 20
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-4
    seed: int = 0
    train_limit: int | None = None
    valid_k: int = 50
    estimator: str = "standard"  # standard, stl or dreg (iwae.estimators)
    init_from: str | None = None  # a finished run whose final weights start this one (Burda's Table 2)
    stage_batch_sizes: tuple[int, ...] | None = None  # the minibatch of each stage (None: batch_size throughout)
    stage_k: tuple[int, ...] | None = None  # the samples per example of each stage (None: k throughout)
    optimizer: str = "adam"  # adam (torch.optim.Adam) or burda-adam (iwae.optim.BurdaAdam, the authors' code)
    data_order: str = "shuffled"  # shuffled (a fresh permutation every pass) or fixed (the authors' order)
    loss_reduction: str = "mean"  # the minibatch's loss: mean over examples, or sum (the authors' code)
    binarization: str | None = None  # None: the dataset's own; dynamic or threshold (pixel >= 0.5) for grey levels
    fresh_optimizer: bool = False  # with init_from: a new optimiser instead of the base run's state (Table 2)
    train_split: str = "train"  # train (Burda's 59,600 MNIST images) or train+valid (all 60,000)
    output_bias: str = "data-mean"  # the decoder's output bias at the start: data-mean (Burda's) or zero

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            object.__setattr__(self, "objective", as_objective(self.objective))
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig, got {self.model!r}")
        for setting in CONFIG_FIELDS:  # kinds, ranges and choices, as iwae.settings declares them
            setting.check(getattr(self, setting.name))
        check_estimator(self.estimator)  # the registry's names (iwae.names.ESTIMATOR_NAMES is the CLI's copy)
        if not self.stages:
            raise ValueError("the schedule needs at least one stage")
        for passes, lr in self.stages:
            if not _whole(passes) or passes < 1 or not _positive_number(lr):
                raise ValueError(f"each stage needs passes >= 1 and a finite learning rate > 0, got {[passes, lr]}")
        self.objective.check(self.k)
        for name in ("stage_batch_sizes", "stage_k"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.stages):
                raise ValueError(f"{name} needs one value per stage ({len(self.stages)}), got {len(values)}")
        if self.stage_k is not None:
            if self.stage_k[-1] != self.k:
                raise ValueError(f"the k schedule must end at the run's k ({self.k}), got {list(self.stage_k)}")
            for k in self.stage_k:
                self.objective.check(k)

    @property
    def total_epochs(self) -> int:
        return sum(passes for passes, _ in self.stages)

    def stage_of_epoch(self, epoch: int) -> tuple[int, float]:
        """(stage index, learning rate) of a 0-based global epoch."""
        end = 0
        for index, (passes, lr) in enumerate(self.stages):
            end += passes
            if epoch < end:
                return index, lr
        raise ValueError(f"epoch {epoch} is past the schedule's {self.total_epochs} epochs")

    def batch_size_of_stage(self, stage: int) -> int:
        """The minibatch size of a stage (0-based): ``stage_batch_sizes[stage]``, else ``batch_size``."""
        return self.batch_size if self.stage_batch_sizes is None else self.stage_batch_sizes[stage]

    def k_of_stage(self, stage: int) -> int:
        """The samples per example of a stage (0-based): ``stage_k[stage]``, else ``k``."""
        return self.k if self.stage_k is None else self.stage_k[stage]

    def stage_ends(self) -> set[int]:
        """0-based epochs after which a stage ends."""
        ends, total = set(), 0
        for passes, _ in self.stages:
            total += passes
            ends.add(total - 1)
        return ends

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["objective"] = self.objective.to_dict()
        data["stages"] = [list(stage) for stage in self.stages]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From :meth:`to_dict`'s form, or from the flat form (``"objective": "miwae", "M": 5, "beta": null, ...``),
        which loads as the same run. With ``init_from`` but no ``fresh_optimizer`` key, the run had a fresh
        optimiser (docs/cli.md#iwae-train)."""
        if not isinstance(data, dict):
            raise ValueError(f"a configuration is a JSON object, got {type(data).__name__}")
        try:
            return cls._from_dict(dict(data))
        except (TypeError, KeyError, AttributeError) as error:  # a value of the wrong kind, say a string for a list
            raise ValueError(f"malformed configuration ({type(error).__name__}: {error})") from None

    @classmethod
    def _from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        legacy = {key: values.pop(key) for key in LEGACY_OBJECTIVE_KEYS if key in values}
        if values.get("init_from") is not None and "fresh_optimizer" not in values:
            values["fresh_optimizer"] = True  # no key: the run started with a fresh optimiser
        if legacy or isinstance(values.get("objective"), str):
            values["objective"] = make_objective(values.get("objective", "iwae"), **legacy)
        elif "objective" in values:
            values["objective"] = as_objective(values["objective"])
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        if "model" in values:
            values["model"] = ModelConfig.from_dict(values["model"])
        if "stages" in values:
            try:
                values["stages"] = tuple((passes, lr) for passes, lr in values["stages"])
            except (TypeError, ValueError):
                raise ValueError(f"stages must be [passes, learning rate] pairs, got {values['stages']!r}") from None
        for name in ("stage_batch_sizes", "stage_k"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Names of the settings in which two configurations differ."""
    da, db = a.to_dict(), b.to_dict()
    return sorted(key for key in da.keys() | db.keys() if da.get(key) != db.get(key))


# -- the one builder from flat settings ---------------------------------------------------------------------------
BURDA_BATCH_SIZE = 20  # the minibatch of Burda's learning rates, which lr_scale scales from
PROTOCOL_KEY = "protocol"


def _model_config(layers: Any, latent_dims: Any, hidden_dims: Any, activation: Any) -> ModelConfig:
    """Burda's architecture of ``layers`` (1 or 2) stochastic layers, or any depth that ``latent_dims`` gives
    (``"100,50,20"``). Each stochastic layer's networks have two hidden layers: Burda's sizes for his one- and
    two-layer models, else ``hidden_dims`` (one size a stochastic layer, ``"200,100,40"``), by default twice the
    layer's latent size (the rule of Burda's two-layer model: 100 -> 200, 50 -> 100)."""
    check_settings({"layers": layers, "activation": activation})
    dims = None
    if latent_dims is not None:
        dims = _whole_numbers(latent_dims, "latent_dims takes whole numbers such as '50' or '100,50,20'")
        if not dims or min(dims) < 1:
            raise ValueError(f"latent_dims must be whole numbers >= 1, got {latent_dims!r}")
        if layers is not None and len(dims) != layers:
            raise ValueError(f"latent_dims needs {layers} size(s) (one per stochastic layer), got {latent_dims!r}")
    depth = len(dims) if dims is not None else (DEFAULTS["layers"] if layers is None else layers)
    if depth > 2 and dims is None:
        raise ValueError(f"a model of {depth} stochastic layers needs its sizes: give latent_dims, such as '100,50,20'")
    if depth <= 2 and hidden_dims is None:
        model = ModelConfig.burda(depth)
        if dims is not None:
            model = replace(model, latent_dims=dims)
    else:
        latent = dims if dims is not None else ModelConfig.burda(depth).latent_dims
        if hidden_dims is None:
            sizes = tuple(2 * d for d in latent)
        else:
            sizes = _whole_numbers(
                hidden_dims, "hidden_dims takes one whole number per stochastic layer, such as '200,100'"
            )
            if len(sizes) != depth or min(sizes) < 1:
                raise ValueError(
                    f"hidden_dims needs {depth} size(s) >= 1 (one per stochastic layer), got {hidden_dims!r}"
                )
        model = ModelConfig(latent_dims=latent, hidden_dims=tuple((size, size) for size in sizes))
    if activation is not None and activation != model.activation:
        model = replace(model, activation=activation)
    return model


def apply_protocol(given: dict[str, Any]) -> None:
    """Expand ``protocol`` in flat settings: ``default`` changes nothing; ``authors`` sets :data:`AUTHORS_PROTOCOL`
    (a setting given otherwise beside it is an error)."""
    protocol = given.pop(PROTOCOL_KEY, DEFAULTS[PROTOCOL_KEY])
    check_setting(PROTOCOL_KEY, protocol)
    if protocol == "authors":
        for key, value in AUTHORS_PROTOCOL.items():
            if key in given and given[key] != value:
                raise ValueError(f"protocol 'authors' sets {key} = {value!r}; leave out {key} = {given[key]!r}")
            given[key] = value


def scale_learning_rates(
    stages: tuple[tuple[int, float], ...], batch_size: int, lr_scale: str
) -> tuple[tuple[int, float], ...]:
    """The schedule's learning rates scaled for a minibatch other than Burda's 20: by ``batch_size / 20``
    (``linear``, Goyal et al. 2017) or its square root (``sqrt``, the rule for Adam of Malladi et al. 2022)."""
    check_setting("lr_scale", lr_scale)
    ratio = batch_size / BURDA_BATCH_SIZE
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[lr_scale]
    return tuple((passes, lr * factor) for passes, lr in stages)


def grow_batch_schedule(
    stages: tuple[tuple[int, float], ...], batch_size: int
) -> tuple[tuple[tuple[int, float], ...], tuple[int, ...]]:
    """Smith et al.'s (ICLR 2018) alternative to a decaying learning rate: every stage keeps the first stage's
    rate, and the minibatch grows instead by the factor the rate would have fallen, ``round(batch_size * lr_0 /
    lr_i)`` (Burda's rates from 1e-3 to 1e-4 at minibatch 20 give 20, 28, 38, 54, 74, 105, 143, 200).
    Returns the stages and the minibatch of each."""
    first = stages[0][1]
    sizes = tuple(max(1, round(batch_size * first / lr)) for _, lr in stages)
    return tuple((passes, first) for passes, _ in stages), sizes


def _whole_numbers(spec: Any, expected: str) -> tuple[int, ...]:
    """A list of whole numbers, or a string of them separated by commas; else ``ValueError(expected, got spec)``."""
    parts = spec if isinstance(spec, list | tuple) else str(spec).split(",")
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"{expected}, got {spec!r}") from None


def parse_k_schedule(spec: Any, n_stages: int, recorded: bool = False) -> tuple[int, ...]:
    """``"1,2,3,5"`` (one k per stage of the schedule) as a tuple of ints; one that decreases is refused unless
    ``recorded`` (a run recorded before that was refused)."""
    values = _whole_numbers(spec, "k_schedule takes one whole number per stage, such as '1,2,3,5'")
    if len(values) != n_stages:
        raise ValueError(f"k_schedule needs one k per stage of the schedule ({n_stages}), got {spec!r}")
    if not recorded and any(later < earlier for earlier, later in itertools.pairwise(values)):
        raise ValueError(
            f"k_schedule grows k over the stages (each stage's k at least the one before), got {spec!r}; "
            "sort it, or train the stages as runs of their own"
        )
    return values


def build_train_config(settings: Mapping[str, Any], *, recorded: bool = False) -> TrainConfig:
    """The :class:`TrainConfig` that flat settings describe: ``iwae train``'s arguments, a grid's keys, a report's row.

    Args:
        settings: the keys of :mod:`iwae.settings` (their defaults and simple checks are declared there; ``None``
            values are the defaults):

            - every :class:`TrainConfig` field but ``model`` and ``stages``;
            - the objective: ``objective`` (a name) with ``M``, ``beta``, ``p``, ``alpha``;
            - the model: ``layers`` (Burda's 1 or 2), ``latent_dims`` (any depth), ``hidden_dims``, ``activation``;
            - ``protocol``: ``default`` or ``authors`` (:data:`AUTHORS_PROTOCOL`); ``optimizer = "burda-adam"``
              alone also sets the authors' ``beta1`` 0.99 unless ``beta1`` is given;
            - the schedule: ``schedule`` (``burda``, ``burda:S``) or ``epochs`` with ``lr``; ``batch_schedule``
              (``fixed``, or ``grow``: :func:`grow_batch_schedule`); ``lr_scale`` (``none``, ``linear``, ``sqrt``:
              :func:`scale_learning_rates`); ``k_schedule`` (one k per stage, ending at ``k``, which it sets when
              ``k`` is not given).
        recorded: the settings of a run already trained (a sweep's database, a report): the combinations refused
            since (``lr_scale`` with ``lr``, ``batch_schedule = "grow"`` with ``epochs``, a decreasing
            ``k_schedule``) build what they built then (the scaled ``lr``; one stage at its own minibatch; the
            schedule as given).

    Returns:
        The checked :class:`TrainConfig`.

    Raises:
        ValueError: one line, for an unknown key or a bad value.
    """
    unknown = set(settings) - setting_names()
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {', '.join(sorted(setting_names()))}")
    given = {key: value for key, value in settings.items() if value is not None}
    check_settings(given)
    apply_protocol(given)
    if given.get("optimizer") == "burda-adam":
        given.setdefault("beta1", BURDA_ADAM_BETA1)
    model = _model_config(
        given.pop("layers", None),
        given.pop("latent_dims", None),
        given.pop("hidden_dims", None),
        given.pop("activation", None),
    )
    lr_scale = given.pop("lr_scale", DEFAULTS["lr_scale"])
    batch_schedule = given.pop("batch_schedule", DEFAULTS["batch_schedule"])
    if lr_scale != "none" and "lr" in given and not recorded:  # no silent product of two rates
        raise ValueError(
            f"lr_scale = {lr_scale!r} scales the schedule's rates, and lr gives the rate itself: give one of them"
        )
    if batch_schedule == "grow" and "epochs" in given and not recorded:  # one stage: nothing to grow across
        raise ValueError(
            "batch_schedule = 'grow' grows the minibatch from one stage of a schedule to the next, and epochs "
            "trains one stage: use it with schedule (burda, burda:S), or drop it"
        )
    stages = parse_schedule(given.pop("schedule", None), given.pop("epochs", None), given.pop("lr", None))
    batch_size = given.get("batch_size", DEFAULTS["batch_size"])
    stages = scale_learning_rates(stages, batch_size, lr_scale)
    if batch_schedule == "grow":
        if "stage_batch_sizes" in given:
            raise ValueError("give batch_schedule = 'grow' or stage_batch_sizes, not both")
        stages, given["stage_batch_sizes"] = grow_batch_schedule(stages, batch_size)
    if "k_schedule" in given:
        stage_k = parse_k_schedule(given.pop("k_schedule"), len(stages), recorded)
        given.setdefault("k", stage_k[-1])
        given["stage_k"] = stage_k
    for name in ("stage_batch_sizes", "stage_k"):
        if isinstance(given.get(name), list):
            given[name] = tuple(given[name])
    params = {key: given.pop(key) for key in LEGACY_OBJECTIVE_KEYS if key in given}
    objective = make_objective(given.pop("objective", DEFAULTS["objective"]), **params)
    return TrainConfig(objective=objective, model=model, stages=stages, **given)
