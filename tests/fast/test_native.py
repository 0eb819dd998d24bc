"""The native Bernoulli log-likelihood kernel and the fused linear layers against the PyTorch formulas."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from iwae.fast import native

HAVE_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
needs_native = pytest.mark.skipif(not native.available(), reason=native.status())


@pytest.mark.skipif(not HAVE_COMPILER or native.switched_off(), reason="no C compiler, or switched off")
def test_kernels_build_where_a_compiler_exists() -> None:
    """With a C compiler on PATH the kernels must build: a silent fallback would hide a broken build."""
    assert native.available(), native.status()
    assert native.status().startswith("native kernels")


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    samples=st.integers(1, 6),
    batch=st.integers(1, 4),
    cols=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 1.0, 5.0, 30.0]),
    shift=st.sampled_from([-20.0, -7.0, 0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_log_probs_and_gradients_match_float64(
    samples: int, batch: int, cols: int, scale: float, shift: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    pre = (torch.randn(samples, batch, cols, generator=generator) * scale + shift).requires_grad_(True)
    bias = torch.randn(cols, generator=generator).requires_grad_(True)
    x = torch.bernoulli(torch.full((batch, cols), 0.4), generator=generator)
    grad = torch.randn(samples, batch, generator=generator)

    log_probs = native.bernoulli_log_prob_rows(pre, bias, x)
    # The exact functions of the float32 logits pre + bias (rounded as the kernel rounds them).
    logits = (pre + bias).detach().double()
    terms = x.double() * logits - F.softplus(logits)
    expected_pre = grad.double()[..., None] * (x.double() - torch.sigmoid(logits))
    # each of x l and softplus(l) is within a few float32 ulps (their difference can cancel); the row sum
    # itself is rounded once, from double
    tolerance = 4e-7 * (x.double() * logits.abs() + F.softplus(logits)).sum(-1) + 1e-30
    assert log_probs.dtype == torch.float32 and log_probs.shape == (samples, batch)
    assert ((log_probs.double() - terms.sum(-1)).abs() <= tolerance).all()

    grad_pre, grad_bias = torch.autograd.grad(log_probs, (pre, bias), grad)
    # x - sigmoid(l) cancels when both are near 1: sigmoid's float32 error (~1e-7) then sets the scale
    grad_scale = grad.double().abs()[..., None]
    assert ((grad_pre.double() - expected_pre).abs() <= 1e-6 * expected_pre.abs() + 2e-7 * grad_scale).all()
    torch.testing.assert_close(grad_bias.double(), expected_pre.sum((0, 1)), rtol=1e-5, atol=1e-6)


@needs_native
def test_extreme_and_non_finite_logits() -> None:
    bias, x = torch.zeros(6), torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    pre = torch.tensor(
        [
            [100.0, -100.0, 0.0, 1e-8, -87.5, 88.0],
            [math.inf, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-math.inf, 0.0, 0.0, 0.0, 0.0, 0.0],
            [math.nan, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    log_probs = native.bernoulli_log_prob_rows(pre, bias, x)
    expected = native.bernoulli_log_prob_rows_reference(pre[:1].double(), bias.double(), x.double())
    torch.testing.assert_close(log_probs[0].double(), expected[0], rtol=1e-7, atol=1e-7)
    assert math.isnan(log_probs[1].item())  # x l - softplus(l) = inf - inf: PyTorch's formula gives nan too
    assert log_probs[2] == -math.inf  # an 'on' pixel with probability 0
    assert math.isnan(log_probs[3].item())


@needs_native
def test_tiny_gradients_flush_to_zero_without_error() -> None:
    """Subnormal products (tiny importance weights times tiny sigmoids) come out as zeros or tiny normals."""
    pre = torch.full((3, 50), -80.0, requires_grad=True)
    log_probs = native.bernoulli_log_prob_rows(pre, torch.zeros(50), torch.zeros(50))
    (grad_pre,) = torch.autograd.grad(log_probs, pre, torch.full((3,), 1e-30))
    assert torch.isfinite(grad_pre).all() and (grad_pre.abs() < 1e-38).all()


@needs_native
def test_threads_split_rows_without_changing_results() -> None:
    """Rows are summed the same way on any thread, so one thread and two give the same bits."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(2 * native.PARALLEL_MIN_ELEMENTS // 784 + 7, 3, 784, generator=generator) * 4
    bias = torch.randn(784, generator=generator)
    x = torch.bernoulli(torch.full((3, 784), 0.3), generator=generator)
    grad = torch.randn(pre.shape[:-1], generator=generator)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                (native._log_prob_kernel(pre, bias, x), native._log_prob_backward_kernel(pre, bias, x, grad))
            )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_native
def test_compiled_calls_take_the_custom_operator() -> None:
    pre = torch.randn(5, 3, 40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    x = torch.bernoulli(torch.full((3, 40), 0.5))
    compiled = torch.compile(native.bernoulli_log_prob_rows, fullgraph=True)
    log_probs = compiled(pre, bias, x)
    torch.testing.assert_close(log_probs, native.bernoulli_log_prob_rows(pre, bias, x))
    grads = torch.autograd.grad(log_probs.sum(), (pre, bias))
    expected = torch.autograd.grad(native.bernoulli_log_prob_rows(pre, bias, x).sum(), (pre, bias))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_other_dtypes_and_data_with_gradients_use_pytorch() -> None:
    pre = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    bias, x = torch.randn(7, dtype=torch.float64), torch.rand(4, 7, dtype=torch.float64)
    assert not native.applies_to(pre)
    reference = native.bernoulli_log_prob_rows_reference(pre, bias, x)
    torch.testing.assert_close(native.bernoulli_log_prob_rows(pre, bias, x), reference)
    x32 = torch.rand(4, 7, requires_grad=True)  # a gradient for x: only PyTorch's formula gives one
    (grad_x,) = torch.autograd.grad(native.bernoulli_log_prob_rows(pre.float(), bias.float(), x32).sum(), x32)
    torch.testing.assert_close(grad_x, (pre.float() + bias.float()).sum(0).detach())


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"needs pre \[\.\.\., \*batch, n\], bias \[n\], x \[\*batch, n\]"):
        native.bernoulli_log_prob_rows(torch.zeros(2, 3, 5), torch.zeros(5), torch.zeros(2, 5))


