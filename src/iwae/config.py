"""Run configuration: frozen, typed dataclasses that are saved inside every checkpoint.

The library never reads ``sys.argv``. :func:`build_train_config` is the one place where flat settings (the CLI's
arguments, a sweep grid's keys, a report's database row) become a :class:`TrainConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from iwae.estimators import check_estimator
from iwae.models import ModelConfig
from iwae.objectives import IWAE, Objective, as_objective, make_objective

# Burda et al.'s schedule: stage i = 0..7 runs 3^i passes at 1e-3 * 10^(-i/7), rounded as in their code.
BURDA_LEARNING_RATES = (1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4)
BURDA_STAGES: tuple[tuple[int, float], ...] = tuple((3**i, lr) for i, lr in enumerate(BURDA_LEARNING_RATES))


def parse_schedule(spec: str | None = None, epochs: int | None = None, lr: float | None = None):
    """Resolve a schedule to stages ``((passes, learning_rate), ...)``.

    ``"burda"`` is Burda's 8 stages (3,280 passes); ``"burda:S"`` its first S stages;
    ``epochs=N`` (with ``lr``, default 1e-3) a single stage of N passes.
    """
    if epochs is not None:
        if spec is not None:
            raise ValueError("give either a schedule or a number of epochs, not both")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        return ((epochs, 1e-3 if lr is None else lr),)
    spec = spec or "burda"
    name, _, count = spec.partition(":")
    if name != "burda":
        raise ValueError(f"unknown schedule {spec!r}; use 'burda' or 'burda:S' (S = 1..8 stages)")
    n_stages = len(BURDA_STAGES) if not count else int(count)
    if not 1 <= n_stages <= len(BURDA_STAGES):
        raise ValueError(f"burda:S needs 1 <= S <= 8, got {spec!r}")
    stages = BURDA_STAGES[:n_stages]
    if lr is not None:
        raise ValueError("--lr goes with --epochs; Burda's schedule sets its own learning rates")
    return stages


# The flat fields of configurations written before the objective became one nested value.
LEGACY_OBJECTIVE_KEYS = ("M", "beta", "p", "alpha")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the seed, the run is reproducible).

    ``objective`` is an :class:`~iwae.objectives.Objective` (``IWAE()``, ``MIWAE(M=5)``, ...); a bare name such as
    ``"vae"`` is turned into the registered objective without parameters.
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

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            object.__setattr__(self, "objective", as_objective(self.objective))
        for name in ("k", "batch_size", "valid_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.valid_k < 1:
            raise ValueError(f"valid_k must be >= 1, got {self.valid_k}")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            raise ValueError(f"train_limit must be a whole number >= 1, got {self.train_limit!r}")
        if not self.stages:
            raise ValueError("the schedule needs at least one stage")
        check_estimator(self.estimator)
        self.objective.check(self.k)

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
        """From :meth:`to_dict`'s form, or from a configuration saved before the objective was nested
        (``"objective": "miwae", "M": 5, "beta": null, ...``), which loads as the same run."""
        values = dict(data)
        legacy = {key: values.pop(key) for key in LEGACY_OBJECTIVE_KEYS if key in values}
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
            values["stages"] = tuple((int(p), float(lr)) for p, lr in values["stages"])
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
MODEL_KEYS = ("layers", "latent_dims", "activation")
SCHEDULE_KEYS = ("schedule", "epochs", "lr")
OBJECTIVE_KEYS = ("objective", *LEGACY_OBJECTIVE_KEYS)


def setting_names() -> set[str]:
    """The flat settings :func:`build_train_config` takes."""
    plain = {f.name for f in fields(TrainConfig)} - {"model", "stages"}
    return plain | set(MODEL_KEYS) | set(SCHEDULE_KEYS) | set(OBJECTIVE_KEYS)


def _model_config(layers: Any, latent_dims: Any, activation: Any) -> ModelConfig:
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"layers must be 1 or 2, got {layers!r}")
    model = ModelConfig.burda(layers)
    if latent_dims is not None:
        parts = latent_dims if isinstance(latent_dims, list | tuple) else str(latent_dims).split(",")
        try:
            dims = tuple(int(d) for d in parts)
        except ValueError:
            raise ValueError(f"latent_dims takes whole numbers such as '50' or '100,50', got {latent_dims!r}") from None
        if len(dims) != layers:
            raise ValueError(f"latent_dims needs {layers} size(s), got {latent_dims!r}")
        if min(dims) < 1:
            raise ValueError(f"latent_dims must be >= 1, got {latent_dims!r}")
        model = replace(model, latent_dims=dims)
    if activation is not None and activation != model.activation:
        model = replace(model, activation=activation)
    return model


def build_train_config(settings: Mapping[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` that flat settings describe: the CLI's ``iwae train`` arguments, a sweep grid's
    keys and a report's rows all come through here.

    Keys: every :class:`TrainConfig` field but ``model`` and ``stages``; the objective as ``objective`` (a name)
    with ``M``/``beta``/``p``/``alpha``; the model as ``layers`` (Burda's 1 or 2), ``latent_dims`` and
    ``activation``; the schedule as ``schedule`` (``burda``, ``burda:S``) or ``epochs`` with ``lr``. ``None``
    values are the defaults. Raises a one-line ``ValueError`` for an unknown key or a bad value.
    """
    unknown = set(settings) - setting_names()
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {', '.join(sorted(setting_names()))}")
    given = {key: value for key, value in settings.items() if value is not None}
    model = _model_config(given.pop("layers", 1), given.pop("latent_dims", None), given.pop("activation", None))
    stages = parse_schedule(given.pop("schedule", None), given.pop("epochs", None), given.pop("lr", None))
    params = {key: given.pop(key) for key in LEGACY_OBJECTIVE_KEYS if key in given}
    objective = make_objective(given.pop("objective", "iwae"), **params)
    return TrainConfig(objective=objective, model=model, stages=stages, **given)
