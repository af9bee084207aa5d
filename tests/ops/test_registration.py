"""The torch.library registrations (schema, fake, autograd) of every sparsecc op, called positionally
as the rewrites do and with the trailing `kernels` argument the backend sets."""
import pytest
import torch

import sparsecc.ops  # noqa: F401  (registers the ops)
from sparsecc.codegen.nm_format import compress
from sparsecc.prune import magnitude


def _inputs(op: str, grad: bool = False) -> tuple:
    """Small positional arguments of `op` (floating tensors requiring grad where asked)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    if op == "nm_linear":
        w = torch.randn(16, 32, generator=g)
        values, index = compress(w * magnitude(w, pattern="2:4"), 2, 4)
        return r(5, 32), values, index, r(16), 2, 4, 32
    if op == "csr_linear":
        w = torch.randn(16, 32, generator=g)
        csr = (w * (w.abs() > 1)).to_sparse_csr()
        return r(2, 5, 32), csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone(), r(16), 32
    if op == "cats_mlp":
        return r(3, 8), r(12, 8), r(12), r(12, 8), None, r(8, 12), r(8), 0.2, "silu"
    if op == "window_attention":
        pos = torch.arange(6)
        return r(1, 4, 3, 4), r(1, 2, 6, 4), r(1, 2, 6, 4), pos[3:], pos, None, 2, 1, 1, 0.5, None
    assert op == "moe_ffn"
    return r(5, 8), r(3, 8), None, r(3, 6, 8), None, r(3, 6, 8), None, r(3, 8, 6), r(8), 2, 0.0, "silu", "softmax_topk"


OPS = ["nm_linear", "csr_linear", "cats_mlp", "window_attention", "moe_ffn"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kernels", [(), ("reference",), ("auto",)], ids=["ambient", "reference", "auto"])
def test_opcheck_with_and_without_the_kernels_argument(op, kernels):
    """Schema, fake tensor and autograd registrations hold with the trailing argument given or not."""
    for grad in (False, True):
        torch.library.opcheck(getattr(torch.ops.sparsecc, op).default, (*_inputs(op, grad), *kernels))


@pytest.mark.parametrize("op", OPS)
def test_the_kernels_argument_changes_nothing_but_the_way(op):
    """Outputs and gradients are the same with kernels given positionally, by keyword or not at all."""
    fn = getattr(torch.ops.sparsecc, op)
    results = []
    for extra, kw in (((), {}), (("reference",), {}), ((), {"kernels": "reference"})):
        args = _inputs(op, grad=True)
        out = fn(*args, *extra, **kw)
        out.square().sum().backward()
        results.append((out, [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want)


def test_nm_linear_gradients_equal_the_dense_layers():
    x, values, index, b, *nm = _inputs("nm_linear", grad=True)
    torch.ops.sparsecc.nm_linear(x, values, index, b, *nm).square().sum().backward()
    from sparsecc.codegen.nm_format import decompress
    xd, bd = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(xd, decompress(values, index, 2, 4, 32), bd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(b.grad, bd.grad)
