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
