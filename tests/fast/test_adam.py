"""iwae.fast.adam: the fused Adam kernel called directly is ``optimizer.step()``'s update, bit for bit, and leaves
what it does not cover to the optimiser; and the guards on the private PyTorch APIs the fast layer calls."""

from __future__ import annotations

import torch
from gradients import adam_pair, random_gradients

from iwae.config import TrainConfig
from iwae.fast import adam, native
from iwae.fast import step as native_step
from iwae.fast.adam import adam_step


def test_adam_step_equals_optimizer_step_bit_for_bit() -> None:
    """Over several steps and a change of learning rate (a stage of Burda's schedule); state_dicts equal too."""
    config = TrainConfig(stages=((2, 1e-3), (2, 3e-4)))
    (direct_model, direct), (reference_model, reference) = adam_pair(config)
    for step in range(6):
        for optimizer in (direct, reference):
            optimizer.param_groups[0]["lr"] = 1e-3 if step < 3 else 3e-4
        random_gradients(direct_model, step)
        random_gradients(reference_model, step)
        adam_step(direct)
        reference.step()
    for got, want in zip(direct_model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(direct.state.values(), reference.state.values(), strict=True):
        assert all(torch.equal(got[key], want[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_adam_step_leaves_what_it_does_not_cover_to_the_optimizer() -> None:
    config = TrainConfig()
    (model, optimizer), _ = adam_pair(config)
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    for step in range(2):
        random_gradients(model, step)
        adam_step(optimizer)
    assert calls == [1, 1]  # hooks run: through optimizer.step()
    (model, optimizer), _ = adam_pair(config)
    random_gradients(model, 0)
    adam_step(optimizer)  # the first step creates the state through optimizer.step()
    model[0].weight.grad = None
    before = model[0].weight.detach().clone()
    adam_step(optimizer)  # a parameter without a gradient: optimizer.step() skips it
    assert torch.equal(model[0].weight, before)


def test_private_pytorch_apis_are_there() -> None:
    """Fails loudly on a PyTorch that removed or changed what the fast layer calls (each has a public fallback,
    so such a PyTorch would only be slower: this test is how the change gets seen)."""
    assert adam.available(), "torch._fused_adam_ or the optimizer's hook lists are gone: iwae.fast.adam falls back"
    assert isinstance(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None), bool), "the C++ step's ABI probe changed"
    assert native_step.cxx11_abi() == torch.compiled_with_cxx11_abi()
    if torch.backends.mkldnn.is_available():
        assert native.fused_linear_works(), "torch.ops.mkldnn._linear_pointwise is gone or differs from F.linear"
