"""Recipe files and dicts: YAML/JSON/TOML round trips, errors that point at the key, fuzzing."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.io.recipes import dump_recipe, load_recipe, parse_recipe

EXPECTED = {"default": sparsecc.SparseGPTConfig(sparsity=0.5), "lm_head": None,
            "re:.*mlp\\..*": sparsecc.WandaConfig(pattern="2:4")}

FILES = {
    "r.yaml": 'default: {method: sparsegpt, sparsity: 0.5}\nlm_head: null\n"re:.*mlp\\\\..*": {method: wanda, pattern: "2:4"}\n',
    "r.json": json.dumps({"default": {"method": "sparsegpt", "sparsity": 0.5}, "lm_head": None,
                          "re:.*mlp\\..*": {"method": "WandaConfig", "pattern": "2:4"}}),
    "r.toml": 'lm_head = "skip"\n[default]\nmethod = "sparsegpt"\nsparsity = 0.5\n'
              '["re:.*mlp\\\\..*"]\nmethod = "wanda"\npattern = "2:4"\n',
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_format_gives_the_same_recipe(name, tmp_path):
    path = tmp_path / name
    path.write_text(FILES[name])
    assert load_recipe(path) == EXPECTED


def test_dump_round_trips():
    assert load_recipe(json.loads(json.dumps(dump_recipe(EXPECTED)))) == EXPECTED


@pytest.mark.parametrize("data, match", [
    ({"default": {"method": "wandaa"}}, r"recipe\['default'\]: unknown method 'wandaa'; did you mean 'wanda'"),
    ({"default": {"method": "wanda", "sparsty": 0.5}}, r"recipe\['default'\].*no field 'sparsty'; did you mean 'sparsity'"),
    ({"default": {"sparsity": 0.5}}, r"recipe\['default'\]: missing 'method'"),
    ({"default": {"method": "wanda", "sparsity": 1.0}}, r"recipe\['default'\].*sparsity"),
    ({"default": {"method": "wanda", "pattern": "4:2"}}, r"recipe\['default'\]: pattern '4:2' needs 0 < N < M"),
    ({"re:(": {"method": "wanda"}}, r"not a valid regex"),
    ({"default": "wanda"}, r"recipe\['default'\]: 'wanda' is neither a config nor 'skip'"),
    ({"default": 3}, r"recipe\['default'\]: expected a mapping"),
    ({}, r"non-empty mapping"),
    ([1, 2], r"non-empty mapping"),
])
def test_errors_name_the_key_and_suggest(data, match):
    with pytest.raises(sparsecc.RecipeError, match=match):
        parse_recipe(data)


@pytest.mark.parametrize("name, text, match", [
    ("missing.yaml", None, "does not exist"),
    ("r.txt", "{}", "unknown suffix"),
    ("bad.yaml", "default: {method: wanda\n", "bad.yaml.*not valid YAML"),
    ("bad.toml", "default = [\n", "not valid TOML"),
    ("evil.yaml", "default: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),  # safe_load refuses tags
])
def test_file_errors(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(sparsecc.RecipeError, match=match):
        load_recipe(tmp_path / name)


plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                     max_leaves=8)
fields = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["magnitude", "wanda", "sparsegpt", "obs", "WandaConfig", "wand", "x"]) | plain,
    "sparsity": st.floats(-1, 2) | plain, "pattern": st.sampled_from(["2:4", "4:8", "3:2", "0:4", "a:b"]) | plain,
    "group": st.sampled_from(["layer", "output", "row"]) | plain, "permute": st.booleans() | plain,
    "layerwise": st.sampled_from([None, "owl", "OWL"]) | plain, "blocksize": st.integers(-2, 256) | plain,
    "damp": st.floats(-1, 1) | plain, "sparsty": plain})


@given(st.dictionaries(st.sampled_from(["default", "lm_head", "re:.*", "re:(", "", "model.layers.0"]),
                       fields | plain, max_size=4) | plain)
def test_fuzz_parse_gives_a_recipe_or_a_recipe_error(data):
    try:
        recipe = parse_recipe(data)
    except sparsecc.RecipeError:
        return
    for key, cfg in recipe.items():
        assert isinstance(key, str) and (cfg is None or isinstance(cfg, sparsecc.SparsityConfig))
    assert load_recipe(dump_recipe(recipe)) == recipe
