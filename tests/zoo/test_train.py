"""The zoo: the shipped models and token streams are what they claim to be, and training works.

The shipped tiny model is checked against its own info.json and the shipped text; training is
checked end to end on a few steps of a micro variant (seconds), and, marked slow, by retraining
the tiny model and comparing it with the shipped copy."""
import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sparsecc.tools.evaluate import perplexity
from sparsecc.zoo import (VARIANTS, corpus_sha256, load_corpus, load_model, load_tokens, model_key, shipped_variants,
                          train_model, train_tokenizer)
from sparsecc.zoo import shipped as shipped_mod
from sparsecc.zoo import train as train_mod

MICRO = dataclasses.replace(VARIANTS["tiny"], name="micro", hidden_size=64, intermediate_size=128, num_layers=1,
                            num_heads=2, num_kv_heads=1, context=32, vocab_size=300, steps=40, batch_size=8,
                            warmup_steps=5)


@pytest.fixture(scope="module")
def tiny(tiny_zoo):
    return tiny_zoo


@pytest.fixture(scope="module")
def streams(tiny_streams):
    return tiny_streams


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data folder in WikiText-2's layout holding a slice of the corpus (fast to train on)."""
    corpus = load_corpus()
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "valid.txt").write_text(corpus.train_text[:40_000])
    (root / "wikitext-2" / "test.txt").write_text(corpus.test_text[:8_000])
    return root


@pytest.fixture(scope="module")
def micro(small_data, zoo_cache):
    return train_model(MICRO, data_dir=small_data, cache_dir=zoo_cache, progress=False)


def unigram_perplexity(train_ids, test_ids, vocab):
    """exp(cross-entropy of the test stream under the train stream's add-one unigram distribution)."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return torch.exp(-logp[test_ids].mean()).item()


def test_both_variants_ship():
    assert shipped_variants() == ["ref", "tiny"]


def test_architecture(tiny):
    model, tok, info, _ = tiny
    cfg, spec = model.config, VARIANTS["tiny"]
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.hidden_act == "silu" and not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == spec.context and cfg.vocab_size == len(tok) == spec.vocab_size
    assert cfg.eos_token_id == tok.eos_token_id
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * cfg.num_hidden_layers + 1
    assert all(m.in_features % 64 == 0 for m in linears)
    assert info["variant"] == "tiny" and info["params"] == sum(p.numel() for p in model.parameters())
    assert info["spec"] == dataclasses.asdict(spec)  # shipped from today's recipe


def test_shipped_tokens_are_wikitext_under_the_shipped_tokenizer(tiny):
    """The streams decode to the exact WikiText-2 files they were made from (their sha256s), and
    every shipped model's tokenizer is the one that encoded them."""
    _, tok, info, _ = tiny
    tokens = load_tokens()
    assert tokens.source["name"] == "wikitext-2" and info["corpus"]["test_sha256"] == tokens.source["test_sha256"]
    for split in ("train", "test"):
        ids = getattr(tokens, split)
        assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == tokens.source[f"{split}_tokens"]
        text = tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)
        assert corpus_sha256(text) == tokens.source[f"{split}_sha256"], split
    for variant in shipped_variants():
        assert shipped_mod.tokenizer_sha256(shipped_mod.SHIPPED_DIR / variant) == tokens.source["tokenizer_sha256"]


def test_tiny_beats_unigram_baseline_and_info_tells_the_truth(tiny, streams):
    model, tok, info, _ = tiny
    train_ids, test_ids = streams
    baseline = unigram_perplexity(train_ids, test_ids, len(tok))
    ppl = perplexity(model, test_ids, model.config.max_position_embeddings)
    assert ppl == pytest.approx(info["test_ppl"], rel=1e-4)
    assert ppl < 0.5 * baseline, f"tiny model perplexity {ppl:.1f} vs unigram {baseline:.1f}"


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="unknown zoo variant 'huge'.*tiny"):
        load_model("huge")
    with pytest.raises(ValueError, match="unknown zoo variant"):
        train_model("huge")


