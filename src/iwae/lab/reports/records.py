"""Finished runs read from the sweep databases (:mod:`iwae.lab.store`) as :class:`RunRecord`, and how the report
groups them: runs that differ only in their seed make one :class:`Cell` (mean and sample standard deviation over
the seeds), the cells of Table 1 and the k-sweeps, and training budgets.

A record keeps a sample grid's path only if it resolves inside the sweep folder the row came from: a report embeds
no file that a database row names elsewhere.

Active units come in three definitions (:mod:`iwae.evaluate`): ours (``units``: the variance over the evaluated
images of E_q[u|x] > 0.01), the authors' (``units_authors``: the first 500 training images, one sample of h_1 for
layer 2, variance >= 0.01) and the per-unit KL's (``units_kl``). A run evaluated with ``units="authors"``
(``pruned_by``) shows the authors' counts and pruned NLL in the tables (:attr:`RunRecord.shown_units`); others show
ours. In an ``eval.json`` without ``pruned_by``, ``active_units_authors`` is not the authors' count
(docs/protocol.md#protocol-notes): a record leaves it out (``units_authors`` None).

Only runs in Burda's setup sit beside the paper's numbers (:func:`is_comparable`): :func:`burda_departures` names,
as a reader reads them, the ways in which a run's setup is not Burda's (architecture, minibatch, binarisation,
training images); the report's note under the other runs' table quotes it. Both protocols (:func:`protocol_of`:
ours by default, or the authors' code's) train Burda's setup and are comparable, each in a Table 1 of its own."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from iwae.config import AUTHORS_PROTOCOL, BURDA_BATCH_SIZE, BURDA_STAGES, TrainConfig
from iwae.data import IDX_VALIDATION_IMAGES
from iwae.lab.grid import inside, train_config
from iwae.lab.store import DB_FILE, ResultStore
from iwae.models import ModelConfig


@dataclass
class RunRecord:
    """A finished run as the report sees it (everything read from a database row)."""

    label: str
    run_dir: str
    dataset: str
    layers: int
    objective: str
    k: int
    seed: int
    init_from: str | None
    epochs: int
    estimator: str
    variant: str  # the objective with its parameter, e.g. 'miwae(M=8)' or 'ciwae(beta=0.05)'
    train_limit: int | None
    nll: float
    units: tuple[int, ...]
    eval_k: int
    eval_n: int
    recon: float
    kl: float
    seconds_per_epoch: float
    train_bound: float
    valid_bound: float
    log_activity: list[list[float]]
    metrics: list[dict[str, Any]]
    samples_png: str | None
    config: TrainConfig
    env: dict[str, Any] = field(default_factory=dict)
    units_authors: tuple[int, ...] | None = None  # the authors' definition (None: not evaluated, or no pruned_by)
    units_kl: tuple[int, ...] | None = None  # mean per-unit KL > 0.01
    nll_pruned: float | None = None  # L_k without the inactive units of ``pruned_by``'s definition
    pruned_by: str = "ours"  # whose units nll_pruned leaves out, and whose counts the tables show

    @property
    def unit_definition(self) -> str:
        """Whose active units the tables show for this run: ``authors`` where it was evaluated so, else ``ours``."""
        return "authors" if self.pruned_by == "authors" and self.units_authors is not None else "ours"

    @property
    def shown_units(self) -> tuple[int, ...]:
        """The active units the tables show: :attr:`unit_definition`'s."""
        return self.units_authors if self.unit_definition == "authors" and self.units_authors else self.units


def objective_variant(config: Any) -> str:
    """The objective with the parameter that defines it: 'iwae', 'miwae(M=8)', 'ciwae(beta=0.05)', ..."""
    return config.objective.label()


def is_table1_run(record: RunRecord) -> bool:
    """A cell of Burda's Table 1: VAE or IWAE, standard estimator, trained from scratch."""
    return record.init_from is None and record.estimator == "standard" and record.objective in ("vae", "iwae")


# -- Burda's setup: what decides whether a run's numbers can stand beside the paper's ----------------------------------
ACTIVATION_NAMES = {"tanh": "tanh", "relu": "ReLU", "softplus": "softplus"}
OWN_BINARIZATION = {"mnist-fixed": "fixed"}  # every other dataset is binarised dynamically (iwae.data)
IDX_TRAINING_IMAGES = {"mnist": 60_000, "fashion-mnist": 60_000}  # before Burda's last 400 validate


def own_binarization(dataset: str) -> str:
    """How ``dataset`` is binarised when a run leaves ``binarization`` None (Burda's)."""
    return OWN_BINARIZATION.get(dataset, "dynamic")


def _dashed(sizes: tuple[int, ...]) -> str:
    return "-".join(map(str, sizes))


