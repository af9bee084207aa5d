#!/usr/bin/env bash
# The first run on a GPU machine, as one command from the project root (about 9 minutes at most):
#
#     OUT=/some/folder bash benchmarks/gpu.sh      # OUT unset: ./gpu-out
#     bash benchmarks/gpu.sh --dry-run             # the same steps in a tiny form, on any machine (CPU)
#
# Steps: install sparsecc (pip --no-deps --no-index: nothing is fetched), versions and the GPU,
# the kernel tests on the device (tests/codegen with TRITON_INTERPRET=0, gpu-marked tests
# included; onloading on the GPU), then the six kernel benchmarks through `sparsecc bench --only NAME --write-results`.
# Every step has a time limit within the budget (GPU_SH_BUDGET seconds, default 540) and its
# output in a log; a failing step is recorded in summary.txt and the next one still runs. OUT gets,
# flat (the device machine returns at most 8 files): summary.txt, setup.log, tests.log, tests.xml,
# bench.log, RESULTS.md (benchmarks/RESULTS.md with the new sections) and autotune.json (the launch
# configs the kernels chose). Exit status: 0 when every step passed.
# --dry-run installs nothing, only collects the tests, prints the benchmark commands and runs one
# benchmark --quick without --write-results (tests/test_gpu_script.py runs it).
set -u
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_SH_BUDGET:-540}
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # if pip fails sparsecc still imports (backend="sparsecc" needs the install)
export SPARSECC_CACHE=$OUT/.cache  # the autotuner's choices land here (copied to autotune.json)
FAILED=0
echo "benchmarks/gpu.sh${DRY:+ --dry-run} $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$SUMMARY"

# step NAME LIMIT LOG COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget runs out),
# its output to the terminal and to LOG; record exit status and time in the summary.
step() {
    local name=$1 cap=$2 log=$3 note=""
    shift 3
    local left=$((BUDGET - SECONDS - 15))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        echo "$name: skipped, the ${BUDGET}s budget is spent" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    local cmd="$*"
    echo "== $name (at most ${limit}s): ${cmd%%$'\n'*}" | tee -a "$log"  # a command's first line
    local t0=$SECONDS
    # SIGINT first: pytest then still prints its summary and writes tests.xml
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && note=" (stopped at the ${limit}s limit)"
    printf '%-26s exit %3d  %4ds%s\n' "$name" "$rc" $((SECONDS - t0)) "$note" | tee -a "$SUMMARY"
    ((rc == 0)) || FAILED=1
}

# 1. install and describe the machine
if [ -n "$DRY" ]; then
    echo "(dry run) skipped: python -m pip install -q --no-deps --no-index --no-build-isolation -e ." | tee "$OUT/setup.log"
else
    step install 120 "$OUT/setup.log" python -m pip install -q --no-deps --no-index --no-build-isolation -e .
fi
step versions 60 "$OUT/setup.log" python -c "
import platform, sys
print('python', sys.version.split()[0], platform.platform())
for name in ('torch', 'triton', 'transformers', 'hypothesis', 'pytest', 'sparsecc'):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, 'unavailable:', e)
import torch
gpu = torch.cuda.is_available()
print('CUDA', torch.version.cuda, '| device:', torch.cuda.get_device_name() if gpu else 'none')
sys.exit(0 if gpu or '$DRY' else 'no CUDA device: the steps below run on the CPU')"
{ nvidia-smi || echo "nvidia-smi: not available"; } 2>&1 | tee -a "$OUT/setup.log"

# 2. the kernel tests on the device (pyproject's addopts deselect only `slow`; name gpu explicitly), and
#    onloading on the GPU (each block read to the device and pruned there: issue 16)
tests=(python -m pytest tests/codegen tests/io/test_onload.py::test_onloading_on_the_gpu_matches_the_cpu_and_fits_its_estimate
       -m "not slow or gpu" -q -p no:cacheprovider)
if [ -n "$DRY" ]; then
    step tests 60 "$OUT/tests.log" env TRITON_INTERPRET=0 "${tests[@]}" --collect-only
else
    step tests 180 "$OUT/tests.log" env TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=ci "${tests[@]}" \
        --durations=15 --junitxml="$OUT/tests.xml"
fi

# 3. the kernel benchmarks, each with its own limit; RESULTS.md copied after each
for spec in nm_linear:75 quant_linear:60 cats_mlp:55 window_attention:55 moe_ffn:45 sparse_linear:35; do
    name=${spec%%:*}
    if [ -n "$DRY" ]; then
        step "bench $name" 30 "$OUT/bench.log" python -m sparsecc bench --only "$name" --write-results --dry-run
    else
        step "bench $name" "${spec##*:}" "$OUT/bench.log" python -m sparsecc bench --only "$name" --write-results
        cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    fi
done
[ -n "$DRY" ] && step "bench nm_linear --quick" 60 "$OUT/bench.log" python -m sparsecc bench --only nm_linear --quick

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
[ -f "$SPARSECC_CACHE/autotune.json" ] && cp "$SPARSECC_CACHE/autotune.json" "$OUT/autotune.json"
rm -rf "$SPARSECC_CACHE"
echo "total ${SECONDS}s; $( ((FAILED)) && echo 'some steps FAILED' || echo 'every step passed'); files in $OUT" | tee -a "$SUMMARY"
exit $FAILED
