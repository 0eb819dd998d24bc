"""iwae.names: the torch-free copies of the registries' names equal the registries, and importing them loads no
torch (the command line checks its arguments with them before it loads PyTorch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iwae import names


def test_the_names_are_the_registries() -> None:
    from iwae.data import DATASETS
    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.models import ACTIVATIONS
    from iwae.objectives import objective_names

    assert tuple(DATASETS) == names.DATASET_NAMES
    assert tuple(objective_names()) == names.OBJECTIVE_NAMES
    assert tuple(ESTIMATOR_NAMES) == names.ESTIMATOR_NAMES
    assert tuple(ACTIVATIONS) == names.ACTIVATION_NAMES


@pytest.mark.parametrize(
    ("device", "valid"),
    [("auto", True), ("cpu", True), ("cuda", True), ("cuda:1", True), ("mps", True), ("gpu", False),
     ("cuda:", False), ("cpu:0", False), ("CUDA", False)],
)  # fmt: skip
def test_the_device_pattern_is_what_resolve_device_checks(device: str, valid: bool) -> None:
    from iwae.runs import RunError, resolve_device

    assert bool(names.DEVICE_PATTERN.fullmatch(device)) == valid
    if not valid:
        with pytest.raises(RunError, match="is not a device"):
            resolve_device(device)


def test_importing_the_names_loads_no_torch() -> None:
    script = "import sys\nimport iwae.names\nassert 'torch' not in sys.modules, 'iwae.names imported torch'\n"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
