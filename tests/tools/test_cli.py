"""The command line on a locally saved model: prune -> checkpoint -> eval, and its errors."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsecc
from sparsecc.tools import cli

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
    from sparsecc.zoo import load_tokens
    tokens, tok = load_tokens(), tiny_zoo[1]
    root = tmp_path_factory.mktemp("text")
    (root / "calib.txt").write_text(tok.decode(tokens.train[:60_000].tolist()))  # WikiText-2, as shipped
    (root / "test.txt").write_text(tok.decode(tokens.test[:16_000].tolist()))
    (root / "short.txt").write_text("too short")
    (root / "recipe.yaml").write_text(RECIPE_YAML)
    (root / "typo.yaml").write_text("default: {method: wanda, sparsty: 0.5}\n")
    return root


def run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors (bad option values) exit from parse_args
        code = e.code
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
    assert {k for k, e in meta["compressed"].items() if e["layout"] == "nm"} == \
        {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    assert "pruned linears" in stdout
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


@pytest.mark.parametrize("whole", [False, True], ids=["onloaded", "whole"])
def test_ctrl_c_during_pruning_leaves_no_output(model_dir, texts, tmp_path, capsys, monkeypatch, whole):
    from sparsecc.passes.transform.prune import ApplyRecipe

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ApplyRecipe, "run", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", out, "--nsamples", 4, "--quiet", *(["--no-onload"] if whole else []))
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def one_line_error(code, err, cmd, match):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"sparsecc {cmd}: error:"), err
    assert re.search(match, err), err


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model fails the test: these errors must come before any work."""
    from sparsecc.tools import local_models

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(local_models, "load_local_model", loaded)


