#!/usr/bin/env bash
# The one GPU check, about 10 minutes on one H100/H200: install fastdiff into the machine's
# Python, run the test suite on CUDA, run the benchmark suite, write and print the results.
#
#   bash benchmarks/gpu_check.sh                      # from anywhere; runs in the repo root
#   TOTAL_S=620 PRECOMPILE_S=120 TESTS_S=240 bash benchmarks/gpu_check.sh  # time caps in seconds:
#                                                     # the whole script, the ahead-of-time kernel
#                                                     # compile, the tests; benchmarks get the rest
#   ALLOW_CPU=1 SKIP_INSTALL=1 TESTS=tests/test_bench.py BENCH_ARGS=--bench-quick bash benchmarks/gpu_check.sh
#                                                     # a dry run of this script on a CPU machine
#
# diffusers is not on the GPU image: carry its wheels in .whl/ (the device README's
# `pip download` recipe: diffusers==0.42.1 and importlib_metadata); they install into
# /tmp/site. Writes benchmarks/results/<date>-<gpu>.{json,md,png}; if $OUT is set, copies
# them there with the logs (only $OUT comes back from the device machine). The short
# table of targets and loops is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PRECOMPILE_S=${PRECOMPILE_S:-120}
TESTS_S=${TESTS_S:-240}
TOTAL_S=${TOTAL_S:-620}
# the files whose code only a GPU really runs come first (pytest drops the repeats), so a
# time cap still leaves their verdicts
TESTS=${TESTS:-tests/test_graph.py tests/test_backend_triton.py tests/test_kernel_affine_step.py \
tests/test_kernel_forward_noise.py tests/test_kernel_schedule.py tests/test_rng.py \
tests/test_sampler_api.py tests}
BENCH_ARGS=${BENCH_ARGS:-}
LOGS=${OUT:-/tmp/fastdiff-gpu-check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
start=$SECONDS
phase() { echo; echo "== gpu_check: $1 (at $((SECONDS - start)) s)"; }

phase "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "gpu_check: the carried wheels in .whl/ did not install"
fi
if [ -z "${SKIP_INSTALL:-}" ] && ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1; then
    # no editable install: lay this copy out as installed (fastdiff.kernels is the kernels/
    # folder); the repo root is first on sys.path for `python -` and `python -m pytest`
    echo "gpu_check: pip install -e . failed (see install.log); linking fastdiff/kernels -> ../kernels"
    [ -e fastdiff/kernels ] || ln -s ../kernels fastdiff/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
ALLOW_CPU=${ALLOW_CPU:-} "$PY" - <<'EOF' || { echo "gpu_check: fastdiff or torch is not usable here"; exit 1; }
import os, sys, torch, triton, fastdiff, fastdiff.kernels
try:
    import diffusers; dv = diffusers.__version__
except ImportError:
    dv = "MISSING (carry the wheels in .whl/): the diffusers cases will be skipped"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, diffusers {dv}")
assert torch.cuda.is_available() or os.environ["ALLOW_CPU"], "no CUDA device (ALLOW_CPU=1 for a dry run)"
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "| fastdiff from", fastdiff.__file__)
EOF

# Kernels compile on first launch: with a cold Triton cache the suite compiles 150-250
# variants one after another. A compile here took 0.6-1.1 s per variant and arch (sm_90: ~0.9)
# on an idle 2-core EPYC: ~200 x 0.9 = ~180 s, the whole former 180 s test cap. So the
# library's own variants (fastdiff.kernel_compile --full: every solver x option x dtype path,
# a few hundred variants) are compiled first into the same cache, one process per core:
# ~300 x 0.9 s / 16 = ~20 s, plus the sweep's run in the interpreter (~4000 tiny sampler
# runs, ~0.1 s each, /16 = ~25 s): cap 120 s. The tests' own shapes still specialize variants
# the sweep has not (B or N equal to 1 or divisible by 16, other BLOCKs): up to ~100 compiles,
# ~90 s, on top of the suite's run, hence a 240 s test cap (the pre-compile is not required:
# if it fails or is cut, the tests compile what they need, as before).
arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
print(10 * c[0] + c[1])" 2>/dev/null || echo 90)
phase "kernels: compile ahead for sm_$arch, $(nproc) jobs (cap ${PRECOMPILE_S} s)"
timeout -s INT -k 10 "$PRECOMPILE_S" "$PY" -m fastdiff.kernel_compile --full --arch "$arch" --jobs "$(nproc)" \
    --json "$LOGS/kernel-compile.json" >"$LOGS/kernel-compile.log" 2>&1
echo "kernel_compile: exit $? ($(head -n 1 "$LOGS/kernel-compile.log"))"

phase "tests (cap ${TESTS_S} s)"
per_test=""
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=120"
timeout -s INT -k 15 "$TESTS_S" "$PY" -m pytest $TESTS -q --maxfail=10 $per_test -p no:cacheprovider \
    >"$LOGS/tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -n 12
tail -n 3 "$LOGS/tests.log"
case $tests_rc in
    0) tests_line="tests: passed ($TESTS: $(tail -n 1 "$LOGS/tests.log"))" ;;
    124|130|137) tests_line="tests: STOPPED at the ${TESTS_S} s cap ($(tail -n 1 "$LOGS/tests.log"))" ;;
    *) tests_line="tests: FAILED, exit $tests_rc ($(tail -n 1 "$LOGS/tests.log"))" ;;
esac

BENCH_S=$(( TOTAL_S - (SECONDS - start) - 20 ))  # what is left, less the report's time
[ "$BENCH_S" -lt 150 ] && BENCH_S=150
phase "benchmarks (cap ${BENCH_S} s)"
slug=$("$PY" -c "import re, torch; c = torch.cuda.is_available()
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if c else 'cpu')")
results="benchmarks/results/$(date +%F)-$slug.json"
case " $BENCH_ARGS " in *" --bench-quick "*) results="$LOGS/quick-$slug.json" ;; esac  # not a measurement
# cases that would start in the last 70 s are skipped (visibly), so the run ends and writes its results
timeout -s INT -k 30 "$BENCH_S" "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --bench-out "$results" --bench-budget $((BENCH_S - 70)) \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name $BENCH_ARGS >"$LOGS/bench.log" 2>&1
bench_rc=$?
grep -E "passed|failed|error|SKIPPED.*budget" "$LOGS/bench.log" | tail -n 5

phase "report"
if [ -f "$results" ]; then
    "$PY" benchmarks/report.py "$results" --print >"$LOGS/summary.txt" 2>&1
    stem=${results%.json}
    if [ -n "${OUT:-}" ] && [ "$(dirname "$results")" != "$OUT" ]; then
        cp "$stem.json" "$stem.md" "$OUT/" 2>/dev/null
        [ -f "$stem.png" ] && cp "$stem.png" "$OUT/"
    fi
    echo "wrote $stem.json, .md, .png (exit status of the benchmark run: $bench_rc)"
else
    echo "gpu_check: no results file ($results); the end of bench.log:"
    tail -n 30 "$LOGS/bench.log"
fi

echo
echo "== gpu_check: done in $((SECONDS - start)) s; logs in $LOGS"
echo "$tests_line"
[ -f "$LOGS/summary.txt" ] && sed -n '2,$p' "$LOGS/summary.txt"
[ "$tests_rc" -eq 0 ] && [ -f "$results" ]
