"""Reports beside Burda et al.'s numbers only for runs in his setup: the others get a table of their own, whose note
says how they depart; the authors' protocol gets a Table 1 of its own, labelled; runs are averaged only over seeds."""

from __future__ import annotations

import html
import re
import statistics
from pathlib import Path

import pytest

from iwae.config import build_train_config
from iwae.lab.reports import PUBLISHED_TABLE1, build_report, load_records, write_report
from iwae.lab.reports.records import burda_departures, group_by, protocol_of, setting_of
from iwae.lab.store import ResultStore

# Invented results (inputs for the layout, not measurements). NLLs are chosen apart from every published number.
BURDA = {"objective": "iwae", "k": 5}  # (a) Burda's setup, this package's default protocol
AUTHORS = {"objective": "iwae", "k": 5, "protocol": "authors"}  # (c) Burda's setup, the authors' code's protocol
STUDENT = {"objective": "iwae", "activation": "relu", "batch_size": 128, "train_split": "train+valid"}  # (b)
THRESHOLD = {"objective": "iwae", "k": 5, "binarization": "threshold"}  # (d)
STUDENT_DEPARTURES = (
    "ReLU networks instead of tanh; minibatch 128 instead of 20; trained on all 60,000 training images "
    "(Burda: 59,600, the 400 validation images held out)"
)
PAPER_NLLS = {f"{nll:.2f}" for nll, _ in PUBLISHED_TABLE1.values()}


