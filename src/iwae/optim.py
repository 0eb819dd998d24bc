"""Optimisers: :class:`BurdaAdam`, the Adam of Burda et al.'s published code, beside ``torch.optim.Adam``.

The authors' ``optimizers.py`` (github yburda/iwae) differs from Kingma and Ba's Adam, which the paper cites and
``torch.optim.Adam`` implements, in four ways (docs/protocol.md):

- the second moments start at **1**, not 0 (the first moments at 0);
- ``beta1`` is 0.99 by default, not 0.9;
- the step size is ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` with a timestep t that starts at 1 and grows by one
  per update, and epsilon (1e-4) is added to ``sqrt(v)`` without bias correction;
- the parameter moves by the moments **from before this step's gradient** (Theano computes every update from the
  old values), so the very first update moves nothing and each gradient acts one step late.

Written as a loss minimiser: ``p <- p - step * m / (sqrt(v) + eps)`` where the authors' code ascends the bound
with ``+``; their moments are of the bound's gradient, ours of the loss's, which is its negative, so the update is
the same. The state uses ``torch.optim.Adam``'s names (``step``: updates done, ``exp_avg``: m, ``exp_avg_sq``: v),
so checkpoints and stacked training carry it as they carry Adam's; the learning rate is set per stage through
``param_groups`` like any optimiser's, and the timestep and moments carry over from stage to stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

BURDA_BETAS = (0.99, 0.999)
BURDA_EPS = 1e-4
# What BurdaAdam's step calls (torch's private multi-tensor API, as torch.optim.Adam(foreach=True) does).
_FOREACH_OPERATIONS = ("_foreach_sqrt", "_foreach_add_", "_foreach_addcdiv_", "_foreach_mul_", "_foreach_addcmul_")


class BurdaAdam(torch.optim.Optimizer):
    """The authors' Adam (see the module docstring): element-wise, so it serves stacked parameters too."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = BURDA_BETAS,
        eps: float = BURDA_EPS,
    ) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the learning rate must be a finite number > 0, got {lr!r}")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @staticmethod
    def initial_state(param: Tensor) -> dict[str, Tensor]:
        """A parameter's state before its first update: t = 1 ahead, m = 0, v = 1."""
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.ones_like(param, memory_format=torch.preserve_format),
        }

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = self._update_foreach if _foreach_available() else self._update_per_tensor
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            for param in params:
                if not self.state[param]:
                    self.state[param].update(self.initial_state(param))
            if params:
                update(group, params)
        return loss

    def _step_sizes(self, group: dict[str, Any], params: list[Tensor]) -> list[float]:
        """Each parameter's ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, with the authors' timestep t (1 at the first
        update; per parameter, since one that had no gradient at some step has done fewer updates)."""
        beta1, beta2 = group["betas"]
        sizes = []
        for param in params:
            t = float(self.state[param]["step"]) + 1.0  # the step counts stay on the CPU: no device sync
            sizes.append(group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
        return sizes

    def _update_per_tensor(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The update, about 7 operations per parameter (the fallback where ``torch._foreach_*`` is missing)."""
        beta1, beta2 = group["betas"]
        for param, step_size in zip(params, self._step_sizes(group, params), strict=True):
            state = self.state[param]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            # The move first, from the old moments; then the moments take this step's gradient.
            param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
            grad = param.grad
            m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            state["step"] += 1

    def _update_foreach(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The same update as :meth:`_update_per_tensor`, operation by operation, with ``torch._foreach_*``: 7 calls
        per device and dtype whatever the number of parameters (and one for the CPU step counts). On the CPU each
        call runs the per-tensor operations, so the numbers are the same bit for bit."""
        beta1, beta2 = group["betas"]
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for param in params:
            by_kind.setdefault((param.device, param.dtype), []).append(param)
        for members in by_kind.values():
            states = [self.state[param] for param in members]
            m, v = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
            grads = [param.grad for param in members]
            denominators = torch._foreach_sqrt(v)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(members, m, denominators, [-size for size in self._step_sizes(group, members)])
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            torch._foreach_add_([state["step"] for state in states], 1)


def _foreach_available() -> bool:
    """Whether this torch has the ``torch._foreach_*`` operations :class:`BurdaAdam` takes its step with (private
    API: where one is missing, the step falls back to one parameter at a time)."""
    return all(hasattr(torch, name) for name in _FOREACH_OPERATIONS)


def build_optimizer(name: str, parameters: list[Tensor], lr: float, betas: tuple[float, float], eps: float):
    """The optimiser a run's config names.

    Args:
        name: ``adam`` (``torch.optim.Adam``, the fused kernel on CPU and CUDA, ``foreach`` elsewhere) or
            ``burda-adam`` (:class:`BurdaAdam`).
        parameters: the parameters, all on one device (the first one's device picks Adam's kernel).
        lr: the learning rate.
        betas: ``(beta1, beta2)``.
        eps: added to ``sqrt(v)``.
    """
    if name == "burda-adam":
        return BurdaAdam(parameters, lr=lr, betas=betas, eps=eps)
    if name != "adam":
        raise ValueError(f"unknown optimizer {name!r}; choose adam or burda-adam")
    kernel = {"fused": True} if parameters[0].device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps, **kernel)


__all__ = ["BURDA_BETAS", "BURDA_EPS", "BurdaAdam", "build_optimizer"]
