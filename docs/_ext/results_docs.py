"""Regenerate the results in ``docs/results.md`` and ``README.md`` from the data in ``results/``.

Every number those pages give of our experiments sits in a block generated from an experiment's folder
(``results/README.md`` describes the folders, the blocks and their templates)::

    <!-- results:EXPERIMENT KIND [ARGUMENTS]
    TEMPLATE
    -->
    ...generated...
    <!-- /results:EXPERIMENT -->

KIND is ``about`` (the experiment's command, budget, wall time, date, machine, library commit, published source and
data, from its ``experiment.json``; no template), ``table`` (a Markdown table: the header and alignment lines, then
a ``{% for row in rows %}`` loop), ``text`` (prose) or ``figure`` (a PNG in ``docs/results/`` drawn from the data;
the template is its caption). Templates are Jinja2, rendered in its sandbox over the experiment's rows and values
(:func:`namespace`): ``{{ (nll - paper.nll) | fmt('+.2f') }}``. Published numbers come from
:mod:`iwae.lab.reports.published` only::

    .venv/bin/python docs/_ext/results_docs.py            # rewrite the stale blocks, summaries and figures
    .venv/bin/python docs/_ext/results_docs.py --check    # change nothing; exit 1 naming the first stale one

An experiment kept as run folders (``"data": "runs"``) gets its ``summary.json`` written here from them; a run that
has not finished says how far it is, from its folder in ``results/in-progress/``. Broken data or templates exit 2
with a one-line message naming the file (and, for a template, its line).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, Undefined
from jinja2.sandbox import SandboxedEnvironment

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("docs/results.md", "README.md")
RESULTS_DIR = "results"
IN_PROGRESS_DIR = "in-progress"  # results/in-progress/<experiment>/<run>/: unfinished runs, with their checkpoint
FIGURES_DIR = "docs/results"
EXPERIMENT_FILE = "experiment.json"
SUMMARY_FILE = "summary.json"
DIGEST_KEY = "results-data"  # the PNG text chunk that holds the digest of the data a figure was drawn from
KINDS = ("about", "table", "text", "figure")
BLOCK = re.compile(
    r"<!-- results:(?P<name>[a-z0-9][a-z0-9-]*) (?P<kind>[a-z]+)(?P<args>[^\n]*?)"
    r"(?: -->|\n(?P<template>.*?)\n-->)(?P<body>.*?)<!-- /results:(?P=name) -->",
    re.DOTALL,
)
REQUIRED = ("what", "commands", "budget", "date", "machine", "published", "data")
# runs: run folders (summary.json made from them); outputs: a command's own JSON files, their keys the values;
# transcribed: summary.json is the data.
DATA_KINDS = ("runs", "outputs", "transcribed")


class ResultsError(ValueError):
    """Data or a template that cannot be read: the message names the file (and the block) and what is wrong;
    ``line`` is the template's line at fault (1 for its first), where known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# -- templates ---------------------------------------------------------------------------------------------------------
def units_text(units: Any) -> str:
    """Active units per stochastic layer joined by ``+`` ("16+5"); None is ``—``."""
    return "—" if units is None else "+".join(str(unit) for unit in units)


