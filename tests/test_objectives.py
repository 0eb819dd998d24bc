"""iwae.objectives: the registry of bound objects, its configuration form, and adding an objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from iwae import bounds, estimators
from iwae.config import TrainConfig, build_train_config
from iwae.objectives import (
    IWAE,
    MIWAE,
    OBJECTIVES,
    PIWAE,
    Objective,
    make_objective,
    objective_from_dict,
    objective_names,
    register_objective,
)

PARAMS = {"miwae": {"M": 2}, "piwae": {"M": 2}, "ciwae": {"beta": 0.3}, "power": {"p": 0.5}, "vr": {"alpha": 0.4}}


def test_the_family_is_registered_once_each() -> None:
    assert objective_names() == ("vae", "iwae", "miwae", "piwae", "ciwae", "power", "vr")
    for name in objective_names():
        objective = make_objective(name, **PARAMS.get(name, {}))
        assert objective.name == name and objective_from_dict(objective.to_dict()) == objective
        assert TrainConfig.from_json(TrainConfig(objective=objective, k=4).to_json()).objective == objective
    assert not PIWAE(M=2).shared and all(make_objective(n, **PARAMS.get(n, {})).shared for n in objective_names()[:3])
    assert make_objective("miwae", M=5).label() == "miwae(M=5)" and IWAE().label() == "iwae"


@pytest.mark.parametrize("name", objective_names())
def test_closed_form_loss_gradients_equal_autograd(name: str) -> None:
    objective = make_objective(name, **PARAMS.get(name, {}))
    log_w = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    for target, gradient in (
        (objective.encoder_target, objective.encoder_loss_gradient),
        (objective.decoder_target, objective.decoder_loss_gradient),
    ):
        leaf = log_w.clone().requires_grad_()
        (expected,) = torch.autograd.grad(-target(leaf).mean(), leaf)
        grad, value = gradient(log_w)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(value, target(log_w), rtol=1e-12, atol=1e-12)


def test_bad_parameters_are_one_line_errors() -> None:
    for call, message in (
        (lambda: make_objective("nope"), "unknown objective 'nope'; choose one of vae, iwae"),
        (lambda: make_objective("ciwae"), "needs beta"),
        (lambda: make_objective("iwae", beta=0.5), "beta applies to the ciwae objective only"),
        (lambda: make_objective("iwae", M=2), "M applies to the miwae and piwae objectives only"),
        (lambda: MIWAE(M=0), "M must be a whole number"),
        (lambda: MIWAE(M=1.5), "M must be a whole number"),
        (lambda: make_objective("power", p=float("nan")), "finite"),
        (lambda: MIWAE(M=3).check(4), "multiple of M"),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_adding_an_objective_is_one_class() -> None:
    """A user's objective trains through the estimators and is taken by the one config builder."""

    @dataclass(frozen=True)
    class Tempered(Objective):
        name: ClassVar[str] = "tempered-test"
        t: float = 0.5

        def encoder_target(self, log_w):
            return bounds.iwae_bound(self.t * log_w) / self.t

    register_objective(Tempered)
    try:
        config = build_train_config({"objective": "tempered-test", "k": 3, "epochs": 1})
        assert config.objective == Tempered() and TrainConfig.from_json(config.to_json()) == config
        log_w = torch.randn(3, 2)
        assert Tempered().dreg_coefficients is not None
        terms = estimators.terms_from_sample(
            estimators.ImportanceSample([], log_w, torch.zeros(3, 2), torch.zeros(3, 2)), Tempered(), "standard"
        )
        torch.testing.assert_close(terms.bound, bounds.iwae_bound(0.5 * log_w) / 0.5)
        with pytest.raises(ValueError, match="registered already"):
            register_objective(type("Other", (Tempered,), {}))
    finally:
        OBJECTIVES.pop("tempered-test")