def test_missing_compiler_falls_back_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-iwae")
    library = native._build_and_load()
    assert library.handle is None and "no C compiler 'no-such-compiler-iwae'" in library.description


def test_switch_turns_the_native_paths_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_FAST", "0")
    native._library.cache_clear()
    native.fused_linear_works.cache_clear()
    try:
        assert not native.available() and not native.fused_linear_works()
        assert "IWAE_FAST='0'" in native.status()
        pre, bias, x = torch.randn(2, 3, 8), torch.randn(8), torch.rand(3, 8)
        reference = native.bernoulli_log_prob_rows_reference(pre, bias, x)
        assert torch.equal(native.bernoulli_log_prob_rows(pre, bias, x), reference)
    finally:
        monkeypatch.delenv("IWAE_FAST")
        native._library.cache_clear()
        native.fused_linear_works.cache_clear()


def test_builds_are_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAVE_COMPILER:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native._build_and_load()
    built = sorted((tmp_path / "iwae" / "native").glob("kernels-*.so"))
    assert first.handle is not None and len(built) == 1
    second = native._build_and_load()  # loads the cached file, builds nothing new
    assert second.description == first.description
    records = [library.with_name(library.name + ".sha256") for library in built]  # the content hash of each build
    assert sorted((tmp_path / "iwae" / "native").iterdir()) == sorted(built + records)  # no temporary files left


@pytest.mark.skipif(not native.fused_linear_works(), reason="PyTorch without oneDNN's linear_pointwise op")
@pytest.mark.parametrize("activation", native.FUSED_ACTIVATIONS)
def test_fused_linear_equals_plain_linear_in_inference(activation: str) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(7, 3, 50, generator=generator)
    weight, bias = torch.randn(30, 50, generator=generator) * 0.2, torch.randn(30, generator=generator)
    expected = native._plain_linear(inputs.double(), weight.double(), bias.double(), activation)
    with torch.no_grad():
        assert native.fused_linear_applies(inputs)
        fused = native.fused_linear(inputs, weight, bias, activation)
        without_bias = native.fused_linear(inputs, weight, None, activation)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without_bias.double(), native._plain_linear(inputs, weight, None, activation).double())


@pytest.mark.parametrize("activation", native.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_gradients_equal_autograd_of_the_plain_layer(activation: str, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(5, 4, 6, generator=generator, requires_grad=True)
    weight = torch.randn(3, 6, generator=generator, requires_grad=True)
    bias = torch.randn(3, generator=generator, requires_grad=True) if with_bias else None
    leaves = [t for t in (inputs, weight, bias) if t is not None]
    grad_out = torch.randn(5, 4, 3, generator=generator)
    fused = native.fused_linear(inputs, weight, bias, activation)
    plain = native._plain_linear(inputs, weight, bias, activation)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        torch.autograd.grad(fused, leaves, grad_out), torch.autograd.grad(plain, leaves, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # only the weight requires a gradient (the first layer of an encoder: x is data)
    data_only = native.fused_linear(inputs.detach(), weight, bias, activation)
    (grad_weight,) = torch.autograd.grad(data_only, weight, grad_out)
    (expected,) = torch.autograd.grad(native._plain_linear(inputs, weight, bias, activation), weight, grad_out)
    torch.testing.assert_close(grad_weight, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 400])  # 400 x 784 x 200 multiply-adds take oneDNN, 3 x 784 x 200 the matmul
def test_linear_input_grad_equals_the_matmul(rows: int) -> None:
    generator = torch.Generator().manual_seed(3)
    grad, weight = torch.randn(rows // 2 + 1, 2, 784, generator=generator), torch.randn(784, 200, generator=generator)
    expected = grad.double() @ weight.double()
    torch.testing.assert_close(native.linear_input_grad(grad, weight).double(), expected, rtol=1e-5, atol=1e-4)
    assert (grad.numel() * 200 >= native.ONEDNN_INPUT_GRAD_MIN_MACS) == (rows == 400)


def test_fused_linear_rejects_other_activations() -> None:
    with pytest.raises(ValueError, match="activation"):
        native.fused_linear(torch.randn(2, 3), torch.randn(4, 3), None, "softplus")


def test_evaluation_paths_agree_with_plain_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """L_k of a model through the fast inference paths equals the plain PyTorch path's up to rounding."""
    from iwae.models import LatentVariableModel, ModelConfig

    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig.burda(2))
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    with torch.no_grad():
        fast = model.log_weights(x, 7, torch.Generator().manual_seed(2))
        monkeypatch.setattr(native, "fused_linear_applies", lambda inputs: False)
        monkeypatch.setattr(native, "applies_to", lambda tensor: False)
        plain = model.log_weights(x, 7, torch.Generator().manual_seed(2))
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-3)
