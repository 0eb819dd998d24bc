"""Writes that cannot be redirected: every file the package keeps goes through one primitive that creates its
temporary exclusively beside the target, fsyncs and renames; a full disk leaves the previous file and one line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from iwae import checkpoint
from iwae.checkpoint import (
    WriteError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    save_model,
)

VICTIM = "precious: must never change\n"
needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text(VICTIM)
    return victim


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()  # Adam now holds tensors (exp_avg, exp_avg_sq) and a step count
    return model, optimizer, torch.Generator().manual_seed(3)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@needs_symlinks
@pytest.mark.parametrize("what", ["text", "checkpoint", "model"])
def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(tmp_path: Path, what: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = _victim(tmp_path)
    target = run / {"text": "eval.json", "checkpoint": "checkpoint.safetensors", "model": "model.safetensors"}[what]
    # The old fixed name, and names of the new pattern an attacker might guess.
    planted = [target.with_name(target.name + ".tmp"), run / f".{target.name}.0.tmp", run / f".{target.name}..tmp"]
    for link in planted:
        link.symlink_to(victim)
    model, optimizer, generator = _tiny()
    if what == "text":
        atomic_write_text(target, '{"nll": 86.0}\n')
        assert json.loads(target.read_text()) == {"nll": 86.0}
    elif what == "checkpoint":
        save_checkpoint(target, model, optimizer, generator, {"epochs_done": 2}, '{"k": 5}')
        restored = load_checkpoint(target)
        assert restored.progress == {"epochs_done": 2} and restored.config_json == '{"k": 5}'
        assert torch.equal(restored.model_state["weight"], model.weight.detach())
        assert torch.equal(restored.rng_state, generator.get_state())
    else:
        save_model(target, model, '{"k": 5}')
        state, config = load_model_state(target)
        assert torch.equal(state["bias"], model.bias.detach()) and config == '{"k": 5}'
    assert victim.read_text() == VICTIM
    assert all(link.is_symlink() for link in planted)  # left alone, neither followed nor removed
    assert not target.is_symlink()
    assert sorted(p.name for p in run.iterdir()) == sorted([target.name, *(p.name for p in planted)])


@needs_symlinks
def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = _victim(tmp_path)
    (run / "eval.json").symlink_to(victim)
    (run / "model.safetensors").symlink_to(victim)
    atomic_write_text(run / "eval.json", "new\n")
    save_model(run / "model.safetensors", torch.nn.Linear(2, 2), "{}")
    assert victim.read_text() == VICTIM
    assert not (run / "eval.json").is_symlink() and (run / "eval.json").read_text() == "new\n"
    assert not (run / "model.safetensors").is_symlink() and load_model_state(run / "model.safetensors")[1] == "{}"


def test_new_files_get_the_umasks_mode_not_the_temporarys_private_one(tmp_path: Path) -> None:
    if os.name == "nt":
        pytest.skip("POSIX modes")
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_keeps_the_previous_file_removes_the_temporary_and_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "config.json"
    target.write_text("previous\n")
    model_path = tmp_path / "model.safetensors"
    save_model(model_path, torch.nn.Linear(2, 2), '{"old": true}')
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, failing, _full_disk)
        with pytest.raises(WriteError) as raised:
            atomic_write_text(target, "new\n")
        with pytest.raises(OSError) as raised_model:  # a WriteError is an OSError: old handlers still catch it
            save_model(model_path, torch.nn.Linear(2, 2), '{"new": true}')
    for error, path in ((raised.value, target), (raised_model.value, model_path)):
        message = str(error)
        assert "\n" not in message and str(path) in message
        assert "no space left on device" in message and "previous file is intact" in message
        assert error.errno == errno.ENOSPC and error.filename == str(path)
    assert target.read_text() == "previous\n"
    assert load_model_state(model_path)[1] == '{"old": true}'
    assert _leftovers(tmp_path) == []


def test_a_full_disk_on_a_new_file_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint.os, "write", _full_disk)
    with pytest.raises(WriteError, match="nothing was written"):
        atomic_write_bytes(tmp_path / "new.png", b"\x89PNG")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_write_removes_the_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_args):
        raise KeyboardInterrupt

    (tmp_path / "eval.json").write_text("previous\n")
    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "eval.json", "new\n")
    assert (tmp_path / "eval.json").read_text() == "previous\n" and _leftovers(tmp_path) == []


def _sweep(directory: Path) -> Path:
    from iwae.lab.store import ResultStore

    store = ResultStore.in_dir(directory)
    store.upsert(
        "iwae-k5",
        run_dir=str(directory / "iwae-k5"),
        config={"dataset": "mnist", "layers": 1, "epochs": 2, "eval_k": 10, "objective": "iwae", "k": 5},
        status="finished",
        seconds_per_epoch=1.5,
        train_bound=-100.0,
        valid_bound=-101.0,
        eval={"nll": 87.0, "active_units": [20], "k": 10, "n_examples": 30, "recon_log_lik": -80.0, "kl": 20.0},
        metrics=[],
    )
    return directory


def test_the_cli_reports_a_full_disk_in_one_line_and_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from iwae.cli import EXIT_WRITE, main

    sweep = _sweep(tmp_path / "sweep")
    csv_path = tmp_path / "out" / "results.csv"
    assert main(["results", str(sweep), "--csv", str(csv_path)]) == 0
    written = csv_path.read_text(encoding="utf-8")
    assert written.startswith("name,") and "iwae-k5" in written
    capsys.readouterr()

    monkeypatch.setattr(checkpoint.os, "fsync", _full_disk)
    assert main(["results", str(sweep), "--csv", str(csv_path)]) == EXIT_WRITE == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the table goes to stderr first, then the error
    assert err == (
        f"error: cannot write {csv_path}: no space left on device; free space and rerun (the previous file is intact)"
    )
    assert csv_path.read_text(encoding="utf-8") == written
    assert _leftovers(csv_path.parent) == []


@needs_symlinks
def test_figures_and_reports_go_through_the_primitive(tmp_path: Path) -> None:
    from iwae.lab.reports import write_report
    from iwae.models import LatentVariableModel, ModelConfig
    from iwae.sampling import sample_figure
    from iwae.studies.camel import plot_densities

    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("samples.png", "samples.png.tmp", "camel.png.tmp"):
        (out / name).symlink_to(victim)
    model = LatentVariableModel(ModelConfig(x_dim=16, latent_dims=(2,), hidden_dims=((8,),)))
    images = torch.rand(20, 16, generator=torch.Generator().manual_seed(0))
    sample_figure(model, images, "dynamic", out / "samples.png", n=4, shape=(4, 4))
    grid = np.linspace(-3, 3, 50)
    plot_densities(grid, {"vae": np.ones_like(grid) * 0.1, "iwae": np.ones_like(grid) * 0.2}, out / "camel.png", "t")
    for name in ("samples.png", "camel.png"):
        assert not (out / name).is_symlink() and (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert victim.read_text() == VICTIM
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries of the new pattern

    paths = write_report([_sweep(tmp_path / "sweep")], tmp_path / "report" / "REPORT.md")
    report_dir = Path(paths["markdown"]).parent
    assert Path(paths["markdown"]).read_text(encoding="utf-8").startswith("# ")
    assert _leftovers(report_dir) == [] and _leftovers(Path(paths["figures"])) == []
