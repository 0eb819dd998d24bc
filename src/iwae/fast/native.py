"""Fast CPU paths for the decoder's output: a C kernel compiled on first use, and oneDNN's fused linear layers.

Shape convention: samples first. ``pre`` is ``[k, batch, n]`` (any leading dimensions), ``x`` is
``[batch, n]``, ``bias`` is ``[n]`` and the per-sample log-likelihoods are ``[k, batch]``.

Both serve float32 tensors on the CPU; elsewhere (other devices or dtypes), where they cannot run, or with
``IWAE_FAST`` switching them off (:mod:`iwae.fast.switches`) plain PyTorch operations serve. :func:`status` says
which paths are in use. Results equal the PyTorch formulas up to float32 rounding (``tests/fast/test_native.py``).

- :func:`bernoulli_log_prob_rows`: ``sum_j x_j l_j - softplus(l_j)`` with ``l = pre + bias``, and its gradient
  ``grad * (x - sigmoid(l))``, in one pass over ``pre`` each (``kernels.c``: polynomial exp and log1p, each row
  summed in double) where PyTorch makes several. Large inputs are split by rows over PyTorch's OpenMP threads;
  under ``torch.compile`` the kernel is a custom operator (``torch.ops.iwae.*``), so no graph break.
- :func:`tanh_`: tanh in place, from the same C file, for :mod:`iwae.fast.step`'s small layers.
- :func:`fused_linear`: ``activation(inputs @ weight.T + bias)`` as one oneDNN primitive
  (``torch.ops.mkldnn._linear_pointwise``), with a hand-written backward; no separate pass for the bias or the
  activation, and on some CPUs a faster matmul than the default BLAS (docs/performance.md#what-makes-the-difference).
  A probe on first use checks that the op exists and agrees with ``F.linear``.

The C file is compiled with ``$CC`` (default ``cc``), ``-O3 -march=native -fopenmp``, into
``$XDG_CACHE_HOME/iwae/native`` (or ``~/.cache/iwae/native``), under a name that hashes the source, the compiler, the
flags and the CPU, so a build is never loaded on a machine it was not built for. The cache is private
(:mod:`iwae.fast.cache`): mode ``0o700``, used only if it is this user's alone; a cached library is loaded only if it
is this user's and its SHA-256 equals the one recorded after its build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from iwae.data import cache_dir
from iwae.fast import cache, switches

T = TypeVar("T")

SOURCE = Path(__file__).with_name("kernels.c")
_COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math")
FLAG_SETS = (  # tried in turn: the first that builds is used
    (*_COMMON_FLAGS, "-march=native", "-fopenmp"),
    (*_COMMON_FLAGS, "-fopenmp"),
    _COMMON_FLAGS,
)
PARALLEL_MIN_ELEMENTS = 1 << 15  # smaller inputs run on the calling thread alone


def switched_off() -> bool:
    """Whether the C kernels are switched off (``IWAE_FAST``, :mod:`iwae.fast.switches`)."""
    return not switches.enabled("kernels")


class _Library:
    """The loaded shared library (or why there is none)."""

    def __init__(self, handle: ctypes.CDLL | None, description: str):
        self.handle = handle
        self.description = description
        if handle is not None:
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            forward, backward = handle.iwae_bernoulli_log_prob_rows, handle.iwae_bernoulli_log_prob_rows_backward
            forward.argtypes = [pointer] * 4 + [size] * 4
            backward.argtypes = [pointer] * 5 + [size] * 4
            handle.iwae_tanh_.argtypes = [pointer, size, size]
            forward.restype = backward.restype = handle.iwae_tanh_.restype = None


def build_dir() -> Path:
    return cache_dir() / "native"


def _compiler_identity(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.splitlines()[0] if result.stdout else compiler


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else the platform's processor string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def _compile_atomically(arguments: list[str], target: Path, libraries: tuple[str, ...] = ()) -> None:
    """Run the compiler command ``arguments`` with ``-o`` a temporary file, then ``libraries``, and rename the
    result to ``target`` (mode ``0o700``, whatever the umask): a build that fails or is interrupted leaves no
    ``target`` behind. ``target``'s directory must exist (:func:`iwae.fast.cache.make_private_directory`)."""
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [*arguments, "-o", temporary, *libraries]
        subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
        os.chmod(temporary, cache.PRIVATE_MODE)  # the linker recreates the file under the umask
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _build_error(error: subprocess.CalledProcessError) -> str:
    """A failed build's last line of output (or the error itself)."""
    return error.stderr.strip().splitlines()[-1] if error.stderr.strip() else str(error)


