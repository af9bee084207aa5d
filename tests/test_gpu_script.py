"""benchmarks/gpu.sh, the prepared first run on a GPU machine, kept from rotting: its --dry-run runs
the same steps in a tiny form on this machine (~30 s)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_leaves_results_and_logs_in_out(tmp_path):
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("TRITON_INTERPRET", None)  # the script sets what each step needs
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"RESULTS.md", "summary.txt", "setup.log", "tests.log", "bench.log"} <= set(files), files
    # what the device machine returns: at most 8 plain files, named in letters, digits, . _ -
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all((tmp_path / "out" / f).is_file() for f in files), files
    summary = (tmp_path / "out" / "summary.txt").read_text()
    steps = re.findall(r"^(.+?)\s+exit\s+(\d+)", summary, re.M)
    assert [s for s, _ in steps] == ["versions", "tests", *(f"bench {k}" for k in (
        "nm_linear", "quant_linear", "cats_mlp", "window_attention", "moe_ffn", "sparse_linear")),
        "bench nm_linear --quick"], summary
    assert all(code == "0" for _, code in steps) and "every step passed" in summary, summary
    assert re.search(r"\d+ tests? collected", (tmp_path / "out" / "tests.log").read_text())
    assert "| rel. error |" in (tmp_path / "out" / "bench.log").read_text()  # the quick benchmark ran
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == results  # a dry run writes no results


def test_every_kernel_benchmark_runs_within_the_budget():
    """gpu.sh runs each of the CLI's kernel benchmarks, and the time limits of the tests and the
    benchmarks leave the first steps (install, versions: seconds in practice) 30 s of the budget."""
    from sparsecc.tools.cli import KERNEL_BENCHMARKS
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    specs = dict(re.findall(r"(\w+):(\d+)", re.search(r"^for spec in (.+); do$", script, re.M).group(1)))
    assert sorted(specs) == sorted(KERNEL_BENCHMARKS), specs
    budget = int(re.search(r"BUDGET=\$\{GPU_SH_BUDGET:-(\d+)\}", script).group(1))
    tests = int(re.search(r'step tests (\d+) "\$OUT/tests.log" env TRITON_INTERPRET=0 HYPOTHESIS', script).group(1))
    assert tests + sum(map(int, specs.values())) <= budget - 30, (tests, specs, budget)
