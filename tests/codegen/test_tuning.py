"""Autotuning (sparsecc/codegen/tuning.py): the fastest candidate is chosen, cached on disk and
reused; off the GPU the default is used untimed; and every kernel gives its reference's result
whichever candidate config wins (CPU: triton's interpreter, with a stand-in timer)."""
import json
import sys

import pytest
import torch

from sparsecc.codegen import interpreted, tuning
from sparsecc.codegen.cats_mlp import cats_mlp_reference, cats_mlp_triton
from sparsecc.codegen.moe_ffn import moe_ffn_reference, moe_ffn_triton
from sparsecc.codegen.nm_linear import nm_linear_reference, nm_linear_triton
from sparsecc.codegen.window_attention import window_attention_reference, window_attention_triton
from sparsecc.codegen.nm_format import compress
from sparsecc.prune import magnitude

CPU = torch.device("cpu")


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Tuning switched on for CPU tensors, the cache in tmp_path, and a stand-in timer: the
    candidate at position `tuner.winner` of each search is the fastest. Returns a namespace with
    `winner`, `timed` (how many candidates were timed) and `picked` ((config, candidates) of each
    choice)."""
    class State:
        winner, timed, picked = 0, 0, []
    state = State()
    monkeypatch.setenv("SPARSECC_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "enabled", lambda device: True)
    tuning.forget()

    def bench(fn):
        i = state.timed
        state.timed += 1
        if i != state.winner:
            return 2.0
        fn()  # the winner must launch: a config that cannot would raise here
        return 1.0
    monkeypatch.setattr(tuning, "_bench", bench)
    real_choose = tuning.choose

    def choose(kernel, key, candidates, launch, device):
        state.timed = 0
        cfg = real_choose(kernel, key, candidates, launch, device)
        state.picked.append((cfg, candidates))
        return cfg
    monkeypatch.setattr(tuning, "choose", choose)
    for mod in ("nm_linear", "cats_mlp", "window_attention", "moe_ffn"):
        monkeypatch.setattr(sys.modules[f"sparsecc.codegen.{mod}"], "choose", choose)
    yield state
    tuning.forget()


def test_candidates_put_the_default_first_without_repeats():
    default = dict(A=1, B=2)
    found = tuning.candidates(default, A=[1, 3], B=[2, 4])
    assert found[0] == default and len(found) == 4
    assert {(c["A"], c["B"]) for c in found} == {(1, 2), (1, 4), (3, 2), (3, 4)}


def test_token_buckets():
    assert [tuning.bucket(t) for t in (1, 2, 3, 16, 17, 2048)] == [1, 2, 4, 16, 32, 2048]


def test_off_the_gpu_the_default_is_used_untimed(monkeypatch):
    monkeypatch.setattr(tuning, "_bench", lambda fn: pytest.fail("timed on CPU"))
    assert not tuning.enabled(CPU)
    assert tuning.choose("k", (1,), [{"B": 1}, {"B": 2}], lambda c: None, CPU) == {"B": 1}


def test_fastest_is_kept_on_disk_and_reused(tuner, tmp_path, monkeypatch):
    cands = [{"B": 1}, {"B": 2}, {"B": 3}, {"B": 4}]

    def launch(cfg):
        if cfg["B"] == 4:
            raise RuntimeError("out of resources")  # a config that cannot run is never chosen
    tuner.winner = 2
    assert tuning.choose("k", (7,), cands, launch, CPU) == {"B": 3}
    saved = json.loads((tmp_path / "autotune.json").read_text())
    assert list(saved.values()) == [{"B": 3}]
    tuning.forget()  # a new process: the file answers, nothing is timed
    monkeypatch.setattr(tuning, "_bench", lambda fn: pytest.fail("re-tuned a cached key"))
    assert tuning.choose("k", (7,), cands, launch, CPU) == {"B": 3}


def test_no_runnable_config_is_a_clear_error(tuner, monkeypatch):
    monkeypatch.setattr(tuning, "_bench", lambda fn: fn())

    def launch(cfg):
        raise RuntimeError("out of resources")
    with pytest.raises(RuntimeError, match="no launch config of the k kernel"):
        tuning.choose("k", (1,), [{"B": 1}, {"B": 2}], launch, CPU)


def test_a_damaged_cache_file_means_tuning_again(tuner, tmp_path):
    (tmp_path / "autotune.json").write_text("{not json")
    tuner.winner = 1
    assert tuning.choose("k", (1,), [{"B": 1}, {"B": 2}], lambda c: None, CPU) == {"B": 2}


# --- every kernel, whichever candidate wins ----------------------------------------------------
needs_kernels = pytest.mark.skipif(not interpreted(), reason="runs the kernels in triton's interpreter")


def _close(out, ref):
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


def _nm(tokens, g):
    w = torch.randn(136, 144, generator=g)  # sizes past the largest tiles, so every tiling matters
    values, index = compress(w * magnitude(w, pattern="2:4"), 2, 4)
    x, b = torch.randn(tokens, 144, generator=g), torch.randn(136, generator=g)
    return (lambda: nm_linear_triton(x, values, index, 2, 4, 144, b)), \
        (lambda: nm_linear_reference(x, values, index, 2, 4, 144, b))


def _cats(tokens, g):
    ws = [torch.randn(140, 72, generator=g), None, torch.randn(140, 72, generator=g), None,
          torch.randn(72, 140, generator=g), torch.randn(72, generator=g)]
    x = torch.randn(tokens, 72, generator=g)
    return (lambda: cats_mlp_triton(x, *ws, 0.3, "silu")), (lambda: cats_mlp_reference(x, *ws, 0.3, "silu"))


def _window(tokens, g):
    n, sinks, window = tokens + 30, 2, 12
    q, k, v = torch.randn(1, 4, tokens, 16, generator=g), torch.randn(1, 2, n, 16, generator=g), \
        torch.randn(1, 2, n, 16, generator=g)
    args = (q, k, v, torch.arange(n - tokens, n), torch.arange(n), None, window, 1, sinks, 0.25, None)
    return (lambda: window_attention_triton(*args)), (lambda: window_attention_reference(*args))


def _moe(tokens, g):
    e, size, hidden = 3, 70, 72  # 2 of 3 experts per token: tiles of every BLOCK_M fill up at 40 tokens
    ws = (torch.randn(e, size, hidden, generator=g), None, torch.randn(e, size, hidden, generator=g), None,
          torch.randn(e, hidden, size, generator=g), None)
    x, router = torch.randn(tokens, hidden, generator=g), torch.randn(e, hidden, generator=g)
    args = (router, None, *ws, 2, 0.0, "silu", "softmax_topk")
    return (lambda: moe_ffn_triton(x, *args)), (lambda: moe_ffn_reference(x, *args))


@needs_kernels
@pytest.mark.parametrize("tokens", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("make", [_nm, _cats, _window, _moe], ids=["nm_linear", "cats_mlp", "window_attention",
                                                                    "moe_ffn"])
def test_kernels_match_their_reference_under_every_candidate_config(tuner, make, tokens):
    kernel, reference = make(tokens, torch.Generator().manual_seed(tokens))
    ref = reference()
    tuner.winner = 10 ** 6  # no candidate launches; the first one wins the tie
    kernel()
    assert tuner.picked, "the wrapper did not ask the tuner"
    candidates = tuner.picked[0][1]
    assert len(candidates) > 1
    for i, want in enumerate(candidates):
        tuning.forget()
        tuning.cache_path().unlink()
        tuner.picked, tuner.winner = [], i
        out = kernel()
        assert [cfg for cfg, _ in tuner.picked] == [want]
        _close(out, ref)
