"""Run configuration: frozen, typed dataclasses that are saved inside every checkpoint.

The library never reads ``sys.argv``; the CLI builds a :class:`TrainConfig` and passes it on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from iwae.models import ModelConfig

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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the seed, the run is reproducible)."""

    dataset: str = "mnist"
    objective: str = "iwae"
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
    # Gradient estimator and the bound family's parameters (iwae.estimators); the defaults leave vae/iwae as they were.
    estimator: str = "standard"  # standard, stl or dreg
    M: int = 1  # miwae/piwae: k samples in M groups of K = k / M
    beta: float | None = None  # ciwae
    p: float | None = None  # power
    alpha: float | None = None  # vr
    init_from: str | None = None  # a finished run whose final weights start this one (Burda's Table 2)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.stages:
            raise ValueError("the schedule needs at least one stage")
        self._check_objective()

    def _check_objective(self) -> None:
        from iwae.estimators import ESTIMATOR_NAMES, OBJECTIVE_NAMES, BoundSpec
        from iwae.objectives import OBJECTIVES

        if self.estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")
        if self.objective in OBJECTIVE_NAMES:
            BoundSpec.from_config(self).check(self.k)
        elif self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVE_NAMES)}")
        elif self.estimator != "standard" or self.M != 1 or {self.beta, self.p, self.alpha} != {None}:
            raise ValueError(f"objective {self.objective!r} takes only the standard estimator and no M/beta/p/alpha")

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
        data["stages"] = [list(stage) for stage in self.stages]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        values = dict(data)
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
