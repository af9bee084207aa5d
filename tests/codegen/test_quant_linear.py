"""The quantized-linear kernels (codegen/quant_linear.py) against the reference: the Triton kernel
(CPU: triton's interpreter; GPU with TRITON_INTERPRET=0), torch's int4/int8 CPU kernels on the layout
built once, and the op torch.ops.sparsecc.quant_linear (registration, gradients, ways). QuantLinear and
pack_: tests/techniques/test_quant_packing.py."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsecc.ops  # noqa: F401  (registers the ops)
from sparsecc.codegen import interpreted, quant_linear_cpu, quant_linear_reference, quant_linear_triton
from sparsecc.codegen.quant_linear import cpu_form, cpu_layout
from sparsecc.ops.dispatch import implementation, use_kernels
from sparsecc.prune.quantize import rtn

DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|
CPU_TOL = 1.6e-2  # torch's CPU kernels take x (and the scales) in bf16
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not interpreted(),
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (run with TRITON_INTERPRET=0)")


def grid_for(out_f, in_f, bits, group_size, sym=False, seed=0, zero_rows=0):
    """(dequantized weight, grid) of a random weight, the first `zero_rows` rows pruned to 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:zero_rows] = 0
    return rtn(w, bits, group_size, sym)


def stored(grid):
    return grid.codes, grid.scales, grid.zeros, grid.bits, grid.group_size, grid.in_features


def check(y, ref, dtype, tol=None):
    assert y.dtype == dtype and y.shape == ref.shape
    if y.numel():
        err = (y.float() - ref.float()).abs().max().item()
        assert err <= (tol or TOL[dtype]) * max(1.0, ref.float().abs().max().item()), err