@pytest.mark.parametrize("cmd, extra, match", [
    ("prune", ["--nsamples", 0], "--nsamples.*at least 1"),
    ("prune", ["--batch-size", 0], "--batch-size.*at least 1"),
    ("prune", ["--seqlen", -1], "--seqlen.*at least 2"),
    ("prune", ["--seed", -1], "--seed.*0 or more"),
    ("prune", ["--out", "{tmp}/file.txt/out"], "--out.*file.txt.*not a folder"),
    ("prune", ["--json", "{tmp}"], "--json.*is a folder"),
    ("prune", ["--json", "{tmp}/missing/r.json"], "--json.*missing.*does not exist"),
    ("eval", ["--max-windows", -1], "--max-windows.*0 or more"),
    ("eval", ["--batch-size", 0], "--batch-size.*at least 1"),
    ("eval", ["--seqlen", 1], "--seqlen.*at least 2"),
    ("eval", ["--json", "{tmp}"], "--json.*is a folder"),
])
def test_bad_options_are_refused_before_any_work(cmd, extra, match, model_dir, texts, tmp_path, capsys, no_work):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    extra = [str(a).format(tmp=tmp_path) for a in extra]
    args = ["--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt", "--out", tmp_path / "out"] \
        if cmd == "prune" else ["--text", texts / "test.txt"]
    code, _, err = run(capsys, cmd, model_dir, *args, *extra, "--quiet")
    one_line_error(code, err, cmd, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_prune_refuses_an_unwritable_out_folder_before_any_work(model_dir, texts, tmp_path, capsys, monkeypatch, no_work):
    import os
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()  # tests run as root, where chmod does not stop writes: os.access says no instead
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else access(p, mode, **k))
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", locked / "out", "--quiet")
    one_line_error(code, err, "prune", "--out.*locked.*not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("whole", [False, True], ids=["onloaded", "whole"])
@pytest.mark.parametrize("failing", ["json", "checkpoint"])
def test_a_failing_write_leaves_neither_checkpoint_nor_json(failing, whole, model_dir, texts, tmp_path, capsys,
                                                            monkeypatch):
    import errno
    from sparsecc.io import checkpoint, report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(*((report.Report, "to_json") if failing == "json" else (checkpoint, "write_meta")), full)
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", tmp_path / "out", "--json", tmp_path / "r.json", "--nsamples", 2, "--quiet",
                       *(["--no-onload"] if whole else []))
    one_line_error(code, err, "prune", "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["json is out", "json inside out", "out is the model"])
def test_outputs_that_overlap_are_refused_before_any_work(case, model_dir, texts, tmp_path, capsys, monkeypatch):
    """--json in --out was written into the folder save_pruned replaces whole (the checkpoint stayed,
    the run failed); --out on the model folder replaced the model being pruned."""
    import sparsecc.tools.local_models
    monkeypatch.setattr(sparsecc.tools.local_models, "load_local_model", lambda *a: pytest.fail("loaded before checking"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    json_path, match = {"json is out": (tmp_path / "new", "--json .* lies in --out"),
                        "json inside out": (out / "report.json", "--json .* lies in --out"),
                        "out is the model": (tmp_path / "r.json", "would replace the model being pruned")}[case]
    if case != "json inside out":
        out = {"json is out": tmp_path / "new", "out is the model": model_dir}[case]
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", out, "--overwrite", "--json", json_path, "--nsamples", 2, "--quiet")
    one_line_error(code, err, "prune", match)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_eval_on_text_shorter_than_one_window(model_dir, texts, capsys):
    code, _, err = run(capsys, "eval", model_dir, "--text", texts / "short.txt", "--quiet")
    one_line_error(code, err, "eval", r"short.txt.* \d+ tokens.*one window of 128.*--seqlen")


@pytest.mark.parametrize("cmd", ["prune", "eval"])
def test_seqlen_longer_than_the_context(cmd, model_dir, texts, tmp_path, capsys):
    args = ["--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt", "--out", tmp_path / "out", "--nsamples", 2] \
        if cmd == "prune" else ["--text", texts / "test.txt"]
    code, _, err = run(capsys, cmd, model_dir, *args, "--seqlen", 1000, "--quiet")
    one_line_error(code, err, cmd, "--seqlen 1000.*context of 128.*--seqlen 128")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibration_batches_longer_than_the_context_are_refused(family, make_model):
    model = make_model(family)  # context 64 (gpt2: n_positions, which its config also names max_position_embeddings)
    recipe = {"default": sparsecc.WandaConfig(0.5), "lm_head": None}
    with pytest.raises(sparsecc.CalibrationError, match=r"65 tokens.*context of 64.*seqlen=64"):
        sparsecc.calibrate(model, [torch.randint(0, 128, (1, 65))], recipe)
    sparsecc.calibrate(model, [torch.randint(0, 128, (1, 64))], recipe)


def test_help_and_version_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom sparsecc.tools.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['eval', '--help'], ['bench', '--help'], ['demo', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print('imported:', sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout and f"sparsecc {sparsecc.__version__}" in done.stdout, done.stdout


def test_package_imports_lazily_and_offers_every_name():
    import subprocess
    import sys
    code = ("import sys, types, sparsecc\n"
            "assert 'torch' not in sys.modules\n"
            "assert set(sparsecc.__all__) <= set(dir(sparsecc)) and sparsecc.__version__\n"
            "from sparsecc import Plan, WandaConfig\n"
            "import sparsecc.api \n"
            "assert callable(sparsecc.capture) and not isinstance(sparsecc.capture, types.ModuleType)\n"
            "assert isinstance(sparsecc.prune, types.ModuleType) and all(getattr(sparsecc, n) is not None for n in sparsecc.__all__)\n"
            "assert sparsecc.load_recipe({'default': {'method': 'wanda'}})['default'] == WandaConfig()\n"
            "assert not hasattr(sparsecc, 'no_such_name')\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_bench_only_runs_the_named_scripts_and_reports_failures(capsys, monkeypatch):
    import subprocess
    ran = []

    def fake(cmd, **k):
        ran.append(Path(cmd[1]).name)
        return subprocess.CompletedProcess(cmd, 1 if "nm_linear" in cmd[1] else 0)
    monkeypatch.setattr(subprocess, "run", fake)
    code, _, err = run(capsys, "bench", "--only", "nm_linear,cats_mlp", "--quick")
    one_line_error(code, err, "bench", r"1 of 2 benchmarks failed: nm_linear.py \(exit status 1\)")
    assert ran == ["nm_linear.py", "cats_mlp.py"]
    code, _, err = run(capsys, "bench", "--only", "nm_linea")
    one_line_error(code, err, "bench", "--only.*'nm_linea'.*did you mean 'nm_linear'")
    assert ran == ["nm_linear.py", "cats_mlp.py"]


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(cli.__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                                           if p.name != "results.py"))
def test_bench_scripts_parse_their_options(script):
    import subprocess
    import sys
    path = Path(cli.__file__).resolve().parents[2] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--write-results" in done.stdout, done.stderr


def test_bench_knows_every_benchmark_script():
    scripts = {p.stem for p in (Path(cli.__file__).resolve().parents[2] / "benchmarks").glob("*.py")} - {"results"}
    assert scripts == set(cli._benchmarks(quick=False)) and set(cli.KERNEL_BENCHMARKS) <= scripts


# quant_linear: torch's int4/int8 CPU kernels take x in bf16 (relative error ~3e-3)
@pytest.mark.parametrize("script,tol", [("nm_linear.py", 1e-5), ("cats_mlp.py", 1e-5), ("window_attention.py", 1e-5),
                                        ("moe_ffn.py", 1e-5), ("sparse_linear.py", 1e-5), ("quant_linear.py", 1e-2)])
def test_kernel_benchmarks_run_quick_and_check_their_op(script, tol):
    """The kernel benchmarks' CPU path: each checks the op against a float64 product and prints a
    table whose last column is that relative error."""
    import os
    import subprocess
    import sys
    path = Path(cli.__file__).resolve().parents[2] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--quick", "--device", "cpu", "--reps", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    rows = [r for r in done.stdout.splitlines() if re.match(r"\| ([0-9]|prefill|decode)", r)]
    assert rows and all(float(r.split("|")[-2]) < tol for r in rows), done.stdout
    assert len(rows) == len(set(rows)), done.stdout  # each table printed once


def test_demo_runs_offline_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    """The README's main job: the shipped tiny model, pruned and compiled; dense vs pruned on held-out windows."""
    import sparsecc.zoo.corpus as corpus_mod
    monkeypatch.setattr(corpus_mod, "load_corpus", lambda *a, **k: pytest.fail("the demo must not read the corpus"))
    code, out, err = run(capsys, "demo", "--nsamples", 8, "--eval-windows", 16, "--json", tmp_path / "demo.json")
    assert code == 0, err
    result = json.loads((tmp_path / "demo.json").read_text())
    assert "sparsegpt 50% (compiled)" in out and "16 windows of 128 tokens" in out
    assert result["dense_ppl"] < result["pruned_ppl"] < 1.15 * result["dense_ppl"]
    assert result["model"]["variant"] == "tiny" and abs(result["report"]["overall_sparsity"] - 0.5) < 1e-6


@pytest.mark.parametrize("argv, match", [(["--sparsity", "1.5"], "sparsity must be in"),
                                         (["--pattern", "4:2"], "needs 0 < N < M"),
                                         (["--method", "wanda", "--bits", "4"], "use --method sparsegpt"),
                                         (["--bits", "4", "--group-size", "0"], "must be at least 1"),
                                         (["--bits", "5"], "invalid choice")])
def test_demo_refuses_bad_values_before_any_work(argv, match, capsys, monkeypatch):
    import sparsecc.zoo
    monkeypatch.setattr(sparsecc.zoo, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    code, _, err = run(capsys, "demo", *argv)
    assert code == 2 and re.search(match, err) and err.count("\n") == 1, err


def test_prune_onloads_by_default_and_equals_the_whole_model_run(model_dir, texts, tmp_path, capsys):
    args = ["--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt", "--nsamples", 4, "--quiet"]
    code, stdout, err = run(capsys, "prune", model_dir, "--out", tmp_path / "blocks", "--json", tmp_path / "r.json",
                            "--max-memory", "1GiB", *args)
    assert code == 0, err
    assert "wrote" in stdout and json.loads((tmp_path / "r.json").read_text())["rows"]
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "whole", "--no-onload", *args)
    assert code == 0, err
    blocks, whole = (json.loads((tmp_path / d / "sparsecc.json").read_text()) for d in ("blocks", "whole"))
    assert (blocks["format"], whole["format"]) == (3, 2)  # split by block, or one file per kind
    assert {k: v for t in blocks["sha256"].values() for k, v in t.items()} == \
        {k: v for t in whole["sha256"].values() for k, v in t.items()}


def test_max_memory_refuses_the_whole_model_but_not_onloading(model_dir, texts, tmp_path, capsys):
    args = ["--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt", "--nsamples", 2, "--quiet",
            "--max-memory", "10MB"]  # the tiny model: 3.7 MB of parameters (most in its embeddings)
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "whole", "--no-onload", *args)
    one_line_error(code, err, "prune", r"pruning the whole model needs ~.* more than --max-memory .*leave out --no-onload")
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "tight", "--max-memory", "10kB", *args[:-2])
    one_line_error(code, err, "prune", r"block by block needs ~.* MiB at its peak")
    assert list(tmp_path.iterdir()) == []
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "blocks", *args)
    assert code == 0, err


def test_a_recipe_needing_the_whole_model_falls_back_to_loading_it(model_dir, texts, tmp_path, capsys):
    (tmp_path / "bonsai.yaml").write_text('"re:.*mlp$": {method: StructuredConfig, sparsity: 0.5, score: bonsai, '
                                          'samples: 4}\n')
    code, stdout, err = run(capsys, "prune", model_dir, "--recipe", tmp_path / "bonsai.yaml", "--calib",
                            texts / "calib.txt", "--out", tmp_path / "out", "--nsamples", 2, "--quiet")
    assert code == 0, err
    assert "loading the whole model (StructuredConfig(score='bonsai') (collect_unit_relevance) cannot run block by " \
           "block (its relevance takes forwards of the whole model per sample))\n" in err and "wrote" in stdout


def test_torchrun_two_processes_write_the_one_process_checkpoint(model_dir, texts, tmp_path):
    """`torchrun --nproc_per_node=2 -m sparsecc prune`: gloo ranks share the calibration, rank 0 writes."""
    import os
    import subprocess
    import sys
    args = ["prune", str(model_dir), "--recipe", str(texts / "recipe.yaml"), "--calib", str(texts / "calib.txt"),
            "--nsamples", "4", "--seqlen", "64", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the ranks' matmuls bit for bit as the single run's
    one = subprocess.run([sys.executable, "-m", "sparsecc", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "sparsecc", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote") == 1  # rank 0 reports
    a, b = (json.loads((tmp_path / d / "sparsecc.json").read_text()) for d in ("one", "two"))
    assert {k: v for t in a["sha256"].values() for k, v in t.items()} == \
        {k: v for t in b["sha256"].values() for k, v in t.items()}


def test_activations_on_disk_give_the_default_checkpoint(model_dir, texts, tmp_path, capsys):
    args = ["--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt", "--nsamples", 4, "--quiet"]
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "memory", *args)
    assert code == 0, err
    code, _, err = run(capsys, "prune", model_dir, "--out", tmp_path / "disk", "--activations", "disk",
                       "--offload-folder", tmp_path / "offload", *args)
    assert code == 0, err
    assert list((tmp_path / "offload").iterdir()) == []
    memory, disk = (json.loads((tmp_path / d / "sparsecc.json").read_text())["sha256"] for d in ("memory", "disk"))
    assert memory == disk


@pytest.mark.parametrize("extra, match", [
    (["--offload-folder", "off"], r"--offload-folder is where --activations disk writes"),
    (["--activations", "bf16", "--no-onload"], r"--activations bf16 applies to onloading .*--no-onload turns off"),
    (["--activations", "ram"], r"invalid choice: 'ram'"),
    (["--device", "cuda", "--save-plan"], r"--device cuda applies to onloading .*--save-plan turns off")])
def test_bad_activation_options_are_refused(extra, match, model_dir, texts, tmp_path, capsys):
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", tmp_path / "out", *extra)
    assert code == 2 and re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_finetune_keeps_the_checkpoints_zeros_and_reports_held_out_perplexity(model_dir, texts, tmp_path, capsys):
    pruned, out = tmp_path / "pruned", tmp_path / "ft"
    code, _, err = run(capsys, "prune", model_dir, "--recipe", texts / "recipe.yaml", "--calib", texts / "calib.txt",
                       "--out", pruned, "--nsamples", 8, "--quiet", "--compress")
    assert code == 0, err
    code, stdout, err = run(capsys, "finetune", pruned, "--text", texts / "calib.txt", "--eval-text", texts / "test.txt",
                            "--out", out, "--steps", 4, "--seqlen", 64, "--batch-size", 4, "--teacher", model_dir,
                            "--quiet", "--json", tmp_path / "ft.json")
    assert code == 0, err
    assert "held-out perplexity" in stdout and "distilled" in stdout
    before, _ = sparsecc.load_pruned(pruned)
    after, meta = sparsecc.load_pruned(out)  # load_pruned checks every weight against its mask
    assert meta["compressed"] and meta["setup"]["finetune"]["steps"] == 4
    changed = 0
    for (n, a), b in zip(after.named_parameters(), before.parameters()):
        if n.endswith("proj.weight"):
            assert torch.equal(a == 0, b == 0), n
            changed += not torch.equal(a, b)
    assert changed == 14
    report = json.loads((tmp_path / "ft.json").read_text())["finetune"]
    assert report["eval_after"]["tokens"] > 0 and len(report["losses"]) == 4


def test_finetune_refuses_bad_input_in_one_line_and_writes_nothing(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", model_dir, "--text", texts / "calib.txt", "--out", out, "--steps", 2, "--quiet")
    one_line_error(code, err, "finetune", "nothing pruned.*allow_dense")
    code, _, err = run(capsys, "finetune", model_dir, "--text", texts / "short.txt", "--out", out, "--quiet")
    one_line_error(code, err, "finetune", "--text.*fewer than one window of 128")
    code, _, err = run(capsys, "finetune", model_dir, "--text", texts / "calib.txt", "--out", out, "--temperature", 3)
    one_line_error(code, err, "finetune", "--temperature.*--teacher")
    code, _, err = run(capsys, "finetune", model_dir, "--text", texts / "calib.txt", "--out", out, "--steps", 0)
    assert code == 2 and "--steps" in err
    assert not out.exists()
