"""Hand-made sweep databases for the report tests (``tests/lab/reports/``): finished runs with invented results
(inputs for the layout and the arithmetic, not measurements), the setups the reports tell apart, and the cells of a
report's Markdown rows."""

from __future__ import annotations

from pathlib import Path

from iwae.lab.store import ResultStore

# Invented setups; NLLs given to them are chosen apart from every published number.
BURDA = {"objective": "iwae", "k": 5}  # (a) Burda's setup, this package's default protocol
AUTHORS = {"objective": "iwae", "k": 5, "protocol": "authors"}  # (c) Burda's setup, the authors' code's protocol
STUDENT = {  # (b)
    "objective": "iwae", "activation": "relu", "batch_size": 128, "adam_eps": 1e-8, "train_split": "train+valid"
}
THRESHOLD = {"objective": "iwae", "k": 5, "binarization": "threshold"}  # (d)
STUDENT_DEPARTURES = (
    "ReLU networks instead of tanh; minibatch 128 instead of 20; Adam's epsilon 1e-08 instead of 1e-04; trained on "
    "all 60,000 training images (Burda: 59,600, the 400 validation images held out)"
)


def finished_row(store: ResultStore, name: str, run_dir: Path, nll: float, units: list[int], **options) -> None:
    """A finished run with learning curves and per-unit activities (for the figures)."""
    config = {"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options}
    store.upsert(
        name,
        run_dir=str(run_dir / name),
        config=config,
        status="finished",
        seconds_per_epoch=1.5 * options.get("k", 1),
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={
            "nll": nll,
            "active_units": units,
            "k": 10,
            "n_examples": 30,
            "recon_log_lik": -80.0,
            "kl": 20.0,
            "log_activity": [[-9.0, -8.5, 0.1, 0.3][: sum(units) + 2]],
        },
        metrics=[
            {"epoch": 1, "train_bound": -110.0, "valid_L50": -105.0},
            {"epoch": 2, "train_bound": -100.0, "valid_L50": -101.0},
        ],
    )


def evaluated_row(
    store: ResultStore,
    name: str,
    directory: Path,
    nll: float,
    active_units: list[int],
    *,
    seconds_per_epoch: float = 1.0,
    evaluation: dict | None = None,
    **options,
) -> None:
    """A finished run of one layer without learning curves: its NLL and active units given, L_10 on 30 examples,
    and ``evaluation``'s further fields in its eval.json."""
    store.upsert(
        name,
        run_dir=str(directory / name),
        config={"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options},
        status="finished",
        seconds_per_epoch=seconds_per_epoch,
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={"nll": nll, "active_units": active_units, "k": 10, "n_examples": 30, "recon_log_lik": -80.0, "kl": 20.0}
        | (evaluation or {}),
        metrics=[],
    )


def seed_row(
    store: ResultStore, name: str, directory: Path, nll: float, units: int = 20, seconds: float = 1.5, **options
) -> None:
    """A finished run of one layer, its active units and seconds per epoch given."""
    evaluated_row(store, name, directory, nll, [units], seconds_per_epoch=seconds, **options)


def setup_row(
    store: ResultStore, name: str, directory: Path, nll: float, units: int, kl_units: int, **options
) -> None:
    """A finished run of one layer with both counts of active units: the covariance one and the per-unit KL's."""
    evaluated_row(store, name, directory, nll, [units], evaluation={"active_units_kl": [kl_units]}, **options)


def cells(line: str) -> list[str]:
    """A Markdown row's cells, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def line_cells(markdown: str, start: str) -> list[str]:
    """The cells of the one row that starts with ``start`` (one row per cell of a table, not one per seed)."""
    (line,) = [x for x in markdown.splitlines() if x.startswith(start)]
    return cells(line)
