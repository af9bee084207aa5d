"""benchmarks/e2e.py, the end-to-end benchmark of the user's path, in its --quick form on two rows:
both tables come out with their columns and finite positive figures, and nothing is written."""
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "e2e.py"
COLUMNS = ["technique", "run", "prepare s", "compile s (graphs)", "prefill tok/s", "vs dense", "decode b1 tok/s",
           "vs dense", "decode b8 tok/s", "vs dense", "peak MB", "checkpoint MB", "vs dense", "perplexity"]


def _run(*argv, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_quick_two_rows_give_both_tables_with_positive_figures():
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    png = ROOT / "benchmarks" / "e2e.png"
    stamp = png.stat().st_mtime_ns if png.exists() else None
    done = _run("--quick", "--rows", "dense,wanda24", "--reps", "1", "--threads", "1")  # 1: steady on a shared CPU
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("| technique |")]
    assert len(headers) == 2, done.stdout  # the ref (tiny) model, then the random Llama
    for model, i in zip(("ref", "random"), headers):
        assert [c.strip() for c in lines[i].strip("|").split("|")] == COLUMNS
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[i + 2:i + 4]]
        assert [r[0] for r in rows] == ["dense", "Wanda 2:4, packed N:M"], rows
        for r in rows:
            assert r[1] == "eager" and "error" not in " ".join(r), r
            figures = [r[4], r[6], r[8], r[10], r[11]] + ([r[13]] if model == "ref" else [])
            assert all(math.isfinite(float(v)) and float(v) > 0 for v in figures), r
            assert all(v.endswith("x") and float(v[:-1]) > 0 for v in (r[5], r[7], r[9], r[12])), r
            assert model == "ref" or r[13] == "-", r
        assert rows[0][5] == rows[0][12] == "1.00x"
        assert float(rows[1][12][:-1]) < 1  # the compressed 2:4 checkpoint is smaller than the dense one
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == results
    assert (png.stat().st_mtime_ns if png.exists() else None) == stamp  # no plot without --write-results


def test_bad_arguments_fail_in_one_line():
    done = _run("--rows", "dense,wanda5O", timeout=120)
    assert done.returncode == 2 and "did you mean 'wanda50'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