def _model_departures(model: ModelConfig) -> list[str]:
    found = []
    if model.activation != "tanh":
        found.append(f"{ACTIVATION_NAMES.get(model.activation, model.activation)} networks instead of tanh")
    if model.n_stochastic not in (1, 2):
        found.append(
            f"{model.n_stochastic} stochastic layers ({_dashed(model.latent_dims)} units; Burda: 1 or 2 layers)"
        )
    else:
        burda = ModelConfig.burda(model.n_stochastic, model.x_dim)
        if model.latent_dims != burda.latent_dims:
            found.append(f"latent sizes {_dashed(model.latent_dims)} instead of {_dashed(burda.latent_dims)}")
        if model.hidden_dims != burda.hidden_dims:
            ours, his = (", ".join(map(_dashed, m.hidden_dims)) for m in (model, burda))
            found.append(f"hidden layers {ours} instead of {his}")
    if model.likelihood != "bernoulli":
        found.append(f"a {model.likelihood} likelihood instead of Bernoulli")
    return found


def burda_departures(config: TrainConfig) -> list[str]:
    """The ways in which a run's setup departs from Burda et al.'s in what decides its numbers, as phrases for a
    reader ('ReLU networks instead of tanh', 'minibatch 128 instead of 20', ...); empty for Burda's setup.

    Burda's setup: his architecture for the layer count (:meth:`ModelConfig.burda`, tanh), minibatch 20 in every
    stage, Adam's epsilon 1e-4, k throughout, the dataset's own binarisation, his training images (the
    validation images held out, no ``train_limit``) and his initial output bias (the logit of the mean training
    pixel). The objective, estimator and start (Table 1's runs) are judged by :func:`is_table1_run`; the schedule's
    length and the evaluation are the budget, which the report shows; the protocol (ours or the authors' code's,
    :func:`protocol_of`) is not a departure."""
    found = _model_departures(config.model)
    batches = config.stage_batch_sizes or (config.batch_size,)
    if set(batches) != {BURDA_BATCH_SIZE}:
        sizes = ", ".join(map(str, batches))
        over = " over the stages" if len(batches) > 1 else ""
        found.append(f"minibatch {sizes}{over} instead of {BURDA_BATCH_SIZE}")
    if config.adam_eps != TrainConfig.adam_eps:
        found.append(f"Adam's epsilon {config.adam_eps:.0e} instead of {TrainConfig.adam_eps:.0e}")
    if config.stage_k is not None and set(config.stage_k) != {config.k}:
        found.append(f"k {', '.join(map(str, config.stage_k))} over the stages instead of k = {config.k} throughout")
    own = own_binarization(config.dataset)
    if config.binarization is not None and config.binarization != own:
        found.append(f"{config.binarization} binarisation instead of {own}")
    total = IDX_TRAINING_IMAGES.get(config.dataset)
    burda_images = f"{total - IDX_VALIDATION_IMAGES:,}" if total else None
    if config.train_split != "train":
        found.append(
            f"trained on all {total:,} training images (Burda: {burda_images}, the {IDX_VALIDATION_IMAGES} "
            "validation images held out)"
            if total
            else "trained on the training and validation images (Burda: the validation images held out)"
        )
    if config.train_limit is not None:
        found.append(
            f"trained on the first {config.train_limit:,} training images (Burda: all {burda_images or 'of them'})"
        )
    if config.output_bias != "data-mean":
        start = config.output_bias
        found.append(f"the output bias starting at {start} instead of the logit of the mean training pixel")
    return found


def is_comparable(record: RunRecord) -> bool:
    """Whether a run's numbers may stand beside the paper's: it trained in Burda's setup (no
    :func:`burda_departures`)."""
    return not burda_departures(record.config)


# How the four settings of ``protocol = "authors"`` (iwae.config.AUTHORS_PROTOCOL) read, by their value.
PROTOCOL_PHRASES = {
    ("optimizer", "burda-adam"): "optimizer burda-adam (the authors' Adam)",
    ("optimizer", "adam"): "optimizer adam (torch's)",
    ("data_order", "fixed"): "data_order fixed (the same order of training images every pass)",
    ("data_order", "shuffled"): "data_order shuffled (a fresh order every pass)",
    ("loss_reduction", "sum"): "loss_reduction sum (the minibatch's loss summed)",
    ("loss_reduction", "mean"): "loss_reduction mean (the minibatch's loss averaged)",
}
DEFAULT_PROTOCOL = {name: getattr(TrainConfig(), name) for name in AUTHORS_PROTOCOL}


def protocol_of(config: TrainConfig) -> str:
    """``authors`` if a run trained as the authors' code does (every setting of ``protocol = "authors"``),
    ``default`` if by none of them (this package's default), else ``mixed``."""
    values = {name: getattr(config, name) for name in AUTHORS_PROTOCOL}
    return "authors" if values == AUTHORS_PROTOCOL else "default" if values == DEFAULT_PROTOCOL else "mixed"


