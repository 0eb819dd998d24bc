"""Every bad input: one line on stderr, exit code 2, no traceback and nothing changed on disk (issue 18).

Each case is a command line and, where it needs one, a corruption of a trained run (a tiny finished run ``done`` and
a run ``partial`` checkpointed at epoch 1 of 2), set up in a fresh folder whose tree (paths, sizes and mtimes) must be
the same after the command as before it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lock_holders import held_by_another_thread
from safetensors import safe_open
from safetensors.torch import save_file
from trees import assert_refused, snapshot

from iwae.cli import main
from iwae.lab.store import ResultStore
from iwae.train import RUN_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--train-limit", "100", "--latent-dims", "4", "--no-progress", "--device", "cpu"]
TRAIN = ["train", "--epochs", "1", *TINY]
RESUME = ["train", "--epochs", "2", *TINY, "--resume"]  # the settings of ``partial``
EVAL = ["--k", "5", "--limit", "10", "--no-progress", "--device", "cpu"]


# -- corruptions ----------------------------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path: Path) -> None:
    path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(path.stat().st_size)))


def flip_a_byte(path: Path) -> None:  # in the tensor data, past the header: a valid file with other values
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_tensor(path: Path, name: str) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: value for key, value in (handle.metadata() or {}).items() if key != "digest"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != name}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)


def edit_config(run: Path, **changes) -> None:
    data = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if key == "latent_dims":
            data["model"]["latent_dims"] = value
        else:
            data[key] = value
    (run / "config.json").write_text(json.dumps(data))


def make_read_only(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # the command, given the work folder
    setup: Callable[[Path], None] = field(default=lambda work: None)
    expect: str = ""  # a fragment of the one-line message
    held: str = ""  # a lock file (relative to the work folder) that another writer holds during the command


# -- planted links and other traps (issue 25): each link's target lies in the work folder, so the snapshot of the
# tree covers it too -----------------------------------------------------------------------------------------------
def plant_link(link: Path, target: Path, *, target_text: str | None = "precious\n", folder: bool = False) -> None:
    """Replace ``link`` by a symbolic link to ``target``; ``target`` is made a file with ``target_text`` (None:
    left missing, a dangling link) or, with ``folder``, an empty folder."""
    if folder:
        target.mkdir(parents=True, exist_ok=True)
    elif target_text is not None:
        target.write_text(target_text)
    if os.path.lexists(link):
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=folder)


LOOP = "is a loop of symbolic links"


def loop(link: Path) -> None:
    link.symlink_to(link.name)  # a link to itself


def stray_metrics(folder: Path) -> None:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("this is not JSON\n")


def results_database(folder: Path, content: bytes | None = None) -> Path:
    """``folder/results.sqlite``: ``content``, or (None) a real, empty results database."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.sqlite"
    if content is None:
        ResultStore(path)
        # Back from WAL to a rollback journal: a reader of a WAL database makes and removes SQLite's side files, which
        # changes the folder's mtime (and nothing else); this suite compares mtimes.
        with closing(sqlite3.connect(path)) as connection:
            connection.execute("PRAGMA journal_mode = DELETE")
    else:
        path.write_bytes(content)
    return path


def tiny_grid(work: Path, extra: str = "", name: str = "grid.toml") -> Path:
    grid = work / name
    grid.write_text('[fixed]\nobjective = "iwae"\nk = 2\nepochs = 1\ntrain_limit = 100\nlatent_dims = [4]\n' + extra)
    return grid


