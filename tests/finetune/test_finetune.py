"""finetune_: every pruned weight stays exactly zero, N:M patterns and quantization grids hold,
LoRA merges into what the model computed, distillation, resuming, and bad input leaving the
model as it was."""
import copy
import warnings

import pytest
import torch
from torch.nn.utils import parametrize

import sparsecc
from sparsecc.errors import FinetuneError
from sparsecc.finetune import loop
from sparsecc.finetune.weights import is_linear
from sparsecc.prune.quantize import grid_of

from conftest import VOCAB


@pytest.fixture
def text():
    """A repeating token stream (learnable in a few steps), cut into 4 batches of [2, 16]."""
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, VOCAB, (24,), generator=g)
    stream = motif.repeat(6)
    return [stream[i * 32:(i + 1) * 32].view(2, 16) for i in range(4)]


def _pruned(make_model, batches, family="llama", **cfg):
    model = make_model(family)
    sparsecc.sparsify_(model, {"default": sparsecc.WandaConfig(**cfg), "lm_head": None}, batches, progress=False)
    return model


def _zeros(model):
    """{weight name: its zeros} of the pruned linears."""
    return {f"{n}.weight": m.weight.detach() == 0 for n, m in model.named_modules()
            if is_linear(m) and m is not model.get_output_embeddings() and bool((m.weight == 0).any())}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_zero_stays_zero_and_the_nm_pattern_holds(make_model, batches, text, family, method):
    model = _pruned(make_model, batches, family, pattern="2:4")
    zeros = _zeros(model)
    assert len(zeros) >= 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsecc.finetune_(model, text, steps=12, lr=3e-3, method=method, rank=4, progress=False)
    params = dict(model.named_parameters())
    assert set(params) == set(before)  # no reparameterisation left behind
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for n, z in zeros.items():
        w = params[n].detach()
        assert torch.equal(w == 0, z), n  # the same zeros: none filled, none added
        view = w if w.shape[1] % 4 == 0 else w.t()  # Conv1D stores [in, out]
        per_group = (view.t() if family == "gpt2" else view).reshape(-1, 4) != 0
        assert int(per_group.sum(-1).max()) <= 2, n
    changed = [n for n in zeros if not torch.equal(params[n], before[n])]
    assert len(changed) == len(zeros)  # every pruned linear was trained
    assert report.frozen_zeros == sum(int(z.sum()) for z in zeros.values())
    assert report.pruned_tensors == len(zeros)
    assert report.losses[-1] < report.losses[0]
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, before[next(n for n in before if n.endswith("embed_tokens.weight") or
                                        n.endswith("wte.weight") or n.endswith("embed_tokens.weight"))]) \
        == (method == "lora")  # LoRA trains only the adapters


