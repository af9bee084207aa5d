"""Fixtures for the kernel tests."""
import pytest

from sparsecc.codegen import ops


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel_calls("nm_linear_triton") wraps that Triton entry point of sparsecc.codegen.ops and
    returns the list the shape of each call's first argument is appended to."""
    def spy(name):
        calls, kernel = [], getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
        return calls
    return spy