def protocol_settings(config: TrainConfig) -> str:
    """The protocol's settings of a run as a reader reads them: 'optimizer burda-adam (the authors' Adam), beta1
    0.99, ...'."""
    phrases = []
    for name in AUTHORS_PROTOCOL:
        value = getattr(config, name)
        phrases.append(
            PROTOCOL_PHRASES.get((name, value), f"{name} {value:g}" if name == "beta1" else f"{name} {value}")
        )
    return ", ".join(phrases)


def _record(row: dict[str, Any], label: str, sweep_dir: str | Path) -> RunRecord:
    config = train_config(row["config"], recorded=True)
    samples = row["samples_png"]
    evaluation = row["eval"]
    return RunRecord(
        label=label,
        run_dir=row["run_dir"],
        dataset=config.dataset,
        layers=config.model.n_stochastic,
        objective=config.objective.name,
        k=config.k,
        seed=config.seed,
        init_from=config.init_from,
        epochs=config.total_epochs,
        estimator=config.estimator,
        variant=objective_variant(config),
        train_limit=config.train_limit,
        nll=float(evaluation["nll"]),
        units=tuple(int(u) for u in evaluation["active_units"]),
        eval_k=int(evaluation["k"]),
        eval_n=int(evaluation["n_examples"]),
        recon=float(evaluation["recon_log_lik"]),
        kl=float(evaluation["kl"]),
        seconds_per_epoch=float(row["seconds_per_epoch"]),
        train_bound=float(row["train_bound"]),
        valid_bound=float(row["valid_bound"]),
        log_activity=evaluation.get("log_activity", []),
        metrics=row["metrics"] or [],
        samples_png=samples if samples and inside(samples, sweep_dir) else None,
        config=config,
        env={key: row[key] for key in ("package_version", "torch_version", "device", "git_commit")},
        units_authors=_counts(evaluation.get("active_units_authors")) if "pruned_by" in evaluation else None,
        units_kl=_counts(evaluation.get("active_units_kl")),
        nll_pruned=None if evaluation.get("nll_active_only") is None else float(evaluation["nll_active_only"]),
        pruned_by=str(evaluation.get("pruned_by", "ours")),
    )


def _counts(values: Any) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(u) for u in values)


def load_records(sweep_dirs: list[str | Path]) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """Finished runs (as records) and the rows of unfinished ones, from each sweep's database."""
    records, unfinished, seen_dirs = [], [], set()
    for directory in sweep_dirs:
        if not (Path(directory) / DB_FILE).is_file():
            raise ValueError(f"{directory} holds no {DB_FILE}; run 'iwae sweep GRID --out {directory}' first")
        prefix = f"{Path(directory).name}/" if len(sweep_dirs) > 1 else ""
        for row in ResultStore.in_dir(directory, create=False).rows():
            if row["status"] == "finished" and row["eval"]:
                run_dir = str(Path(row["run_dir"]).resolve())
                if run_dir in seen_dirs:  # one run recorded by several grids (the sweep reused it)
                    continue
                seen_dirs.add(run_dir)
                records.append(_record(row, prefix + row["name"], directory))
            else:
                unfinished.append(row)
    return records, unfinished


K = TypeVar("K", bound=Hashable)