def test_lora_merges_into_what_the_model_computed_and_counts_its_cost(make_model, batches, text, tmp_path):
    model = _pruned(make_model, batches, sparsity=0.5)
    zeros = _zeros(model)
    report = sparsecc.finetune_(model, text, steps=8, lr=1e-2, method="lora", rank=4, merge=False, progress=False)
    assert not report.merged and report.adapter_params > 0
    adapted = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert len(adapted) == 14  # every linear of the 2 blocks, lm_head not
    x = text[0]
    with torch.no_grad():
        with_adapters = model(x).logits
    with pytest.raises(sparsecc.PlanError, match="merge_adapters_"):
        sparsecc.save_pruned(model, tmp_path / "out", sparsecc.Report([]))
    assert not (tmp_path / "out").exists()
    assert sparsecc.merge_adapters_(model) == 14
    with torch.no_grad():
        merged = model(x).logits
    torch.testing.assert_close(merged, with_adapters, rtol=1e-5, atol=1e-5)
    for n, z in _zeros(model).items():
        assert torch.equal(z, zeros[n])
    # rank 4 on 14 linears: 4 * (in + out) each
    expected = sum(4 * sum(m.weight.shape) for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert report.adapter_params == expected


def test_a_quantized_linear_stays_on_its_grid(make_model, batches, text):
    model = make_model()
    sparsecc.sparsify_(model, {"default": sparsecc.SparseGPTConfig(sparsity=0.5, bits=4, group_size=32),
                               "lm_head": None}, batches, progress=False)
    zeros = _zeros(model)
    grids = {n: grid_of(m) for n, m in model.named_modules() if grid_of(m) is not None}
    assert len(grids) == 14
    report = sparsecc.finetune_(model, text, steps=15, lr=3e-3, progress=False)
    assert report.quantized_linears == 14
    moved = 0
    for n, old in grids.items():
        m = model.get_submodule(n)
        new = grid_of(m)
        assert new.matches(m.weight) and torch.equal(new.scales, old.scales)  # same grid, new codes
        moved += int((new.unpacked() != old.unpacked()).sum())
    assert moved > 0
    now = _zeros(model)
    for n, z in zeros.items():  # a kept weight may round to the level 0 now, a pruned one never leaves it
        assert bool(now[n][z].all())


def test_structured_and_cats_models_fine_tune(make_model, batches, text):
    model = make_model()
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.StructuredConfig(0.5)}, batches, progress=False)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    report = sparsecc.finetune_(model, text, steps=6, lr=3e-3, progress=False)
    assert report.rewritten_modules == 2 and report.pruned_tensors == 0
    assert {n: p.shape for n, p in model.named_parameters()} == shapes

    model = make_model()
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(sparsity=0.5)}, batches, progress=False)
    cats = [m for m in model.modules() if isinstance(m, sparsecc.CATSMLP)]
    before = cats[0].down_proj.weight.detach().clone() if hasattr(cats[0], "down_proj") else None
    report = sparsecc.finetune_(model, text, steps=6, lr=3e-3, progress=False)
    assert report.rewritten_modules == 2 and report.losses[-1] < report.losses[0]
    assert [m for m in model.modules() if isinstance(m, sparsecc.CATSMLP)] == cats
    if before is not None:
        assert not torch.equal(cats[0].down_proj.weight, before)


def test_distillation_from_an_identical_teacher_starts_at_the_lm_loss_share(make_model, batches, text):
    model = _pruned(make_model, batches, sparsity=0.5)
    teacher = copy.deepcopy(model)
    ce = loop._step_loss(model, text[0], None, 0.5, 2.0)
    both = loop._step_loss(model, text[0], teacher, 0.5, 2.0)
    assert both.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)  # KL(p || p) = 0
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a sharper teacher: far from the student
    first = loop._step_loss(model, text[0], teacher, 1.0, 1.0).item()
    report = sparsecc.finetune_(model, text, steps=10, lr=1e-2, teacher=teacher, distill_weight=1.0, temperature=1.0,
                                progress=False)
    assert report.teacher and report.losses[0] == pytest.approx(first, rel=1e-4)
    assert loop._step_loss(model, text[0], teacher, 1.0, 1.0).item() < 0.5 * first  # pulled toward the teacher
    assert teacher.training is False and model.training is False


def test_held_out_evaluation_before_and_after(make_model, batches, text):
    model = _pruned(make_model, batches, sparsity=0.5)
    report = sparsecc.finetune_(model, text[:3], steps=20, lr=3e-3, eval_batches=text[3:], progress=False)
    assert report.eval_after["ppl"] < report.eval_before["ppl"]
    assert report.eval_after["tokens"] == 2 * 15
    assert "held-out perplexity" in str(report)


