"""Recipes: exact names, prefixes, regexes, default, None to skip; typos are errors with hints."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.techniques.targeting import resolve

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "lm_head"]
A, B = sparsecc.MagnitudeConfig(0.5), sparsecc.MagnitudeConfig(0.7)


def r(recipe):
    return resolve(recipe, {"linear": NAMES})


def test_exact_regex_default_and_skip():
    got = r({"re:.*up_proj": A, "model.layers.1.mlp.up_proj": B, "default": A, "lm_head": None})
    assert got == {"model.layers.1.mlp.up_proj": B, "model.layers.0.mlp.up_proj": A,
                   "model.layers.0.self_attn.q_proj": A}


def test_prefix_names_cover_submodules():
    assert set(r({"model.layers.0": A})) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}


def test_single_config_is_default():
    assert set(r(A)) == set(NAMES)


def test_typo_suggests_nearest():
    with pytest.raises(sparsecc.RecipeError, match="'lm_haed' matches no linear module.*lm_head"):
        r({"lm_haed": None})
    with pytest.raises(sparsecc.RecipeError, match="matches no linear module"):
        r({"re:.*mlpp.*": A})


def test_bad_values():
    with pytest.raises(sparsecc.RecipeError, match="valid regex"):
        r({"re:(": A})
    with pytest.raises(sparsecc.RecipeError, match="config or None"):
        r({"lm_head": 0.5})
    with pytest.raises(sparsecc.RecipeError, match="dict"):
        r(["lm_head"])


def test_config_json_round_trip_and_typos():
    for cfg in (A, sparsecc.MagnitudeConfig(pattern="2:4", group="output")):
        assert sparsecc.config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(sparsecc.RecipeError, match="did you mean 'MagnitudeConfig'"):
        sparsecc.config_from_dict({"type": "MagnitudeConfg"})
    with pytest.raises(sparsecc.RecipeError, match="did you mean 'sparsity'"):
        sparsecc.config_from_dict({"type": "MagnitudeConfig", "sparsty": 0.5})


@given(keys=st.lists(st.sampled_from(NAMES + ["re:.*proj", "re:model\\..*", "default"]), min_size=1, max_size=4, unique=True),
       skip=st.booleans())
def test_resolution_properties(keys, skip):
    recipe = {k: (None if skip and i == 0 else sparsecc.MagnitudeConfig(0.1 * (i + 1))) for i, k in enumerate(keys)}
    got = r(recipe)
    assert set(got) <= set(NAMES)
    for name, cfg in got.items():
        exact = [k for k in keys if k == name]
        if exact:
            assert cfg is recipe[exact[0]]  # an exact name always wins
    if skip and keys[0] in NAMES:
        assert keys[0] not in got
