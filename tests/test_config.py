"""iwae.config: saved configurations load as they were written, TrainConfig checks its fields with the settings'
table (iwae.settings), the builder from flat settings, the authors' protocol and models of any depth, the
learning-rate schedules (Burda's, batch growth, larger minibatches, k per stage), and old configurations."""

from __future__ import annotations

import json
import math

import pytest

from iwae.config import (
    AUTHORS_PROTOCOL,
    BURDA_LEARNING_RATES,
    BURDA_STAGES,
    TrainConfig,
    build_train_config,
    config_differences,
    grow_batch_schedule,
    parse_schedule,
)
from iwae.models import ModelConfig
from iwae.objectives import IWAE, PIWAE
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
     "train_limit": 100, "seed": 7, "init_from": "/runs/base", "stage_batch_sizes": [20], "binarization": "threshold"},
]  # fmt: skip  (stage_batch_sizes [20]: what batch_schedule "grow" made of one stage, before it was refused there)


@pytest.mark.parametrize(("text", "flat"), list(zip(SAVED, SAVED_SETTINGS, strict=True)))
def test_saved_configurations_load_unchanged(text: str, flat: dict) -> None:
    config = TrainConfig.from_json(text)
    # the JSON format is as it was, with the settings added since at the values such runs had
    assert json.loads(config.to_json()) == json.loads(text) | {"output_bias": "data-mean"}
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