def _interrupted(model, text, step, monkeypatch, **kw):
    """finetune_(model, text, **kw) stopped by a KeyboardInterrupt (Ctrl-C) in its `step`-th step."""
    real, calls = loop._step_loss, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_step_loss", dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            sparsecc.finetune_(model, text, progress=False, **kw)
    finally:
        monkeypatch.setattr(loop, "_step_loss", real)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: dropout 0.1, biases
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(make_model, batches, text, tmp_path, monkeypatch, family):
    base = _pruned(make_model, batches, family, sparsity=0.5)
    whole = copy.deepcopy(base)
    sparsecc.finetune_(whole, text, steps=10, lr=3e-3, progress=False)

    model = copy.deepcopy(base)
    _interrupted(model, text, 7, monkeypatch, steps=10, lr=3e-3, checkpoint_dir=tmp_path / "ck", save_every=4)
    assert list(model.state_dict()) == list(base.state_dict())  # the same order too
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(base.named_parameters())[n])  # the interrupted call undid itself
    report = sparsecc.finetune_(model, text, steps=10, lr=3e-3, checkpoint_dir=tmp_path / "ck", save_every=4,
                                progress=False)
    assert report.resumed_from == 4 and len(report.losses) == 10
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[n]), n
    with pytest.raises(FinetuneError, match="another run's state.*steps: saved 10, now 12"):
        sparsecc.finetune_(copy.deepcopy(base), text, steps=12, lr=3e-3, checkpoint_dir=tmp_path / "ck",
                           warmup=1, progress=False)
    with pytest.raises(FinetuneError, match="another run's state.*lr"):
        sparsecc.finetune_(copy.deepcopy(base), text, steps=10, lr=1e-3, checkpoint_dir=tmp_path / "ck",
                           progress=False)


def test_half_precision_trains_fp32_master_weights(make_model, batches, text):
    """bfloat16: the masters keep the updates the model's dtype rounds away, so the weights end
    closer to a float32 run's than training in bfloat16 does; zeros stay zero, the dtype stays."""
    base = _pruned(make_model, batches, sparsity=0.5)
    zeros = _zeros(base)
    ref = copy.deepcopy(base)
    sparsecc.finetune_(ref, text, steps=6, lr=1e-4, progress=False)
    runs = {}
    for masters in (True, False):
        m = copy.deepcopy(base).to(torch.bfloat16)
        runs[masters] = m, sparsecc.finetune_(m, text, steps=6, lr=1e-4, master_weights=masters, progress=False)
    want = {n: p.detach() for n, p in ref.named_parameters()}
    err = {k: sum(float((p.detach().float() - want[n]).abs().sum()) for n, p in m.named_parameters())
           for k, (m, _) in runs.items()}
    assert err[True] < 0.75 * err[False], err  # measured 2.35 vs 4.89
    model, report = runs[True]
    assert report.master_weights and not runs[False][1].master_weights and "fp32 master weights" in report.table()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())


