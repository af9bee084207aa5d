"""torch's semi-structured 2:4 product as a third GPU way of sparsecc::nm_linear
(sparsecc/codegen/semi_structured.py). torch builds those tensors only on CUDA, so on CPU the
GPU branch is entered with a stand-in `on_gpu`, `backend` and `build` (the dense weight): what is
checked is the plumbing — when the way is offered, that the timed winner runs and gives the
product, that torch's tensor is built once per stored weight, rebuilt after an in-place change,
and freed when another way wins. On a GPU the last test runs torch's real 2:4 product."""
import pytest
import torch
import torch.nn.functional as F

from sparsecc.codegen import semi_structured
from sparsecc.codegen.nm_format import compress
from sparsecc.codegen.nm_linear import nm_linear_reference
from sparsecc.ops import dispatch
from sparsecc.prune import magnitude


class Limits:
    sparse_min_rows = sparse_min_cols = 16


class StandInBackend:
    BACKEND = "cusparselt"
    _DTYPE_SHAPE_CONSTRAINTS = {torch.float16: Limits, torch.bfloat16: Limits, torch.float32: Limits}


@pytest.fixture
def gpu(monkeypatch):
    """The GPU branch on CPU tensors: `winner` is the way the tuner picks (or a function of the
    tuning key), `offered` the ways it was shown per call, `keys` the tuning keys, `builds` how many
    2:4 tensors were built. Like cuSPARSELt, the stand-in product refuses strided inputs."""
    class State:
        winner, offered, keys, builds = "kernel", [], [], 0
    state = State()

    def choose(op, key, candidates, launch, device):
        state.offered.append([c["run"] for c in candidates])
        state.keys.append(key)
        for c in candidates:  # timing runs every way once, as the tuner does
            launch(c)
        return {"run": state.winner(key) if callable(state.winner) else state.winner}

    class ContiguousOnly:
        @staticmethod
        def linear(x, w, b=None):
            assert x.is_contiguous(), "cuSPARSELt would read a strided input wrong"
            return F.linear(x, w, b)

    def build(dense):
        assert dense.is_contiguous()
        state.builds += 1
        return dense.clone()
    monkeypatch.setattr(dispatch, "on_gpu", lambda x: True)
    monkeypatch.setattr(dispatch, "choose", choose)
    monkeypatch.setattr(dispatch.WAYS["nm_linear"], "kernel", lambda *a: nm_linear_reference(*a))  # no interpreter
    monkeypatch.setattr(semi_structured, "backend", lambda: StandInBackend)
    monkeypatch.setattr(semi_structured, "build", build)
    monkeypatch.setattr(semi_structured, "F", ContiguousOnly)
    return state


def _layer(out_f=32, in_f=64, dtype=torch.bfloat16, pattern="2:4"):
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f)
    w = (w * magnitude(w, pattern=pattern)).to(dtype)
    n, m = (int(v) for v in pattern.split(":"))
    values, index = compress(w, n, m)
    return w, values, index, (n, m)


def _run(x, values, index, nm, bias=None):
    return torch.ops.sparsecc.nm_linear(x, values, index, bias, *nm, x.shape[-1])


def test_the_winner_runs_and_its_tensor_is_built_once_per_stored_weight(gpu):
    w, values, index, nm = _layer()
    bias = torch.randn(32).to(torch.bfloat16)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    gpu.winner = semi_structured.NAME
    y = _run(x, values, index, nm, bias)
    torch.testing.assert_close(y, F.linear(x, w, bias))
    assert gpu.offered[-1] == ["kernel", "fallback", semi_structured.NAME]
    assert gpu.keys[-1][-1] == semi_structured.NAME  # a choice cached before this way existed is not reused
    assert dispatch.last_way["nm_linear"] == semi_structured.NAME
    _run(x, values, index, nm, bias)
    assert gpu.builds == 1  # kept for the stored weight
    values.mul_(2)  # an in-place change of the stored weight: torch's tensor is rebuilt
    torch.testing.assert_close(_run(x, values, index, nm, bias), F.linear(x, 2 * w, bias))
    assert gpu.builds == 2


def test_a_losing_way_frees_its_tensor(gpu):
    w, values, index, nm = _layer()
    x = torch.randn(4, 64).to(torch.bfloat16)
    gpu.winner = "kernel"
    torch.testing.assert_close(_run(x, values, index, nm), F.linear(x, w))
    assert gpu.builds == 1 and values not in semi_structured._built  # built for timing, then dropped


@pytest.mark.parametrize("why,layer,x_dtype", [
    ("4:8 is not 2:4", dict(pattern="4:8"), torch.bfloat16),
    ("fp32 is not a cuSPARSELt dtype", dict(dtype=torch.float32), torch.float32),
    ("fp16 weight, bf16 input", dict(dtype=torch.float16), torch.bfloat16),
    ("input and weight dtypes differ", dict(), torch.float16),
    ("out 24 is not a multiple of 16", dict(out_f=24), torch.bfloat16),
    ("in 72 is not a multiple of 16", dict(in_f=72), torch.bfloat16)])