CASES = [
    # iwae train: flags
    Case("k-not-a-number", lambda w: [*TRAIN, "--k", "abc", "--out", str(w / "new")], expect="--k"),
    Case("k-zero", lambda w: [*TRAIN, "--k", "0", "--out", str(w / "new")], expect=">= 1"),
    Case(
        "latent-dims-abc", lambda w: [*TRAIN, "--latent-dims", "abc", "--out", str(w / "new")], expect="--latent-dims"
    ),
    Case("latent-dims-zero", lambda w: [*TRAIN, "--latent-dims", "0", "--out", str(w / "new")], expect=">= 1"),
    Case(
        "latent-dims-per-layer",
        lambda w: [*TRAIN, "--layers", "1", "--latent-dims", "4,4", "--out", str(w / "new")],
        expect="1 size",
    ),
    Case(
        "schedule-abc", lambda w: ["train", *TINY, "--schedule", "burda:abc", "--out", str(w / "new")], expect="burda"
    ),
    Case("schedule-12", lambda w: ["train", *TINY, "--schedule", "burda:12", "--out", str(w / "new")], expect="1 <= S"),
    Case("lr-inf", lambda w: [*TRAIN, "--lr", "inf", "--out", str(w / "new")], expect="finite number > 0"),
    Case("lr-negative", lambda w: [*TRAIN, "--lr", "-1", "--out", str(w / "new")], expect="finite number > 0"),
    Case("lr-with-burda", lambda w: ["train", *TINY, "--lr", "1e-3", "--out", str(w / "new")], expect="--epochs"),
    Case("device-foo", lambda w: [*TRAIN, "--device", "foo", "--out", str(w / "new")], expect="--device"),
    Case("device-absent-gpu", lambda w: [*TRAIN, "--device", "cuda:99", "--out", str(w / "new")], expect="cuda:99"),
    Case("seed-huge", lambda w: [*TRAIN, "--seed", "1" + "0" * 23, "--out", str(w / "new")], expect="--seed"),
    Case("seed-1e23", lambda w: [*TRAIN, "--seed", "1e23", "--out", str(w / "new")], expect="--seed"),
    Case("seeds-repeated", lambda w: [*TRAIN, "--seeds", "0,0", "--out", str(w / "new")], expect="distinct"),
    Case("beta1-above-1", lambda w: [*TRAIN, "--beta1", "1.5", "--out", str(w / "new")], expect="--beta1"),
    Case(
        "miwae-k-not-multiple",
        lambda w: [*TRAIN, "--objective", "miwae", "--k", "3", "--M", "2", "--out", str(w / "new")],
        expect="multiple",
    ),
    Case(
        "data-dir-missing",
        lambda w: [*TRAIN, "--data-dir", str(w / "no-data"), "--out", str(w / "new")],
        expect="--data-dir",
    ),
    Case("out-under-a-file", lambda w: [*TRAIN, "--out", str(w / "file.txt" / "run")], expect="is a file"),
    Case("out-is-a-file", lambda w: [*TRAIN, "--out", str(w / "file.txt")], expect="not a folder"),
    Case(
        "out-read-only",
        lambda w: [*TRAIN, "--out", str(w / "ro" / "run")],
        lambda w: make_read_only(w / "ro"),
        expect="not writable",
    ),
    Case("k-needs-terabytes", lambda w: [*TRAIN, "--k", "100000000", "--out", str(w / "new")], expect="memory"),
    Case(
        "latent-needs-terabytes",
        lambda w: [*TRAIN, "--latent-dims", "100000000", "--out", str(w / "new")],
        expect="memory",
    ),
    Case(
        "init-from-missing",
        lambda w: [*TRAIN, "--init-from", str(w / "nope"), "--out", str(w / "new")],
        expect="--init-from",
    ),
    Case(
        "init-from-other-architecture",
        lambda w: [*TRAIN, "--latent-dims", "5", "--init-from", str(w / "done"), "--out", str(w / "new")],
        expect="architecture",
    ),
    # iwae train: the run directory
    Case("existing-run", lambda w: [*TRAIN, "--out", str(w / "done")], expect="--resume"),
    Case("resume-other-settings", lambda w: [*RESUME, "--k", "2", "--out", str(w / "partial")], expect="different"),
    Case(
        "resume-truncated-checkpoint",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: truncate(w / "partial" / "checkpoint.safetensors"),
        expect="checkpoint.safetensors",
    ),
    Case(
        "resume-empty-checkpoint",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: (w / "partial" / "checkpoint.safetensors").write_bytes(b""),
        expect="is empty",
    ),
    Case(
        "resume-garbled-checkpoint",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: garble(w / "partial" / "checkpoint.safetensors"),
        expect="garbled",
    ),
    Case(
        "resume-checkpoint-bit-flip",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: flip_a_byte(w / "partial" / "checkpoint.safetensors"),
        expect="checksum",
    ),
    Case(
        "resume-checkpoint-without-rng",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: drop_tensor(w / "partial" / "checkpoint.safetensors", "rng_state"),
        expect="rng_state",
    ),
    Case(
        "resume-config-string-k",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: edit_config(w / "partial", k="five"),
        expect="config.json",
    ),
    Case(
        "resume-config-not-json",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: (w / "partial" / "config.json").write_text('{"k": '),
        expect="not valid JSON",
    ),
    Case(
        "resume-checkpoint-without-an-optimiser-tensor",
        lambda w: [*RESUME, "--out", str(w / "partial")],
        lambda w: drop_tensor(w / "partial" / "checkpoint.safetensors", "optimizer.0.exp_avg"),
        expect="lacks the optimiser state optimizer.0.exp_avg",
    ),
    # iwae train: links, names, stray files and other writers
    Case("out-link-loop", lambda w: [*TRAIN, "--out", str(w / "loop")], lambda w: loop(w / "loop"), expect=LOOP),
    Case("out-dangling-link", lambda w: [*TRAIN, "--out", str(w / "dangling")],
         lambda w: plant_link(w / "dangling", w / "nowhere", target_text=None), expect="to nothing"),
    Case(
        "init-from-link-loop",
        lambda w: [*TRAIN, "--init-from", str(w / "loop"), "--out", str(w / "new")],
        lambda w: loop(w / "loop"),
        expect=LOOP,
    ),
    *(
        Case(
            f"{name}-link-{'dangling' if dangling else 'to-a-file'}",
            lambda w: [*RESUME, "--out", str(w / "partial")],
            lambda w, name=name, dangling=dangling: plant_link(
                w / "partial" / name, w / "victim.txt", target_text=None if dangling else "precious\n"
            ),
            expect=f"{name} is a symbolic link",
        )
        for name in RUN_NAMES  # every name a run's writers create in it
        for dangling in (False, True)
    ),
    Case(
        "seed-folder-link",
        lambda w: [*TRAIN, "--seeds", "0,1", "--out", str(w / "seeds")],
        lambda w: plant_link(w / "seeds" / "seed-0", w / "elsewhere", folder=True),
        expect="seed-0 is a symbolic link",
    ),
    Case("stray-metrics-in-a-new-out", lambda w: [*TRAIN, "--out", str(w / "stray")],
         lambda w: stray_metrics(w / "stray"), expect="no config.json"),
    Case("out-name-too-long", lambda w: [*TRAIN, "--out", str(w / ("r" * 300))], expect="longer than a file name"),
    Case("busy-run", lambda w: [*RESUME, "--out", str(w / "partial")], expect="is in use by", held="partial/.lock"),
    # iwae train: settings that would be silently ignored or multiplied
    Case("batch-grow-with-epochs", lambda w: [*TRAIN, "--batch-schedule", "grow", "--out", str(w / "new")],
         expect="one stage"),
    Case(
        "k-schedule-decreasing",
        lambda w: ["train", *TINY, "--schedule", "burda:2", "--k-schedule", "5,1", "--out", str(w / "new")],
        expect="grows k",
    ),
    Case(
        "lr-scale-with-lr",
        lambda w: [*TRAIN, "--lr", "1e-3", "--batch-size", "100", "--lr-scale", "sqrt", "--out", str(w / "new")],
        expect="give one of them",
    ),
    # iwae sweep, results and report: the sweep folder's fixed names
    Case(
        "sweep-lock-link",
        lambda w: ["sweep", str(tiny_grid(w)), "--out", str(w / "sweep"), "--device", "cpu", "--no-progress"],
        lambda w: plant_link(w / "sweep" / ".sweep.lock", w / "victim.txt"),
        expect=".sweep.lock is a symbolic link",
    ),
    Case(
        "sweep-database-link",
        lambda w: ["sweep", str(tiny_grid(w)), "--out", str(w / "sweep"), "--device", "cpu", "--no-progress"],
        lambda w: plant_link(w / "sweep" / "results.sqlite", w / "victim.txt"),
        expect="results.sqlite is a symbolic link",
    ),
    Case(
        "sweep-garbage-database",
        lambda w: ["sweep", str(tiny_grid(w)), "--out", str(w / "sweep"), "--device", "cpu", "--no-progress"],
        lambda w: results_database(w / "sweep", b"not a database at all"),
        expect="not a SQLite database",
    ),
    Case(
        "sweep-init-from-link-loop",
        lambda w: ["sweep", str(tiny_grid(w, f'init_from = "{w / "loop"}"\n')), "--out", str(w / "sweep")],
        lambda w: loop(w / "loop"),
        expect=LOOP,
    ),
    Case(
        "sweep-name-too-long",
        lambda w: ["sweep", str(tiny_grid(w, '[[phase]]\nname = "' + "p" * 300 + '"\n')), "--out", str(w / "sweep")],
        expect="longer than a file name",
    ),
    Case("results-empty-database", lambda w: ["results", str(w / "sweep")],
         lambda w: results_database(w / "sweep", b""), expect="is empty"),
    Case("results-garbage-database", lambda w: ["results", str(w / "sweep")],
         lambda w: results_database(w / "sweep", b"garbage" * 100), expect="not a SQLite database"),
    Case(
        "results-shm-link",
        lambda w: ["results", str(w / "sweep")],
        lambda w: (results_database(w / "sweep"), plant_link(w / "sweep" / "results.sqlite-shm", w / "victim.txt")),
        expect="results.sqlite-shm is a symbolic link",
    ),
    Case(
        "report-figures-folder-link",
        lambda w: ["report", str(w / "sweep"), "--out", str(w / "report")],
        lambda w: (results_database(w / "sweep"), plant_link(w / "report_files", w / "elsewhere", folder=True)),
        expect="report_files is a symbolic link",
    ),
    # iwae snr
    Case(
        "snr-rainforth-absurd-k",
        lambda w: ["snr", "--model", "rainforth", "--ks", "1,10000000000000", "--out", str(w / "snr")],
        expect="needs at least",
    ),
    Case(
        "snr-run-folder-link",
        lambda w: ["snr", str(w / "done"), "--ks", "1", "--repeats", "2", "--batch-size", "2", "--device", "cpu",
                   "--no-progress"],
        lambda w: plant_link(w / "done" / "snr", w / "elsewhere", folder=True),
        expect="snr is a symbolic link",
    ),
    # iwae eval
    Case(
        "eval-truncated-model",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: truncate(w / "done" / "model.safetensors"),
        expect="model.safetensors",
    ),
    Case(
        "eval-empty-model",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: (w / "done" / "model.safetensors").write_bytes(b""),
        expect="is empty",
    ),
    Case(
        "eval-garbled-model",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: garble(w / "done" / "model.safetensors"),
        expect="garbled",
    ),
    Case(
        "eval-model-bit-flip",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: flip_a_byte(w / "done" / "model.safetensors"),
        expect="checksum",
    ),
    Case(
        "eval-missing-tensor",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: drop_tensor(w / "done" / "model.safetensors", "model.decoder.0.head.bias"),
        expect="lacks",
    ),
    Case(
        "eval-architecture-mismatch",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: edit_config(w / "done", latent_dims=[5]),
        expect="shape",
    ),
    Case(
        "eval-config-string-number",
        lambda w: ["eval", str(w / "done"), *EVAL],
        lambda w: edit_config(w / "done", batch_size="20"),
        expect="config.json",
    ),
    Case(
        "eval-checkpoint-only-garbled",
        lambda w: ["eval", str(w / "partial"), *EVAL],
        lambda w: garble(w / "partial" / "checkpoint.safetensors"),
        expect="checkpoint.safetensors",
    ),
    Case("eval-k-above-cap", lambda w: ["eval", str(w / "done"), *EVAL, "--k", "100000000"], expect="at most"),
    Case("eval-device-foo", lambda w: ["eval", str(w / "done"), *EVAL, "--device", "foo"], expect="--device"),
    Case(
        "eval-data-dir-missing",
        lambda w: ["eval", str(w / "done"), *EVAL, "--data-dir", str(w / "no-data")],
        expect="--data-dir",
    ),
    Case("eval-seed-negative", lambda w: ["eval", str(w / "done"), *EVAL, "--seed", "-1"], expect="--seed"),
    Case("eval-no-run", lambda w: ["eval", str(w / "nope"), *EVAL], expect="no run directory"),
    Case(
        "eval-no-model",
        lambda w: ["eval", str(w / "empty-run"), *EVAL],
        lambda w: shutil.copytree(w / "done", w / "empty-run", ignore=shutil.ignore_patterns("*.safetensors")),
        expect="no model.safetensors",
    ),
    # iwae sample
    Case(
        "sample-out-under-a-file",
        lambda w: ["sample", str(w / "done"), "--out", str(w / "file.txt" / "a.png")],
        expect="is a file",
    ),
    Case(
        "sample-garbled-model",
        lambda w: ["sample", str(w / "done"), "--device", "cpu"],
        lambda w: garble(w / "done" / "model.safetensors"),
        expect="garbled",
    ),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``done``: a finished one-epoch run; ``partial``: epoch 1 of 2, checkpointed; ``file.txt``: a plain file."""
    root = tmp_path_factory.mktemp("trained")
    assert main([*TRAIN, "--out", str(root / "done")]) == 0
    assert main(["train", "--epochs", "2", *TINY, "--max-epochs", "1", "--out", str(root / "partial")]) == 0
    (root / "file.txt").write_text("not a folder\n")
    return root


def deny_writes_as_root(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Root may write into a 0o555 folder: make ``os.access`` answer as it would for anyone else."""
    real = os.access

    def access(path, mode, **kwargs) -> bool:
        if mode & os.W_OK and Path(path).resolve() == folder.resolve():
            return False
        return real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_says_one_line_exits_2_and_changes_nothing(
    case: Case, trained: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    case.setup(work)
    if (work / "ro").is_dir() and os.geteuid() == 0:
        deny_writes_as_root(monkeypatch, work / "ro")
    argv = case.argv(work)
    capsys.readouterr()
    try:
        with held_by_another_thread(work / case.held) if case.held else nullcontext():
            before = snapshot(tmp_path)  # the holder has written its name into the lock file
            code = main(argv)
    finally:
        if (work / "ro").is_dir():
            (work / "ro").chmod(0o755)
    assert_refused(code, *capsys.readouterr(), case.expect)
    assert snapshot(tmp_path) == before  # chmod, above, changes no mtime


def test_a_torn_last_line_of_metrics_is_repaired_on_resume(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "partial"
    shutil.copytree(trained / "partial", run)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 2, "stage": 0, "train_b')  # a kill mid-write
    assert main([*RESUME, "--out", str(run)]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]


def test_eval_keeps_earlier_results(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "done"
    shutil.copytree(trained / "done", run)
    assert main(["eval", str(run), *EVAL]) == 0
    assert main(["eval", str(run), *EVAL, "--k", "3", "--seed", "1"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert json.loads((run / "eval-test-k5-seed0-limit10.json").read_text())["nll"] == first["nll"]
    assert json.loads((run / "eval-test-k3-seed1-limit10.json").read_text())["nll"] == second["nll"]
    assert json.loads((run / "eval.json").read_text())["nll"] == second["nll"]  # the latest


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--k", "abc", "--out", "x"],
        ["train", "--device", "foo", "--out", "x"],
        ["train", "--latent-dims", "abc", "--out", "x"],
        ["train", "--schedule", "burda:abc", "--out", "x"],
        ["train", "--lr", "inf", "--out", "x"],
        ["train", "--seed", "1" + "0" * 23, "--out", "x"],
        ["train", "--data-dir", "/nonexistent/data", "--out", "x"],
        ["train", "--out", "/dev/null/run"],
        ["eval", "run", "--k", "100000000"],
    ],
)
def test_argument_errors_answer_before_torch_is_imported(argv: list[str]) -> None:
    code = f"import sys\nfrom iwae.cli import main\ncode = main({argv!r})\nprint(code, 'torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["2", "False"], completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