@needs_kernels
@given(tokens=st.integers(1, 40), out_f=st.integers(1, 70), in_f=st.integers(1, 130),
       bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 8, 16, 32, 64, 5]),
       sym=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       bias=st.booleans(), blocks=st.sampled_from([None, (16, 16, 16), (16, 32, 64), (1, 16, 32), (1, 32, 16, 3),
                                                    (16, 16, 32, 2)]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(tokens, out_f, in_f, bits, group, sym, dtype, bias, blocks, seed):
    """Any width (odd ones leave a padding nibble), groups inside or across K tiles, one token on
    the dot-free variant or a dot tile, K split or not."""
    if group is not None:
        in_f = max(1, in_f // group) * group
    w, grid = grid_for(out_f, in_f, bits, group, sym, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_f, generator=g).to(DEVICE, dtype)
    b = torch.randn(out_f, generator=g).to(DEVICE, dtype) if bias else None
    if blocks is not None and blocks[0] == 1:
        x = x[:1]
    args = [t.to(DEVICE) for t in stored(grid)[:3]] + list(stored(grid)[3:])
    y = quant_linear_triton(x, *args, b, blocks=blocks)
    check(y, F.linear(x.float(), w.to(DEVICE), None if b is None else b.float()), dtype)


@needs_kernels
@pytest.mark.parametrize("bits,group", [(4, 32), (8, None), (2, 16)])
def test_kernel_edges(bits, group):
    """Pruned rows (codes at their zero point: exactly 0), 3-D input, no tokens, the tuned default."""
    w, grid = grid_for(24, 64, bits, group, zero_rows=5)
    assert torch.equal(grid.dequantize()[:5], torch.zeros(5, 64))
    args = [t.to(DEVICE) for t in stored(grid)[:3]] + list(stored(grid)[3:])
    for shape in [(1, 64), (2, 3, 64), (0, 64)]:
        x = torch.randn(*shape).to(DEVICE)
        y = quant_linear_triton(x, *args)
        check(y, F.linear(x, w.to(DEVICE)), torch.float32)
        assert (y[..., :5] == 0).all()


def test_bad_input():
    _, grid = grid_for(8, 32, 4, 16)
    codes, scales, zeros, bits, g, in_f = stored(grid)
    for fn in (quant_linear_reference, quant_linear_triton):
        with pytest.raises(ValueError, match="input width 30"):
            fn(torch.randn(3, 30), codes, scales, zeros, bits, g, in_f)
        with pytest.raises(ValueError, match="group_size 5 does not divide"):
            fn(torch.randn(3, 32), codes, scales, zeros, bits, 5, in_f)
        with pytest.raises(ValueError, match="scales"):
            fn(torch.randn(3, 32), codes, scales[:, :1], zeros, bits, g, in_f)
        with pytest.raises(ValueError, match="4-bit codes"):
            fn(torch.randn(3, 32), codes.int(), scales, zeros, bits, g, in_f)
        with pytest.raises(ValueError, match="bits must be one of"):
            fn(torch.randn(3, 32), codes, scales, zeros, 5, g, in_f)
    if interpreted():
        with pytest.raises(ValueError, match="BLOCK_T must be 1 or a power of two"):
            quant_linear_triton(torch.randn(3, 32), *stored(grid), blocks=(8, 16, 16))


# --- torch's CPU kernels -------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 128, True), (4, 512, False), (4, None, False),
                                            (3, 64, False), (2, 256, True), (8, None, True), (8, None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_way_equals_reference(bits, group, sym, dtype):
    """int4 (2/3-bit codes too; groups of 512 as repeated groups of 256; one group per row) and
    int8 per row (asymmetric: plus Σx · s (128 - z)) within bf16 rounding, any input dtype."""
    w, grid = grid_for(48, 1024, bits, group, sym, seed=bits)
    layout = cpu_layout(*stored(grid))
    assert layout is not None
    assert layout[0].dtype == (torch.uint8 if bits <= 4 else torch.int8)
    x = torch.randn(2, 5, 1024).to(dtype)
    b = torch.randn(48)
    y = quant_linear_cpu(x, *stored(grid), b, *layout)
    check(y, F.linear(x.float(), w, b), dtype, CPU_TOL)
    if bits == 8:
        assert layout[1].shape == (1 if sym else 2, 48)  # the zero-point row only when asymmetric


def test_cpu_way_all_positive_int8_rows():
    """Asymmetric int8 with zero point 0 (all weights >= 0): the Σx term is the whole offset."""
    g = torch.Generator().manual_seed(3)
    w, grid = rtn(torch.rand(32, 256, generator=g), 8, None, False)
    assert (grid.zeros == 0).all()
    x = torch.randn(4, 256, generator=g)
    check(quant_linear_cpu(x, *stored(grid), None, *cpu_layout(*stored(grid))), x @ w.t(), torch.float32, CPU_TOL)


@pytest.mark.parametrize("bits,group,out_f,in_f,why", [
    (4, 32, 40, 64, "out_features divisible by 16"), (4, 16, 32, 64, "multiple of 32"),
    (8, 32, 32, 64, "one scale per row"), (8, None, 32, 40, "in_features divisible by 16")])
def test_cpu_way_falls_back_where_torch_cannot(bits, group, out_f, in_f, why):
    form, reason = cpu_form(bits, group or in_f, in_f, out_f)
    assert form is None and why in reason
    w, grid = grid_for(out_f, in_f, bits, group)
    assert cpu_layout(*stored(grid)) is None
    x = torch.randn(3, in_f)
    torch.testing.assert_close(quant_linear_cpu(x, *stored(grid)), x @ w.t())  # the reference: exact


def test_cpu_way_reference_for_other_inputs():
    """No layout, float64 input, no tokens: the reference (fp64 exact, no bf16 rounding)."""
    w, grid = grid_for(32, 64, 4, 32)
    layout = cpu_layout(*stored(grid))
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(quant_linear_cpu(x, *stored(grid), None, *layout), x @ w.double().t())
    assert quant_linear_cpu(torch.randn(0, 64), *stored(grid), None, *layout).shape == (0, 32)


# --- the op --------------------------------------------------------------------------------

def op_args(grad=False, layout=True, bits=4, group=32):
    g = torch.Generator().manual_seed(0)
    w, grid = grid_for(32, 64, bits, group)
    x = torch.randn(5, 64, generator=g).requires_grad_(grad)
    b = torch.randn(32, generator=g).requires_grad_(grad)
    extra = cpu_layout(*stored(grid)) if layout else (None, None)
    return w, (x, grid.codes, grid.scales, grid.zeros, b, bits, grid.group_size, 64, *extra)


@pytest.mark.parametrize("layout", [True, False])
@pytest.mark.parametrize("kernels", [(), ("reference",), ("auto",)], ids=["ambient", "reference", "auto"])
def test_opcheck(layout, kernels):
    for grad in (False, True):
        _, args = op_args(grad, layout)
        torch.library.opcheck(torch.ops.sparsecc.quant_linear.default, (*args, *kernels))
    _, args = op_args(False, layout, bits=8, group=None)
    torch.library.opcheck(torch.ops.sparsecc.quant_linear.default, (args[0][None], *args[1:], *kernels))


def test_op_gradients_equal_the_dense_layers():
    w, args = op_args(grad=True)
    x, b = args[0], args[4]
    y = torch.ops.sparsecc.quant_linear(*args, kernels="reference")
    y.square().sum().backward()
    xd, bd = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(xd, w, bd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(b.grad, bd.grad)


def test_op_ways_on_cpu(kernel_calls, monkeypatch):
    """Mode "auto" on CPU runs torch's kernels on the given layout (bf16 rounding), "reference" the
    exact reference, "triton" the kernel; the lowering report names the same functions."""
    from sparsecc.ops.dispatch import WAYS
    assert implementation("quant_linear", "cpu", "auto") == "quant_linear_cpu"
    assert implementation("quant_linear", "cpu", "reference") == "quant_linear_reference"
    assert implementation("quant_linear", "cpu", "triton") == "quant_linear_triton"
    w, args = op_args()
    ref = F.linear(args[0], w, args[4])
    seen = []
    cpu = WAYS["quant_linear"].cpu
    monkeypatch.setattr(WAYS["quant_linear"], "cpu", lambda *a: seen.append(a[-2] is not None) or cpu(*a))
    with torch.no_grad():
        y = torch.ops.sparsecc.quant_linear(*args)
        assert seen == [True]  # the layout reached the CPU way
        check(y, ref, torch.float32, CPU_TOL)
        assert (y - ref).abs().max() > 1e-6  # bf16 rounding: it really ran torch's kernel
        torch.testing.assert_close(torch.ops.sparsecc.quant_linear(*args, kernels="reference"), ref)
        if interpreted():
            calls = kernel_calls("quant_linear_triton")
            with use_kernels("triton"):
                check(torch.ops.sparsecc.quant_linear(*args), ref, torch.float32)
            assert calls == [(5, 64)]


# --- on the GPU only -----------------------------------------------------------------------

@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (8, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llm_shape_and_decode_beats_the_reference(bits, group, dtype):
    """4096 x 11008 at 1, 16 and 128 tokens against the dense product (default configs); at one token
    the kernel (reading b/16 of fp16's bytes) is faster than the reference (dequantize, then cuBLAS)."""
    import triton.testing

    w, grid = grid_for(4096, 11008, bits, group, seed=1)
    w = w.cuda()
    args = [t.cuda() for t in stored(grid)[:3]] + list(stored(grid)[3:])
    for tokens in (1, 16, 128):
        x = torch.randn(tokens, 11008, device="cuda", dtype=dtype)
        check(quant_linear_triton(x, *args), F.linear(x.float(), w), dtype)
    x = torch.randn(1, 11008, device="cuda", dtype=dtype)
    t_kernel = triton.testing.do_bench(lambda: quant_linear_triton(x, *args), return_mode="median")
    t_ref = triton.testing.do_bench(lambda: quant_linear_reference(x, *args), return_mode="median")
    assert t_kernel < t_ref, (t_kernel, t_ref)
