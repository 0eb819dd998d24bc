"""iwae.config: saved configurations load as they were written, TrainConfig checks its fields with the settings'
table (iwae.settings), and the builder from flat settings."""

from __future__ import annotations

import json

import pytest

from iwae.config import TrainConfig, build_train_config, config_differences
from iwae.settings import CONFIG_FIELDS

# config.json as iwae wrote it before the settings' table (the default run, and an authors'-protocol MIWAE run).
SAVED = [
    '{"adam_eps": 0.0001, "batch_size": 20, "beta1": 0.9, "beta2": 0.999, "binarization": null, "data_order": '
    '"shuffled", "dataset": "mnist", "estimator": "standard", "fresh_optimizer": false, "init_from": null, "k": 1, '
    '"loss_reduction": "mean", "model": {"activation": "tanh", "hidden_dims": [[200, 200]], "latent_dims": [50], '
    '"likelihood": "bernoulli", "x_dim": 784}, "objective": {"name": "iwae"}, "optimizer": "adam", "seed": 0, '
    '"stage_batch_sizes": null, "stage_k": null, "stages": [[1, 0.001], [3, 0.00072], [9, 0.00052], [27, 0.00037], '
    '[81, 0.00027], [243, 0.00019], [729, 0.00014], [2187, 0.0001]], "train_limit": null, "train_split": "train", '
    '"valid_k": 50}',
    '{"adam_eps": 0.0001, "batch_size": 20, "beta1": 0.99, "beta2": 0.999, "binarization": "threshold", '
    '"data_order": "fixed", "dataset": "mnist", "estimator": "standard", "fresh_optimizer": false, "init_from": '
    '"/runs/base", "k": 4, "loss_reduction": "sum", "model": {"activation": "tanh", "hidden_dims": [[200, 200], '
    '[100, 100]], "latent_dims": [8, 4], "likelihood": "bernoulli", "x_dim": 784}, "objective": {"M": 2, "name": '
    '"miwae"}, "optimizer": "burda-adam", "seed": 7, "stage_batch_sizes": [20], "stage_k": null, "stages": [[3, '
    '0.001]], "train_limit": 100, "train_split": "train", "valid_k": 50}',
]
SAVED_SETTINGS = [
    {},
    {"protocol": "authors", "objective": "miwae", "M": 2, "k": 4, "epochs": 3, "latent_dims": "8,4",
     "train_limit": 100, "seed": 7, "init_from": "/runs/base", "batch_schedule": "grow", "binarization": "threshold"},
]  # fmt: skip


@pytest.mark.parametrize(("text", "flat"), list(zip(SAVED, SAVED_SETTINGS, strict=True)))
def test_saved_configurations_load_unchanged(text: str, flat: dict) -> None:
    config = TrainConfig.from_json(text)
    assert config.to_json() == text  # the JSON format is as it was
    assert config == build_train_config(flat)  # and the same flat settings still build it


def test_config_differences_names_the_settings_that_differ() -> None:
    a, b = TrainConfig.from_json(SAVED[0]), TrainConfig.from_json(SAVED[1])
    assert config_differences(a, a) == []
    assert config_differences(a, a.replace(k=5, seed=2)) == ["k", "seed"]
    assert "objective" in config_differences(a, b) and "model" in config_differences(a, b)


@pytest.mark.parametrize("setting", CONFIG_FIELDS, ids=lambda s: s.name)
def test_trainconfig_checks_each_field_with_the_table(setting) -> None:
    bad = object()  # no setting takes it
    with pytest.raises(ValueError) as raised:
        setting.check(bad)
    with pytest.raises(ValueError) as from_config:
        TrainConfig(**{setting.name: bad})
    assert str(from_config.value) == str(raised.value)


def test_the_builder_checks_every_flat_setting_and_refuses_unknown_ones() -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        build_train_config({"bogus": 1})
    with pytest.raises(ValueError, match="layers must be >= 1, got 0"):
        build_train_config({"layers": 0})
    with pytest.raises(ValueError, match="lr_scale must be one of none, linear, sqrt, got 'cube'"):
        build_train_config({"lr_scale": "cube", "batch_size": 40})
    assert json.loads(build_train_config({"seed": 3}).to_json())["seed"] == 3
