"""Every ```python block of README.md runs, in order, in one namespace.

The README's examples assume `model` (a transformers causal LM), `token_ids` (a 1-D token
stream), and for the per-matrix functions `w`, `act_norm`, `H`; they are defined here small.
"""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    x = torch.randn(512, 128)
    return {"model": model, "token_ids": torch.randint(0, 128, (20_000,)), "w": torch.randn(64, 128),
            "act_norm": x.norm(dim=0), "H": x.T @ x, "__name__": "readme"}


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, namespace, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # files the examples write land here
    torch._dynamo.reset()
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), namespace)


def test_readme_results_match_results_md():
    """README's results tables are the ones the benchmark wrote into benchmarks/RESULTS.md."""
    text = README.read_text()
    assert "<!-- prune-quality:start -->" in text, "README lost its results section"
    section = text.split("<!-- prune-quality:start -->", 1)[1].split("<!-- prune-quality:end -->", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) >= 8
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text()
    missing = [r for r in rows if r not in results]
    assert not missing, f"README rows not in benchmarks/RESULTS.md (re-run prune_quality.py --write-results): {missing}"
