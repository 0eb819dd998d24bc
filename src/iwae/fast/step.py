"""A training step's forward and backward passes in C++ (``step.cpp``), for Burda's models.

Shape convention: samples first. ``x`` is ``[batch, x_dim]``; the noise of stochastic layer j is ``[k, batch, d_j]``;
the log-weights and their gradients are ``[k, batch]``.

:mod:`iwae.fast.backprop`'s explicit backpropagation (the reference, which says the algebra), for every estimator,
on models with Bernoulli observations and tanh layers, from two Python calls instead of about 80 operator calls:
:func:`forward` gives the log-weights and the tape, :mod:`iwae.fast.backprop` computes the loss's gradients in the
log-weights, and :func:`backward` accumulates every parameter's gradient. The operators make the same ATen calls in
the same order as the Python; small layers go through ``addmm`` and :file:`kernels.c`'s tanh instead of oneDNN's
fused layer, whose fixed cost per call dominates there (docs/performance.md#what-makes-the-difference). Results equal
the Python's up to float32 rounding (``tests/fast/test_step.py``).

Compiled on first use with ``$CXX`` (default ``c++``) against the installed PyTorch, into :mod:`iwae.fast.native`'s
private cache (:mod:`iwae.fast.cache`), under a name that hashes the sources, the compiler, the flags, the CPU and
PyTorch's version. Where it cannot be built (no C++ compiler, ``IWAE_FAST=-step``), or for other models, devices or
dtypes, :mod:`iwae.fast.backprop` goes on in Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

from iwae.fast import native, switches

SOURCE = Path(__file__).with_name("step.cpp")
FORWARD_ONEDNN_MIN_MACS = 1 << 23  # smaller layers: addmm and the C tanh (faster there: docs/performance.md)
_COMMON_FLAGS = (  # -w: PyTorch's headers warn under some compilers (errors still show)
    "-O3",
    "-fPIC",
    "-shared",
    "-std=c++20",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-w",
)
FLAG_SETS = (  # tried in turn: the first that builds is used
    (*_COMMON_FLAGS, "-march=native", "-fopenmp"),
    (*_COMMON_FLAGS, "-fopenmp"),
    _COMMON_FLAGS,
)


class _Operators:
    """The loaded operators (or why there are none)."""

    def __init__(self, loaded: bool, description: str):
        self.forward: Callable[..., list[Tensor]] | None = torch.ops.iwae_step.forward if loaded else None
        self.backward: Callable[..., list[Tensor]] | None = torch.ops.iwae_step.backward if loaded else None
        self.description = description


def _command(compiler: str, flags: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """The compiler's arguments, with PyTorch's headers and ABI, and the linker's for PyTorch's libraries."""
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi())}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = []
    for path in cpp_extension.library_paths():
        libraries += [f"-L{path}", f"-Wl,-rpath,{path}"]
    return [compiler, *flags, abi, *includes, str(SOURCE)], (*libraries, "-lc10", "-ltorch_cpu", "-ltorch")


def cxx11_abi() -> bool:
    """The C++ ABI PyTorch was built with. ``torch._C._GLIBCXX_USE_CXX11_ABI`` is private: where it is gone,
    ``torch.compiled_with_cxx11_abi()`` (public) answers; ``tests/fast/test_adam.py`` fails loudly if neither exists."""
    private = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return bool(private) if private is not None else bool(torch.compiled_with_cxx11_abi())


def _load(target: Path) -> bool:
    torch.ops.load_library(str(target))  # registers torch.ops.iwae_step.*
    return True


def _build_and_load() -> _Operators:
    loaded, detail = native.build_and_load(
        "step", "C++", "CXX", (SOURCE, native.SOURCE), FLAG_SETS, _command, _load,
        extra_identity=(torch.__version__, *cpp_extension.include_paths()),
    )  # fmt: skip
    if loaded is None:
        return _Operators(False, f"no C++ training step: {detail}")
    return _Operators(True, f"C++ training step ({detail})")


@functools.cache
def _operators() -> _Operators:
    if not switches.enabled("step"):
        return _Operators(False, f"no C++ training step: {switches.why_off('step')}")
    if hasattr(torch.ops.iwae_step, "forward"):  # loaded before in this process (a namespace loads once)
        return _Operators(True, "C++ training step (loaded before)")
    return _build_and_load()


def available() -> bool:
    """True when the C++ training step is built and loaded (building it on the first call)."""
    return _operators().forward is not None


def status() -> str:
    """One line: whether the training steps that :func:`applies` to run in C++, and from which file."""
    return _operators().description


def serves(model: torch.nn.Module) -> bool:
    """Whether the C++ step serves this model: Bernoulli observations and tanh layers, float32 on the CPU, switched
    on and built."""
    config = model.config
    return (
        config.likelihood == "bernoulli"
        and config.activation == "tanh"
        and native.model_on_cpu_float32(model)
        and switches.enabled("step")
        and available()
    )


def applies(model: torch.nn.Module, x: Tensor) -> bool:
    """Whether :func:`forward` and :func:`backward` serve this model and minibatch: :func:`serves` the model, the
    minibatch float32 on the CPU, outside ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and serves(model)
    )


