"""The zoo's tiny model: trains into a cache, beats a unigram baseline, reloads identically.

The tiny model is trained once per session (about a minute on 2 CPU cores) into a temporary
cache, or into $SPARSECC_CACHE when that is set, so CI can keep it between runs."""
import dataclasses
import json
import os

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sparsecc.evaluate import perplexity
from sparsecc.zoo import VARIANTS, load_corpus, load_model, model_key, train_tokenizer
from sparsecc.zoo import train as train_mod


@pytest.fixture(scope="module")
def cache(zoo_cache):
    return zoo_cache


@pytest.fixture(scope="module")
def tiny(tiny_zoo):
    return tiny_zoo


@pytest.fixture(scope="module")
def streams(tiny_streams):
    return tiny_streams


def unigram_perplexity(train_ids, test_ids, vocab):
    """exp(cross-entropy of the test stream under the train stream's add-one unigram distribution)."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return torch.exp(-logp[test_ids].mean()).item()


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


def test_tiny_beats_unigram_baseline(tiny, streams):
    model, tok, info, _ = tiny
    train_ids, test_ids = streams
    baseline = unigram_perplexity(train_ids, test_ids, len(tok))
    ppl = perplexity(model, test_ids, model.config.max_position_embeddings)
    assert ppl == pytest.approx(info["test_ppl"], rel=1e-3)  # info.json tells the truth
    assert ppl < 0.8 * baseline, f"tiny model perplexity {ppl:.1f} vs unigram {baseline:.1f}"


def test_info_and_cache_layout(tiny, cache):
    _, _, info, _ = tiny
    path = info["path"]
    assert os.path.dirname(path) == os.path.join(cache, "zoo")
    assert os.path.basename(path).startswith("tiny-")
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "info.json"} <= files
    saved = json.loads(open(os.path.join(path, "info.json")).read())
    for key in ("variant", "config", "corpus", "train_wall_s", "steps", "final_train_loss", "test_ppl", "date", "torch"):
        assert key in saved and saved[key] == info[key]
    assert saved["corpus"]["name"] in ("wikitext-2", "python-stdlib")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")]  # no temp folders left


def test_reload_from_cache_is_identical(tiny, cache):
    model, tok, info, _ = tiny
    again, tok2, info2 = load_model("tiny", cache_dir=cache, train_if_missing=False, progress=False)  # loads only
    assert info2 == info and not again.training
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    assert tok2("some text , with words .")["input_ids"] == tok("some text , with words .")["input_ids"]


def test_cli_prints_info_from_cache(tiny, cache, capsys):
    assert train_mod.main(["--variant", "tiny", "--cache-dir", cache, "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == tiny[2]["path"] and printed["test_ppl"] == tiny[2]["test_ppl"]


def test_missing_model_raises_with_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sparsecc.zoo.train --variant tiny"):
        load_model("tiny", cache_dir=tmp_path, train_if_missing=False)
    with pytest.raises(ValueError, match="unknown zoo variant"):
        load_model("huge", cache_dir=tmp_path)


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