def _defined(value: Any) -> Any:
    """``value``; Jinja's error naming the name or field if it is undefined (formatting would hide which)."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    return value


def duration(seconds: float | None) -> str:
    """Seconds as a reader reads them: ``42 s``, ``9 min 41 s``, ``59 min``, ``4 h 33 min``; None is ``—``."""
    if _defined(seconds) is None:
        return "—"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    hours, rest = divmod(round(whole / 60), 60)
    return f"{hours} h" + (f" {rest} min" if rest else "")


def fmt(value: Any, spec: str = "") -> str:
    """``value`` formatted by the Python format spec ``spec`` (the templates' ``fmt`` filter); None is ``—``, and a
    zero never shows a minus sign."""
    if _defined(value) is None:
        return "—"
    text = format(value, spec)
    if re.fullmatch(r"-0(\.0+)?", text):  # -0.00: a difference that rounds to nothing
        text = ("+" if "+" in spec else "") + text[1:]
    return text


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox with the results' conventions: a number not measured (None) stays None through arithmetic
    and field access (shown as ``—``), and ``a.b`` of a dict is its field ``b`` (never a method of dict)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return None if left is None or right is None else super().call_binop(context, operator, left, right)

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        return None if arg is None else super().call_unop(context, operator, arg)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            return obj[argument] if argument in obj else self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if obj is None or isinstance(obj, Mapping):
            return self.getitem(obj, attribute)
        return super().getattr(obj, attribute)


ENV = _Sandbox(
    undefined=StrictUndefined,  # a misspelt name or field is an error, not an empty string
    trim_blocks=True,  # a line that holds only {% ... %} tags leaves nothing
    lstrip_blocks=True,
    extensions=["jinja2.ext.do"],  # {% do list.append(x) %}
    finalize=lambda value: "—" if value is None else value,
)
ENV.filters.update(fmt=fmt, units=units_text, duration=duration)


def render(template: str, names: Mapping[str, Any]) -> str:
    """``template`` (Jinja2) rendered over ``names``, without blank lines at its ends; a :class:`ResultsError` with
    the template's line if it cannot be."""
    try:
        return ENV.from_string(template).render(names).strip("\n")
    except TemplateSyntaxError as error:
        raise ResultsError(error.message or str(error), error.lineno) from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as error:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<template>"]
        raise ResultsError(str(error), lines[0] if lines else None) from None


# -- the data ----------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """A JSON file's content; a :class:`ResultsError` naming the file if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path}: not valid JSON ({error})") from None


def identifier(name: str) -> str:
    """A run's name as a template name: ``vae-k1`` -> ``vae_k1``."""
    return re.sub(r"\W", "_", name)


@dataclass
class Run:
    """A run an experiment declares, as far as its files go.

    ``state``: ``finished`` (evaluated, in ``results/<experiment>/runs/<run>/``), ``unevaluated`` (trained to the
    end, no evaluation yet), ``running`` (in ``results/in-progress/<experiment>/<run>/`` with a checkpoint),
    ``lost`` (in progress, its checkpoint missing or damaged: to be restarted) or ``planned`` (no files yet).
    """

    name: str
    state: str
    folder: str | None  # relative to the repository's root
    config: Any = None  # iwae.config.TrainConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_epoch: int | None = None
    evaluation: dict[str, Any] | None = None
    # The run's evaluations of the same images (split, seed, count, units, binarisation) at each K, by K; and of the
    # same images binarised otherwise (iwae eval --binarization), at the main evaluation's K.
    by_k: dict[int, dict[str, Any]] = field(default_factory=dict)
    crossed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs_total(self) -> int | None:
        return None if self.config is None else self.config.total_epochs

    @property
    def epochs_done(self) -> int:
        return self.metrics[-1]["epoch"] if self.metrics else 0

    def status(self) -> str:
        """Where the run stands, in a few words: ``running: epoch 16 of 3,280 (results/in-progress/...)``."""
        total = f"{self.epochs_total:,}" if self.epochs_total is not None else "?"
        if self.state == "finished":
            return f"finished: {self.epochs_done:,} passes, evaluated ({self.folder})"
        if self.state == "unevaluated":
            return f"trained ({self.epochs_done:,} passes), not yet evaluated ({self.folder})"
        if self.state == "running":
            return f"running: epoch {self.checkpoint_epoch:,} of {total} ({self.folder})"
        if self.state == "lost":
            return f"checkpoint lost after epoch {self.epochs_done:,} of {total} ({self.folder}): to be restarted"
        return "not started"


def _metrics(folder: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """A run folder's metric records (those up to epoch ``up_to``); ``[]`` without a metrics file."""
    from iwae.runs import METRICS_FILE, RunError, parse_metrics

    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    try:
        records = parse_metrics(path)
    except RunError as error:
        raise ResultsError(str(error)) from None
    return [record for record in records if up_to is None or record["epoch"] <= up_to]


def _config(folder: Path) -> Any:
    """A run folder's TrainConfig, or a :class:`ResultsError` naming the file."""
    from iwae.runs import RunError, load_config

    try:
        return load_config(folder)
    except RunError as error:
        raise ResultsError(str(error)) from None


def _images(evaluation: Mapping[str, Any]) -> tuple[Any, ...]:
    """What an evaluation's images are besides their binarisation (None in ``binarization``: the run's own)."""
    return tuple(evaluation.get(key) for key in ("split", "seed", "n_examples", "limit", "pruned_by"))


def _other_evaluations(
    folder: Path, evaluation: dict[str, Any]
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The run's evaluations (``eval-<settings>.json``) of the images ``evaluation`` took: by K, ``evaluation`` among
    them (``iwae eval --k K``); and binarised otherwise at its K (``iwae eval --binarization``)."""
    by_k, crossed = {int(evaluation["k"]): evaluation}, []
    for path in sorted(folder.glob("eval-*.json")):
        other = read_json(path)
        if not isinstance(other, dict) or "k" not in other or "nll" not in other:
            raise ResultsError(f"{path}: not an evaluation (no k or nll)")
        if _images(other) != _images(evaluation):
            continue
        if other.get("binarization") == evaluation.get("binarization"):
            by_k.setdefault(int(other["k"]), other)
        elif other["k"] == evaluation["k"]:
            crossed.append(other)
    return dict(sorted(by_k.items())), crossed


def run_state(root: Path, experiment: str, name: str, eval_file: str) -> Run:
    """The state of run ``name`` of ``experiment`` from its files (:class:`Run`)."""
    from iwae.checkpoint import CheckpointError, load_checkpoint
    from iwae.runs import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE

    done = root / RESULTS_DIR / experiment / "runs" / name
    going = root / RESULTS_DIR / IN_PROGRESS_DIR / experiment / name
    if (done / CONFIG_FILE).is_file():
        if going.exists():
            raise ResultsError(f"{going}: left over from a run now in {done}; remove it (results/README.md)")
        folder, config = done.relative_to(root).as_posix(), _config(done)
        metrics = _metrics(done)
        if (done / eval_file).is_file():
            evaluation = read_json(done / eval_file)
            by_k, crossed = _other_evaluations(done, evaluation)
            return Run(name, "finished", folder, config, metrics, evaluation=evaluation, by_k=by_k, crossed=crossed)
        return Run(name, "unevaluated", folder, config, metrics)
    if not (going / CONFIG_FILE).is_file():
        return Run(name, "planned", None)
    folder, config = going.relative_to(root).as_posix(), _config(going)
    try:
        epoch = int(load_checkpoint(going / CHECKPOINT_FILE).progress["epochs_done"])
    except (FileNotFoundError, CheckpointError):
        return Run(name, "lost", folder, config, _metrics(going))
    metrics = _metrics(going, up_to=epoch)  # lines past the checkpoint are recomputed when it resumes
    if epoch == config.total_epochs and (going / MODEL_FILE).is_file():
        return Run(name, "unevaluated", folder, config, metrics, checkpoint_epoch=epoch)
    return Run(name, "running", folder, config, metrics, checkpoint_epoch=epoch)


# What the rows of a summary made from run folders hold (written into its "fields").
RUN_FIELDS = {
    "id": "the run's name as a template name",
    "run": "the run's folder name",
    "state": "finished, unevaluated, running, lost (checkpoint missing: restart) or planned",
    "status": "where the run stands, in words",
    "folder": "the run's folder, from the repository's root",
    "dataset": "the training data",
    "layers": "stochastic layers",
    "objective": "the training objective",
    "objective_label": "the objective with its parameters: miwae(M=8), ciwae(beta=0.05)",
    "objective_params": "the objective's parameters by name: {'M': 8}, {'alpha': 0.2}; {} for vae and iwae",
    "estimator": "the gradient estimator: standard, stl or dreg",
    "k": "samples per example in training",
    "binarization": "dynamic (a fresh draw at each use) or threshold (pixel >= 0.5); None: the dataset's own",
    "seed": "the seed",
    "output_bias": "the decoder's output bias at the start: data-mean (Burda's) or zero",
    "protocol": "default (this package's) or authors (their code's), or mixed",
    "epochs": "passes in the run's schedule",
    "epochs_done": "passes done (for a running run, up to its checkpoint)",
    "checkpoint_epoch": "the epoch of the checkpoint a running run resumes from",
    "train_seconds": "training seconds, the sum over its epochs (metrics.jsonl)",
    "seconds_per_epoch_median": "median seconds per epoch",
    "seconds_per_epoch_min": "seconds of the fastest (least contended) epoch",
    "valid_k": "k of the validation bound monitored each epoch",
    "valid_bound": "the validation bound L_valid_k after the last epoch done (nats)",
    "nll": "test NLL: -mean L_eval_k over the evaluated images (nats)",
    "nll_std_err": "its standard error",
    "units": "active units per stochastic layer, ours (Var over the images of E_q[u|x] > 0.01)",
    "units_authors": "active units by the authors' definition (500 training images, >= 0.01)",
    "units_kl": "units whose mean KL exceeds 0.01",
    "nll_pruned": "NLL with the inactive units of pruned_by's definition removed",
    "pruned_by": "whose inactive units nll_pruned removes",
    "eval_k": "k of L_k in the evaluation",
    "eval_n": "images evaluated",
    "eval_split": "the split evaluated",
    "eval_seconds": "seconds the evaluation took",
    "recon_log_lik": "the reconstruction term E_q[log p(x|h)], one sample per image (nats)",
    "kl": "the KL term E_q[log q(h|x) - log p(h)], one sample per image (nats)",
    "elbo": "their difference, the one-sample ELBO (nats)",
    "bounds": "-L_K of the same images at each K the run was evaluated at: [{k, nll, nll_std_err}] (nats)",
    "crossed": "the test NLL of the same images binarised otherwise than the run trained on, at the same K: "
    "[{binarization, nll, nll_std_err}] (nats)",
    "wall_seconds": "training plus evaluation seconds",
    "per_example": "the evaluation's per-example L_k (from the repository's root; templates compare two runs with "
    "paired(a, b)); None where the evaluation kept none",
}


def run_row(run: Run) -> dict[str, Any]:
    """A summary row of a run (:data:`RUN_FIELDS`); None where its files do not say."""
    from iwae.lab.reports.records import protocol_of

    row: dict[str, Any] = dict.fromkeys(RUN_FIELDS)
    row.update(id=identifier(run.name), run=run.name, state=run.state, status=run.status(), folder=run.folder)
    if run.config is not None:
        config = run.config
        row.update(
            dataset=config.dataset,
            layers=config.model.n_stochastic,
            objective=config.objective.name,
            objective_label=config.objective.label(),
            objective_params=asdict(config.objective),
            estimator=config.estimator,
            k=config.k,
            binarization=config.binarization,
            seed=config.seed,
            output_bias=config.output_bias,
            protocol=protocol_of(config),
            epochs=config.total_epochs,
            valid_k=config.valid_k,
        )
    row.update(epochs_done=run.epochs_done, checkpoint_epoch=run.checkpoint_epoch)
    if run.metrics:
        seconds = [float(record["seconds"]) for record in run.metrics]
        valid = [key for key in run.metrics[-1] if key.startswith("valid_L")]
        row.update(
            train_seconds=sum(seconds),
            seconds_per_epoch_median=statistics.median(seconds),
            seconds_per_epoch_min=min(seconds),
            valid_bound=run.metrics[-1][valid[0]] if valid else None,
        )
    evaluation = run.evaluation
    if evaluation is not None and evaluation.get("per_example_file"):
        row["per_example"] = f"{run.folder}/{evaluation['per_example_file']}"
    if evaluation is not None:
        row.update(
            nll=evaluation["nll"],
            nll_std_err=evaluation.get("nll_std_err"),
            units=evaluation["active_units"],
            units_authors=evaluation.get("active_units_authors") if "pruned_by" in evaluation else None,
            units_kl=evaluation.get("active_units_kl"),
            nll_pruned=evaluation.get("nll_active_only"),
            pruned_by=evaluation.get("pruned_by"),
            eval_k=evaluation["k"],
            eval_n=evaluation["n_examples"],
            eval_split=evaluation.get("split"),
            eval_seconds=evaluation.get("seconds"),
            recon_log_lik=evaluation.get("recon_log_lik"),
            kl=evaluation.get("kl"),
            elbo=evaluation.get("elbo"),
            bounds=[{"k": k, "nll": e["nll"], "nll_std_err": e.get("nll_std_err")} for k, e in run.by_k.items()],
            crossed=[
                {"binarization": e["binarization"], "nll": e["nll"], "nll_std_err": e.get("nll_std_err")}
                for e in run.crossed
            ],
        )
        if row["train_seconds"] is not None and row["eval_seconds"] is not None:
            row["wall_seconds"] = row["train_seconds"] + row["eval_seconds"]
    return row


@dataclass
class Experiment:
    """One folder of ``results/``: its ``experiment.json`` (``meta``), its summary (``rows`` and named ``values``),
    and, for one kept as run folders, its runs."""

    name: str
    folder: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    values: dict[str, Any]
    fields: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    @property
    def from_runs(self) -> bool:
        return self.meta["data"] == "runs"

    def summary_text(self) -> str:
        """The ``summary.json`` of an experiment kept as run folders, as this script writes it."""
        summary = {
            "experiment": self.name,
            "generated_by": "docs/_ext/results_docs.py from runs/ and ../in-progress/; do not edit",
            "fields": self.fields,
            "rows": self.rows,
            "values": self.values,
        }
        return json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def row(self, row_id: str) -> dict[str, Any]:
        for row in self.rows:
            if row["id"] == row_id:
                return row
        raise ResultsError(f"{self.folder / SUMMARY_FILE}: no row {row_id!r}")

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise ResultsError(f"{self.folder / EXPERIMENT_FILE}: no run {name!r} among its runs")


def output_files(meta: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """The files of an experiment kept as its commands' outputs, each with the name its object goes under (None: its
    keys are merged into the values): ``outputs`` as a list of files or as ``{"name": "file"}``."""
    outputs = meta.get("outputs") or []
    return list(outputs.items()) if isinstance(outputs, dict) else [(None, name) for name in outputs]


def load_experiment(root: Path, folder: Path) -> Experiment:
    """An experiment from its folder: ``experiment.json`` checked, the summary read (or made from its runs)."""
    path = folder / EXPERIMENT_FILE
    meta = read_json(path)
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ResultsError(f"{path}: missing {', '.join(missing)}")
    if meta["data"] not in DATA_KINDS:
        raise ResultsError(f"{path}: data must be one of {', '.join(DATA_KINDS)}, not {meta['data']!r}")
    if meta["data"] == "transcribed" and "provenance" not in meta:
        raise ResultsError(f"{path}: transcribed data needs its provenance")
    if not meta["commands"] or not all(isinstance(c, dict) and "command" in c for c in meta["commands"]):
        raise ResultsError(f"{path}: commands must be a list of {{'command': ...}}")
    from iwae.lab.reports.published import SOURCES

    unknown = [key for key in meta["published"] if key not in SOURCES]
    if unknown:
        raise ResultsError(f"{path}: unknown published source(s) {', '.join(unknown)} (one of {', '.join(SOURCES)})")
    if meta["data"] == "runs":
        names = meta.get("runs") or []
        if not names:
            raise ResultsError(f"{path}: an experiment kept as run folders names its runs")
        eval_file = meta.get("eval_file", "eval.json")
        runs = [run_state(root, folder.name, name, eval_file) for name in names]
        rows, values, fields = [run_row(run) for run in runs], {}, dict(RUN_FIELDS)
    elif meta["data"] == "outputs":
        runs, rows, values, fields = [], [], {}, {}
        for key, name in output_files(meta):
            output = read_json(folder / name)
            if not isinstance(output, dict):
                raise ResultsError(f"{folder / name}: a command's output is a JSON object")
            output = output if key is None else {key: output}  # {"name": "file.json"}: the file's object as name
            twice = sorted(set(output) & set(values))
            if twice:
                raise ResultsError(f"{folder / name}: {', '.join(twice)} given by another output too")
            values.update(output)
            fields.update(dict.fromkeys(output, f"from {name}, the command's own output"))
        if not values:
            raise ResultsError(f"{path}: an experiment kept as outputs names them: \"outputs\": [\"FILE.json\"]")
    else:
        summary = read_json(folder / SUMMARY_FILE)
        runs, rows = [], summary.get("rows", [])
        values, fields = summary.get("values", {}), summary.get("fields", {})
    ids = [row.get("id") for row in rows]
    bad = [i for i in ids if not isinstance(i, str) or not i.isidentifier()]
    if bad or len(set(ids)) != len(ids):
        raise ResultsError(f"{folder / SUMMARY_FILE}: row ids must be distinct names (found {bad or ids})")
    clash = set(ids) & set(values) | (set(ids) | set(values)) & set(HELPER_NAMES)
    if clash:
        raise ResultsError(f"{folder / SUMMARY_FILE}: {', '.join(sorted(clash))} named twice (rows, values, helpers)")
    return Experiment(folder.name, folder, meta, rows, values, fields, runs)


@dataclass
class Results:
    """Every experiment of ``results/``, by name."""

    root: Path
    experiments: dict[str, Experiment]

    def get(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise ResultsError(f"no experiment {name!r} in {self.root / RESULTS_DIR}")
        return self.experiments[name]


def load_results(root: Path) -> Results:
    """The experiments under ``root/results`` (every folder with an ``experiment.json``)."""
    base = root / RESULTS_DIR
    folders = sorted(p.parent for p in base.glob(f"*/{EXPERIMENT_FILE}") if p.parent.name != IN_PROGRESS_DIR)
    return Results(root, {folder.name: load_experiment(root, folder) for folder in folders})


# -- what templates see ------------------------------------------------------------------------------------------------
def published_table1(dataset: str, layers: int, k: int, objective: str) -> dict[str, Any] | None:
    """Burda et al.'s Table 1 (or Appendix D) NLL and active units of a cell, with its source; None if none."""
    from iwae.lab.reports.published import PUBLISHED_TABLE1, table1_source

    found = PUBLISHED_TABLE1.get((dataset, layers, k, objective))
    if found is None:
        return None
    nll, units = found
    return {"nll": nll, "units": None if units is None else list(units), "source": table1_source(dataset)}


def published_table2(from_objective: str, from_k: int, to_objective: str, to_k: int) -> dict[str, Any] | None:
    """Burda et al.'s Table 2 (the objective swap): base and continued NLL and units, with the source."""
    from iwae.lab.reports.published import PUBLISHED_TABLE2, SOURCES

    found = PUBLISHED_TABLE2.get(((from_objective, from_k), (to_objective, to_k)))
    if found is None:
        return None
    entry: dict[str, Any] = {part: {"nll": nll, "units": list(units)} for part, (nll, units) in found.items()}
    return {**entry, "source": SOURCES["table2"]}


def published_rainforth(objective_label: str, estimator: str, k: int) -> dict[str, Any] | None:
    """Rainforth et al.'s test NLL of an objective (``miwae(M=8)``) and estimator at ``k``, with its source; None if
    they give none."""
    from iwae.lab.reports.published import PUBLISHED_RAINFORTH, SOURCES

    found = PUBLISHED_RAINFORTH.get((objective_label, estimator, k))
    return None if found is None else {"nll": found, "units": None, "source": SOURCES["rainforth"]}


def published_student(k: int) -> dict[str, Any] | None:
    """The student reproduction's test NLL and active units (by the per-unit KL) at ``k``, with its source; None if
    it gives neither. Either may be None."""
    from iwae.lab.reports.published import PUBLISHED_STUDENT, SOURCES

    found = PUBLISHED_STUDENT.get(k)
    if found is None:
        return None
    nll, units = found
    return {"nll": nll, "units": None if units is None else [units], "source": SOURCES["student"]}


def published_of(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A row's published counterpart: Table 2's for a swap (``from_objective``, ``from_k``, ``to_objective``,
    ``to_k``), else Table 1's for a cell (``dataset``, ``layers``, ``k``, ``objective``); None if it has none, as
    has a model trained on thresholded images (the paper's are binarised dynamically, or fixed in Appendix D)."""
    if row.get("binarization") == "threshold":
        return None
    swap = ("from_objective", "from_k", "to_objective", "to_k")
    if all(row.get(key) is not None for key in swap):
        return published_table2(*(row[key] for key in swap))
    cell = ("dataset", "layers", "k", "objective")
    if all(row.get(key) is not None for key in cell):
        return published_table1(*(row[key] for key in cell))
    return None


def result(row: Mapping[str, Any] | None) -> str | None:
    """``NLL ± standard error / units`` of a row (or of a published counterpart: ``NLL / units``); None without
    an NLL."""
    if row is None or row.get("nll") is None:
        return None
    text = f"{row['nll']:.2f}"
    if row.get("nll_std_err") is not None:
        text += f" ± {row['nll_std_err']:.2f}"
    return text + (f" / {units_text(row['units'])}" if row.get("units") is not None else "")


def model_label(objective: str | None, k: int | None) -> str | None:
    """``VAE, k = 1``; None for a run not started (no settings yet)."""
    return None if objective is None or k is None else f"{objective.upper()}, k = {k}"


def within(difference: float, limit: float) -> str:
    """``yes`` if ``difference`` <= ``limit``; else ``no``, with three decimals where two would hide it."""
    if difference <= limit:
        return "yes"
    return f"no ({difference:.3f})" if round(difference, 2) <= limit else "no"


def schedule_of(**settings: Any) -> dict[str, Any]:
    """What a training schedule amounts to over Burda's 59,600 MNIST training images: its ``steps``, ``passes`` and
    the minibatch of each stage (``batch_sizes``), from the settings as ``iwae train``/a grid takes them."""
    from iwae.lab.bench.settings import BURDA_TRAIN_IMAGES
    from iwae.lab.grid import train_config
    from iwae.train import total_steps

    config = train_config({"dataset": "mnist", **settings})
    sizes = config.stage_batch_sizes or (config.batch_size,) * len(config.stages)
    return {"steps": total_steps(config, BURDA_TRAIN_IMAGES), "passes": config.total_epochs, "batch_sizes": list(sizes)}


ENV.globals.update(
    min=min,
    max=max,
    sum=sum,
    paper1=published_table1,
    paper2=published_table2,
    rainforth=published_rainforth,
    student=published_student,
    result=result,
    model=model_label,
    within=within,
    schedule_of=schedule_of,
)
# The names templates see besides the data (:func:`namespace`, Jinja's globals): rows and values may not take them.
HELPER_NAMES = (
    *ENV.globals,
    *("meta", "rows", "values", "experiment", "outcome", "paired", "find", "burda_passes", "match_nats"),
    *("row", "paper", "run", "prefix", "prefix_meta"),
)


def _with_paper(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with its published counterpart as ``paper`` (:func:`published_of`)."""
    return {**row, "paper": published_of(row)}


def namespace(results: Results, experiment: Experiment) -> dict[str, Any]:
    """The names a template of ``experiment`` sees besides :data:`ENV`'s globals: its rows by id (each with its
    published counterpart as ``paper``), its named values (also as ``values``, for a name Jinja reads as a literal,
    such as ``true``), ``meta`` (its experiment.json), ``rows``, and ``find``, ``experiment`` and ``outcome``."""
    from iwae.lab.reports.published import BURDA_PASSES
    from iwae.lab.schedules import MATCH_NATS

    # Copies: what a template changes (``{% do values.ks.append(1) %}``) stays in its block.
    data, values, meta = copy.deepcopy((experiment.rows, experiment.values, experiment.meta))
    rows = [_with_paper(row) for row in data]

    def find(**criteria: Any) -> dict[str, Any]:
        """The one row whose fields equal ``criteria``."""
        found = [row for row in rows if all(row.get(key) == value for key, value in criteria.items())]
        if len(found) != 1:
            raise ResultsError(f"{experiment.name}: {len(found)} rows match {criteria}, not one")
        return found[0]

    def other(name: str) -> dict[str, Any]:
        """Another experiment's names."""
        return namespace(results, results.get(name))

    def paired(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
        """Row ``a``'s NLL minus row ``b``'s on the same examples, with the standard error of the per-example
        differences (``difference``, ``std_err``, ``n``); None unless both evaluations kept per-example values."""
        from iwae.evaluate import paired_nll_difference

        if a.get("per_example") is None or b.get("per_example") is None:
            return None
        try:
            pair = paired_nll_difference(results.root / a["per_example"], results.root / b["per_example"])
        except ValueError as error:
            raise ResultsError(str(error)) from None
        return {"difference": pair.difference, "std_err": pair.std_err, "n": pair.n_examples}

    def outcome(name: str, run: str) -> str | None:
        """A run's result (``NLL ± se / units``) once evaluated, else where it stands; None if not declared."""
        target = results.get(name)
        if not target.from_runs:
            raise ResultsError(f"outcome({name!r}, ...): {name} is not kept as run folders")
        if run not in target.meta["runs"]:
            return None
        row = target.row(identifier(run))
        return result(row) if row["state"] == "finished" else row["status"]

    return {
        **{row["id"]: row for row in rows},
        **values,
        "values": values,
        "meta": meta,
        "rows": rows,
        "find": find,
        "experiment": other,
        "outcome": outcome,
        "paired": paired,
        "burda_passes": BURDA_PASSES,
        "match_nats": MATCH_NATS,
    }


# -- blocks ----------------------------------------------------------------------------------------------------------
def about(results: Results, experiment: Experiment) -> str:
    """The block that says what an experiment ran: commands, budget, wall time, when, where, the published source and
    where its data are."""
    from iwae.lab.reports.published import SOURCES

    meta = experiment.meta
    commands = meta["commands"]
    shown = [
        f"`{c['command']}`" + (f" ({c['note']})" if c.get("note") and c.get("wall_time_s") is None else "")
        for c in commands
    ]
    lines = [f"- **Command{'s' if len(commands) > 1 else ''}**: " + "; ".join(shown)]
    lines.append(f"- **Budget**: {meta['budget']}")
    lines.append(f"- **Wall time**: {_wall_time(experiment)}")
    commit = meta.get("library_commit")
    if commit:
        library = f"library commit {commit}"
    else:
        library = "library commit not recorded" + (
            f" (first published in {meta['committed_in']})" if meta.get("committed_in") else ""
        )
    resumed = "".join(
        f"; resumed {entry['date']} at epoch {entry['from_epoch']:,} with commit {entry['library_commit']}"
        + (f" ({entry['note']})" if entry.get("note") else "")
        for entry in meta.get("resumed", [])
    )
    lines.append(f"- **Measured**: {meta['date']}, {meta['machine']}; {library}{resumed}")
    published = "; ".join(SOURCES[key] for key in meta["published"]) or "none to compare with"
    lines.append(f"- **Published**: {published}")
    folder = experiment.folder.relative_to(results.root).as_posix()
    if experiment.from_runs:
        where = ", ".join(
            f"`{run.folder}/` ({run.state})" if run.folder else f"{run.name} (not started)" for run in experiment.runs
        )
        lines.append(f"- **Data**: `{folder}/` (the summary made from its runs): {where}")
    elif meta["data"] == "outputs":
        files = ", ".join(f"`{folder}/{name}`" for _, name in output_files(meta))
        note = f" ({meta['provenance']})" if meta.get("provenance") else ""
        lines.append(f"- **Data**: {files}: the command's own output{note}")
    else:
        lines.append(f"- **Data**: `{folder}/summary.json`: {meta['provenance']}")
    return "\n".join(lines)


def _wall_time(experiment: Experiment) -> str:
    meta = experiment.meta
    if experiment.from_runs:
        parts = []
        for run in experiment.runs:
            row = experiment.row(identifier(run.name))
            if row["train_seconds"] is None:
                parts.append(f"{run.name}: not started")
                continue
            train = f"{duration(row['train_seconds'])} of training over {row['epochs_done']:,} passes"
            if run.state in ("running", "lost"):
                parts.append(f"{run.name}: {train} so far")
            elif row["eval_seconds"] is not None:
                parts.append(f"{run.name}: {train} + {duration(row['eval_seconds'])} of evaluation")
            else:
                parts.append(f"{run.name}: {train}")
        return "; ".join(parts) + " (the sums of the epochs' seconds in metrics.jsonl, and the evaluation's)"
    timed = [c for c in meta["commands"] if c.get("wall_time_s") is not None]
    if not timed:
        return meta.get("wall_time_note", "not recorded")
    several = len(meta["commands"]) > 1
    parts = []
    for command in timed:
        notes = [f"`{command['command']}`"] if several else []
        notes += [command["note"]] if command.get("note") else []
        parts.append(duration(command["wall_time_s"]) + (f" ({', '.join(notes)})" if notes else ""))
    return "; ".join(parts)


def table(template: str, results: Results, experiment: Experiment) -> str:
    """A Markdown table: its template renders the header and alignment lines, then a line per row (a
    ``{% for row in rows %}`` loop), each a table line."""
    rendered = render(template, namespace(results, experiment))
    lines = rendered.splitlines()
    aligned = len(lines) >= 2 and re.fullmatch(r"\|(:?-+:?\|)+", lines[1])
    if not aligned or not all(line.startswith("|") for line in lines):
        raise ResultsError("a table template renders a header, an alignment line (|---|) and its rows, each a '|' line")
    return rendered


def text(template: str, results: Results, experiment: Experiment) -> str:
    """Prose with its fields filled in from the experiment's data."""
    return render(template, namespace(results, experiment))


# -- figures -----------------------------------------------------------------------------------------------------------
@dataclass
class FigureSpec:
    """Everything a figure shows, as data: drawn by :func:`draw`, and its digest stored in the PNG, so that
    ``--check`` knows whether the figure shows the data it would be drawn from now."""

    name: str  # the file's stem in docs/results/
    alt: str
    xlabel: str
    ylabel: str
    xscale: str = "linear"
    xticks: list[float] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)  # {"x", "y", "label"[, "marker"]}
    vlines: list[dict[str, Any]] = field(default_factory=list)  # {"x", "label"}
    points: list[dict[str, Any]] = field(default_factory=list)  # {"x", "y", "label", "marker"[, "color"]}
    histograms: list[dict[str, Any]] = field(default_factory=list)  # {"values", "label"}: on shared bins
    bins: int = 20
    # PNGs shown side by side instead of axes: {"path" (from the repository's root), "sha256" (of its bytes)}
    images: list[dict[str, Any]] = field(default_factory=list)

    def digest(self) -> str:
        data = json.dumps(self.__dict__, sort_keys=True, allow_nan=False)
        return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def _draw_images(spec: FigureSpec, root: Path) -> Any:
    """The images of ``spec`` side by side, each as drawn (no axes)."""
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    pictures = []
    for image in spec.images:
        with Image.open(root / image["path"]) as opened:
            pictures.append(np.asarray(opened.convert("RGB")))
    height = max(picture.shape[0] for picture in pictures)
    width = sum(picture.shape[1] for picture in pictures)
    figure = Figure(figsize=(width / 100, height / 100))
    axes = figure.subplots(1, len(pictures), width_ratios=[picture.shape[1] for picture in pictures], squeeze=False)
    for axis, picture in zip(axes[0], pictures, strict=True):
        axis.imshow(picture, interpolation="nearest")
        axis.set_axis_off()
    figure.subplots_adjust(left=0, right=1, top=1, bottom=0, wspace=0.02)
    return figure


def draw(spec: FigureSpec, root: Path = ROOT) -> bytes:
    """The PNG of a figure, its data's digest in the text chunk :data:`DIGEST_KEY` (no pyplot: Agg, one figure);
    ``root`` is where the paths of its images start."""
    figure = _draw_images(spec, root) if spec.images else _draw_axes(spec)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100 if spec.images else 90, metadata={DIGEST_KEY: spec.digest()})
    return buffer.getvalue()


def _draw_axes(spec: FigureSpec) -> Any:
    """One axes: the lines, histograms, vertical lines and points of ``spec``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.4))
    axis = figure.subplots()
    for line in spec.lines:
        axis.plot(line["x"], line["y"], "-" + line.get("marker", ""), linewidth=1.4, label=line["label"])
    if spec.histograms:
        import numpy as np

        values = [value for histogram in spec.histograms for value in histogram["values"]]
        edges = np.linspace(min(values), max(values), spec.bins + 1)
        for histogram in spec.histograms:
            axis.hist(histogram["values"], bins=edges, histtype="step", linewidth=1.6, label=histogram["label"])
    for vline in spec.vlines:
        axis.axvline(vline["x"], color="grey", linestyle=":", label=vline["label"])
    for point in spec.points:
        color = point.get("color")  # None: the next of matplotlib's cycle
        axis.plot([point["x"]], [point["y"]], point["marker"], markersize=8, label=point["label"], color=color)
    axis.set_xscale(spec.xscale)
    if spec.xticks:
        axis.set_xticks(spec.xticks, [f"{tick:,}" for tick in spec.xticks])
        axis.minorticks_off()
    axis.set_xlabel(spec.xlabel)
    axis.set_ylabel(spec.ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def png_digest(path: Path) -> str | None:
    """The data digest stored in a PNG this script drew; None if there is none (or no file)."""
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(DIGEST_KEY)


def curve_figure(args: dict[str, str], results: Results, experiment: Experiment) -> FigureSpec | None:
    """A run's validation bound against passes (``run=NAME``), log scale, ticks at its stage ends, with its test NLL
    and the paper's once evaluated; ``prefix=EXPERIMENT.ROW`` marks a shorter run with the same settings whose schedule
    is the first stages of this one's (the same computation: it is this curve up to its passes) and its test NLL.
    None while the run has no epoch."""
    if "run" not in args:
        raise ResultsError("a curve figure names its run: run=NAME")
    from iwae.config import BURDA_STAGES

    run = experiment.run(args["run"])
    if not run.metrics:
        return None
    config = run.config
    valid_key = f"valid_L{config.valid_k}"
    ends, total = [], 0
    for passes, _ in config.stages:
        total += passes
        ends.append(total)
    spec = FigureSpec(
        name=f"{experiment.name}-{run.name}-curve",
        alt=f"{experiment.name} {run.name}: validation bound against passes",
        xlabel="passes over the training images (log scale; ticks at the schedule's stage ends)",
        ylabel="nats (lower is better)",
        xscale="log",
        xticks=ends,
        lines=[
            {
                "x": [record["epoch"] for record in run.metrics],
                "y": [-record[valid_key] for record in run.metrics],
                "label": f"-L_{config.valid_k} on the validation images after each pass ({run.state})",
            }
        ],
    )
    if "prefix" in args:
        prefix_experiment, _, prefix_id = args["prefix"].partition(".")
        shorter = results.get(prefix_experiment).row(prefix_id)
        settings = ("dataset", "layers", "objective", "k", "seed")
        ours = (config.dataset, config.model.n_stochastic, config.objective.name, config.k, config.seed)
        if tuple(shorter.get(key) for key in settings) != ours or shorter.get("epochs") not in ends:
            raise ResultsError(
                f"prefix={args['prefix']}: not this run's settings ({', '.join(settings)}) or its passes "
                f"({shorter.get('epochs')}) not a stage end of this run's schedule ({', '.join(map(str, ends))})"
            )
        passes, stages = shorter["epochs"], ends.index(shorter["epochs"]) + 1
        burda = tuple(config.stages) == BURDA_STAGES[: len(config.stages)]
        schedule = f"schedule burda:{stages}" if burda else f"the first {stages} stages"
        label = f"the {passes}-pass model ({schedule}): this run at pass {passes}"
        spec.vlines.append({"x": passes, "label": label})
        if shorter.get("nll") is not None:
            measured = f"{prefix_experiment}, {results.get(prefix_experiment).meta['date']}"
            label = f"its test NLL, L_5000 ({measured})"
            spec.points.append({"x": passes, "y": shorter["nll"], "label": label, "marker": "o"})
    row = experiment.row(identifier(run.name))
    if row["nll"] is not None:
        spec.points.append({"x": row["epochs_done"], "y": row["nll"], "label": "ours: test NLL, L_5000", "marker": "D"})
    paper = published_of(row)
    if paper is not None and paper.get("nll") is not None:
        spec.points.append(
            {
                "x": config.total_epochs,
                "y": paper["nll"],
                "label": f"paper's test NLL ({paper['source']})",
                "marker": "*",
            }
        )
    return spec


def _named_runs(args: dict[str, str], experiment: Experiment, kind: str) -> list[Run]:
    """The runs a figure names, ``runs=A,B``, in that order."""
    if not args.get("runs"):
        raise ResultsError(f"a {kind} figure names its runs: runs=NAME,NAME")
    return [experiment.run(name) for name in args["runs"].split(",")]


def _label(run: Run) -> str:
    return f"{run.name} ({run.config.objective.label()} k = {run.config.k})"


def bounds_figure(args: dict[str, str], results: Results, experiment: Experiment) -> FigureSpec | None:
    """-L_K of the same test images against K, one line per run (``runs=A,B``): from the ELBO (K = 1) towards the
    NLL. None while no named run has been evaluated at two K."""
    runs = [run for run in _named_runs(args, experiment, "bounds") if len(run.by_k) >= 2]
    if not runs:
        return None
    ks = sorted({k for run in runs for k in run.by_k})
    return FigureSpec(
        name=f"{experiment.name}-bounds-{'-'.join(run.name for run in runs)}",
        alt=f"{experiment.name}: -L_K against K",
        xlabel="K, samples per image (log scale)",
        ylabel="-L_K on the test images, nats (lower is tighter)",
        xscale="log",
        xticks=ks,
        lines=[
            {"x": list(run.by_k), "y": [e["nll"] for e in run.by_k.values()], "label": _label(run), "marker": "o"}
            for run in runs
        ],
    )


def units_figure(args: dict[str, str], results: Results, experiment: Experiment) -> FigureSpec | None:
    """Histograms of ln A_u over the latent units (every stochastic layer) of the runs named (``runs=A,B``), with
    the threshold of activity, A_u = 0.01. None while no named run has been evaluated."""
    runs = [run for run in _named_runs(args, experiment, "units") if run.evaluation is not None]
    if not runs:
        return None
    return FigureSpec(
        name=f"{experiment.name}-units-{'-'.join(run.name for run in runs)}",
        alt=f"{experiment.name}: histograms of ln A_u",
        xlabel="ln A_u, A_u = the variance over the test images of E_q[u | x]",
        ylabel="latent units",
        histograms=[
            {"values": [value for layer in run.evaluation["log_activity"] for value in layer], "label": _label(run)}
            for run in runs
        ],
        vlines=[{"x": math.log(0.01), "label": "A_u = 0.01: active to the right"}],
    )


PUBLISHED_BY_K: dict[str, Callable[[int], dict[str, Any] | None]] = {"student": published_student}


def units_k_figure(args: dict[str, str], results: Results, experiment: Experiment) -> FigureSpec | None:
    """Active latent units against k over the experiment's evaluated runs: Burda's covariance count and, where every
    run has it, the per-unit KL count; ``published=NAME`` (:data:`PUBLISHED_BY_K`) adds that source's counts as
    points. None while fewer than two runs are evaluated."""
    rows = sorted((row for row in experiment.rows if row.get("nll") is not None), key=lambda row: row["k"])
    if len(rows) < 2:
        return None
    ks = [row["k"] for row in rows]
    covariance = [sum(row["units"]) for row in rows]
    lines = [{"x": ks, "y": covariance, "label": "ours: A_u > 0.01 (covariance)", "marker": "o"}]
    if all(row.get("units_kl") is not None for row in rows):
        label = "ours: mean KL(q(z_u|x) || p(z_u)) > 0.01"
        lines.append({"x": ks, "y": [sum(row["units_kl"]) for row in rows], "label": label, "marker": "s"})
    points = []
    if "published" in args:
        if args["published"] not in PUBLISHED_BY_K:
            raise ResultsError(f"published={args['published']}: one of {', '.join(PUBLISHED_BY_K)}")
        for k in ks:
            theirs = PUBLISHED_BY_K[args["published"]](k)
            if theirs is not None and theirs.get("units") is not None:
                label = f"theirs: the {args['published']} study's own counts" if not points else "_nolegend_"
                points.append({"x": k, "y": sum(theirs["units"]), "label": label, "marker": "*", "color": "black"})
    return FigureSpec(
        name=f"{experiment.name}-units-k",
        alt=f"{experiment.name}: active units against k",
        xlabel="k, samples per image in training (log scale)",
        ylabel="active latent units",
        xscale="log",
        xticks=ks,
        lines=lines,
        points=points,
    )


def samples_figure(args: dict[str, str], results: Results, experiment: Experiment) -> FigureSpec | None:
    """The sample grids (``samples.png``, which a sweep's runs draw) of the runs named (``runs=A,B``), side by side.
    None while no named run has one."""
    from iwae.lab.run import SAMPLES_FILE

    images = []
    for run in _named_runs(args, experiment, "samples"):
        path = results.root / RESULTS_DIR / experiment.name / "runs" / run.name / SAMPLES_FILE
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            images.append({"path": path.relative_to(results.root).as_posix(), "sha256": digest, "run": run.name})
    if not images:
        return None
    return FigureSpec(
        name=f"{experiment.name}-samples-{'-'.join(image['run'] for image in images)}",
        alt=f"{experiment.name}: samples of {', '.join(image['run'] for image in images)}",
        xlabel="",
        ylabel="",
        images=images,
    )


FIGURE_KINDS: dict[str, Callable[[dict[str, str], Results, Experiment], FigureSpec | None]] = {
    "curve": curve_figure,
    "bounds": bounds_figure,
    "units": units_figure,
    "samples": samples_figure,
    "units_k": units_k_figure,
}


def figure(
    args: str, template: str | None, results: Results, experiment: Experiment, page: Path
) -> tuple[str, FigureSpec | None]:
    """A figure block's Markdown (the image and its caption: the template, with the ``run`` and ``prefix`` rows and
    ``prefix_meta`` among its names) and the figure to draw (None while there is nothing to draw)."""
    kind, *rest = args.split() or [""]
    if kind not in FIGURE_KINDS:
        raise ResultsError(f"figure kind {kind!r}: one of {', '.join(FIGURE_KINDS)}")
    options = dict(item.split("=", 1) for item in rest if "=" in item)
    spec = FIGURE_KINDS[kind](options, results, experiment)
    names = namespace(results, experiment)
    if "run" in options:
        names["run"] = names[identifier(options["run"])]
    if "prefix" in options:
        prefix_experiment, _, prefix_id = options["prefix"].partition(".")
        other = namespace(results, results.get(prefix_experiment))
        names["prefix"], names["prefix_meta"] = other[prefix_id], other["meta"]
    caption = render(template, names) if template else ""
    if spec is None:
        status = f" ({names['run']['status']})" if "run" in names else ""
        return f"*No data to draw yet{status}.*", None
    link = Path(os.path.relpath(results.root / FIGURES_DIR / f"{spec.name}.png", results.root / page.parent))
    body = f"![{spec.alt}]({link.as_posix()})"
    return body + (f"\n\n{caption}" if caption else ""), spec


# -- the pages ---------------------------------------------------------------------------------------------------------
@dataclass
class Stale:
    """Something this script would rewrite: where (a file, with a line for a block) and what."""

    where: str
    what: str


def refresh_page(content: str, page: str, results: Results) -> tuple[str, list[Stale], list[FigureSpec]]:
    """A page with every block generated afresh; the blocks that differed; the figures its blocks show."""
    stale: list[Stale] = []
    figures: list[FigureSpec] = []
    matched: set[int] = set()

    def replace(match: re.Match[str]) -> str:
        name, kind, template = match["name"], match["kind"], match["template"]
        line = content.count("\n", 0, match.start()) + 1
        where = f"{page}:{line}"
        matched.add(match.start())
        if "<!-- results:" in match["body"] or "<!-- /results:" in match["body"]:
            raise ResultsError(
                f"{where}: results:{name} is not closed (<!-- /results:{name} -->) before the next block"
            )
        try:
            if kind not in KINDS:
                raise ResultsError(f"kind {kind!r}: one of {', '.join(KINDS)}")
            experiment = results.get(name)
            if kind == "about":
                generated = about(results, experiment)
            elif kind in ("table", "text"):
                if not template:
                    raise ResultsError(f"a {kind} block needs a template")
                generated = (table if kind == "table" else text)(template, results, experiment)
            else:
                generated, spec = figure(match["args"], template, results, experiment, Path(page))
                if spec is not None:
                    figures.append(spec)
        except ResultsError as error:  # a template's line n is the page's line + n
            at = f"{page}:{line + error.line}" if error.line else where
            raise ResultsError(f"{at}: results:{name} {kind}: {error}") from None
        body = f"\n\n{generated}\n\n"
        if body != match["body"]:
            stale.append(Stale(where, f"block results:{name} ({kind})"))
        end = match.start("body") - match.start()
        return match.group(0)[:end] + body + f"<!-- /results:{name} -->"

    fresh = BLOCK.sub(replace, content)
    for marker in re.finditer(r"<!-- results:", content):
        if marker.start() not in matched:
            line = content.count("\n", 0, marker.start()) + 1
            raise ResultsError(f"{page}:{line}: a results block without its closing marker, or not well formed")
    return fresh, stale, figures


def refresh(root: Path = ROOT, pages: tuple[str, ...] = PAGES, write: bool = True) -> list[Stale]:
    """Bring the summaries made from runs, the pages' blocks and their figures up to date with the data (``write``),
    or only say which are stale; returns the stale ones, in order."""
    from iwae.checkpoint import atomic_write_bytes, atomic_write_text

    results = load_results(root)
    stale: list[Stale] = []
    for experiment in results.experiments.values():
        if experiment.from_runs:
            path = experiment.folder / SUMMARY_FILE
            fresh = experiment.summary_text()
            if not path.is_file() or path.read_text() != fresh:
                stale.append(Stale(path.relative_to(root).as_posix(), "the summary of its runs"))
                if write:
                    atomic_write_text(path, fresh)
    for page in pages:
        path = root / page
        if not path.is_file():
            continue
        content = path.read_text()
        fresh, page_stale, figures = refresh_page(content, page, results)
        stale += page_stale
        if write and fresh != content:
            atomic_write_text(path, fresh)
        for spec in figures:
            png = root / FIGURES_DIR / f"{spec.name}.png"
            if png_digest(png) != spec.digest():
                stale.append(Stale(png.relative_to(root).as_posix(), "a figure drawn from other data"))
                if write:
                    png.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(png, draw(spec, root))
    return stale


def main(argv: list[str], root: Path = ROOT) -> int:
    """Regenerate (or with ``--check`` only check) the results from the data; 1 if ``--check`` finds a stale block,
    2 if the data or a template cannot be read."""
    check = "--check" in argv
    try:
        stale = refresh(root, write=not check)
    except ResultsError as error:
        print(f"{Path(__file__).name}: {error}", file=sys.stderr)
        return 2
    if check:
        if stale:
            first = stale[0]
            more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
            print(f"{first.where}: {first.what} is stale{more}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    for item in stale:
        print(f"{item.where}: refreshed {item.what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
