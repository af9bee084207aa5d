"""How the sparsecc ops choose their way (sparsecc/ops/dispatch.py): kernel modes, the ambient mode
and an op's `kernels` argument, timing on the GPU, and the lowering report read off the registry."""
import pytest
import torch

import sparsecc.ops
from sparsecc.ops import dispatch
from sparsecc.ops.dispatch import WAYS


def _which(fn):
    return fn.__name__


@pytest.mark.parametrize("mode,gpu,winner,runs", [
    ("auto", True, "kernel", "nm_linear_triton"), ("auto", True, "fallback", "nm_linear_reference"),
    ("auto", False, None, "nm_linear_reference"), ("triton", False, None, "nm_linear_triton"),
    ("reference", True, None, "nm_linear_reference")])
def test_dispatch_runs_the_kernel_only_where_it_is_not_slower(monkeypatch, mode, gpu, winner, runs):
    """Mode auto on the GPU asks the tuner kernel-vs-fallback per shape; the other cases never time."""
    asked = []

    def choose(op, key, candidates, launch, device):
        asked.append((op, key))
        assert [c["run"] for c in candidates] == ["kernel", "fallback"]
        return {"run": winner}
    monkeypatch.setattr(dispatch, "choose", choose)
    monkeypatch.setattr(dispatch, "on_gpu", lambda x: gpu)
    with dispatch.use_kernels(mode):
        assert dispatch.dispatch("nm_linear", ("k",), torch.zeros(1), _which) == runs
    assert asked == ([("nm_linear/dispatch", ("k",))] if winner else [])
    with dispatch.use_kernels("reference" if mode != "reference" else "triton"):  # the argument beats the ambient mode
        assert dispatch.dispatch("nm_linear", ("k",), torch.zeros(1), _which, kernels=mode) == runs


def test_cats_has_a_cpu_path_and_a_reference():
    x = torch.zeros(1)
    assert dispatch.dispatch("cats_mlp", (), x, _which) == "cats_mlp_cpu"
    assert dispatch.dispatch("cats_mlp", (), x, _which, kernels="reference") == "cats_mlp_reference"


def test_one_way_ops_are_never_timed(monkeypatch):
    monkeypatch.setattr(dispatch, "choose", lambda *a: pytest.fail("timed an op with one way"))
    monkeypatch.setattr(dispatch, "on_gpu", lambda x: True)
    for op in ("csr_linear", "csr_linear_grad", "moe_ffn_backward"):
        assert dispatch.dispatch(op, (), torch.zeros(1), _which) == dispatch.implementation(op, "cuda", "auto")


def test_modes_are_checked():
    with pytest.raises(ValueError, match="kernel mode must be one of auto, triton, reference, got 'cuda'"):
        with sparsecc.ops.use_kernels("cuda"):
            pass
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        torch.ops.sparsecc.csr_linear(torch.zeros(1, 2), torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0), None, 2, "fast")


def test_lowering_names_the_function_each_op_runs():
    from sparsecc.ops import implementation
    assert implementation("nm_linear", "cpu", "auto") == "nm_linear_reference"
    assert implementation("nm_linear", "cuda", "auto") == "nm_linear_triton"  # SPARSECC_AUTOTUNE=0: nothing timed
    assert implementation("window_attention", "cpu", "auto") == "window_attention_blocked"
    assert implementation("moe_ffn", "cpu", "triton") == "moe_ffn_triton"
    assert implementation("cats_mlp", "cpu", "reference") == "cats_mlp_reference"
    assert implementation("cats_mlp", "cpu", "auto") == "cats_mlp_cpu"
    assert implementation("csr_linear", "cuda", "triton") == "csr_matmul"


def test_the_report_names_what_the_ops_run(monkeypatch):
    """Every sparsecc op is registered, and the report names the very functions dispatch calls."""
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("sparsecc::")}
    assert ops == set(WAYS) == {"nm_linear", "csr_linear", "csr_linear_grad", "cats_mlp", "window_attention",
                                "moe_ffn", "moe_ffn_backward", "quant_linear"}
    monkeypatch.setattr(dispatch, "tuning_enabled", lambda device: True)
    for op, ways in WAYS.items():
        for mode, gpu in (("triton", False), ("reference", True), ("auto", False)):
            monkeypatch.setattr(dispatch, "on_gpu", lambda x: gpu)
            ran = dispatch.dispatch(op, (), torch.zeros(1), _which, kernels=mode)
            assert ran == dispatch.implementation(op, "cuda" if gpu else "cpu", mode)
        timed = dispatch.implementation(op, "cuda", "auto")
        assert ways.kernel.__name__ in timed and all(name in timed for name in ways.others)