def network_layout(model: torch.nn.Module) -> tuple[list[Tensor], list[int]]:
    """Every linear layer's weight and bias, for the encoder's networks and then the decoder's, each network's
    hidden layers before its head; and each network's number of linear layers (``step.cpp``'s ``params`` and
    ``layers_per_network``)."""
    params, layers_per_network = [], []
    for network in (*model.encoder, *model.decoder):
        layers = [*network.hidden, network.head]
        layers_per_network.append(len(layers))
        for layer in layers:
            params += (layer.weight, layer.bias)
    return params, layers_per_network


class Tape:
    """What :func:`forward` keeps for :func:`backward`: the model's layout, the operators' settings and
    ``step.cpp``'s flat list of tensors."""

    def __init__(self, layout: tuple[list[Tensor], list[int]], settings: list[int], tensors: list[Tensor]):
        self.layout = layout
        self.settings = settings
        self.tensors = tensors


def _settings() -> list[int]:
    onednn = int(native.fused_linear_works())
    return [native.PARALLEL_MIN_ELEMENTS, FORWARD_ONEDNN_MIN_MACS, native.ONEDNN_INPUT_GRAD_MIN_MACS, onednn]


def forward(model: torch.nn.Module, x: Tensor, noise: list[Tensor]) -> tuple[Tensor, Tape]:
    """The log-weights ``[k, batch]`` of :meth:`~iwae.models.LatentVariableModel.sample_with_noise`, and the tape
    for :func:`backward`. Only where :func:`applies`. Nothing is recorded for autograd (the operators run their
    ATen calls without it)."""
    layout, settings = network_layout(model), _settings()
    log_w, *tensors = _operators().forward(x.contiguous(), noise, *layout, settings)
    return log_w, Tape(layout, settings, tensors)


def backward(x: Tensor, noise: list[Tensor], tape: Tape, gradients: tuple[Tensor, Tensor], stop_q_params: bool) -> None:
    """Add every parameter's loss gradient to its ``.grad``, given the decoder's and the encoder's loss gradients
    in the log-weights (the same tensor when one surrogate serves both), as :func:`iwae.fast.backprop._backward` does;
    ``stop_q_params``: log q with q's parameters stopped (STL, DReG)."""
    params, layers_per_network = tape.layout
    decoder_grad, encoder_grad = gradients
    grads = _operators().backward(
        x.contiguous(), noise, params, layers_per_network, tape.settings, tape.tensors, decoder_grad, encoder_grad,
        stop_q_params,
    )  # fmt: skip
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad if param.grad is None else param.grad.add_(grad)
