"""Experiment grids: TOML grid files and shipped presets, expanded into checked run specs (:class:`RunSpec`).

A grid file names fixed settings and axes; the product of the axes gives the configurations::

    [fixed]                      # settings shared by every run
    dataset = "mnist"
    layers = 1
    schedule = "burda:3"         # or epochs = N with lr = X
    eval_k = 5000
    eval_limit = 1000

    [axes]                       # one run per combination, named from the axis values
    objective = ["vae", "iwae"]  # -> vae-k1, vae-k5, ..., iwae-k50
    k = [1, 5, 50]

An axis entry may be a table of several settings that go together (``setting = [{objective = "vae",
k = 1}, ...]``). A grid may instead hold several ``[[phase]]`` tables (each with its own ``name``,
``fixed`` and ``axes``; top-level ``[fixed]`` applies to all), run one after the other: a later phase
may start from an earlier phase's finished runs with ``init_from = "<run name>"`` (Burda's Table 2).

Settings are the options of ``iwae train`` (dataset, objective, k, layers, seed, schedule or
epochs/lr, batch_size, train_limit, beta1, activation, latent_dims, valid_k, init_from and any
other :class:`~iwae.config.TrainConfig` field) and of ``iwae eval`` (eval_k, eval_limit,
eval_split, eval_seed, eval_batch_size, eval_units; ``protocol = "authors"`` makes the last two 20 and
``authors`` unless given), plus ``samples`` (write a sample grid, default true).
Every run's settings are checked before anything is written (:func:`check_settings`: its TrainConfig built,
the types and ranges of the rest), and so are the names: a phase or run name is one path component
(:func:`check_name`), and every run directory must resolve inside the sweep folder (:func:`run_dir_of`).

A run of a grid is :func:`iwae.lab.run.run_one`; a whole grid runs through :func:`iwae.lab.sweep.run_sweep`.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from iwae.config import TrainConfig, build_train_config, setting_names
from iwae.data import DATASETS
from iwae.files import check_name_lengths, resolved
from iwae.names import AUTHORS_EVAL_BATCH, EVAL_SPLITS, UNIT_DEFINITIONS

RUNS_SUBDIR = "runs"

# Options that drive evaluation and the run's extras (the training settings are iwae.config.setting_names()).
EVAL_DEFAULTS: dict[str, Any] = {
    "eval_k": 5000,
    "eval_limit": None,
    "eval_split": "test",
    "eval_seed": 0,
    "eval_batch_size": 100,
    "eval_units": "ours",
}
# What ``protocol = "authors"`` changes in a run's evaluation where the grid leaves it: the authors' inactive units
# (iwae.evaluate) and their minibatch of 20 for L_5000 (measure_marginal_log_likelihood in yburda/iwae).
AUTHORS_EVAL: dict[str, Any] = {"eval_units": "authors", "eval_batch_size": AUTHORS_EVAL_BATCH}
RUN_DEFAULTS: dict[str, Any] = {"samples": True}
NAME_FORMATS = {
    "objective": "{}",
    "estimator": "{}",
    "dataset": "{}",
    "k": "k{}",
    "layers": "L{}",
    "seed": "s{}",
    "init_from": "from-{}",
    "binarization": "{}",
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")


# -- options -> TrainConfig ----------------------------------------------------------------------
def known_options() -> set[str]:
    """Every setting a grid may name: the training settings, the evaluation's and the run's."""
    return setting_names() | set(EVAL_DEFAULTS) | set(RUN_DEFAULTS)


def check_options(options: dict[str, Any]) -> None:
    """Raise a one-line ``ValueError`` naming the settings :func:`known_options` lacks."""
    unknown = set(options) - known_options()
    if unknown:
        raise ValueError(f"unknown grid settings {sorted(unknown)}; known: {', '.join(sorted(known_options()))}")


def train_config(options: dict[str, Any], *, recorded: bool = False) -> TrainConfig:
    """The :class:`~iwae.config.TrainConfig` that a run's settings describe.

    :func:`iwae.config.build_train_config` of its training settings; the evaluation and run settings are left out.
    ``recorded``: the settings of a run a database recorded (read back as they were trained, see the builder).
    """
    check_options(options)
    settings = {key: value for key, value in options.items() if key in setting_names()}
    return build_train_config(settings, recorded=recorded)


def eval_options(options: dict[str, Any]) -> dict[str, Any]:
    """The run's evaluation settings, each given or its default (:data:`AUTHORS_EVAL` under the authors' protocol)."""
    defaults = {**EVAL_DEFAULTS, **(AUTHORS_EVAL if options.get("protocol") == "authors" else {})}
    return {key: options.get(key, default) for key, default in defaults.items()}


def _whole(value: Any, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


# The settings whose type and range the lab checks itself, because building the TrainConfig does not: the
# evaluation's and the run's (no TrainConfig field), and three training settings the configuration takes as given.
# Every other training setting (epochs, lr, beta1, beta2, adam_eps, k, ...) is checked by building the TrainConfig
# (iwae.config.build_train_config and TrainConfig.__post_init__). (setting: (test, what it must be))
SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eval_k": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "eval_limit": (lambda v: v is None or _whole(v, 1), "a whole number >= 1"),
    "eval_split": (lambda v: v in EVAL_SPLITS, ", ".join(EVAL_SPLITS[:-1]) + " or " + EVAL_SPLITS[-1]),
    "eval_seed": (_whole, "a whole number"),
    "eval_batch_size": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "eval_units": (lambda v: v in UNIT_DEFINITIONS, " or ".join(UNIT_DEFINITIONS)),
    "samples": (lambda v: isinstance(v, bool), "true or false"),
    # the TrainConfig takes any string as a dataset's name (an unknown one would fail only as the run loads it)
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    # the builder reads any false value (0, false, an empty list) as Burda's whole schedule
    "schedule": (lambda v: isinstance(v, str), "a string such as 'burda' or 'burda:3'"),
    # the TrainConfig takes an empty string as a path
    "init_from": (lambda v: isinstance(v, str) and v != "", "a run name or a run directory"),
}


def check_settings(options: dict[str, Any]) -> TrainConfig:
    """Check every setting of a run as the run would read it, and return its TrainConfig.

    Checked: unknown settings; the types and ranges in :data:`SETTING_CHECKS` (evaluation and run settings with
    their defaults filled in); the TrainConfig built, which checks the rest.

    Raises:
        ValueError: one line naming the first bad setting.
    """
    check_options(options)
    given = {key: value for key, value in options.items() if value is not None}
    values = {**given, **eval_options(options), "samples": options.get("samples", RUN_DEFAULTS["samples"])}
    for key, value in values.items():
        test, expected = SETTING_CHECKS.get(key, (None, ""))
        if test is not None and not test(value):
            raise ValueError(f"{key} must be {expected}, got {value!r}")
    try:
        return train_config(options)
    except TypeError as error:  # a value of the wrong type deep in the builder
        raise ValueError(str(error)) from None


def check_name(name: Any, what: str) -> str:
    """``name`` if it is one safe path component, else a one-line ``ValueError``; ``what`` names it there.

    Safe: letters, digits and ``. _ = + -``, starting with a letter, a digit or ``_``, without ``..``. Phase and
    run names name directories.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} must be letters, digits and . _ = + - (no path separators, no '..', not empty), "
            "starting with a letter, a digit or _"
        )
    check_name_lengths(name, what)
    return name


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or somewhere below it (a loop of links: a one-line
    :class:`iwae.files.LinkRefused`)."""
    return resolved(path).is_relative_to(resolved(root))


def run_dir_of(out_dir: str | Path, name: str) -> Path:
    """``OUT/runs/NAME``, checked.

    Raises:
        ValueError: ``name`` is not a safe name (:func:`check_name`), or the directory resolves outside ``OUT``
            (a link under ``runs/`` that points elsewhere, say).
    """
    path = Path(out_dir) / RUNS_SUBDIR / check_name(name, "run name")
    if not inside(path, out_dir):
        raise ValueError(f"run directory {path} resolves to {resolved(path)}, outside the sweep folder {out_dir}")
    return path


# -- grids ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One configuration of a grid: its name, phase and settings (a flat JSON-able dict)."""

    name: str
    phase: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "phase", "options"}``, JSON-able."""
        return {"name": self.name, "phase": self.phase, "options": dict(self.options)}


def preset_names() -> list[str]:
    """The shipped grids (``src/iwae/presets/*.toml``), by name, sorted."""
    folder = resources.files("iwae") / "presets"
    return sorted(entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_grid(source: str | Path) -> dict[str, Any]:
    """A grid from a TOML file, or a shipped preset by name (``table1-smoke``, ``table1-quick``, ...)."""
    path = Path(source)
    if path.is_file():
        text = path.read_text()
    elif str(source) in preset_names():
        text = (resources.files("iwae") / "presets" / f"{source}.toml").read_text()
    else:
        raise ValueError(f"no grid file {str(source)!r} and no such preset; presets: {', '.join(preset_names())}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML ({error})") from None


def _segment(key: str, value: Any) -> str:
    text = NAME_FORMATS.get(key, key + "{}").format(value)
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _axis_items(value: Any) -> list[tuple[str, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


def _table(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a table, got {value!r}")
    return value


def _phase_specs(phase: dict[str, Any], shared: dict[str, Any]) -> list[RunSpec]:
    unknown = set(_table(phase, "a [[phase]] entry")) - {"name", "fixed", "axes"}
    if unknown:
        raise ValueError(f"a grid (or phase) holds name, [fixed] and [axes] only; found {sorted(unknown)}")
    phase_name = check_name(phase["name"], "phase name") if "name" in phase else ""
    fixed = {**shared, **_table(phase.get("fixed", {}), "[fixed]")}
    axes: dict[str, list[Any]] = _table(phase.get("axes", {}), "[axes]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"axis {key!r} must be a non-empty list")
    specs = []
    for combination in itertools.product(*axes.values()):
        options, segments = dict(fixed), [phase_name] if phase_name else []
        for key, value in zip(axes, combination, strict=True):
            items = _axis_items(value) or [(key, value)]
            options.update(items)
            segments.extend(_segment(k, v) for k, v in items)
        check_options(options)
        specs.append(RunSpec(check_name("-".join(segments) or "run", "run name"), phase_name, options))
    return specs


def expand_grid(grid: dict[str, Any]) -> list[RunSpec]:
    """All configurations of a grid, phase by phase, each fully checked (:func:`check_settings`)."""
    shared = _table(grid.get("fixed", {}), "[fixed]")
    if "phase" in grid:
        if "axes" in grid:
            raise ValueError("a grid with [[phase]] tables keeps its axes inside the phases")
        unknown = set(grid) - {"fixed", "phase"}
        if unknown:
            raise ValueError(f"a grid with [[phase]] tables holds [fixed] and the phases only; found {sorted(unknown)}")
        phases = grid["phase"]
        if not isinstance(phases, list) or not phases:
            raise ValueError("[[phase]] must be a non-empty array of tables")
    else:
        phases = [{key: value for key, value in grid.items() if key != "fixed"}]
        shared = {}
        phases[0]["fixed"] = grid.get("fixed", {})
    specs = [spec for phase in phases for spec in _phase_specs(phase, shared)]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"the grid gives several runs the same name {duplicates}; make the axes differ")
    for spec in specs:
        try:
            check_settings(spec.options)  # fail early on a bad setting
        except ValueError as error:
            raise ValueError(f"run {spec.name!r}: {error}") from None
    return specs