def test_float16_scales_the_loss_skips_overflowing_steps_and_resumes_exactly(make_model, batches, text, tmp_path,
                                                                             monkeypatch):
    """A loss scale too large for float16 overflows the gradients: those steps are skipped (the model
    unchanged by them) and the scale halved until it fits; the scale is part of a resumable state."""
    from sparsecc.finetune import precision
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 24)
    base = _pruned(make_model, batches, sparsity=0.5).half()
    zeros = _zeros(base)
    whole = copy.deepcopy(base)
    report = sparsecc.finetune_(whole, text, steps=16, lr=3e-3, progress=False)
    assert 3 <= report.skipped_steps <= 14 and "steps skipped" in report.table()  # measured 7 of 16
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in whole.parameters())
    assert report.losses[-1] < report.losses[0]
    params = dict(whole.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())
    model = copy.deepcopy(base)
    _interrupted(model, text, 13, monkeypatch, steps=16, lr=3e-3, checkpoint_dir=tmp_path / "ck", save_every=12)
    resumed = sparsecc.finetune_(model, text, steps=16, lr=3e-3, checkpoint_dir=tmp_path / "ck", save_every=12,
                                 progress=False)
    assert resumed.resumed_from == 12 and resumed.skipped_steps == report.skipped_steps
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def _refused(model, match, *args, **kw):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FinetuneError, match=match):
        sparsecc.finetune_(model, *args, progress=False, **kw)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_bad_input_is_refused_and_leaves_the_model_as_it_was(make_model, batches, text):
    dense = make_model()
    _refused(dense, "nothing pruned.*allow_dense=True", text, steps=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sparsecc.finetune_(dense, text, steps=2, allow_dense=True, progress=False)
    assert any("dense" in str(x.message) for x in w)

    model = _pruned(make_model, batches, sparsity=0.5)
    _refused(model, "rank 65 is larger than .*<= 64", text, steps=2, method="lora", rank=65)
    _refused(model, "steps must be a positive int, got 0", text, steps=0)
    with torch.inference_mode():
        _refused(model, "inference_mode", text, steps=2)
    with torch.no_grad():  # training turns gradients on for itself, and back off after
        sparsecc.finetune_(copy.deepcopy(model), text, steps=2, progress=False)
        assert not torch.is_grad_enabled()
    _refused(model, "steps must be a positive int", text, steps=-3)
    _refused(model, "method must be one of", text, method="qlora")
    _refused(model, "lr must be a positive number", text, lr=-1.0)
    _refused(model, "distill_weight must be in", text, distill_weight=1.5)
    _refused(model, "no next token.*longer text", [t[:, :1] for t in text], steps=2)
    _refused(model, "fine-tuning batches: .*vocabulary", [torch.full((1, 8), VOCAB + 5)], steps=2)
    _refused(model, "teacher's logits", text, steps=2, teacher=make_model("gpt2").__class__(
        type(make_model("gpt2").config)(vocab_size=VOCAB + 1, n_embd=32, n_layer=1, n_head=2, n_positions=64)))


def test_a_pruned_lm_head_keeps_its_zeros_and_refusals_of_fp16_packed_and_padding(make_model, batches, text):
    model = make_model()
    sparsecc.sparsify_(model, {"default": sparsecc.WandaConfig(0.5)}, batches, progress=False)  # lm_head too
    head = model.lm_head.weight.detach() == 0
    assert float(head.float().mean()) == 0.5
    report = sparsecc.finetune_(model, text, steps=4, lr=3e-3, progress=False)
    assert torch.equal(model.lm_head.weight == 0, head) and report.pruned_tensors == 15
    _refused(copy.deepcopy(model).half(), "float16.*keep master_weights=True", text, steps=2, master_weights=False)
    packed = copy.deepcopy(model)
    assert sparsecc.pack_(packed, format="csr", min_sparsity=0.4)
    with pytest.raises(FinetuneError, match="packed.*fine-tune before packing"):
        sparsecc.finetune_(packed, text, steps=2, progress=False)
    pad = {"input_ids": text[0], "attention_mask": torch.zeros_like(text[0])}
    _refused(model, "batch 0 has no next token", [pad], steps=2)


def test_a_failure_mid_run_undoes_everything(make_model, batches, text, monkeypatch):
    model = _pruned(make_model, batches, sparsity=0.5)
    model.model.norm.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real, calls = loop._step_loss, []

    def nan_at_step_3(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "_step_loss", nan_at_step_3)
    with pytest.raises(FinetuneError, match="loss is nan at step 2: lower lr"):
        sparsecc.finetune_(model, text, steps=5, lr=3e-3, progress=False)
    params = dict(model.named_parameters())
    assert set(params) == set(before)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert not params["model.norm.weight"].requires_grad and params["lm_head.weight"].requires_grad


def test_a_pruned_moe_keeps_its_experts_zeros(make_model, batches, text):
    model = _pruned(make_model, batches, sparsity=0.5)
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.MoEConfig(num_experts=4, top_k=2)}, batches, progress=False)
    experts = {n: p.detach() == 0 for n, p in model.named_parameters() if ".w_" in n}
    assert len(experts) == 6 and all(float(z.float().mean()) > 0.3 for z in experts.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsecc.finetune_(model, text, steps=6, lr=3e-3, progress=False)
    for n, z in experts.items():
        p = model.get_parameter(n)
        assert bool((p[z] == 0).all()) and not torch.equal(p, before[n]), n
    assert report.pruned_tensors == 8 + 6  # q/k/v/o of 2 blocks, and the experts' 3 tensors of 2 MoE MLPs