def _row(store: ResultStore, name: str, directory: Path, nll: float, units: int, kl_units: int, **options) -> None:
    store.upsert(
        name,
        run_dir=str(directory / name),
        config={"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, **options},
        status="finished",
        seconds_per_epoch=1.0,
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={
            "nll": nll,
            "active_units": [units],
            "active_units_kl": [kl_units],
            "k": 10,
            "n_examples": 30,
            "recon_log_lik": -80.0,
            "kl": 20.0,
        },
        metrics=[],
    )


def _sweep(directory: Path) -> Path:
    store = ResultStore.in_dir(directory)
    _row(store, "burda-k5", directory, 88.13, 21, 19, **BURDA)
    _row(store, "authors-k5", directory, 86.91, 22, 20, **AUTHORS)
    _row(store, "student-k5", directory, 90.41, 31, 17, **STUDENT, k=5)
    _row(store, "student-k50", directory, 89.27, 33, 18, **STUDENT, k=50)
    _row(store, "threshold-k5", directory, 70.33, 18, 16, **THRESHOLD)
    return directory


def _sections(markdown: str) -> dict[str, str]:
    """Each '## ' heading's text, up to the next heading."""
    parts = re.split(r"^## ", markdown, flags=re.MULTILINE)[1:]
    return {part.splitlines()[0]: part for part in parts}


def _cells(line: str) -> list[str]:
    """A Markdown row's cells (an escaped pipe, ``\\|``, is inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _row_of(section: str, run: str) -> list[str]:
    (line,) = [x for x in section.splitlines() if x.startswith(f"| {run} |")]
    return _cells(line)


def test_a_reader_sees_only_runs_in_burdas_setup_beside_the_paper(tmp_path: Path) -> None:
    paths = write_report([_sweep(tmp_path / "sweep")], tmp_path / "REPORT.md")
    markdown = Path(paths["markdown"]).read_text(encoding="utf-8")
    sections = _sections(markdown)

    # (a) and (c) beside the paper's numbers, in two Table 1s, each labelled by its protocol
    tables = {heading: text for heading, text in sections.items() if heading.startswith("Table 1")}
    assert len(tables) == 2
    (authors,) = [text for heading, text in tables.items() if "the authors' code" in heading.split(":")[0]]
    (default,) = [text for heading, text in tables.items() if "default protocol" in heading.split(":")[0]]
    assert "| mnist | 1 | 5 |" in authors and "| 86.91 | 85.54 | +1.37 | 22 | 22 | +0 |" in authors
    assert "| mnist | 1 | 5 |" in default and "| 88.13 | 85.54 | +2.59 | 21 | 22 | -1 |" in default
    assert "88.13" not in authors and "86.91" not in default  # the protocols are not averaged into one cell
    for setting in ("optimizer burda-adam", "beta1 0.99", "data_order fixed", "loss_reduction sum"):
        assert setting in authors and setting not in default  # the note under the authors' table names them
    assert "These runs follow the authors' code" in authors
    assert "default protocol, not the authors' code" in default and "optimizer adam" in default

    # (b) and (d) nowhere beside a paper number: each line that shows their NLL has no published NLL in it
    for nll in ("90.41", "89.27", "70.33"):
        lines = [x for x in markdown.splitlines() if nll in x]
        assert lines and not any(paper in _cells(x) for x in lines for paper in PAPER_NLLS), nll
        assert not any(nll in text for text in tables.values())
    apart = {heading: text for heading, text in sections.items() if heading.startswith("Runs not comparable")}
    assert len(apart) == 2 and not any("paper" in text.splitlines()[2] for text in apart.values())  # no paper column
    (student,) = [text for text in apart.values() if "| student-k5 |" in text]
    (threshold,) = [text for text in apart.values() if "| threshold-k5 |" in text]
    assert "| student-k50 |" in student and "| threshold-k5 |" not in student
    # the note under each says why, per setting
    assert f"depart from the paper's setup: {STUDENT_DEPARTURES}." in student and "threshold" not in student
    assert "depart from the paper's setup: threshold binarisation instead of dynamic." in threshold
    assert "ReLU" not in threshold and "burda-k5" not in markdown.split("## Runs not comparable")[1].split("## All")[0]

    # (b): per k, the NLL and both counts of active units side by side, the covariance one and the per-unit KL's
    headers = _cells(student.splitlines()[2])
    covariance, kl = headers.index("units: Var_x E_q[u\\|x] (covariance)"), headers.index("units: per-unit KL")
    assert kl == covariance + 1 and headers[headers.index("k")] == "k"
    for run, k, nll, units, kl_units in (
        ("student-k5", "5", "90.41", "31", "17"),
        ("student-k50", "50", "89.27", "33", "18"),
    ):
        row = _row_of(student, run)
        assert (row[headers.index("k")], row[headers.index("NLL")], row[covariance], row[kl]) == (
            k,
            nll,
            units,
            kl_units,
        )
    assert "units (KL): mean per-unit KL" in student and "units: Var over the evaluated (test) images" in student

    # the k-sweep of (b) plots no paper line and has no paper column
    assert not any("paper" in x for x in markdown.split("## k-sweep, runs not comparable")[1].split("## All")[0])

    page = Path(paths["html"]).read_text(encoding="utf-8")
    assert html.escape(f"depart from the paper's setup: {STUDENT_DEPARTURES}.") in page
    assert html.escape("Runs not comparable with Burda et al.'s Table 1") in page
    assert "optimizer burda-adam" in page


def test_a_sweep_of_one_protocol_says_which(tmp_path: Path) -> None:
    for name, options in (("default", BURDA), ("authors", AUTHORS)):
        directory = tmp_path / name
        _row(ResultStore.in_dir(directory), "run", directory, 88.0, 20, 18, **options)
        records, _ = load_records([directory])
        headings = [b[1] for b in build_report(records, [], "x").blocks if b[0] == "h2"]
        table = next(h for h in headings if h.startswith("Table 1"))
        if name == "default":
            assert table == "Table 1: test NLL (nats) and active units, ours | paper | difference"
        else:
            assert table.startswith("Table 1, runs following the authors' code:")
        assert not any(h.startswith("Runs not comparable") for h in headings)


def _config(**settings):
    defaults = {"dataset": "mnist", "layers": None if "latent_dims" in settings else 1}
    return build_train_config(defaults | ({} if "schedule" in settings else {"epochs": 2}) | settings)


@pytest.mark.parametrize(
    ("settings", "departures"),
    [
        ({}, []),
        ({"protocol": "authors"}, []),  # the authors' code trains Burda's setup
        ({"layers": 2}, []),
        ({"dataset": "mnist-fixed"}, []),
        ({"binarization": "dynamic"}, []),  # MNIST's own
        ({"epochs": 100, "lr": 3e-4}, []),  # the budget, shown apart
        ({"activation": "relu"}, ["ReLU networks instead of tanh"]),
        ({"latent_dims": "20"}, ["latent sizes 20 instead of 50"]),
        ({"hidden_dims": "400"}, ["hidden layers 400-400 instead of 200-200"]),
        ({"latent_dims": "100,50,20"}, ["3 stochastic layers (100-50-20 units; Burda: 1 or 2 layers)"]),
        ({"batch_size": 128}, ["minibatch 128 instead of 20"]),
        ({"schedule": "burda:3", "batch_schedule": "grow"}, ["minibatch 20, 28, 38 over the stages instead of 20"]),
        ({"schedule": "burda:2", "k_schedule": "1,5"}, ["k 1, 5 over the stages instead of k = 5 throughout"]),
        ({"binarization": "threshold"}, ["threshold binarisation instead of dynamic"]),
        ({"train_limit": 500}, ["trained on the first 500 training images (Burda: all 59,600)"]),
        (
            {"dataset": "omniglot", "train_split": "train+valid"},
            ["trained on the training and validation images (Burda: the validation images held out)"],
        ),
        ({**STUDENT, "epochs": 100}, STUDENT_DEPARTURES.split("; ")),
    ],
)
def test_burda_departures_name_each_way_a_setup_is_not_burdas(settings: dict, departures: list[str]) -> None:
    assert burda_departures(_config(**settings)) == departures


def test_protocols() -> None:
    assert protocol_of(_config()) == "default" and protocol_of(_config(protocol="authors")) == "authors"
    assert protocol_of(_config(optimizer="burda-adam")) == "mixed"


@pytest.mark.parametrize(
    "changed",
    [
        {"optimizer": "burda-adam"},
        {"beta1": 0.95},
        {"data_order": "fixed"},
        {"loss_reduction": "sum"},
        {"protocol": "authors"},
        {"binarization": "threshold"},
        {"binarization": "dynamic"},
        {"train_split": "train+valid"},
        {"activation": "relu"},
        {"latent_dims": "20"},
        {"hidden_dims": "400"},
        {"layers": None, "latent_dims": "100,50,20"},
        {"batch_size": 128},
        {"train_limit": 500},
        {"fresh_optimizer": True},  # a continued run (Table 2): its base's optimiser or a new one
    ],
)
def test_runs_that_differ_in_any_setting_but_the_seed_are_not_averaged(tmp_path: Path, changed: dict) -> None:
    base = {"objective": "iwae", "k": 5}
    if "fresh_optimizer" in changed:
        base["init_from"] = str(tmp_path / "base")
    store = ResultStore.in_dir(tmp_path)
    _row(store, "same-s0", tmp_path, 88.0, 20, 18, **base, seed=0)
    _row(store, "same-s1", tmp_path, 89.0, 20, 18, **base, seed=1)  # a seed of the same setting: averaged
    _row(store, "other-s2", tmp_path, 95.0, 20, 18, **base, **changed, seed=2)
    records, _ = load_records([tmp_path])
    assert sorted(len(runs) for runs in group_by(records, setting_of).values()) == [1, 2]
    markdown = build_report(records, [], "x").markdown("files")
    mean, sd = statistics.mean([88.0, 89.0]), statistics.stdev([88.0, 89.0])
    assert f"{mean:.2f} ± {sd:.2f} (n=2)" in markdown and "(n=3)" not in markdown


def test_table2_sets_only_runs_in_burdas_setup_beside_the_paper(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    _row(store, "base", tmp_path, 90.0, 19, 18, objective="vae", k=1)
    _row(store, "swap", tmp_path, 87.5, 22, 20, objective="iwae", k=50, init_from=str(tmp_path / "base"))
    _row(store, "base-128", tmp_path, 91.0, 19, 18, objective="vae", k=1, batch_size=128)
    _row(
        store,
        "swap-128",
        tmp_path,
        88.5,
        22,
        20,
        objective="iwae",
        k=50,
        batch_size=128,
        init_from=str(tmp_path / "base-128"),
    )
    records, _ = load_records([tmp_path])
    block = build_report(records, [], "x").markdown("files").split("## Table 2")[1].split("## ")[0]
    assert _row_of(block, "swap")[3:] == ["90.00", "86.76", "19", "19", "87.50", "84.88", "+2.62", "22", "22", "+0"]
    assert _row_of(block, "swap-128")[3:] == ["91.00", "—", "19", "—", "88.50", "—", "—", "22", "—", "—"]
    assert (
        "Not beside the paper's numbers, not being Burda et al.'s setup: swap-128: minibatch 128 instead of 20."
        in block
    )