def build_and_load(
    name: str,
    language: str,
    compiler_variable: str,
    sources: tuple[Path, ...],
    flag_sets: tuple[tuple[str, ...], ...],
    command: Callable[[str, tuple[str, ...]], tuple[list[str], tuple[str, ...]]],
    load: Callable[[Path], T],
    extra_identity: tuple[str, ...] = (),
) -> tuple[T | None, str]:
    """Build ``name`` into :func:`build_dir` (or reuse its cached build) and load it.

    The file's name hashes the sources, the compiler, the flags, the machine, the CPU and ``extra_identity``. The
    cache is private (:mod:`iwae.fast.cache`): made with mode ``0o700``, and refused if it is a link, someone else's
    or writable by others, the build then going to a fresh private temporary directory (with one warning line on
    stderr); a cached library is loaded only if its owner, mode and SHA-256 (recorded after its build) check out,
    else it is rebuilt.

    Args:
        name: the library's name, the start of its file name.
        language: ``"C"`` or ``"C++"``.
        compiler_variable: the environment variable that names the compiler (default ``cc`` for C, ``c++`` for C++).
        sources: the files whose text enters the hash.
        flag_sets: tried in turn; the first that builds is used.
        command: ``command(compiler, flags)`` gives the compiler's arguments before ``-o`` and the libraries after.
        load: loads the built file.
        extra_identity: more strings that enter the hash.

    Returns:
        What ``load`` gave and one line naming the file, or None and one line saying why there is nothing.
    """
    compiler = os.environ.get(compiler_variable, {"C": "cc", "C++": "c++"}[language])
    if shutil.which(compiler) is None:
        return None, f"no {language} compiler {compiler!r} on PATH (set {compiler_variable} to one)"
    try:
        texts = [source.read_text() for source in sources]
        machine = (_compiler_identity(compiler), platform.machine(), _cpu_identity())
        identity = "\n".join((*texts, *machine, *extra_identity))
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"cannot query the compiler {compiler!r} ({error})"
    directory, refusal = build_dir(), None
    problem = cache.make_private_directory(directory)
    if problem is not None:  # someone else's, or shared: build where no one else can write, for this process only
        refusal = f"the build cache {directory} is refused: it is {problem}"
        advice = "" if problem.startswith("not creatable") else " (chmod 700 it if it is yours, or delete it)"
        cache.warn_once(f"{refusal}{advice}; iwae builds its native code in a private temporary directory instead")
        try:
            directory = Path(tempfile.mkdtemp(prefix="iwae-native-"))
        except OSError as error:
            return None, f"{refusal}, and there is no private temporary directory ({error})"
    try:
        with cache.locked(directory):
            build = functools.partial(command, compiler)
            loaded, detail = _build_and_load_in(directory, name, identity, flag_sets, build, load)
    finally:
        if refusal is not None:
            shutil.rmtree(directory, ignore_errors=True)  # a loaded library stays mapped
    return loaded, detail if refusal is None else f"{detail}; {refusal}, built in a private temporary directory"


