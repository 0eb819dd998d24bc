"""The layering rule (docs/contributing.md): the core imports nothing from iwae.fast, iwae.lab, iwae.studies,
iwae.cli or iwae.pyro but for the one hook, nothing in iwae.fast imports the lifecycle or the step selector back,
and iwae.pyro sits on the core alone."""

from __future__ import annotations

import ast
from pathlib import Path

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
    "files",
    "locks",
)


PACKAGE = Path(__file__).resolve().parents[2] / "src" / "iwae"


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
    iwae.studies, iwae.cli or iwae.pyro; iwae.steps only in choose_step_path (the one hook)."""
    above = [["iwae", layer] for layer in ("fast", "lab", "studies", "cli", "pyro")]
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


def test_the_pyro_bridge_sits_on_the_core_alone() -> None:
    """iwae.pyro (the optional Pyro extra) takes the core's estimators and objectives and nothing above them; nothing
    else in the package imports it."""
    above = [["iwae", layer] for layer in ("fast", "lab", "studies", "cli", "train", "steps")]
    upward = [m for m in _imported_modules(PACKAGE / "pyro.py") if m.split(".")[:2] in above]
    assert not upward, upward
    importers = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "pyro.py" and any(m.split(".")[:2] == ["iwae", "pyro"] for m in _imported_modules(path))
    ]
    assert not importers, importers
