"""Every bad input: one line on stderr, exit code 2, no traceback and nothing changed on disk (issue 18).

Each case is a command line and, where it needs one, a corruption of a trained run (a tiny finished run ``done`` and
a run ``partial`` checkpointed at epoch 1 of 2), set up in a fresh folder whose tree (paths, sizes and mtimes) must be
the same after the command as before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from iwae.cli import main

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


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (ns)."""
    tree = {}
    for parent, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            stat = os.lstat(Path(parent) / name)
            tree[str((Path(parent) / name).relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return tree


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
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code = main(case.argv(work))
    finally:
        if (work / "ro").is_dir():
            (work / "ro").chmod(0o755)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.expect in lines[0], lines[0]
    assert out == ""
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