def _build_and_load_in(
    directory: Path,
    name: str,
    identity: str,
    flag_sets: tuple[tuple[str, ...], ...],
    command: Callable[[tuple[str, ...]], tuple[list[str], tuple[str, ...]]],
    load: Callable[[Path], T],
) -> tuple[T | None, str]:
    """:func:`build_and_load` in a private ``directory``: a cached library is loaded only if
    :func:`iwae.fast.cache.library_problem` finds nothing wrong with it, else it is rebuilt; a build is loaded only if
    that holds for it too."""
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256("\n".join((identity, *flags)).encode()).hexdigest()[:16]
        target = directory / f"{name}-{key}.so"
        try:
            stale = cache.library_problem(target) if os.path.lexists(target) else None
            if stale is not None:
                cache.remove(target)
                if "no recorded SHA-256" not in stale:  # more than a build from before the records: say so
                    cache.warn_once(f"iwae rebuilds {target}: {stale}")
            if not os.path.lexists(target):
                arguments, libraries = command(flags)
                _compile_atomically(arguments, target, libraries)
                cache.record_digest(target)
                problem = cache.library_problem(target)
                if problem is not None:
                    return None, f"{name} was built but is not loaded: {problem}"
            loaded = load(target)
            return loaded, str(target) if stale is None else f"{target}, rebuilt because {stale}"
        except subprocess.CalledProcessError as error:
            errors.append(_build_error(error))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    reasons = "; ".join(dict.fromkeys(errors))  # the same reason for every flag set is said once
    return None, f"{name} did not build ({reasons})"


def _build_and_load() -> _Library:
    handle, detail = build_and_load(
        "kernels", "C", "CC", (SOURCE,), FLAG_SETS, lambda compiler, flags: ([compiler, *flags, str(SOURCE)], ()),
        lambda target: ctypes.CDLL(str(target)),
    )  # fmt: skip
    return _Library(handle, f"native kernels ({detail})" if handle is not None else f"PyTorch fallback: {detail}")


@functools.cache
def _library() -> _Library:
    if switched_off():
        return _Library(None, f"PyTorch fallback: {switches.why_off('kernels')}")
    return _build_and_load()


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing the build
def available() -> bool:
    """True when the native kernels are built and loaded (building them on the first call)."""
    return _library().handle is not None


def status() -> str:
    """One line: which paths :func:`bernoulli_log_prob_rows` and :func:`fused_linear` take on CPU float32 tensors."""
    linear = "oneDNN fused linear layers" if fused_linear_works() else "no oneDNN fused linear layers"
    return f"{_library().description}; {linear}"


# -- oneDNN's fused linear + activation ----------------------------------------------------
FUSED_ACTIVATIONS = ("none", "tanh", "relu")  # oneDNN post-ops that equal the model's activations


def _fused_linear_op(inputs: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, activation, [], "")


def _plain_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    outputs = F.linear(inputs, weight, bias)
    if activation == "tanh":
        return torch.tanh(outputs)
    return torch.relu(outputs) if activation == "relu" else outputs


@functools.cache
def fused_linear_works() -> bool:
    """Whether PyTorch has the oneDNN op and it agrees with ``F.linear`` (checked once, on a small input)."""
    if not switches.enabled("onednn") or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    inputs, weight, bias = (torch.randn(shape, generator=generator) for shape in ((2, 3, 5), (4, 5), (4,)))
    try:
        with torch.no_grad():
            return all(
                torch.allclose(
                    _fused_linear_op(inputs, weight, bias, activation),
                    _plain_linear(inputs, weight, bias, activation),
                    rtol=1e-5,
                    atol=1e-5,
                )
                for activation in FUSED_ACTIVATIONS
            )
    except (RuntimeError, AttributeError, TypeError):
        return False


class _FusedLinear(torch.autograd.Function):
    """oneDNN's fused forward; the backward as PyTorch's autograd would compute it, from the saved output."""

    @staticmethod
    def forward(ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
        outputs = _fused_linear_op(inputs, weight, bias, activation)
        ctx.activation, ctx.has_bias = activation, bias is not None
        ctx.save_for_backward(inputs, weight, outputs)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        inputs, weight, outputs = ctx.saved_tensors
        grad = activation_backward(ctx.activation, grad, outputs)
        needs_inputs, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_inputs = linear_input_grad(grad, weight) if needs_inputs else None
        grad_weight = linear_weight_grad(grad, inputs) if needs_weight else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0) if needs_bias and ctx.has_bias else None
        return grad_inputs, grad_weight, grad_bias, None


def activation_backward(activation: str, grad: Tensor, outputs: Tensor) -> Tensor:
    """The gradient with respect to an activation's inputs, from the one with respect to its ``outputs`` and those
    outputs: ``activation`` is one of :data:`FUSED_ACTIVATIONS` or ``"softplus"``."""
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, outputs)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, outputs, 0)
    if activation == "softplus":
        return grad * -torch.expm1(-outputs)  # sigmoid(a) = 1 - exp(-softplus(a))
    if activation == "none":
        return grad
    raise ValueError(f"no derivative from the outputs for activation {activation!r}")