def test_offered_only_where_torch_supports_it(gpu, why, layer, x_dtype):
    w, values, index, nm = _layer(**layer)
    x = torch.randn(2, w.shape[1]).to(x_dtype)
    _run(x, values, index, nm)
    assert gpu.offered[-1] == ["kernel", "fallback"], why
    assert gpu.builds == 0


def test_a_choice_per_shape_keeps_the_tensor_while_prefill_and_decode_alternate(gpu):
    """2:4 wins for 16 tokens, the kernel for 1: the tensor built for prefill stays across decode calls."""
    w, values, index, nm = _layer()
    gpu.winner = lambda key: semi_structured.NAME if key[1] == 16 else "kernel"
    for _ in range(3):
        for tokens in (16, 1):
            x = torch.randn(tokens, 64).to(torch.bfloat16)
            torch.testing.assert_close(_run(x, values, index, nm), F.linear(x, w))
    assert gpu.builds == 1


def test_strided_inputs_and_inference_mode_weights(gpu):
    """A strided input (here half of a wider activation, as from a fused projection: its rows are
    not contiguous after reshape) is made contiguous; weights made under inference mode (no
    version counter) are kept like others."""
    with torch.inference_mode():
        w, values, index, nm = _layer()
    gpu.winner = semi_structured.NAME
    x = torch.randn(2, 8, 128).to(torch.bfloat16)[..., :64]
    assert not x.is_contiguous()
    for _ in range(2):
        torch.testing.assert_close(_run(x, values, index, nm), F.linear(x, w))
    assert gpu.builds == 1


def test_fp32_is_offered_on_cutlass(gpu, monkeypatch):
    monkeypatch.setattr(StandInBackend, "BACKEND", "cutlass")
    w, values, index, nm = _layer(dtype=torch.float32)
    _run(torch.randn(2, 64), values, index, nm)
    assert gpu.offered[-1] == ["kernel", "fallback", semi_structured.NAME]


def test_not_offered_for_empty_batches(gpu):
    w, values, index, nm = _layer()
    assert _run(torch.randn(0, 64).to(torch.bfloat16), values, index, nm).shape == (0, 32)
    assert gpu.offered[-1] == ["kernel", "fallback"]


def test_not_offered_without_a_backend_or_outside_mode_auto(gpu, monkeypatch):
    w, values, index, nm = _layer()
    x = torch.randn(2, 64).to(torch.bfloat16)
    for mode in ("triton", "reference"):
        with dispatch.use_kernels(mode):
            _run(x, values, index, nm)
    assert gpu.offered == [] and gpu.builds == 0
    monkeypatch.setattr(semi_structured, "backend", lambda: None)  # no cuSPARSELt in this torch build
    _run(x, values, index, nm)
    assert gpu.offered == [["kernel", "fallback"]]


def test_this_torch_has_no_backend_on_cpu():
    """torch's CPU build has no cuSPARSELt: off the GPU the way is never considered."""
    if torch.cuda.is_available():
        pytest.skip("a GPU build")
    assert semi_structured.backend() is None


def test_lowering_report_names_the_third_way(monkeypatch):
    monkeypatch.setattr(dispatch, "tuning_enabled", lambda device: True)
    assert semi_structured.NAME in dispatch.implementation("nm_linear", "cuda", "auto")
    assert semi_structured.NAME not in dispatch.implementation("cats_mlp", "cuda", "auto")
    assert dispatch.implementation("nm_linear", "cuda", "triton") == "nm_linear_triton"


@pytest.mark.skipif(not torch.cuda.is_available() or semi_structured.backend() is None,
                    reason="torch's 2:4 product needs a CUDA GPU with cuSPARSELt (or CUTLASS)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_2_4_product_on_the_gpu(monkeypatch, dtype):
    """The real thing, where there is a GPU: the op forced onto torch's 2:4 way equals F.linear
    for batched, strided and single-token inputs, with a bias."""
    torch.manual_seed(0)
    w = torch.randn(128, 256, device="cuda")
    w = (w * magnitude(w, pattern="2:4")).to(dtype)
    values, index = compress(w, 2, 4)
    bias = torch.randn(128, device="cuda", dtype=dtype)
    monkeypatch.setattr(dispatch, "choose", lambda op, key, candidates, launch, device: {"run": candidates[-1]["run"]})
    for x in (torch.randn(3, 5, 256, device="cuda", dtype=dtype),
              torch.randn(2, 8, 512, device="cuda", dtype=dtype)[..., :256],
              torch.randn(1, 256, device="cuda", dtype=dtype)):
        y = torch.ops.sparsecc.nm_linear(x, values, index, bias, 2, 4, 256)
        assert dispatch.last_way["nm_linear"] == semi_structured.NAME
        ref = F.linear(x.float(), w.float(), bias.float())
        assert y.dtype == dtype and y.shape == ref.shape
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2  # fp16/bf16 rounding of the output
