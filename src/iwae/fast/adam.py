"""Adam's update without the Python around it: the fused kernel called directly (``torch._fused_adam_``).

``torch.optim.Adam(fused=True).step()`` spends time grouping tensors by device and dtype, checking flags, running
hooks and profiling: a noticeable part of a step at Burda's minibatch 20
(docs/performance.md#what-makes-the-difference).
:func:`adam_step` makes the two calls that ``Adam.step`` makes (the step counts' increment and the fused kernel) once
every parameter has its state: the same update, bit for bit (``tests/fast/test_adam.py``). Anything else goes through
``optimizer.step()``.

Private PyTorch API: ``torch._fused_adam_`` and the optimizer's hook lists. :func:`available` checks that they are
there (the public ``optimizer.step()`` serves where not); ``tests/fast/test_adam.py`` fails loudly on a PyTorch that
changed them.
"""

from __future__ import annotations

import torch
import torch.optim.optimizer as optimizer_module


def available() -> bool:
    """Whether this PyTorch has the private pieces :func:`adam_step` calls."""
    return (
        callable(getattr(torch, "_fused_adam_", None))
        and callable(getattr(torch, "_foreach_add_", None))
        and hasattr(optimizer_module, "_global_optimizer_pre_hooks")
        and hasattr(optimizer_module, "_global_optimizer_post_hooks")
    )


def direct_arguments(optimizer: torch.optim.Optimizer) -> tuple[list[list[torch.Tensor]], dict] | None:
    """The tensor lists and keywords of the fused kernel call that ``optimizer.step()`` would make, or None where
    :func:`adam_step` must leave the step to it."""
    if not available() or type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    hook_lists = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    hooks = tuple(getattr(optimizer, name, None) for name in hook_lists)
    if any(hook is None for hook in hooks):
        return None
    global_hooks = (optimizer_module._global_optimizer_pre_hooks, optimizer_module._global_optimizer_post_hooks)
    if any(hooks) or any(global_hooks):
        return None
    group = optimizer.param_groups[0]
    plain = not any(group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable", "foreach"))
    if not (group.get("fused") and plain and group["weight_decay"] == 0 and not group.get("decoupled_weight_decay")):
        return None
    if isinstance(group["lr"], torch.Tensor) or any(isinstance(beta, torch.Tensor) for beta in group["betas"]):
        return None
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    first = group["params"][0]
    for param in group["params"]:
        state = optimizer.state.get(param)
        grad = param.grad
        if not state or grad is None or grad.is_sparse or (param.device, param.dtype) != (first.device, first.dtype):
            return None  # the first step (no state yet), a parameter without a gradient, several devices or dtypes
        params.append(param)
        grads.append(grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    beta1, beta2 = group["betas"]
    keywords = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": 0.0, "eps": group["eps"]}
    return [params, grads, exp_avgs, exp_avg_sqs, steps], keywords


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, for a fused Adam with state as two direct kernel calls (bit for bit the same update).

    Anything else (step hooks, several groups, devices or dtypes, amsgrad, weight decay, a parameter without a
    gradient, the first step) goes through ``optimizer.step()``."""
    direct = direct_arguments(optimizer)
    if direct is None:
        optimizer.step()
        return
    (params, grads, exp_avgs, exp_avg_sqs, steps), keywords = direct
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, maximize=False, grad_scale=None,
            found_inf=None, **keywords,
        )  # fmt: skip
