#!/usr/bin/env bash
# The single script a lent GPU machine runs (H100/H200; its own python3 with torch 2.11 and
# triton 3.6, no open_clip, no network), from a copy of this repository:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT (default ./runs/gpu_check)
#
# Before that one call, on the build machine: `make gpu-wheels` (Inf-CL and open_clip into
# .whl/, which git ignores, so the call names it: carry [".whl"]) and `git rev-parse HEAD > .git_sha`
# (the copy travels without .git; untracked files that git does not ignore travel with it).
# Afterwards commit $OUT's JSON and PNG under benchmarks/results/ (named after the card).
#
# Stages, each under its own `timeout`, each logged; a failing stage never stops the next:
#   1. carried wheels in .whl/ installed into /tmp/site (PYTHONPATH), if any
#   2. the CUDA extension built in place for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16)
#   3. python3 -m ace_kernels.info
#   4. the GPU tests: pytest -m "gpu or triton" over tests/, test_compile.py last (collection
#      errors of modules that need packages missing there do not stop the others)
#   5. the benchmark suite on the GPU shapes, writing its JSON after every configuration and
#      skipping what no longer fits the time left (--time-budget); the PNG is drawn from the
#      JSON even when the suite itself was cut off
# The whole script stays inside GPU_CHECK_BUDGET seconds (default 465: 8 minutes with margin).
# Files back (at most 8): gpu_check.log, build.log, info.txt, tests.log, bench.log,
# <device>-<date>.json and .png, dispatch_order.json (the measured backend order of
# backend="auto" on this card: copy it over ace_kernels/dispatch_order.json).
#
# Switches: GPU_CHECK_BUDGET (s), GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_SKIP_TESTS=1,
# GPU_CHECK_QUICK=1 (benchmark --quick), GPU_CHECK_ONLY="lora hypergraph" (families),
# GPU_CHECK_TIER=all|cheap|costly (benchmark --tier; default all), GPU_CHECK_COMPILE=1 (also
# time the baselines under torch.compile: off by default, compiling costs ~10-30 s a shape of
# device time), PYTHON (default python3),
# ACE_GIT_SHA (the sha to record when the copy has no .git; otherwise a file .git_sha at the
# repository root is read if present).
#
# Costly items and a second call. Families run in the order lora, hypergraph, contrastive,
# model, training, cheap items first within each; the two costly items come last (estimates
# for an H100/H200):
#   model: ace_lora_max_batch, the largest-batch search, reference-ops and ours (~30-80 s);
#   training: chunked_train_step, BiomedCLIP at B=64, 512 and 16,384 with chunk 256 (model
#     build ~10 s, B=64 and B=512 ~10 s, B=16,384 one step of 30-60 s).
# Each is skipped, with the reason, when its estimate exceeds the time left. When the first
# call could not fit them, a second call measures only those (and what they are compared
# with in the same run), e.g.
#   GPU_CHECK_SKIP_TESTS=1 GPU_CHECK_TIER=costly bash benchmarks/gpu_check.sh
# and a first call that should leave them out uses GPU_CHECK_TIER=cheap.

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-465}
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_stage NAME MAX_SECONDS LOGFILE CMD...: run under timeout min(MAX, time left - RESERVE).
RESERVE=20
run_stage() {
    local name=$1 max=$2 logfile=$3
    shift 3
    local avail=$(($(left) - RESERVE))
    local limit=$((max < avail ? max : avail))
    if [ "$limit" -lt 10 ]; then
        say "stage $name: SKIPPED (only $(left) s left)"
        return 124
    fi
    say "stage $name: start (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        say "stage $name: ok in ${took}s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "stage $name: TIMED OUT after ${took}s (rc $rc); partial output in $(basename "$logfile")"
    else
        say "stage $name: FAILED rc $rc after ${took}s; see $(basename "$logfile")"
    fi
    return $rc
}

say "repository $REPO, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1), budget ${BUDGET}s"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi not available"; } | tee -a "$LOG"

# The sha to record: git if the copy has .git, else ACE_GIT_SHA, else a .git_sha file left by the caller.
if [ -z "${ACE_GIT_SHA:-}" ]; then
    if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
        ACE_GIT_SHA=$(git -C "$REPO" rev-parse HEAD)
    elif [ -f "$REPO/.git_sha" ]; then
        ACE_GIT_SHA=$(head -c 80 "$REPO/.git_sha")
    else
        ACE_GIT_SHA="unknown (tree copied without .git)"
    fi
fi
export ACE_GIT_SHA
say "git sha: $ACE_GIT_SHA"