def fused_linear_applies(inputs: Tensor) -> bool:
    """True where :func:`fused_linear` takes oneDNN: CPU float32, the op works, not inside torch.compile."""
    return (
        inputs.device.type == "cpu"
        and inputs.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and fused_linear_works()
    )


def fused_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """``activation(F.linear(inputs, weight, bias))`` for ``[..., in] -> [..., out]``; ``activation`` is one of
    :data:`FUSED_ACTIVATIONS`. oneDNN where :func:`fused_linear_applies` (with a hand-written backward when
    autograd records), PyTorch otherwise: the same values up to float32 rounding (oneDNN's tanh differs from
    ``torch.tanh`` by a few 1e-7)."""
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"fused_linear takes activation in {FUSED_ACTIVATIONS}, got {activation!r}")
    if not fused_linear_applies(inputs):
        return _plain_linear(inputs, weight, bias, activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (inputs, weight, bias)):
        return _FusedLinear.apply(inputs, weight, bias, activation)
    return _fused_linear_op(inputs, weight, bias, activation)


ONEDNN_INPUT_GRAD_MIN_MACS = 1 << 25  # smaller products: PyTorch's matmul (faster there: docs/performance.md)


def linear_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight``, a linear layer's gradient with respect to its inputs (``[..., out] -> [..., in]``).

    Products of at least :data:`ONEDNN_INPUT_GRAD_MIN_MACS` multiply-adds on CPU float32 go through oneDNN as a
    linear layer with the transposed weight (a view, no copy); smaller ones through PyTorch's matmul
    (docs/performance.md#what-makes-the-difference)."""
    if grad.numel() * weight.shape[1] >= ONEDNN_INPUT_GRAD_MIN_MACS and fused_linear_applies(grad):
        return _fused_linear_op(grad, weight.T, None, "none")
    return grad @ weight


def linear_weight_grad(grad: Tensor, inputs: Tensor) -> Tensor:
    """``grad^T @ inputs`` over all leading dimensions, a linear layer's gradient with respect to its weight
    (``[out, in]``) from the gradient of its outputs ``[..., out]`` and its inputs ``[..., in]``."""
    return grad.reshape(-1, grad.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])


