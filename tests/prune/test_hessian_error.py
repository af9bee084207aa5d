"""The per-layer report's relative reconstruction error."""
import torch

from sparsecc.prune.hessian_error import relative_error


def test_exact_and_diagonal_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    w2 = w * (torch.rand(8, 16, generator=g, dtype=torch.float64) > 0.5)
    want = float(((x @ (w - w2).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    err, kind = relative_error(w, w2, xtx=x.T @ x)
    assert kind == "hessian" and abs(err - want) < 1e-9
    # the diagonal form is exact when the input columns are orthogonal
    q, _ = torch.linalg.qr(x)
    q = q * torch.arange(1, 17, dtype=torch.float64)
    want = float(((q @ (w - w2).T) ** 2).sum() / ((q @ w.T) ** 2).sum())
    err, kind = relative_error(w, w2, sumsq=(q * q).sum(0))
    assert kind == "diagonal" and abs(err - want) < 1e-9
    assert relative_error(w, w2) == (None, None)
    assert relative_error(w, w, xtx=x.T @ x)[0] == 0.0


def test_wide_layers_are_summed_in_bands_to_the_same_figures():
    """A layer wider than one band (the error and the Hessian are made a band of rows or columns at
    a time, to bound their temporaries) gives the figures of the one-shot formulas."""
    from sparsecc.passes.analysis import HessianStats
    from sparsecc.prune.hessian_error import reconstruction_error
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2048, generator=g)  # 2048 inputs: 2 bands of H's columns, 8 of rows
    w = torch.randn(300, 2048, generator=g)
    w2 = w * (torch.rand(300, 2048, generator=g) > 0.5)
    xtx = (x.T @ x).double()
    d = (w - w2).double()
    assert abs(reconstruction_error(w, w2, xtx) / float(((d @ xtx) * d).sum()) - 1) < 1e-12

    h = HessianStats.empty(2048)
    h.update(x[:40])
    h.update(x[40:])
    want = (x[:40].T @ x[:40]).double() + (x[40:].T @ x[40:]).double()
    torch.testing.assert_close(h.xtx, want, rtol=1e-6, atol=1e-4)  # the band products: fp32 partials
    assert torch.equal(h.matrix(), (h.xtx * (2.0 / 64)).float())  # the one-shot scaling, bit for bit
    full = h.matrix()
    h.compact()  # keeps the solver's matrix in place of the fp64 sums
    assert h.scaled and h.xtx.dtype == torch.float32 and torch.equal(h.matrix(), full)
    assert h.matrix() is h.xtx  # no copy for the solver
    err64 = relative_error(w, w2, xtx=want)[0]
    assert abs(relative_error(w, w2, xtx=h.xtx)[0] - err64) < 1e-6 * err64  # a ratio: the scale cancels