# 1. carried wheels
export PYTHONPATH=$REPO
if ls .whl/*.whl >/dev/null 2>&1; then
    if run_stage wheels 60 "$LOG" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site:$REPO
    fi
else
    say "stage wheels: none carried (.whl/ empty or absent)"
fi

# 2. the CUDA extension, in place (ace_kernels/_C*.so), for Hopper
BUILD_LOG=$OUT/build.log
: >"$BUILD_LOG"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    say "stage build: skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ -z "$(find csrc \( -name '*.cu' -o -name '*.cpp' \) 2>/dev/null | head -n 1)" ]; then
    say "stage build: no CUDA sources under csrc/"
else
    run_stage build 180 "$BUILD_LOG" env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 ACE_KERNELS_FORCE_CUDA=1 \
        CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" $PY setup.py build_ext --inplace
    # ptxas register / spill report of the build, for the log reader
    grep -E "registers|spill|error" "$BUILD_LOG" | tail -n 40 >>"$LOG"
fi

# 3. what can run here
run_stage info 30 "$OUT/info.txt" $PY -m ace_kernels.info
cat "$OUT/info.txt" >>"$LOG" 2>/dev/null

# 4. GPU tests (and Triton tests, which run on the GPU here)
TESTS_LOG=$OUT/tests.log
: >"$TESTS_LOG"
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ]; then
    say "stage tests: skipped (GPU_CHECK_SKIP_TESTS=1)"
else
    TIMEOUT_OPT=""
    $PY -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_OPT="--timeout=90"
    # test_compile.py last: its inductor compile is the slowest test; if the stage runs out of
    # time, the op tests have run.
    TEST_FILES=$(ls tests/test_*.py | grep -v '/test_compile.py$'; ls tests/test_compile.py 2>/dev/null)
    run_stage tests 120 "$TESTS_LOG" $PY -m pytest $TEST_FILES -m "gpu or triton" -q -rfEs \
        --continue-on-collection-errors -p no:cacheprovider $TIMEOUT_OPT
    tail -n 25 "$TESTS_LOG" >>"$LOG"
fi

# 5. the benchmark suite
BENCH_LOG=$OUT/bench.log
: >"$BENCH_LOG"
STEM=$($PY - <<'EOF' 2>>"$BENCH_LOG"
import datetime, torch
from benchmarks.harness import device_slug
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"{device_slug(dev)}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")
EOF
)
STEM=${STEM:-benchmarks}
BENCH_ARGS=(--out-dir "$OUT" --name "$STEM" --no-plot)
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && BENCH_ARGS+=(--quick)
for family in ${GPU_CHECK_ONLY:-}; do BENCH_ARGS+=(--only "$family"); done
[ -n "${GPU_CHECK_TIER:-}" ] && BENCH_ARGS+=(--tier "$GPU_CHECK_TIER")
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] && BENCH_ARGS+=(--compile-baselines on)
# The suite stops starting new configurations 45 s before its own kill time (one configuration,
# the full-size model build included, fits in that margin).
BENCH_LIMIT=$(($(left) - RESERVE))
BENCH_ARGS+=(--time-budget $((BENCH_LIMIT > 90 ? BENCH_LIMIT - 45 : 45)))
run_stage bench 600 "$BENCH_LOG" $PY -m benchmarks "${BENCH_ARGS[@]}"
# The table is the end of the suite's output; keep it in the main log.
sed -n '/^op  /,$p' "$BENCH_LOG" >>"$LOG"

# The PNG from whatever rows were written, even when the suite was cut off.
if [ -f "$OUT/$STEM.json" ]; then
    timeout 60 $PY - "$OUT/$STEM.json" "$OUT/$STEM.png" >>"$LOG" 2>&1 <<'EOF'
import sys
from benchmarks.harness import load_rows
from benchmarks.plot import plot_rows
rows = load_rows(sys.argv[1])
plot_rows(rows, sys.argv[2], title=f"{rows[0]['device'] if rows else ''} ({rows[0]['date'] if rows else ''})")
print(f"plot: {sys.argv[2]} ({len(rows)} rows)")
EOF
else
    say "no result JSON was written"
fi

# The measured backend order of backend="auto" on this card (ace_kernels/dispatch_order.json
# updated from this run's rows; commit it over the package's file).
if [ -f "$OUT/$STEM.json" ]; then
    timeout 60 $PY -m benchmarks.dispatch_order "$OUT/$STEM.json" --out "$OUT/dispatch_order.json" \
        >>"$LOG" 2>&1 || say "dispatch order: not written (see above)"
fi

# Nothing else may land under $OUT (at most 8 files come back).
find "$OUT" -mindepth 1 -maxdepth 1 ! -name 'gpu_check.log' ! -name 'build.log' ! -name 'info.txt' \
    ! -name 'tests.log' ! -name 'bench.log' ! -name "$STEM.json" ! -name "$STEM.png" \
    ! -name 'dispatch_order.json' -exec rm -rf {} +
say "done in $(($(date +%s) - START))s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit 0
