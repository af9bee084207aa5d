"""Calibration over torch.distributed ranks (passes/distributed.py): two gloo ranks, spawned once
for the module, must leave the model bit for bit as one process does, and refuse what they cannot
shard on every rank (no hang). Plus the exactness of the fp64 Hessian sums on their own."""
import json
import os
import time
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsecc
from sparsecc.errors import DistributedError
from sparsecc.passes.analysis import HessianStats

RANKS = 2
DEADLINE = 300  # seconds for the spawned ranks, all scenarios together


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _batches():
    """6 batches (3 per rank), one padded: padding is dropped per batch, on whichever rank."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(6):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        if i == 4:
            mask[1, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


MLPS = "re:.*mlp"
RECIPES = {
    "sparsegpt": {"default": sparsecc.SparseGPTConfig(0.5), "lm_head": None},
    "wanda24": {"default": sparsecc.WandaConfig(pattern="2:4"), "lm_head": None},
    "mixed": {r"re:.*self_attn\..*": sparsecc.SparseGPTConfig(0.5), "default": sparsecc.WandaConfig(0.5),
              "lm_head": None},
    # every analysis pass with a reduction (passes/analysis): OWL's norms, CATS's gate samples,
    # channel statistics with H (refit) and FLAP's global widths, Bonsai's losses, routers, blocks
    "owl": {"default": sparsecc.WandaConfig(0.5, layerwise="owl"), "lm_head": None},
    "cats": {"default": sparsecc.WandaConfig(0.5), "lm_head": None, MLPS: sparsecc.CATSConfig(0.5)},
    "flap": {MLPS: sparsecc.StructuredConfig(0.5, score="flap", update="refit", layerwise="global"),
             r"re:.*self_attn": sparsecc.StructuredConfig(0.5, score="wanda-sp")},
    "bonsai": {MLPS: sparsecc.StructuredConfig(0.5, score="bonsai", samples=12)},
    "moe": {MLPS: sparsecc.MoEConfig(num_experts=4, top_k=2)},
    "drop_bi": {"model.layers": sparsecc.LayerDropConfig(n=1)},
    "drop_loss": {"model.layers": sparsecc.LayerDropConfig(n=1, score="loss"), "default": sparsecc.WandaConfig(0.5),
                  "lm_head": None},
}
EQUAL = ["sparsegpt", "wanda24", "calibrate", "owl", "cats", "flap", "bonsai", "moe", "drop_bi", "drop_loss"]
ONLOADED = ["prune_folder", "prune_folder_flap"]  # prune_folder on the source folder: RECIPES sparsegpt, flap


def _scenarios(rank: int):
    """name -> fn() returning {"state": tensors, "rows": rows} or raising; run on each rank, and
    (but the distributed-only ones) in one process for the reference."""
    def sparsify(recipe):
        def run():
            m = _model()
            report = sparsecc.sparsify_(m, RECIPES[recipe], _batches(), progress=False)
            return {"state": m.state_dict(), "rows": report.rows, "setup": report.setup}
        return run

    def calibrate():
        plan = sparsecc.calibrate(_model(), _batches(), RECIPES["mixed"], progress=False, keep_hessians=True)
        state = {f"decision/{n}/{k}": t for n, d in plan.decisions.items() for k, t in d.items()}
        state |= {f"hessian/{n}": h.xtx for n, h in plan.stats["hessian"].items()}
        state |= {f"input_stats/{n}/{k}": t for n, s in plan.stats["input_stats"].items()
                  for k, t in s.tensors().items()}
        return {"state": state, "rows": plan.rows, "setup": plan.setup}

    def cats():  # a small sample budget: each batch's gate values are subsampled, on whichever rank
        from sparsecc.passes.analysis import gate_activations
        budget, gate_activations.MAX_SAMPLES = gate_activations.MAX_SAMPLES, 6 * 1000
        try:
            return sparsify("cats")()
        finally:
            gate_activations.MAX_SAMPLES = budget

    def l0(recipe):
        def run():
            sparsecc.sparsify_(_model(), recipe, _batches(), progress=False)
        return run

    def other_batches():
        batches = _batches()
        if rank == 1:
            batches[5]["input_ids"] = batches[5]["input_ids"].flip(1)
        sparsecc.sparsify_(_model(), RECIPES["wanda24"], batches, progress=False)

    def comm():
        from sparsecc.passes.distributed import current_comm
        c = current_comm()
        parts = {b: torch.full((2, 3), float(b), dtype=torch.float64) for b in ([0, 2, 3] if rank == 0 else [5])}
        order = torch.stack(c.gather_in_order(parts, (2, 3), torch.float64, "cpu"))  # uneven shares, gaps
        made = {"mask": torch.arange(6).reshape(2, 3) % 2 == 0, "bf": torch.randn(3, generator=torch.Generator()
                .manual_seed(2)).bfloat16(), "scalar": torch.tensor(0.25, dtype=torch.float64),
                "perm": torch.tensor([2, 0, 1])}
        got = [c.decide(f"lin{i}", 1.0, lambda: made) for i in range(3)]  # owners 0, 1, 0
        assert all(set(d) == set(made) and all(torch.equal(d[k], made[k]) and d[k].dtype == made[k].dtype
                                                for k in made) for d in got)
        try:  # the owner (rank 1 now) fails: it raises its own error, the other rank a DistributedError
            c.decide("lin3", 1.0, lambda: 1 / 0)
        except (ZeroDivisionError, DistributedError) as e:
            raised = type(e).__name__ + ": " + str(e)
        try:
            c.agree(rank == 0, "a check", "rank 1's reason")
            agreed = "ok"
        except DistributedError as e:
            agreed = str(e)
        return {"state": {"order": order}, "rows": [raised, agreed]}

    def prune_folder(recipe):  # onloading on ranks: each loads every block, rank 0 alone writes
        def run():
            import tempfile
            src, out = os.environ["SPARSECC_TEST_SOURCE"], os.path.join(tempfile.mkdtemp(), "out")
            report = sparsecc.prune_folder(src, RECIPES[recipe], _batches(), out, progress=False)
            written = os.path.exists(out)
            state = sparsecc.load_pruned(out)[0].state_dict() if written else {}
            return {"state": state, "rows": report.rows + [written], "setup": report.setup}
        return run

    return {**{name: sparsify(name) for name in RECIPES if name != "mixed"}, "cats": cats, "calibrate": calibrate,
            "prune_folder": prune_folder("sparsegpt"),
            # module rewrites block by block: FLAP's global widths (a first sweep), refit H, shrunk heads
            "prune_folder_flap": prune_folder("flap"),
            "l0_blocks": l0({"model.layers": sparsecc.LayerDropConfig(n=1, score="l0", steps=2)}),
            "l0_units": l0({MLPS: sparsecc.L0Config(0.5, steps=2)}),
            "other_batches": other_batches, "comm": comm}


def _source(tmp: str) -> None:
    """The model as a sharded folder, for prune_folder; its path in the environment the ranks inherit."""
    os.environ["SPARSECC_TEST_SOURCE"] = f"{tmp}/source"
    _model().save_pretrained(f"{tmp}/source", max_shard_size="60KB")


def _save(out: str, name: str, fn) -> None:
    try:
        res = fn()
    except Exception as e:
        (open(f"{out}/{name}.json", "w")).write(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return
    if res.get("state") is not None:
        save_file({k: v.contiguous().clone() for k, v in res["state"].items()},  # shared Hessians: one copy each
                  f"{out}/{name}.safetensors")
    rows = [{k: v for k, v in r.items() if k != "seconds"} if isinstance(r, dict) else r for r in res["rows"]]
    open(f"{out}/{name}.json", "w").write(json.dumps({"rows": rows, "setup": res.get("setup")}, default=str))


def _worker(rank: int, tmp: str) -> None:
    """One rank: every scenario in turn in one process group, results under tmp/rank<r>."""
    import torch.distributed as dist
    torch.set_num_threads(1)  # matmuls bit for bit as in the reference
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=60))
    out = f"{tmp}/rank{rank}"
    os.makedirs(out, exist_ok=True)
    try:
        for name, fn in _scenarios(rank).items():
            _save(out, name, fn)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the scenarios on 2 spawned gloo ranks; (folder of their results, seconds taken)."""
    import torch.multiprocessing as mp
    tmp = str(tmp_path_factory.mktemp("dist"))
    _source(tmp)  # transformers saves nothing on ranks > 0 of a process group: written before the spawn
    t0 = time.perf_counter()
    ctx = mp.start_processes(_worker, (tmp,), nprocs=RANKS, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=1):
            if time.perf_counter() - t0 > DEADLINE:
                pytest.fail(f"the {RANKS} ranks did not finish in {DEADLINE} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return tmp, time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process results, with one thread like the ranks."""
    tmp = str(tmp_path_factory.mktemp("single"))
    _source(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, fn in _scenarios(0).items():
            if name in EQUAL + ONLOADED:
                _save(tmp, name, fn)
    finally:
        torch.set_num_threads(threads)
    return tmp


def _load(folder: str, name: str):
    res = json.loads(open(f"{folder}/{name}.json").read())
    path = f"{folder}/{name}.safetensors"
    return res, (load_file(path) if os.path.exists(path) else None)


@pytest.mark.parametrize("scenario", EQUAL)
def test_ranks_equal_one_process_bitwise(ranks, reference, scenario):
    ref, ref_state = _load(reference, scenario)
    assert "error" not in ref, ref
    for r in range(RANKS):
        got, state = _load(f"{ranks[0]}/rank{r}", scenario)
        assert "error" not in got, got
        assert got["rows"] == ref["rows"] and got["setup"] == ref["setup"]  # the global batches described
        assert state.keys() == ref_state.keys()
        bad = [k for k in state if not torch.equal(state[k], ref_state[k])]
        assert not bad, f"rank {r} differs from one process in {bad[:5]}"
    if scenario == "sparsegpt":
        assert sum(k.endswith("proj.weight") for k in state) == 28  # every linear of the 4 blocks compared
    if scenario == "calibrate":  # both statistics, over all 6 batches (one row padded: 5 tokens fewer)
        assert any(k.startswith("hessian/") for k in state) and any(k.startswith("input_stats/") for k in state)
        assert all(int(state[k]) == 6 * 32 - 5 for k in state if k.endswith("/count"))


@pytest.mark.parametrize("scenario", ONLOADED)
def test_onloading_on_ranks_writes_the_one_process_checkpoint_once(ranks, reference, scenario):
    ref, ref_state = _load(reference, scenario)
    assert "error" not in ref, ref
    got, state = _load(f"{ranks[0]}/rank0", scenario)
    assert got["rows"] == ref["rows"] and got["rows"][-1] is True  # rank 0 wrote it
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    other, _ = _load(f"{ranks[0]}/rank1", scenario)
    assert other["rows"][:-1] == ref["rows"][:-1] and other["rows"][-1] is False  # rank 1 wrote nothing
    if scenario == "prune_folder_flap":  # shrunk, with FLAP's biases: the rewrites were written and restored
        down = "model.layers.3.mlp.down_proj"
        assert state[f"{down}.bias"].numel() == 64 and state[f"{down}.weight"].shape[1] < 128


@pytest.mark.parametrize("scenario, message", [
    ("l0_blocks", "LayerDropConfig(score='l0') trains its gates in one process"),
    ("l0_units", "collect_unit_gates cannot run on 2 processes yet; run it in one process"),
    ("other_batches", "other calibration batches than this one; give every rank the same full list")])
def test_unsupported_runs_fail_on_every_rank(ranks, scenario, message):
    for r in range(RANKS):
        got, _ = _load(f"{ranks[0]}/rank{r}", scenario)
        assert got.get("error") == "DistributedError" and message in got["message"], got


def test_collectives(ranks):
    for r in range(RANKS):
        got, state = _load(f"{ranks[0]}/rank{r}", "comm")
        assert torch.equal(state["order"][:, 0, 0], torch.tensor([0., 2, 3, 5], dtype=torch.float64))
        raised, agreed = got["rows"]
        assert raised == ("ZeroDivisionError: division by zero" if r == 1 else
                          "DistributedError: rank 1 failed planning lin3: ZeroDivisionError: division by zero")
        assert agreed == ("rank 1 failed a check: rank 1's reason" if r == 0 else "ok")
    print(f"{RANKS} ranks, all scenarios: {ranks[1]:.1f} s")


@pytest.mark.parametrize("splits", [[6], [3, 3], [2, 1, 3], [1, 1, 1, 1, 1, 1]])
def test_fp64_hessian_sums_are_exact_in_any_grouping(splits):
    """fp32 partials XᵀX added in fp64 (analysis/hessian.py): the same bits whatever the batches'
    split over ranks (each rank's sum, then the ranks' sums) and order."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 24, generator=g) * (1 + 3 * torch.rand(24, generator=g)) for _ in range(6)]
    one = HessianStats.empty(24)
    for x in xs:
        one.update(x)
    for order in (xs, xs[::-1]):
        total, start = torch.zeros(24, 24, dtype=torch.float64), 0
        for n in splits:
            rank = HessianStats.empty(24)
            for x in order[start:start + n]:
                rank.update(x)
            total += rank.xtx
            start += n
        assert torch.equal(total, one.xtx)
    assert one.matrix().dtype == torch.float32 and one.count == 240
