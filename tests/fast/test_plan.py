"""iwae.fast.plan: what the fast layer serves a training run and why, and the status report of every feature."""

from __future__ import annotations

import pytest
import torch

from iwae import fast
from iwae.fast import adam, switches
from iwae.fast import step as native_step
from iwae.models import LatentVariableModel, ModelConfig
from iwae.objectives import IWAE, PIWAE


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


def test_a_model_off_the_cpu_is_described_without_building_the_cpu_only_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (here the ``meta`` device) the C++ step cannot serve; saying so must not compile it (50 s on a fresh
    machine) just to name it in the description."""

    def no_build() -> str:
        raise AssertionError("the C++ step was built to describe a model it cannot serve")

    monkeypatch.setattr(native_step, "status", no_build)
    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),))).to("meta")
    description, served = fast.gradient_path(model, IWAE(), "standard")
    assert served and "not float32 on the CPU" in description


def test_each_part_of_the_plan_has_its_own_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct Adam call and the explicit gradients are switched apart: without ``adam`` the gradients stay fast
    and the optimiser steps through ``optimizer.step()``; without ``backprop`` and ``step`` the reverse."""
    model = LatentVariableModel(ModelConfig(12, (3,), ((8,),)))
    monkeypatch.setenv("IWAE_FAST", "-adam")
    path = fast.training_path(model, IWAE(), "standard")
    assert path.accumulate is not None and path.optimizer_step is None
    monkeypatch.setenv("IWAE_FAST", "adam")
    path = fast.training_path(model, IWAE(), "standard")
    assert path.accumulate is None and path.description.startswith("autograd (explicit backpropagation off: IWAE_FAST")
    assert (path.optimizer_step is adam.adam_step) == adam.available()
