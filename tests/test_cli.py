"""The command line on a locally saved model: prune -> checkpoint -> eval, and its errors."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsecc
from sparsecc import cli

RECIPE_YAML = 'default: {method: wanda, sparsity: 0.5}\nlm_head: null\n"re:.*mlp\\\\.down_proj": {method: sparsegpt, pattern: "2:4"}\n'


@pytest.fixture(scope="module")
def model_dir(tiny_zoo, tmp_path_factory):
    model, tok, _, _ = tiny_zoo
    path = tmp_path_factory.mktemp("cli") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts(tiny_zoo, tmp_path_factory):
    from sparsecc.zoo import load_corpus
    corpus = load_corpus()
    root = tmp_path_factory.mktemp("text")
    (root / "calib.txt").write_text(corpus.train_text[:200_000])
    (root / "test.txt").write_text(corpus.test_text[:60_000])
    (root / "short.txt").write_text("too short")
    (root / "recipe.yaml").write_text(RECIPE_YAML)
    (root / "typo.yaml").write_text("default: {method: wanda, sparsty: 0.5}\n")
    return root


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_then_eval(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                            "--out", out, "--nsamples", 8, "--quiet", "--compress", "--save-plan", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "down_proj" in stdout and "wrote" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["rows"]) == 14 and report["setup"]["nsamples"] == 8
    loaded, meta = sparsecc.load_pruned(out)
    assert set(meta["compressed"]) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    w = loaded.get_parameter("model.layers.0.mlp.down_proj.weight")
    assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).clamp(max=2), (w.reshape(w.shape[0], -1, 4) != 0).sum(-1))
    assert (out / "tokenizer.json").is_file()
    dense = type(loaded)(loaded.config)
    dense.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    sparsecc.sparsify_(dense, sparsecc.Plan.load(out / "plan"))  # the kept plan reproduces the checkpoint
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in dense.state_dict().items())

    code, dense_out, err = run(capsys, "eval", model_dir, "--text", texts / "test.txt", "--quiet", "--json", tmp_path / "d.json")
    assert code == 0, err
    code, pruned_out, err = run(capsys, "eval", out, "--text", texts / "test.txt", "--quiet", "--json", tmp_path / "p.json")
    assert code == 0, err
    dense, pruned = (json.loads((tmp_path / f).read_text())["perplexity"] for f in ("d.json", "p.json"))
    assert dense < pruned < 1.5 * dense


@pytest.mark.parametrize("case, match", [
    ("typo", "sparsty.*did you mean 'sparsity'"),
    ("short", "too short"),
    ("exists", "already exists.*--overwrite"),
    ("no model", "does not exist"),
    ("no tokenizer", "holds no tokenizer.*--tokenizer"),
])
def test_errors_are_one_line_and_write_nothing(case, match, model_dir, texts, tmp_path, capsys):
    out = tmp_path / "out"
    recipe, calib, model = texts / "recipe.yaml", texts / "calib.txt", model_dir
    if case == "typo":
        recipe = texts / "typo.yaml"
    elif case == "short":
        calib = texts / "short.txt"
    elif case == "exists":
        out.mkdir()
    elif case == "no model":
        model = tmp_path / "missing"
    elif case == "no tokenizer":
        model = tmp_path / "bare"
        from transformers import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained(model_dir).save_pretrained(model)
    code, _, err = run(capsys, "prune", model, "--recipe", recipe, "--calib", calib, "--out", out, "--nsamples", 4, "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sparsecc prune: error:")
    assert re.search(match, err), err
    assert out.exists() == (case == "exists")
    if case == "exists":
        assert list(out.iterdir()) == []


def test_ctrl_c_during_pruning_leaves_no_output(model_dir, texts, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sparsecc, "sparsify_", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", out, "--nsamples", 4, "--quiet")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(cli.__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                                           if p.name != "results.py"))
def test_bench_scripts_parse_their_options(script):
    import subprocess
    import sys
    path = Path(cli.__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--write-results" in done.stdout, done.stderr


@pytest.mark.parametrize("script", ["nm_linear.py", "cats_mlp.py", "window_attention.py", "moe_ffn.py", "sparse_linear.py"])
def test_kernel_benchmarks_run_quick_and_check_their_op(script):
    """The kernel benchmarks' CPU path: each checks the op against a float64 product and prints a
    table whose last column is that relative error."""
    import os
    import subprocess
    import sys
    path = Path(cli.__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--quick", "--device", "cpu", "--reps", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    rows = [r for r in done.stdout.splitlines() if re.match(r"\| ([0-9]|prefill|decode)", r)]
    assert rows and all(float(r.split("|")[-2]) < 1e-5 for r in rows), done.stdout
