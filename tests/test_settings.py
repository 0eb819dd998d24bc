"""The training settings' table (iwae.settings): torch-free, the configuration's settings and defaults, the
registries' names, and docs/cli.md listing it (the ``iwae train`` parser generated from it: tests/cli/test_run.py)."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iwae import names, settings
from iwae.settings import COMMAND_LINE, CONFIG_FIELDS, DEFAULTS, SETTINGS

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
# The keys build_train_config turns into TrainConfig fields (objective, model, stages) rather than taking as fields.
BUILDER_KEYS = {
    "objective", "M", "beta", "p", "alpha",
    "layers", "latent_dims", "hidden_dims", "activation",
    "schedule", "epochs", "lr", "batch_schedule", "lr_scale", "k_schedule",
    "protocol",
}  # fmt: skip


def test_the_table_and_the_command_line_import_no_torch() -> None:
    script = (
        "import sys\n"
        "import iwae.settings, iwae.cli.common, iwae.cli.run\n"
        "from iwae.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_every_setting_is_declared_once() -> None:
    from iwae.config import TrainConfig, setting_names

    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "stages", "objective"}
    assert {s.name for s in CONFIG_FIELDS} == fields  # every TrainConfig field is in the table, marked
    assert {s.name for s in SETTINGS} == fields | BUILDER_KEYS
    assert setting_names() == settings.setting_names() == fields | BUILDER_KEYS


def test_defaults_are_the_configurations() -> None:
    from iwae.config import BURDA_STAGES, TrainConfig, build_train_config, parse_schedule
    from iwae.models import ModelConfig
    from iwae.objectives import MIWAE

    config = TrainConfig()
    for setting in CONFIG_FIELDS:
        assert getattr(config, setting.name) == setting.default, setting.name
    built = build_train_config({})
    assert built == config
    assert built.objective.name == DEFAULTS["objective"]
    assert built.model == ModelConfig.burda(DEFAULTS["layers"]) and built.model.activation == DEFAULTS["activation"]
    assert built.stages == parse_schedule(DEFAULTS["schedule"]) == BURDA_STAGES
    assert parse_schedule(epochs=2) == ((2, DEFAULTS["lr"]),)
    assert DEFAULTS["M"] == MIWAE().M
    for name in ("protocol", "batch_schedule", "lr_scale"):
        assert build_train_config({name: DEFAULTS[name]}) == config, name


def test_choices_come_from_the_names_and_equal_the_registries() -> None:
    from iwae.data import DATASETS

    for setting in SETTINGS:
        if setting.choices is None:
            continue
        assert setting.default is None or setting.default in setting.choices, setting.name
        if setting.registry is None:  # iwae.names' rule: the first of a protocol's choices is the default
            assert setting.default in (None, setting.choices[0]), setting.name
        else:
            module, _, attribute = setting.registry.rpartition(".")
            assert tuple(getattr(importlib.import_module(module), attribute)) == setting.choices, setting.name
    table = settings.BY_NAME
    assert table["dataset"].choices == names.DATASET_NAMES == tuple(DATASETS)
    assert table["activation"].choices == names.ACTIVATION_NAMES
    assert (table["batch_schedule"].choices, table["lr_scale"].choices) == (names.BATCH_SCHEDULES, names.LR_SCALES)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("k", 0, "k must be >= 1, got 0"),
        ("k", 1.5, "k must be a whole number, got 1.5"),
        ("k", True, "k must be a whole number, got True"),
        ("k", None, "k must be a whole number, got None"),
        ("train_limit", -5, "train_limit must be a whole number >= 1, got -5"),
        ("seed", 2**32, "seed must be 0..4294967295, got 4294967296"),
        ("beta1", 1.0, r"beta1 \(Adam\) must be a number in \[0, 1\), got 1.0"),
        ("lr", float("inf"), "the learning rate must be a finite number > 0, got inf"),
        ("data_order", "random", "data_order must be one of shuffled, fixed, got 'random'"),
        ("dataset", "cifar", "dataset must be one of mnist, "),
        ("estimator", 3, "estimator must be a name, got 3"),
        ("stage_k", [1, 0], r"stage_k must be whole numbers >= 1, got \[1, 0\]"),
        ("fresh_optimizer", 1, "fresh_optimizer must be true or false, got 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(name: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        settings.check_setting(name, value)
    assert "\n" not in str(raised.value)


def test_good_values_and_left_out_ones_pass() -> None:
    for name, value in [("train_limit", None), ("binarization", None), ("k", 3), ("seed", 0), ("beta1", 0),
                        ("estimator", "a-registered-later"), ("stage_k", (1, 2)), ("schedule", "burda:2")]:  # fmt: skip
        settings.check_setting(name, value)
    settings.check_settings({"k": None, "epochs": None, "unknown": object()})  # None: left out; unknown: not ours


def test_help_texts_show_the_defaults() -> None:
    for setting in SETTINGS:
        text = setting.help_text()
        assert text and "{" not in text, setting.name
        if setting.flag and setting.default is not None and setting.kind is not settings.SWITCH:
            assert "{default}" in setting.help, f"{setting.name}: its help should show its default"


def _normalised(text: str) -> str:
    """Whitespace collapsed, and argparse's line breaks after a hyphen ('--latent-' / 'dims') joined."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def test_docs_cli_lists_every_train_option_with_its_help() -> None:
    doc = CLI_MD.read_text()
    start = doc.index("```text\nusage: iwae train ")
    block = _normalised(doc[start : doc.index("```", start + 3)])
    for setting in COMMAND_LINE:
        assert setting.option in block, f"docs/cli.md lacks {setting.option}; run docs/_ext/cli_help.py"
        assert _normalised(setting.help_text()) in block, (
            f"docs/cli.md's help of {setting.option} is not the table's; run docs/_ext/cli_help.py"
        )
