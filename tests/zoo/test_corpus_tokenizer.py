"""Corpus resolution (argument, env, shared dir, stdlib fallback) and the byte-level BPE tokenizer."""
import hashlib
import inspect
import json

import pytest
import torch
from transformers import AutoTokenizer

from sparsecc.zoo import corpus as corpus_mod
from sparsecc.zoo import encode_text, load_corpus, train_tokenizer

TRAIN = " = Title = \n \n Some text , with <unk> tokens @-@ and 3 @.@ 5 numbers .\n" * 50
TEST = " = Other = \n More text here .\n" * 20


def make_data(root, train=TRAIN, test=TEST):
    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2" / "valid.txt").write_text(train, encoding="utf-8")
    (root / "wikitext-2" / "test.txt").write_text(test, encoding="utf-8")
    return root


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SPARSECC_DATA", raising=False)


def test_explicit_dir_trains_on_valid_reports_on_test(tmp_path, no_env):
    c = load_corpus(make_data(tmp_path))
    assert (c.train_text, c.test_text) == (TRAIN, TEST)
    assert c.source["name"] == "wikitext-2"
    assert c.source["train_file"].endswith("valid.txt") and c.source["test_file"].endswith("test.txt")
    assert c.source["train_sha256"] == hashlib.sha256(TRAIN.encode()).hexdigest()
    assert c.source["test_sha256"] == hashlib.sha256(TEST.encode()).hexdigest()
    assert "Some text" not in repr(c)  # the texts stay out of the repr


def test_env_var_and_argument_precedence(tmp_path, monkeypatch):
    env_dir = make_data(tmp_path / "env", train="env train\n")
    arg_dir = make_data(tmp_path / "arg", train="arg train\n")
    monkeypatch.setenv("SPARSECC_DATA", str(env_dir))
    assert load_corpus().train_text == "env train\n"
    assert load_corpus(arg_dir).train_text == "arg train\n"


def test_shared_dir_is_used_when_present(tmp_path, no_env, monkeypatch):
    monkeypatch.setattr(corpus_mod, "shared_data_dir", lambda: make_data(tmp_path))
    assert load_corpus().source["name"] == "wikitext-2"


@pytest.mark.parametrize("via_env", [False, True])
def test_explicit_dir_without_files_raises(tmp_path, monkeypatch, via_env):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("only the train split\n")
    if via_env:
        monkeypatch.setenv("SPARSECC_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SPARSECC_DATA" if via_env else "data_dir") as e:
        load_corpus(None if via_env else tmp_path)
    assert "wikitext-2/test.txt" in str(e.value).replace("\\", "/")


def test_stdlib_fallback_is_deterministic(tmp_path, no_env, monkeypatch):
    monkeypatch.setattr(corpus_mod, "shared_data_dir", lambda: tmp_path / "does-not-exist")
    a, b = load_corpus(), load_corpus()
    assert a.source["name"] == "python-stdlib"
    assert 1_000_000 < len(a.train_text) < 1_400_000 and 200_000 < len(a.test_text) < 400_000
    assert a == b
    assert a.source["train_sha256"] == hashlib.sha256(a.train_text.encode()).hexdigest()
    assert a.source["train_sha256"] != a.source["test_sha256"]
    assert "def " in a.train_text and "def " in a.test_text
    json.dumps(a.source)  # recordable as is


# --- tokenizer -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text():
    return "".join(inspect.getsource(m) for m in (json, inspect, pytest)) + TRAIN


@pytest.fixture(scope="module")
def tok(text):
    return train_tokenizer(text, vocab_size=512)


SAMPLES = ["", "hello world", "  leading and trailing  \n\n", " = Title = \n \n", "tabs\tand\r\nCRLF",
           "ünïcödé, 日本語, emoji 🙂, <unk> @-@", "def f(x):\n    return x ** 2  # comment\n", "<|endoftext|>x"]


@pytest.mark.parametrize("s", SAMPLES)
def test_round_trip(tok, s):
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.decode(encode_text(tok, s).tolist()) == s


def test_encode_text_stream(tok, text):
    ids = encode_text(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 1000
    assert int(ids.max()) < len(tok) and int(ids.min()) >= 0
    assert tok.decode(ids.tolist()) == text  # longer than one encode chunk: chunks join seamlessly
    assert encode_text(tok, "").numel() == 0


def test_vocab_and_eos(tok):
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("abc", vocab_size=100)


def test_training_is_deterministic(tok, text):
    again = train_tokenizer(text, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = train_tokenizer(text[: len(text) // 3], vocab_size=512)
    assert other.backend_tokenizer.to_str() != tok.backend_tokenizer.to_str()


def test_save_and_load_offline(tok, text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.eos_token_id == tok.eos_token_id and len(loaded) == len(tok)
    assert torch.equal(encode_text(loaded, text), encode_text(tok, text))
    assert loaded.decode(loaded.encode(SAMPLES[5], add_special_tokens=False)) == SAMPLES[5]