# -- the kernels, as an autograd function (eager) and as custom operators (torch.compile) ----------------
def _log_prob_kernel(pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    pre, bias, x = pre.contiguous(), bias.contiguous(), x.contiguous()
    out = pre.new_empty(pre.shape[:-1])
    cols = pre.shape[-1]
    _library().handle.iwae_bernoulli_log_prob_rows(
        pre.data_ptr(), bias.data_ptr(), x.data_ptr(), out.data_ptr(), out.numel(), cols, x.numel() // cols,
        PARALLEL_MIN_ELEMENTS,
    )  # fmt: skip
    return out


def _log_prob_backward_kernel(pre: Tensor, bias: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    pre, bias, x, grad = pre.contiguous(), bias.contiguous(), x.contiguous(), grad.contiguous()
    grad_pre = torch.empty_like(pre, memory_format=torch.contiguous_format)
    cols = pre.shape[-1]
    _library().handle.iwae_bernoulli_log_prob_rows_backward(
        pre.data_ptr(), bias.data_ptr(), x.data_ptr(), grad.data_ptr(), grad_pre.data_ptr(), grad.numel(), cols,
        x.numel() // cols, PARALLEL_MIN_ELEMENTS,
    )  # fmt: skip
    return grad_pre


def _input_gradients(needs_input_grad, pre: Tensor, grad_pre: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    grad_bias = grad_pre.reshape(-1, pre.shape[-1]).sum(dim=0) if needs_input_grad[1] else None
    return (grad_pre if needs_input_grad[0] else None), grad_bias, None


class _BernoulliLogProbRows(torch.autograd.Function):
    """The eager path: an autograd function costs less per call than a custom operator."""

    @staticmethod
    def forward(ctx, pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(pre, bias, x)
        return _log_prob_kernel(pre, bias, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, bias, x = ctx.saved_tensors
        return _input_gradients(ctx.needs_input_grad, pre, _log_prob_backward_kernel(pre, bias, x, grad))


@torch.library.custom_op("iwae::bernoulli_log_prob_rows", mutates_args=())
def _log_prob_op(pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return _log_prob_kernel(pre, bias, x)


@_log_prob_op.register_fake
def _(pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return pre.new_empty(pre.shape[:-1])


@torch.library.custom_op("iwae::bernoulli_log_prob_rows_backward", mutates_args=())
def _log_prob_backward_op(pre: Tensor, bias: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    return _log_prob_backward_kernel(pre, bias, x, grad)


@_log_prob_backward_op.register_fake
def _(pre: Tensor, bias: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _op_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    pre, bias, x = ctx.saved_tensors
    return _input_gradients(ctx.needs_input_grad, pre, _log_prob_backward_op(pre, bias, x, grad))


_log_prob_op.register_autograd(_op_backward, setup_context=_setup_context)


def tanh_(tensor: Tensor) -> Tensor:
    """``tanh`` in place with the C kernel (about 1.2 ulp), as :mod:`iwae.fast.step` applies it to its small layers;
    ``torch.tanh_`` where :func:`applies_to` does not hold or the tensor is not contiguous."""
    if not (applies_to(tensor) and tensor.is_contiguous()):
        return tensor.tanh_()
    _library().handle.iwae_tanh_(tensor.data_ptr(), tensor.numel(), PARALLEL_MIN_ELEMENTS)
    return tensor


def bernoulli_log_prob_rows_reference(pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """The PyTorch formula: ``(x * l - softplus(l)).sum(-1)`` with ``l = pre + bias``."""
    logits = pre + bias
    return (x * logits - F.softplus(logits)).sum(dim=-1)


def model_on_cpu_float32(model: torch.nn.Module) -> bool:
    """Whether a model's parameters are float32 on the CPU, the only case the fast paths serve (its first
    parameter answers for all: the C++ step checks every one)."""
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cpu" and parameter.dtype == torch.float32


def applies_to(tensor: Tensor) -> bool:
    """Whether the native kernels serve this tensor: float32 on the CPU, with the library available."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and available()


def bernoulli_log_prob_rows_grad(pre: Tensor, bias: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    """The gradient with respect to ``pre`` of ``sum(grad * bernoulli_log_prob_rows(pre, bias, x))``:
    ``grad[..., None] * (x - sigmoid(pre + bias))``, ``[*samples, *batch, n]`` (the native kernel where
    :func:`applies_to` all four tensors; the bias's gradient is this summed over the rows)."""
    if all(applies_to(t) for t in (pre, bias, x, grad)):
        return _log_prob_backward_kernel(pre, bias, x, grad)
    return grad.unsqueeze(-1) * (x - torch.sigmoid(pre + bias))


def bernoulli_log_prob_rows(pre: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """``sum_j x_j l_j - softplus(l_j)`` with logits ``l = pre + bias``: ``log p(x | l)`` of independent
    Bernoulli pixels. ``pre`` is ``[*samples, *batch, n]``, ``bias`` ``[n]``, ``x`` ``[*batch, n]`` (shared by
    the samples); returns ``[*samples, *batch]``, differentiable in ``pre`` and ``bias`` (``x`` is data).

    The native kernel where :func:`applies_to` all three; :func:`bernoulli_log_prob_rows_reference` otherwise.
    """
    if bias.dim() != 1 or x.dim() < 1 or pre.shape[-1] != bias.shape[0] or pre.shape[pre.dim() - x.dim() :] != x.shape:
        shapes = f"{tuple(pre.shape)}, {tuple(bias.shape)} and {tuple(x.shape)}"
        raise ValueError(f"bernoulli_log_prob_rows needs pre [..., *batch, n], bias [n], x [*batch, n]; got {shapes}")
    if x.requires_grad or not all(applies_to(t) for t in (pre, bias, x)):
        return bernoulli_log_prob_rows_reference(pre, bias, x)
    if torch.compiler.is_compiling():
        return _log_prob_op(pre, bias, x)
    return _BernoulliLogProbRows.apply(pre, bias, x)
