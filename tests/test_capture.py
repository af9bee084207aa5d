"""Capture through dynamo finds linears and blocks generically, for every family."""
import pytest
import torch

import sparsecc
from conftest import FAMILIES

EXPECTED = {  # family -> (linear sites, block prefix)
    "llama": (15, "model.layers."), "mistral": (15, "model.layers."),
    "mixtral": (11, "model.layers."),  # 4 attention projections + router per block; experts are 3-D parameters
    "opt": (13, "model.decoder.layers."), "gpt2": (9, "transformer.h."),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_blocks(family, make_model, batches):
    m = make_model(family)
    cap = sparsecc.capture(m, batches[0])
    n, prefix = EXPECTED[family]
    assert len(cap.sites) == n
    assert cap.blocks == [f"{prefix}0", f"{prefix}1"]
    for site in cap.sites.values():
        w = site.weight(m)
        assert tuple(w.shape) == (site.out_features, site.in_features)
        assert w.data_ptr() == m.get_parameter(site.param).data_ptr()  # a view, not a copy


def test_gpt2_conv1d_is_transposed(make_model, batches):
    cap = sparsecc.capture(make_model("gpt2"), batches[0])
    assert cap.sites["transformer.h.0.mlp.c_fc"].transposed
    assert (cap.sites["transformer.h.0.mlp.c_fc"].out_features, cap.sites["transformer.h.0.mlp.c_fc"].in_features) == (256, 64)


def test_tied_lm_head_is_owned_by_lm_head(make_model, batches):
    cap = sparsecc.capture(make_model("gpt2"), batches[0])
    assert cap.sites["lm_head"].param == "lm_head.weight"
    assert cap.sites["lm_head"].tied == ("transformer.wte.weight",)


def test_repeated_capture_does_not_exhaust_dynamo_cache(make_model, batches):
    for seed in range(12):
        assert len(sparsecc.capture(make_model("llama", seed), batches[0]).sites) == 15


def test_plain_modules_without_blocks():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    cap = sparsecc.capture(m, torch.randn(3, 4))
    assert list(cap.sites) == ["0", "2"] and cap.blocks == []


FED = {"llama": ("model.layers.0.mlp.down_proj", 2), "opt": ("model.decoder.layers.0.fc2", 2),
       "gpt2": ("transformer.h.0.mlp.c_proj", 2), "mistral": ("model.layers.1.mlp.down_proj", 2)}


@pytest.mark.parametrize("family", sorted(FED))
def test_feeders_found_and_permuting_them_keeps_function(family, make_model, batches):
    m = make_model(family)
    cap = sparsecc.capture(m, batches[0])
    consumer, n = FED[family]
    site = cap.sites[consumer]
    assert len(site.feeders) == n
    # attention outputs mix heads and the residual stream feeds everything: never permutable
    assert not any(s.feeders for name, s in cap.sites.items() if "attn" in name or "lm_head" in name)
    with torch.no_grad():
        before = m(batches[0]).logits
        perm = torch.randperm(site.in_features, generator=torch.Generator().manual_seed(0))
        for name, transposed in site.feeders:
            t = m.get_parameter(name).data
            view = t.t() if transposed else t
            view.copy_(view[perm].clone())
        w = site.weight(m)
        w.copy_(w[:, perm].clone())
        after = m(batches[0]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
