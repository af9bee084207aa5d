"""perplexity(): exact on known models, non-overlapping windows, input validation."""
import math
from types import SimpleNamespace

import pytest
import torch

import sparsecc
from torch import nn

from sparsecc.tools.evaluate import perplexity

V = 50


def stream(n, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


class Uniform(nn.Module):
    """Equal logits for every token: perplexity V."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, V) + self.dummy


class Oracle(nn.Module):
    """Logits one-hot on the true next token, scaled large: perplexity 1."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, use_cache=True):
        self.seen.append((x.clone(), use_cache))
        return SimpleNamespace(logits=100.0 * nn.functional.one_hot(x.roll(-1, dims=1), V).float())


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(V, V)

    def forward(self, x):
        return (self.table(x),)


def test_uniform_logits_give_vocab_size():
    assert perplexity(Uniform(), stream(1000), seqlen=64) == pytest.approx(V, rel=1e-4)


def test_perfect_prediction_gives_one():
    assert perplexity(Oracle(), stream(1000), seqlen=64) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("batch_size,max_windows,expected", [(4, None, 15), (8, 5, 5), (1, 100, 15)])
def test_windows_are_non_overlapping_and_remainder_dropped(batch_size, max_windows, expected):
    ids, model = stream(1000), Oracle()
    perplexity(model, ids, seqlen=64, batch_size=batch_size, max_windows=max_windows)
    seen = torch.cat([x for x, _ in model.seen])
    assert [x.shape[0] for x, _ in model.seen] == [min(batch_size, expected - i) for i in range(0, expected, batch_size)]
    assert seen.shape == (expected, 64)
    assert torch.equal(seen.reshape(-1), ids[: expected * 64])  # consecutive, no overlap
    assert all(flag is False for _, flag in model.seen)  # use_cache=False is passed when accepted


def test_matches_manual_mean_nll_over_all_predictions():
    ids, model = stream(700), Bigram()
    windows = ids[:640].view(10, 64)
    logits = model.table(windows)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), windows[:, 1:].reshape(-1))
    assert perplexity(model, ids, seqlen=64, batch_size=3) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_transformers_model_matches_its_own_loss(make_model):
    model = make_model("llama")  # vocab 128, from tests/conftest.py
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    windows = ids[:192].view(6, 32)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    assert perplexity(model, ids, seqlen=32, batch_size=4) == pytest.approx(expected, rel=1e-4)


def test_mode_restored_and_no_grad():
    model = Bigram().train()
    perplexity(model, stream(200), seqlen=32)
    assert model.training and model.table.weight.grad is None


def test_short_text_error():
    with pytest.raises(ValueError, match=r"text too short for one window of 64 tokens \(got 10\)"):
        perplexity(Uniform(), stream(10), seqlen=64)


@pytest.mark.parametrize("bad", [stream(128).view(2, 64), stream(128).float(), [1, 2, 3], stream(128).bool()])
def test_token_ids_must_be_1d_integer_tensor(bad):
    with pytest.raises(TypeError, match="1-D integer tensor"):
        perplexity(Uniform(), bad, seqlen=16)


@pytest.mark.parametrize("kwargs", [dict(seqlen=0), dict(seqlen=1), dict(seqlen=16, batch_size=0),
                                    dict(seqlen=16, max_windows=0), dict(seqlen=16.0)])
def test_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        perplexity(Uniform(), stream(128), **kwargs)


def test_non_finite_result_raises():
    class NaN(Uniform):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(FloatingPointError, match="not finite"):
        perplexity(NaN(), stream(128), seqlen=16)


def test_wrong_output_shape_raises():
    class Flat(Uniform):
        def forward(self, x):
            return super().forward(x).sum(-1)

    with pytest.raises(sparsecc.CalibrationError, match=r"perplexity needs a causal LM returning logits \[batch, seq, "
                       r"vocab\].*got logits of shape \(8, 16\)"):
        perplexity(Flat(), stream(128), seqlen=16)
