"""iwae.fast: one switch per feature, one status report, the plan the training loop asks for, the forward pass for
evaluation against the reference model, and guards on the private PyTorch APIs the layer uses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from iwae import fast
from iwae.data import Split
from iwae.evaluate import estimate_log_likelihood
from iwae.fast import adam, native, switches
from iwae.fast import step as native_step
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import IWAE, PIWAE
from iwae.steps import REFERENCE_PATH, choose_step_path

CORE = (
    "bounds",
    "objectives",
    "estimators",
    "protocol",
    "models",
    "data",
    "evaluate",
    "checkpoint",
    "runs",
    "config",
    "optim",
)
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "iwae"


def _imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
    return modules


def test_the_core_imports_nothing_above_it() -> None:
    """Models, bounds, estimators, data, evaluation, the lifecycle, ...: no import of iwae.fast, iwae.lab,
    iwae.studies or iwae.cli; iwae.steps only in choose_step_path (the one hook)."""
    above = [["iwae", layer] for layer in ("fast", "lab", "studies", "cli")]
    for name in (*CORE, "train", "steps", "stacked", "sampling"):
        upward = [m for m in _imported_modules(PACKAGE / f"{name}.py") if m.split(".")[:2] in above]
        assert not upward or name == "steps", (name, upward)
    hooks = [line for line in (PACKAGE / "steps.py").read_text().splitlines() if "import fast" in line]
    assert hooks == ["    from iwae import fast as fast_layer"]


def test_the_fast_layer_imports_neither_the_lifecycle_nor_the_selector() -> None:
    """The hook is one way: nothing in iwae.fast imports iwae.steps or iwae.train, so there is no import cycle."""
    for path in (PACKAGE / "fast").glob("*.py"):
        back = [m for m in _imported_modules(path) if m.split(".")[:2] in (["iwae", "steps"], ["iwae", "train"])]
        assert not back, (path.name, back)


def test_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (
        ("", set(switches.FEATURES)),
        ("0", set()),
        ("none", set()),
        ("backprop,adam", {"backprop", "adam"}),
        ("-step", set(switches.FEATURES) - {"step"}),
    ):
        monkeypatch.setenv("IWAE_FAST", value)
        assert switches.enabled_features() == expected, value
    monkeypatch.setenv("IWAE_FAST", "warp")
    with pytest.raises(switches.SwitchError, match="unknown feature"):
        switches.enabled("step")
    monkeypatch.setenv("IWAE_FAST", "0")
    assert "IWAE_FAST='0'" in switches.why_off("step")
    monkeypatch.delenv("IWAE_FAST")


def test_status_reports_every_feature() -> None:
    report = fast.status()
    assert set(report) == set(switches.FEATURES)
    assert all(line.startswith(("on: ", "off: ")) for line in report.values())


def test_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),)))
    config_path = fast.training_path(model, IWAE(), "dreg")
    assert config_path.accumulate is not None and config_path.description.startswith("fast: ")
    assert ("in C++" in config_path.description) == native_step.available()
    assert fast.training_path(torch.nn.Linear(2, 2), IWAE(), "standard").accumulate is None
    monkeypatch.setenv("IWAE_FAST", "0")
    none = fast.training_path(model, PIWAE(M=2), "standard")
    assert none.accumulate is None and none.optimizer_step is None and none.description.startswith("autograd")


def test_choose_step_path_without_the_fast_layer_is_the_reference() -> None:
    from iwae.config import TrainConfig

    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),)))
    assert choose_step_path(model, TrainConfig(), fast=False) is REFERENCE_PATH


@pytest.mark.parametrize("layers", [1, 2])
def test_the_evaluation_forward_equals_the_model(layers: int) -> None:
    torch.manual_seed(layers)
    model = LatentVariableModel(ModelConfig.burda(layers)).eval()
    accelerated = fast.for_evaluation(model)
    assert (accelerated is not model) == fast.forward.applies(model)
    x = Split(torch.bernoulli(torch.full((4, 784), 0.3), generator=torch.Generator().manual_seed(0)))
    reference = estimate_log_likelihood(model, x, "none", 40, torch.Generator().manual_seed(1), batch_size=2)
    faster = estimate_log_likelihood(accelerated, x, "none", 40, torch.Generator().manual_seed(1), batch_size=2)
    for name in reference:
        torch.testing.assert_close(faster[name], reference[name], rtol=1e-5, atol=1e-3)
    for got, want in zip(accelerated.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert fast.for_evaluation(model.double()) is not None


def test_private_pytorch_apis_are_there() -> None:
    """Fails loudly on a PyTorch that removed or changed what the fast layer calls (each has a public fallback,
    so such a PyTorch would only be slower: this test is how the change gets seen)."""
    assert adam.available(), "torch._fused_adam_ or the optimizer's hook lists are gone: iwae.fast.adam falls back"
    assert isinstance(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None), bool), "the C++ step's ABI probe changed"
    assert native_step.cxx11_abi() == torch.compiled_with_cxx11_abi()
    if torch.backends.mkldnn.is_available():
        assert native.fused_linear_works(), "torch.ops.mkldnn._linear_pointwise is gone or differs from F.linear"


def test_a_model_off_the_cpu_is_described_without_building_the_cpu_only_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (here the ``meta`` device) the C++ step cannot serve; saying so must not compile it (50 s on a fresh
    machine) just to name it in the description."""

    def no_build() -> str:
        raise AssertionError("the C++ step was built to describe a model it cannot serve")

    monkeypatch.setattr(native_step, "status", no_build)
    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),))).to("meta")
    description, served = fast.gradient_path(model, IWAE(), "standard")
    assert served and "not float32 on the CPU" in description
