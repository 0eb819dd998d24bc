"""iwae.runs: reading a run directory. A metrics file whose last line was cut short by a kill is read without that
line, any other bad line is a one-line error naming it; devices are checked before use; a folder that is no run, or a
config.json that is no configuration, is named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iwae import runs
from iwae.config import TrainConfig
from iwae.runs import RunError


def _metrics(tmp_path: Path, *lines: str) -> Path:
    (tmp_path / runs.METRICS_FILE).write_text("".join(f"{line}\n" for line in lines))
    return tmp_path


def test_metrics_drop_a_torn_last_line_and_refuse_any_other_bad_line(tmp_path: Path) -> None:
    first, second = json.dumps({"epoch": 1, "train_bound": -100.0}), json.dumps({"epoch": 2, "train_bound": -99.0})
    assert runs.read_metrics(tmp_path) == []  # no metrics yet
    assert [r["epoch"] for r in runs.read_metrics(_metrics(tmp_path, first, second, '{"epoch": 3, "tr'))] == [1, 2]
    with pytest.raises(RunError, match=r"line 2, is not JSON; delete that line and resume"):
        runs.read_metrics(_metrics(tmp_path, first, '{"epoch": 2', second))
    for record in ('{"train_bound": -1.0}', '{"epoch": "2"}', "[1, 2]"):
        with pytest.raises(RunError, match=r"line 2, is not an epoch's record"):
            runs.read_metrics(_metrics(tmp_path, first, record))


def test_devices_are_checked_before_use() -> None:
    assert runs.resolve_device("cpu") == torch.device("cpu")
    assert runs.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RunError, match="'tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        runs.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="torch sees no CUDA device; use --device cpu"):
            runs.resolve_device("cuda:0")


def test_a_folder_that_is_no_run_or_holds_no_configuration_is_named(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"is not a run directory \(no config.json\)"):
        runs.load_config(tmp_path)
    (tmp_path / runs.CONFIG_FILE).write_text("{not json")
    with pytest.raises(RunError, match=r"config.json is not valid JSON"):
        runs.load_config(tmp_path)
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps({"k": 0}))
    with pytest.raises(RunError, match=r"config.json is not a valid configuration \(.*k must be >= 1"):
        runs.load_config(tmp_path)
    (tmp_path / runs.CONFIG_FILE).write_text(TrainConfig(k=3).to_json())
    assert runs.load_config(tmp_path) == TrainConfig(k=3)
    with pytest.raises(RunError, match=r"has no model\.safetensors or checkpoint\.safetensors"):
        runs.load_model(tmp_path)