def test_the_authors_protocol_sets_its_items_and_refuses_a_contradiction() -> None:
    config = build_train_config({"protocol": "authors"})
    assert {key: getattr(config, key) for key in AUTHORS_PROTOCOL} == AUTHORS_PROTOCOL
    assert (config.optimizer, config.beta1, config.data_order, config.loss_reduction) == (
        "burda-adam", 0.99, "fixed", "sum",
    )  # fmt: skip
    default = build_train_config({})
    assert (default.optimizer, default.beta1, default.data_order, default.loss_reduction) == (
        "adam", 0.9, "shuffled", "mean",
    )  # fmt: skip
    assert build_train_config({"optimizer": "burda-adam"}).beta1 == 0.99  # the authors' beta1 with their Adam
    assert build_train_config({"optimizer": "burda-adam", "beta1": 0.9}).beta1 == 0.9
    assert build_train_config({"protocol": "authors", "data_order": "fixed"}).data_order == "fixed"
    with pytest.raises(ValueError, match="protocol 'authors' sets optimizer"):
        build_train_config({"protocol": "authors", "optimizer": "adam"})
    with pytest.raises(ValueError, match="protocol must be one of"):
        build_train_config({"protocol": "paper"})
    for key, value in (("optimizer", "sgd"), ("data_order", "random"), ("loss_reduction", "max"),
                       ("binarization", "otsu"), ("train_split", "all")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            build_train_config({key: value})


def test_configs_saved_before_continuation_load_as_they_ran() -> None:
    old = build_train_config({"init_from": "/runs/base"}).to_dict()
    old.pop("fresh_optimizer")
    for key in ("optimizer", "data_order", "loss_reduction", "binarization", "train_split"):
        old.pop(key)
    loaded = TrainConfig.from_dict(old)
    assert loaded.fresh_optimizer  # such runs started a new Adam
    assert (loaded.optimizer, loaded.data_order, loaded.train_split) == ("adam", "shuffled", "train")
    fresh = build_train_config({}).to_dict()
    fresh.pop("fresh_optimizer")
    assert not TrainConfig.from_dict(fresh).fresh_optimizer
    assert TrainConfig.from_json(build_train_config({"protocol": "authors"}).to_json()).optimizer == "burda-adam"


def test_models_of_any_depth() -> None:
    three = build_train_config({"latent_dims": "100,50,20"}).model
    assert three.latent_dims == (100, 50, 20) and three.hidden_dims == ((200, 200), (100, 100), (40, 40))
    assert build_train_config({"latent_dims": [100, 50, 20], "hidden_dims": "300,100,50"}).model.hidden_dims == (
        (300, 300), (100, 100), (50, 50),
    )  # fmt: skip
    assert build_train_config({"layers": 2}).model.hidden_dims == ((200, 200), (100, 100))  # Burda's, unchanged
    assert build_train_config({"latent_dims": "20"}).model.hidden_dims == ((200, 200),)
    for settings, message in (
        ({"layers": 3}, "needs its sizes"),
        ({"layers": 2, "latent_dims": "100,50,20"}, "needs 2 size"),
        ({"latent_dims": "100,50,20", "hidden_dims": "200,100"}, "needs 3 size"),
        ({"latent_dims": "100,0"}, ">= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            build_train_config(settings)


def test_config_validation_and_old_configs_load() -> None:
    old = TrainConfig().to_dict()  # written before the estimator and the bound family existed
    old.pop("estimator")
    old["objective"] = "iwae"
    loaded = TrainConfig.from_dict(old)
    assert loaded.estimator == "standard" and loaded.objective == IWAE()
    flat = {**old, "objective": "piwae", "k": 64, "M": 8, "beta": None, "p": None, "alpha": None}
    assert TrainConfig.from_dict(flat).objective == PIWAE(M=8)  # the flat fields of the previous release
    new = TrainConfig(objective=PIWAE(M=8), k=64, estimator="dreg")
    assert TrainConfig.from_json(new.to_json()) == new
    assert json.loads(new.to_json())["objective"] == {"name": "piwae", "M": 8}
    for bad, message in (
        ({"estimator": "reinforce"}, "unknown estimator"),
        ({"objective": "miwae", "k": 10, "M": 4}, "multiple of M"),
        ({"objective": "iwae", "k": 8, "M": 2}, "M applies"),
        ({"objective": "ciwae"}, "needs beta"),
        ({"objective": "ciwae", "beta": 1.5}, "0 <= beta <= 1"),
        ({"objective": "iwae", "p": 0.5}, "p applies"),
        ({"objective": "power", "p": 2.0}, "p <= 1"),
        ({"objective": "vr", "alpha": -1.0}, "alpha >= 0"),
        ({"objective": "nope"}, "unknown objective"),
    ):
        with pytest.raises(ValueError, match=message):
            build_train_config(bad)


def test_burda_schedule() -> None:
    assert sum(p for p, _ in BURDA_STAGES) == 3280
    assert [lr for _, lr in BURDA_STAGES] == [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]
    assert parse_schedule("burda:4") == ((1, 1e-3), (3, 7.2e-4), (9, 5.2e-4), (27, 3.7e-4))
    assert parse_schedule(None, epochs=5, lr=3e-4) == ((5, 3e-4),)
    config = TrainConfig(stages=parse_schedule("burda:3"))
    assert config.total_epochs == 13
    assert [config.stage_of_epoch(e)[0] for e in range(13)] == [0, 1, 1, 1] + [2] * 9
    assert config.stage_ends() == {0, 3, 12}
    for bad in ("burda:0", "burda:9", "cosine"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_config_round_trip() -> None:
    config = TrainConfig(objective="vae", k=5, model=ModelConfig.burda(2), stages=parse_schedule("burda:2"), seed=3)
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["model"]["latent_dims"] == [100, 50]
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"bogus": 1})


def test_batch_growth_keeps_the_first_rate_and_grows_the_minibatch_by_the_rates_fall() -> None:
    config = build_train_config({"schedule": "burda", "batch_schedule": "grow"})
    assert {lr for _, lr in config.stages} == {1e-3}
    assert [passes for passes, _ in config.stages] == [3**i for i in range(8)]
    assert config.stage_batch_sizes == (20, 28, 38, 54, 74, 105, 143, 200)
    for size, lr in zip(config.stage_batch_sizes, BURDA_LEARNING_RATES, strict=True):  # batch x rate held
        assert abs(size - 20 * 1e-3 / lr) <= 0.5
    stages, sizes = grow_batch_schedule(((2, 1e-3), (1, 1e-4)), 10)
    assert stages == ((2, 1e-3), (1, 1e-3)) and sizes == (10, 100)


@pytest.mark.parametrize(("scale", "factor"), [("none", 1.0), ("linear", 5.0), ("sqrt", math.sqrt(5.0))])
def test_a_larger_fixed_minibatch_scales_the_rates(scale: str, factor: float) -> None:
    config = build_train_config({"schedule": "burda:3", "batch_size": 100, "lr_scale": scale})
    assert [lr for _, lr in config.stages] == pytest.approx([lr * factor for lr in BURDA_LEARNING_RATES[:3]])
    assert config.stage_batch_sizes is None and config.batch_size == 100


def test_k_schedule_sets_k_per_stage_and_the_runs_k() -> None:
    config = build_train_config({"schedule": "burda:4", "k_schedule": "1,2,3,5"})
    assert config.k == 5 and [config.k_of_stage(i) for i in range(4)] == [1, 2, 3, 5]
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="end at the run's k"):
        build_train_config({"schedule": "burda:2", "k_schedule": "1,2", "k": 5})
    with pytest.raises(ValueError, match="one k per stage"):
        build_train_config({"schedule": "burda:3", "k_schedule": "1,2"})
    with pytest.raises(ValueError, match="M"):  # every stage's k must suit the objective
        build_train_config({"schedule": "burda:2", "k_schedule": "3,4", "objective": "miwae", "M": 2})


def test_settings_refused_now_build_what_they_built_when_read_back_from_a_record() -> None:
    refused = [
        {"epochs": 1, "batch_schedule": "grow"},
        {"epochs": 1, "lr": 1e-3, "lr_scale": "sqrt", "batch_size": 80},
        {"schedule": "burda:2", "k_schedule": "5,1"},
    ]
    for settings in refused:
        with pytest.raises(ValueError):
            build_train_config(settings)
    grown, scaled, decreasing = (build_train_config(settings, recorded=True) for settings in refused)
    assert grown.stage_batch_sizes == (20,)  # grow over one stage: its own minibatch, as it trained
    assert scaled.stages == ((1, 2e-3),)  # the given rate times sqrt(80 / 20), as it trained
    assert decreasing.stage_k == (5, 1) and decreasing.k == 1