def test_a_few_training_steps_learn_and_cache(micro, zoo_cache, small_data):
    model, tok, info = micro
    assert not model.training and info["variant"] == "micro" and info["steps"] == MICRO.steps
    assert info["final_train_loss"] < 0.9 * math.log(MICRO.vocab_size)  # from ln V at the start
    path = info["path"]
    assert os.path.dirname(path) == os.path.join(zoo_cache, "zoo") and os.path.basename(path).startswith("micro-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "info.json"} <= set(os.listdir(path))
    saved = json.loads(open(os.path.join(path, "info.json")).read())
    for key in ("variant", "config", "corpus", "train_wall_s", "steps", "final_train_loss", "test_ppl", "date", "torch"):
        assert key in saved and saved[key] == info[key]
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")]  # no temp folders left


def test_reload_from_cache_is_identical(micro, zoo_cache, small_data):
    model, tok, info = micro
    again, tok2, info2 = train_model(MICRO, data_dir=small_data, cache_dir=zoo_cache, train_if_missing=False)
    assert info2 == info and not again.training
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    assert tok2("some text , with words .")["input_ids"] == tok("some text , with words .")["input_ids"]


def test_cli_prints_info_from_cache(tmp_path, capsys, small_data, monkeypatch):
    monkeypatch.setitem(train_mod.VARIANTS, "micro", MICRO)
    argv = ["--variant", "micro", "--cache-dir", str(tmp_path), "--data-dir", str(small_data), "--quiet"]
    assert train_mod.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert train_mod.main(argv) == 0  # the second call loads the cached model
    again = json.loads(capsys.readouterr().out)
    assert again == first and again["variant"] == "micro"


def test_missing_model_raises_with_command(tmp_path, small_data):
    with pytest.raises(FileNotFoundError, match="python -m sparsecc.zoo.train --variant tiny"):
        train_model("tiny", data_dir=small_data, cache_dir=tmp_path, train_if_missing=False)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE", str(tmp_path))
    assert train_mod.cache_root() == tmp_path
    monkeypatch.delenv("SPARSECC_CACHE")
    assert str(train_mod.cache_root()).endswith(os.path.join(".cache", "sparsecc"))
    assert train_mod.cache_root(tmp_path / "x") == tmp_path / "x"


def test_model_key_covers_variant_and_corpus():
    corpus = load_corpus()
    spec = VARIANTS["tiny"]
    key = model_key(spec, corpus)
    assert key == model_key(spec, corpus) and len(key) == 12
    assert model_key(dataclasses.replace(spec, lr=spec.lr * 2), corpus) != key
    assert model_key(dataclasses.replace(spec, vocab_size=1024), corpus) != key
    other = dataclasses.replace(corpus, source={**corpus.source, "train_sha256": "0" * 64})
    assert model_key(spec, other) != key
    assert model_key(VARIANTS["ref"], corpus) != key


def test_all_variants_fit_sparse_patterns():
    for spec in VARIANTS.values():
        head_dim = spec.hidden_size // spec.num_heads
        assert spec.hidden_size % 64 == 0 and spec.intermediate_size % 64 == 0
        assert (spec.num_heads * head_dim) % 64 == 0 and spec.num_kv_heads < spec.num_heads


def test_save_is_atomic_and_overwrites(tmp_path):
    spec = dataclasses.replace(VARIANTS["tiny"], vocab_size=300)
    tok = train_tokenizer("a small text to train on\n" * 20, 300)
    path = tmp_path / "zoo" / "m"
    for seed, overwrite in ((0, False), (1, True)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(spec.llama_config(tok.eos_token_id))
        train_mod._save(path, model, tok, {"seed": seed}, overwrite=overwrite)
        assert json.loads((path / "info.json").read_text()) == {"seed": seed}
    # a finished copy is kept when not overwriting (a concurrent run got there first)
    train_mod._save(path, model, tok, {"seed": 2}, overwrite=False)
    assert json.loads((path / "info.json").read_text()) == {"seed": 1}
    assert os.listdir(path.parent) == ["m"]


def test_ship_writes_models_and_streams_that_load_back(micro, small_data, tmp_path):
    model, tok, info = micro
    corpus = load_corpus(small_data)
    shipped_mod.ship({"micro": (model, tok, info)}, corpus, root=tmp_path)
    again, tok2, info2 = shipped_mod.load_model("micro", root=tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert info2["test_ppl"] == info["test_ppl"] and "path" in info2
    tokens = shipped_mod.load_tokens(root=tmp_path)
    assert tok2.decode(tokens.test.tolist()) == corpus.test_text
    assert sorted(os.listdir(tmp_path)) == ["micro", shipped_mod.TOKENS_NAME]  # no temp folder left


@pytest.mark.slow
def test_retraining_tiny_reproduces_the_shipped_copy(tmp_path):
    """`python benchmarks/train_reference.py --variant tiny` rebuilds the shipped model (needs
    WikiText-2 and ~1.5 min on 2 cores); same torch and thread count: identical weights."""
    if load_corpus().source["name"] != "wikitext-2":
        pytest.skip("needs WikiText-2 (../shared/data or $SPARSECC_DATA)")
    trained = train_model("tiny", cache_dir=tmp_path, progress=False)[0].state_dict()
    shipped = load_model("tiny")[0].state_dict()
    diff = max((v - shipped[k]).abs().max().item() for k, v in trained.items())
    assert diff < 1e-3, f"retrained tiny differs from the shipped copy by {diff}"
