"""A training step's gradients in C++ (``step.cpp``): :mod:`iwae.backprop`'s explicit backpropagation for the VAE
and IWAE bounds with the standard estimator, on models with Bernoulli observations and tanh layers (Burda's).

At Burda's minibatch 20 a step is small enough that calling its ~80 operators from Python costs as much as a good
part of their arithmetic: on this project's 2-core CPU, a step of a model with 8 pixels and 4 hidden units, where
the arithmetic costs nothing, took about 1 ms. The C++ operator makes the same calls to ATen in the same order as
:mod:`iwae.backprop` (the reference, which says the algebra), from one Python call, and computes small layers with
PyTorch's ``addmm`` and :file:`kernels.c`'s tanh instead of oneDNN's fused layer (whose fixed cost per call is tens
of microseconds). Results equal :mod:`iwae.backprop`'s up to float32 rounding (``tests/test_native_step.py``).

It is compiled on first use with ``$CXX`` (default ``c++``) against the installed PyTorch's headers and libraries,
into the same cache as :mod:`iwae.native`'s C kernels, under a name that hashes the sources, the compiler, the flags,
the CPU and PyTorch's version. Where it cannot be built (no C++ compiler, ``IWAE_NATIVE=0``), or for other
objectives, estimators, models, devices or dtypes, :func:`iwae.backprop.accumulate_gradients` goes on in Python.

Shape convention: samples first. ``x`` is ``[batch, x_dim]``; the noise of stochastic layer j is ``[k, batch, d_j]``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

from iwae import native

SOURCE = Path(__file__).with_name("step.cpp")
OBJECTIVES = ("iwae", "vae")  # the bounds whose log-weight gradient step.cpp writes in closed form
FORWARD_ONEDNN_MIN_MACS = 1 << 23  # smaller layers: addmm and the native tanh, faster there on this project's CPU
_COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-w")
FLAG_SETS = ((*_COMMON_FLAGS, "-march=native"), _COMMON_FLAGS)  # tried in turn: the first that builds is used


class _Operator:
    """The loaded operator (or why there is none)."""

    def __init__(self, function: Callable[..., list[Tensor]] | None, description: str):
        self.function = function
        self.description = description


def _torch_arguments() -> tuple[list[str], tuple[str, ...]]:
    """The compiler arguments for PyTorch's headers and ABI, and the linker's for its libraries."""
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = []
    for path in cpp_extension.library_paths():
        libraries += [f"-L{path}", f"-Wl,-rpath,{path}"]
    return [abi, *includes], (*libraries, "-lc10", "-ltorch_cpu", "-ltorch")


def _build_and_load() -> _Operator:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _Operator(None, f"no C++ training step: no C++ compiler {compiler!r} on PATH (set CXX to one)")
    try:
        sources = SOURCE.read_text() + native.SOURCE.read_text()
        identity = "\n".join(
            (sources, native.compiler_identity(compiler), platform.machine(), native.cpu_identity(), torch.__version__)
        )
    except (OSError, subprocess.SubprocessError) as error:
        return _Operator(None, f"no C++ training step: cannot query the compiler {compiler!r} ({error})")
    torch_flags, libraries = _torch_arguments()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256("\n".join((identity, *flags, *torch_flags)).encode()).hexdigest()[:16]
        target = native.build_dir() / f"step-{key}.so"
        try:
            if not target.is_file():
                native.compile_atomically([compiler, *flags, *torch_flags, str(SOURCE)], target, libraries)
            torch.ops.load_library(str(target))
            return _Operator(torch.ops.iwae_step.accumulate_gradients, f"C++ training step ({target})")
        except subprocess.CalledProcessError as error:
            errors.append(native.build_error(error))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    reasons = "; ".join(dict.fromkeys(errors))
    return _Operator(None, f"no C++ training step: it did not build ({reasons})")


@functools.cache
def _operator() -> _Operator:
    if native.switched_off():
        return _Operator(None, f"no C++ training step: {native.SWITCH}=0 in the environment")
    if not native.available():  # step.cpp calls the C kernels, and needs what they need to build
        return _Operator(None, "no C++ training step: the native kernels are not available")
    if hasattr(torch.ops.iwae_step, "accumulate_gradients"):  # loaded before in this process (a namespace loads once)
        return _Operator(torch.ops.iwae_step.accumulate_gradients, "C++ training step (loaded before)")
    return _build_and_load()


def available() -> bool:
    """True when the C++ training step is built and loaded (building it on the first call)."""
    return _operator().function is not None


def status() -> str:
    """One line: whether training steps that :func:`applies` to run in C++, and from which file."""
    return _operator().description


def applies(model: torch.nn.Module, objective: str, estimator: str, x: Tensor) -> bool:
    """Whether :func:`accumulate_gradients` serves this step: the VAE or IWAE bound with the standard estimator, a
    model with Bernoulli observations and tanh layers, float32 on the CPU, outside ``torch.compile``."""
    config = model.config
    return (
        objective in OBJECTIVES
        and estimator == "standard"
        and config.likelihood == "bernoulli"
        and config.activation == "tanh"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and model.decoder[0].head.weight.dtype == torch.float32  # the model's dtype; step.cpp checks every parameter
        and model.decoder[0].head.weight.device.type == "cpu"
        and not native.switched_off()
        and not torch.compiler.is_compiling()
        and available()
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


@torch.no_grad()
def accumulate_gradients(model: torch.nn.Module, x: Tensor, noise: list[Tensor], objective: str) -> Tensor:
    """Add the loss's gradient (``-mean`` of the bound's surrogate) to every parameter's ``.grad``, as
    :func:`iwae.backprop.accumulate_gradients` would; returns the bound ``[batch]``. Only where :func:`applies`."""
    params, layers_per_network = network_layout(model)
    bound, *grads = _operator().function(
        x.contiguous(),
        noise,
        params,
        layers_per_network,
        objective,
        native.PARALLEL_MIN_ELEMENTS,
        FORWARD_ONEDNN_MIN_MACS,
        native.ONEDNN_INPUT_GRAD_MIN_MACS,
        native.fused_linear_works(),
    )
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad if param.grad is None else param.grad.add_(grad)
    return bound