def group_by(records: list[RunRecord], key: Callable[[RunRecord], K]) -> dict[K, list[RunRecord]]:
    groups: dict[K, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(groups)


@dataclass
class Cell:
    """Our result for one setting: means over its seeds, and the sample standard deviations (ddof=1; None for one
    seed) of the NLL and of the seconds per epoch."""

    nll: float
    units: tuple[float, ...]
    seeds: int
    seconds_per_epoch: float
    nll_sd: float | None = None
    seconds_sd: float | None = None
    unit_definition: str = "ours"  # whose active units ``units`` are: "ours" or "authors"
    units_kl: tuple[float, ...] | None = None  # the per-unit KL's count, the mean (None: a run did not record it)


def mean_cell(records: list[RunRecord]) -> Cell:
    """The mean over ``records`` (one setting). Runs of one seed (the setting rerun by another sweep) count as
    one seed, with their mean."""
    by_seed = list(group_by(records, lambda r: r.seed).values())

    def over_seeds(value: Callable[[RunRecord], float]) -> list[float]:
        return [statistics.fmean(value(r) for r in runs) for runs in by_seed]

    def sd(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    nlls, seconds = over_seeds(lambda r: r.nll), over_seeds(lambda r: r.seconds_per_epoch)
    definitions = {r.unit_definition for r in records}
    definition = definitions.pop() if len(definitions) == 1 else "ours"  # runs of mixed definitions: ours for all

    def counted(r: RunRecord) -> tuple[int, ...]:
        return r.shown_units if definition == "authors" else r.units

    def mean_units(count: Callable[[RunRecord], tuple[int, ...]]) -> tuple[float, ...]:
        seed_units = [[statistics.fmean(u) for u in zip(*map(count, runs), strict=True)] for runs in by_seed]
        return tuple(statistics.fmean(u) for u in zip(*seed_units, strict=True))

    kl = None
    if all(r.units_kl is not None for r in records) and len({len(r.units_kl or ()) for r in records}) == 1:
        kl = mean_units(lambda r: r.units_kl or ())
    return Cell(
        statistics.fmean(nlls),
        mean_units(counted),
        len(by_seed),
        statistics.fmean(seconds),
        sd(nlls),
        sd(seconds),
        definition,
        kl,
    )


def table1_cells(records: list[RunRecord]) -> dict[tuple[str, int, int, str], Cell]:
    """Table 1's cells of runs of one budget (:func:`budget_groups`), over seeds: the runs in Burda's setup
    (:func:`is_comparable`) only; :func:`cells_of` gives the others'."""
    return cells_of([r for r in records if is_comparable(r)])


def cells_of(records: list[RunRecord]) -> dict[tuple[str, int, int, str], Cell]:
    """The cells (dataset, layers, k, objective) of Table 1 runs of one budget, comparable or not, over seeds."""
    groups = group_by([r for r in records if is_table1_run(r)], lambda r: (r.dataset, r.layers, r.k, r.objective))
    return {key: mean_cell(group) for key, group in sorted(groups.items())}


def ksweep_groups(cells: dict[tuple[str, int, int, str], Cell]) -> dict[tuple[str, int, str], list[tuple[int, Cell]]]:
    groups: dict[tuple[str, int, str], list[tuple[int, Cell]]] = defaultdict(list)
    for (dataset, layers, k, objective), cell in cells.items():
        groups[(dataset, layers, objective)].append((k, cell))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in groups.items() if len(points) >= 2}


# The settings the tables show in their rows and columns, the budget's and the seed: the others (batch size, Adam's,
# the architecture beyond its layers, ...) are named in the budget where they are not Burda's.
SHOWN_SETTINGS = ("dataset", "objective", "k", "model", "stages", "seed", "train_limit", "estimator", "init_from")


def other_settings(config: TrainConfig) -> list[str]:
    """The training settings outside the tables and the budget's passes in which ``config`` is not Burda's."""
    model, default = config.model, TrainConfig()
    if model.n_stochastic <= 2:
        reference = ModelConfig.burda(model.n_stochastic, model.x_dim)
        differ = [f.name for f in fields(ModelConfig) if getattr(model, f.name) != getattr(reference, f.name)]
    else:  # no Burda architecture to compare with: its sizes, and what differs from the defaults
        differ = [
            f.name
            for f in fields(ModelConfig)
            if f.name in ("latent_dims", "hidden_dims") or getattr(model, f.name) != getattr(ModelConfig(), f.name)
        ]
    notes = [f"{name}={getattr(model, name)}" for name in differ]
    if len(config.stages) == 1 and config.stages != BURDA_STAGES[:1]:
        notes.append(f"lr {config.stages[0][1]:g}")
    elif config.stages != BURDA_STAGES[: len(config.stages)]:
        notes.append("lr " + " + ".join(f"{passes}@{lr:g}" for passes, lr in config.stages))
    return notes + [
        f"{f.name}={getattr(config, f.name)}"
        for f in fields(TrainConfig)
        if f.name not in SHOWN_SETTINGS and getattr(config, f.name) != getattr(default, f.name)
    ]


def budget_of(record: RunRecord) -> str:
    """What a run's numbers depend on besides its setting in the tables and its seed: training passes, data and
    any other setting that is not Burda's, and the evaluation."""
    examples = "all" if record.train_limit is None else f"{record.train_limit:,}"
    budget = f"{record.epochs:,} passes over {examples} training examples, L_{record.eval_k} on {record.eval_n:,}"
    units = ["active units and pruned NLL by the authors' definition"] if record.unit_definition == "authors" else []
    return "; ".join([budget, *units, *other_settings(record.config)])


def setting_of(record: RunRecord) -> tuple[str, str, int, str, str, int]:
    """Everything a run's numbers depend on but its seed (and, for a continued run, its base): runs with the same
    setting are the seeds of one cell."""
    return (budget_of(record), record.dataset, record.layers, record.variant, record.estimator, record.k)


def budget_groups(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Table 1 runs (not continued ones) by budget: cells are only compared within one budget."""
    return dict(sorted(group_by([r for r in records if r.init_from is None], budget_of).items()))
