#!/usr/bin/env bash
# The single script a lent GPU machine runs (H100/H200; its own python3 with torch 2.11 and
# triton 3.6, no open_clip, no network), from a copy of this repository:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT (default ./runs/gpu_check)
#
# The plan: ONE `run` call. A task that draws a machine has 15 minutes of device time in all,
# the machine's start (1-2 minutes), idle time and the give-back included. So:
#   1. Here, before the call: `make gpu-wheels` (Inf-CL and open_clip into .whl/, which git
#      ignores, so the call names it: carry [".whl"]) and the sha the results record (the copy
#      travels without .git; untracked files that git does not ignore travel with it):
#          { git rev-parse HEAD; git diff --quiet HEAD || echo +dirty; } | tr -d '\n' > .git_sha
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570); the script
#      keeps inside GPU_CHECK_BUDGET=540 s (default), the 30 s above it are margin. Raising
#      GPU_CHECK_TESTS_CAP or adding GPU_CHECK_PROFILE=1 or GPU_CHECK_MEMCHECK=1 takes that time from the suite (see the
#      arithmetic below): with a 200 s test cap and the profile, the suite keeps ~185 s and its
#      model family (issue 6's rows) is likely cut. Keep the defaults unless the tests are the point.
#   3. give_back right after (unless making the second call below at once).
#   4. Commit $OUT's JSON and PNG under benchmarks/results/ (named after the card),
#      dispatch_order.json over ace_kernels/dispatch_order.json and tuned_configs.json over
#      ace_kernels/tuned_configs.json.
#
# Stages, each under its own `timeout`, each logged; a failing stage never stops the next:
#   1. carried wheels in .whl/ installed, each on its own, into /tmp/site (GPU_CHECK_SITE;
#      on PYTHONPATH), if any                                                    (cap 60 s)
#   2. the CUDA extension built in place for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16;
#      3 source files), CUDA_HOME (when unset) from the nvcc on PATH (`command -v nvcc`, the
#      install it runs from), else /usr/local/cuda, and `nvcc --version` in build.log; skipped
#      when ace_kernels/_C*.so for this python imports and was built from these very sources:
#      after a good build the sha256 of csrc/ and setup.py goes to build/<the .so's name>.sources.sha256
#      (build/ is git-ignored and stays on a warm machine; mtimes would not do, the tree is copied
#      afresh for every call) and a later call compares it (a second call on a warm machine) (cap 120 s)
#   3. python3 -m ace_kernels.info, into gpu_check.log                              (cap 30 s)
#   4. the GPU tests: first pytest -m gpu (the GPU-only tests, bf16 among them), then
#      -m "triton and not gpu", test_compile.py last, in 4 pytest-xdist processes; collection
#      errors of modules that need packages missing there do not stop the others     (cap 100 s)
#   5. the benchmark suite on the GPU shapes (all the time left): one process per family, each
#      appending to one JSON (a GPU fault or a hang loses only that family), the JSON rewritten
#      after every configuration, what no longer fits the time left skipped with the reason;
#      the suite gets --hard-deadline (the stage's kill time, seconds since the epoch, so its own
#      start-up counts) and derives its own budget from it (45 s before the kill above 135 s, two
#      thirds of the time left at or under it). The PNG is drawn from the JSON even when the suite
#      itself was cut off. On `timeout`'s SIGTERM the suite kills its family's process first (and
#      that process dies with the suite on SIGKILL), so nothing of the run outlives the stage.
#      Then, after the package files and before the PNG, the scorecard (python -m
#      benchmarks.scorecard: every target with the value each part was judged on) into gpu_check.log.
# With the build and the tests at their caps the suite stage gets 540 - (~5 start, wheels and
# nvidia-smi + 120 build + ~8 info + 100 tests + ~5 between stages) - 21 (RESERVE and the 1 s
# under it) = ~280 s, its budget ~235 s (grace 35 s); with a typical build (~60-90 s), ~310-340 s.
# The Triton kernels the tests compile stay in the cache, so the suite does not compile them again.
# Files back (at most 8): gpu_check.log, build.log, tests.log, bench.log, <device>-<date>[-quick].json
# and .png, dispatch_order.json (the measured backend order of backend="auto" on this card; only
# written when the run timed two backends at one shape) and tuned_configs.json (the Triton
# kernels' fastest launch configurations on this card; only written when the run swept them,
# family tuning).
#
# Switches: GPU_CHECK_BUDGET (s, default 540, at most 570), GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_FORCE_BUILD=1,
# GPU_CHECK_SKIP_TESTS=1, GPU_CHECK_TESTS_CAP (s, default 100), GPU_CHECK_TEST_FILES="tests/test_lora.py ..."
# (the test files of both passes, in order; default all, test_compile.py last),
# GPU_CHECK_TEST_WORKERS (pytest-xdist processes for the tests when it is importable, default 4; 1: none),
# GPU_CHECK_QUICK=1 (benchmark --quick), GPU_CHECK_ONLY="lora hypergraph" (families),
# GPU_CHECK_TIER=all|cheap|costly (benchmark --tier; default all; a family or tier the suite
# does not know, or a numeric switch that is no number, stops the script before its first stage),
# GPU_CHECK_PROFILE=1 (before the suite, a torch.profiler breakdown of the LoRA, hypergraph and
# InfoNCE steps per backend or strategy into gpu_check.log, cap GPU_CHECK_PROFILE_CAP s, default 60; its time comes
# out of the suite's), GPU_CHECK_MEMCHECK=1 (after the tests, the op files' GPU tests again under
# compute-sanitizer's memcheck, cap GPU_CHECK_MEMCHECK_CAP s, default 90, out of the suite's time;
# GPU_CHECK_MEMCHECK_FILES picks the files), GPU_CHECK_COMPILE=1 (also time the baselines under
# torch.compile: off by default, compiling costs ~10-30 s a shape of device time), PYTHON (default
# python3), ACE_GIT_SHA (the sha to record; else git when the copy has .git, else the file .git_sha
# at the repository root).
#
# Costly items and an optional second call. Families run in the order lora, hypergraph,
# contrastive, distributed (skipped, saying so, on a machine with one card), model, training,
# contrastive_probe, tuning, cheap items first within each, so each costly item comes at the end
# of its family and the sweep (tuning's) after everything (estimates for an
# H100/H200):
#   model: ace_lora_max_batch, the largest-batch search, reference-ops and ours (~30-80 s);
#   training: chunked_train_step, BiomedCLIP at B=64, 512 and 16,384 with chunk 256 (model
#     build ~10 s, B=64 and B=512 ~10 s, B=16,384 one step of 30-60 s; run 1 took 41 s in all);
#   contrastive_probe: label_guided_infonce at B=1,000,000, one call measured for time and peak
#     (~45 s, B^2 from the B=65,536 row), then its loss against a chunked fp32 forward (up to 45 s);
#   tuning: triton_config_sweep, the LoRA and InfoNCE kernels at each candidate launch
#     configuration (25 of them, ~75 s).
# Each is skipped, with the reason, when its estimate exceeds the time left. Only when the
# first call skipped them AND the session's device time allows, call again AT ONCE (the
# machine stays warm 30 s after a call; a fresh start costs 1-2 minutes and needs 4 left):
# read status.budget_left_s, then
#   run(command="GPU_CHECK_TIER=costly GPU_CHECK_SKIP_TESTS=1 GPU_CHECK_BUDGET=<B> bash benchmarks/gpu_check.sh",
#       carry=[".whl"], timeout_s=<B + 30>)   with   B = min(status.budget_left_s - 60, 570)
#   (a call lasts 600 s at most: the script cuts a larger budget to 570 s, saying so)
# (skip it when B is under ~120 s), then give_back. Its build is skipped on its own (the
# extension from the first call is still in place), and its files are named <device>-<date>-costly.*
# so they never overwrite the first call's; a costly run times one backend per item, so it
# holds no dispatch order and writes none (one it did write would be dispatch_order-costly.json);
# its sweep, if it runs there, writes tuned_configs-costly.json. The sweep runs after the other
# costly items, so a second call of ~150 s rarely reaches it: a session that wants the
# tuned configurations rather than the largest-batch and B=16,384 numbers gives that call
# GPU_CHECK_ONLY=tuning (the issues' own numbers come first).

# Run by sh (dash), the script would stop at its first bash-only line, after some stages ran.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
# The sweep at the end removes whatever else landed under $OUT, but only where this run had $OUT
# to itself (the lent machine's starts empty): in a folder that held files already (OUT=. or
# OUT=benchmarks/results) it would delete them.
OUT_WAS_EMPTY=1
[ -n "$(ls -A "$OUT" 2>/dev/null)" ] && OUT_WAS_EMPTY=0
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
min() { echo $(($1 < $2 ? $1 : $2)); }

# The numeric switches: whole numbers (a decimal part is dropped: B = budget_left_s - 60 may be
# a float). Anything else stops the script before its first stage: bash arithmetic on "300s" fails,
# and every stage would be skipped or run without its cap.
for switch in GPU_CHECK_BUDGET GPU_CHECK_TESTS_CAP GPU_CHECK_PROFILE_CAP GPU_CHECK_MEMCHECK_CAP \
        GPU_CHECK_TEST_WORKERS; do
    value=${!switch:-}
    [ -z "$value" ] && continue
    if [[ ! $value =~ ^[0-9]+(\.[0-9]*)?$ ]]; then
        say "error: $switch=$value: expected a number (of seconds; of processes for the workers); nothing was run"
        exit 2
    fi
    printf -v "$switch" '%d' "$((10#${value%%.*}))"
done
# The suite's families and tiers (benchmarks/suite.py's FAMILIES and TIERS; a test keeps them
# equal): a name it does not know would stop it with argparse's error after the build and the
# tests had run, losing the results of the call. Commas between families count as spaces.
FAMILIES="lora hypergraph contrastive distributed model training contrastive_probe tuning"
TIERS="all cheap costly"
ONLY=${GPU_CHECK_ONLY:-}
ONLY=${ONLY//,/ }
for family in $ONLY; do
    if [[ " $FAMILIES " != *" $family "* ]]; then
        say "error: GPU_CHECK_ONLY=${GPU_CHECK_ONLY}: expected families among $FAMILIES, got '$family'; nothing was run"
        exit 2
    fi
done
if [[ " $TIERS " != *" ${GPU_CHECK_TIER:-all} "* ]]; then
    say "error: GPU_CHECK_TIER=${GPU_CHECK_TIER}: expected one of $TIERS, got '${GPU_CHECK_TIER}'; nothing was run"
    exit 2
fi
BUDGET=${GPU_CHECK_BUDGET:-540}
# One run call lasts 600 s at most, and the script needs 30 s above its budget (timeout_s =
# budget + 30): a larger budget would have the call cut off before the scorecard, the plot and
# the package files.
MAX_BUDGET=570
if [ "$BUDGET" -gt "$MAX_BUDGET" ]; then
    say "GPU_CHECK_BUDGET=$BUDGET: over the $MAX_BUDGET s that fit in one run call (600 s at most, 30 s margin);" \
        "$MAX_BUDGET s used"
    BUDGET=$MAX_BUDGET
fi

# run_stage NAME MAX_SECONDS LOGFILE CMD...: run under timeout min(MAX, time left - RESERVE).
RESERVE=20
run_stage() {
    local name=$1 max=$2 logfile=$3
    shift 3
    local avail=$(($(left) - RESERVE))
    local limit
    limit=$(min "$max" "$avail")
    if [ "$limit" -lt 10 ]; then
        if [ "$max" -lt 10 ]; then
            say "stage $name: SKIPPED (its cap is ${max} s)"
        else
            say "stage $name: SKIPPED (only $(left) s left)"
        fi
        return 124
    fi
    say "stage $name: start (limit ${limit}s)"
    local t0
    t0=$(date +%s)
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

TIER=${GPU_CHECK_TIER:-all}
SUFFIX=""
# -quick as the suite names a --quick run (benchmarks/results/README.md; git ignores such files there)
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && SUFFIX="-quick"
[ "$TIER" = costly ] && SUFFIX="$SUFFIX-costly"
say "repository $REPO, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1), budget ${BUDGET}s, tier $TIER"
GPU_FIELDS=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu
{ timeout 20 nvidia-smi --query-gpu=$GPU_FIELDS --format=csv 2>&1 \
    || echo "nvidia-smi not available (or no answer in 20 s)"; } | tee -a "$LOG"

# The sha to record: ACE_GIT_SHA, else git (plus +dirty) if the copy has .git, else ./.git_sha
# (written by the caller with the command in the header; benchmarks/harness.py reads the same file).
# Where both exist and name different commits, the file wins: it was written for this call, and a
# lent machine's copy once carried a .git of an older commit (the second H200 run of 2026-11-30).
if [ -z "${ACE_GIT_SHA:-}" ]; then
    if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
        ACE_GIT_SHA=$({ git -C "$REPO" rev-parse HEAD; git -C "$REPO" diff --quiet HEAD || echo +dirty; } | tr -d '\n')
        if [ -s "$REPO/.git_sha" ]; then
            FILE_SHA=$(head -c 80 "$REPO/.git_sha" | tr -d '\n')
            if [ "${FILE_SHA%+dirty}" != "${ACE_GIT_SHA%+dirty}" ]; then
                say "git says $ACE_GIT_SHA, .git_sha says $FILE_SHA: recording .git_sha's"
                ACE_GIT_SHA=$FILE_SHA
            fi
        fi
    elif [ -s "$REPO/.git_sha" ]; then
        ACE_GIT_SHA=$(head -c 80 "$REPO/.git_sha" | tr -d '\n')
    else
        ACE_GIT_SHA="unknown (tree copied without .git and no .git_sha)"
    fi
fi
export ACE_GIT_SHA
say "git sha: $ACE_GIT_SHA"

# 1. carried wheels
export PYTHONPATH=$REPO
SITE=${GPU_CHECK_SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1; then
    # One pip call per wheel: a wheel pip refuses (corrupt, built for another platform) costs
    # only itself, not the others (one call for all of them installed none).
    export PY SITE
    run_stage wheels 60 "$LOG" bash -c 'rc=0
        for wheel in .whl/*.whl; do
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$wheel" || { echo "wheels: $(basename "$wheel"): not installed"; rc=1; }
        done
        exit $rc'
    [ -n "$(ls -A "$SITE" 2>/dev/null)" ] && export PYTHONPATH=$SITE:$REPO
else
    say "stage wheels: none carried (.whl/ empty or absent)"
fi

# 2. the CUDA extension, in place (ace_kernels/_C*.so), for Hopper
BUILD_LOG=$OUT/build.log
: >"$BUILD_LOG"
EXT=$(timeout 60 $PY -c 'import sysconfig; print("ace_kernels/_C" + sysconfig.get_config_var("EXT_SUFFIX"))' \
    2>/dev/null)
# The sources' fingerprint (with the code that fingerprints them into the module), stored after a good
# build beside the build tree (git ignores build/).
STAMP=build/$(basename "${EXT:-_C}").sources.sha256
sources_sha256() {
    find csrc setup.py ace_kernels/_sources.py -type f -print0 2>/dev/null | LC_ALL=C sort -z |
        xargs -0 -r sha256sum | sha256sum | cut -d' ' -f1
}
extension_loads() {  # the built module exists and imports (its output to the caller's redirection)
    [ -n "$EXT" ] && [ -f "$EXT" ] && timeout 60 $PY -c "import ace_kernels._C"
}
extension_current() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sources_sha256)" ] || return 1
    extension_loads >/dev/null 2>&1
}
cuda_home_from_nvcc() {
    local nvcc top
    nvcc=$(command -v nvcc 2>/dev/null) || return 0
    top=$(timeout 20 "$nvcc" -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    if [ -n "$top" ] && [ -d "$top" ]; then
        (cd "$top" && pwd -P)
    else
        dirname "$(dirname "$(readlink -f "$nvcc")")"
    fi
}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    say "stage build: skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ -z "$(find csrc \( -name '*.cu' -o -name '*.cpp' \) 2>/dev/null | head -n 1)" ]; then
    say "stage build: no CUDA sources under csrc/"
elif [ "${GPU_CHECK_FORCE_BUILD:-0}" != 1 ] && extension_current; then
    say "stage build: skipped ($EXT imports and was built from these csrc/ and setup.py, sha256 in $STAMP;" \
        "GPU_CHECK_FORCE_BUILD=1 rebuilds)"
else
    # CUDA_HOME: the variable, else where the nvcc on PATH really lives (its own TOP, which also
    # sees through wrapper scripts and links such as /usr/local/bin/nvcc), else /usr/local/cuda.
    if [ -z "${CUDA_HOME:-}" ]; then
        CUDA_HOME=$(cuda_home_from_nvcc)
        [ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=/usr/local/cuda
    fi
    export CUDA_HOME
    { echo "CUDA_HOME=$CUDA_HOME"
      timeout 20 "$CUDA_HOME/bin/nvcc" --version 2>&1 || echo "no nvcc at $CUDA_HOME/bin/nvcc"; } >>"$BUILD_LOG"
    say "CUDA_HOME=$CUDA_HOME ($(grep -o 'release [0-9.]*' "$BUILD_LOG" | head -n 1 || true))"
    rm -f "$STAMP"  # a failed build must not leave an older build's stamp behind
    if run_stage build 120 "$BUILD_LOG" env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 ACE_KERNELS_FORCE_CUDA=1 \
        $PY setup.py build_ext --inplace; then
        if extension_loads >>"$BUILD_LOG" 2>&1; then
            mkdir -p build && sources_sha256 >"$STAMP" && say "build: sources sha256 $(cat "$STAMP") in $STAMP"
        else
            say "build: $EXT missing or not importable after the build; no stamp written"
        fi
    else
        # An older build's module would otherwise load, and the tests and the suite would run
        # kernels from other sources than these: without it they run without the extension.
        [ -n "$EXT" ] && [ -e "$EXT" ] && rm -f "$EXT" &&
            say "build: failed; removed $EXT (the run goes on without the extension)"
    fi
    # ptxas register / spill report of the build, for the log reader
    grep -E "registers|spill|error" "$BUILD_LOG" | tail -n 40 >>"$LOG"
fi

# 3. what can run here
run_stage info 30 "$LOG" $PY -m ace_kernels.info

# 4. GPU tests: the GPU-only tests first (a cut stage then loses Triton tests, which CI also
#    runs under the interpreter), then the Triton tests on the GPU; within each, the files whose
#    GPU tests have not run on a GPU yet first (the model, training and InfoNCE files), test_compile.py
#    last (its inductor compile is the slowest test). -v: a stage cut by its cap keeps the name and
#    result of every test that ran (-q's dots and the -r summary are lost with the killed pytest).
TESTS_LOG=$OUT/tests.log
: >"$TESTS_LOG"
# What gpu_check.log keeps of a verbose pytest log (this stage's and the memcheck's): the failing tests'
# names and each run's totals line (with -v every test's PASSED line would crowd them out of the tail, so
# a test whose name says "error" or "failed" must not match).
PYTEST_SUMMARY='^(FAILED|ERROR) |^=+ ([0-9]+ [a-z]+|no tests ran).* in [0-9.]+s'
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ]; then
    say "stage tests: skipped (GPU_CHECK_SKIP_TESTS=1)"
else
    TIMEOUT_OPT=""
    timeout 30 $PY -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_OPT="--timeout=60"
    # pytest-xdist (the image has it): GPU_CHECK_TEST_WORKERS processes share the card. Much of
    # a GPU test's time is the host's (Triton compiles, Python, launches), which 16 cores run side
    # by side; the 2026-11-30 run's -m gpu pass alone took 85 of the 100 s on one process.
    WORKERS=${GPU_CHECK_TEST_WORKERS:-4}
    if [ "$WORKERS" -gt 1 ] && timeout 30 $PY -c "import xdist" >/dev/null 2>&1; then
        TIMEOUT_OPT="$TIMEOUT_OPT -n $WORKERS"
    fi
    FIRST="tests/test_model.py tests/test_training.py tests/test_contrastive.py"
    TEST_FILES=${GPU_CHECK_TEST_FILES:-$(for f in $FIRST; do [ -f "$f" ] && echo "$f"; done
        ls tests/test_*.py | grep -v -e '/test_compile.py$' -e '/test_model.py$' -e '/test_training.py$' \
            -e '/test_contrastive.py$'; ls tests/test_compile.py 2>/dev/null)}
    export PY TIMEOUT_OPT TEST_FILES
    # pytest's rc 5 (nothing selected) is not a failure.
    run_stage tests "${GPU_CHECK_TESTS_CAP:-100}" "$TESTS_LOG" bash -c '
        common="-v -rfEs --continue-on-collection-errors -p no:cacheprovider $TIMEOUT_OPT"
        echo "== pytest -m gpu"
        $PY -m pytest $TEST_FILES -m gpu $common; a=$?; [ $a -eq 5 ] && a=0
        echo "== pytest -m \"triton and not gpu\""
        $PY -m pytest $TEST_FILES -m "triton and not gpu" $common; b=$?; [ $b -eq 5 ] && b=0
        exit $((a > b ? a : b))'
    # Each pass's header, its failing tests and its totals.
    grep -E "^== pytest|$PYTEST_SUMMARY" "$TESTS_LOG" | tail -n 25 >>"$LOG"
fi

# 4b. with GPU_CHECK_PROFILE=1: the profiler breakdown of the LoRA, hypergraph and InfoNCE steps
#     per backend or strategy (benchmarks/profile_ops.py), into gpu_check.log (no file of its own: 8 come back;
#     a stage that fails or times out then names the log its output is in, the one that comes back).
if [ "${GPU_CHECK_PROFILE:-0}" = 1 ]; then
    run_stage profile "${GPU_CHECK_PROFILE_CAP:-60}" "$LOG" $PY -m benchmarks.profile_ops
fi

# 4c. with GPU_CHECK_MEMCHECK=1: the GPU tests (-m gpu) of the op files again under compute-sanitizer's
#     memcheck, which sees what the CPU cannot: the CUDA extension's kernels (tests/_bounds.py checks
#     the Triton kernels under the interpreter only) and the GPU's own addressing. torch's caching
#     allocator is off there (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so every tensor is an allocation of
#     its own and an access past one lies outside any. compute-sanitizer from PATH, else
#     $CUDA_HOME/bin (default /usr/local/cuda); skipped, saying so, without one. Output in tests.log,
#     its summary lines in gpu_check.log; cap GPU_CHECK_MEMCHECK_CAP s (default 90), out of the suite's
#     time. A stage cut by its cap keeps (-v) what it checked.
if [ "${GPU_CHECK_MEMCHECK:-0}" = 1 ]; then
    SANITIZER=$(command -v compute-sanitizer 2>/dev/null)
    if [ -z "$SANITIZER" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
        SANITIZER=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
    fi
    if [ -z "$SANITIZER" ]; then
        say "stage memcheck: skipped (no compute-sanitizer on PATH or in ${CUDA_HOME:-/usr/local/cuda}/bin)"
    else
        MEMCHECK_FILES=${GPU_CHECK_MEMCHECK_FILES:-tests/test_hypergraph.py tests/test_lora.py \
tests/test_contrastive.py}
        echo "== memcheck: $SANITIZER on pytest -m gpu $MEMCHECK_FILES" >>"$TESTS_LOG"
        # shellcheck disable=SC2086  # the file list splits on spaces
        run_stage memcheck "${GPU_CHECK_MEMCHECK_CAP:-90}" "$TESTS_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SANITIZER" --tool memcheck --target-processes all --error-exitcode 1 --print-limit 20 \
            $PY -m pytest $MEMCHECK_FILES -m gpu -v -rfEs -p no:cacheprovider
        # Its summary: the sanitizer's error lines and totals, the failing tests, pytest's last line.
        sed -n '/^== memcheck/,$p' "$TESTS_LOG" |
            grep -E "^== memcheck|^========= (ERROR SUMMARY|Invalid|Program hit)|$PYTEST_SUMMARY" | tail -n 25 >>"$LOG"
    fi
fi

# 5. the benchmark suite
BENCH_LOG=$OUT/bench.log
: >"$BENCH_LOG"
# The files' stem: the suite's device as benchmarks/harness.py's device_slug names it, and the UTC date.
# slug NAME: device_slug's file name of the card NAME (a test keeps the two equal).
slug() {
    local s
    s=$(printf '%s' "$1" | LC_ALL=C tr 'A-Z' 'a-z' | LC_ALL=C sed -E 's/[^a-z0-9]+/-/g; s/^-//; s/-$//')
    s=${s:0:60}
    echo "${s:-device}"
}
# card_name: the name torch.cuda.get_device_name gives the suite's card (the first that CUDA_VISIBLE_DEVICES
# leaves, by index or UUID), from nvidia-smi; nothing where nvidia-smi cannot say it for certain (no card or
# no nvidia-smi, a MIG mode on, whose devices CUDA names otherwise, cards of two models, whose order may differ).
card_name() {
    local first=${CUDA_VISIBLE_DEVICES-0}
    timeout 20 nvidia-smi --query-gpu=index,uuid,name,mig.mode.current --format=csv,noheader 2>/dev/null |
        awk -F', ' -v first="${first%%,*}" '
            NF != 4 || $4 == "Enabled" { bad = 1 } { names[$3] = 1 }
            first != "" && ($1 == first || index($2, first) == 1) { name = $3 }
            END { n = 0; for (k in names) n++; if (!bad && n == 1 && name != "") print name }'
}
CARD=$(card_name)
if [ -n "$CARD" ]; then
    STEM=$(slug "$CARD")-$(date -u +%Y-%m-%d)  # no Python start (3-4 s of the card's time) to name a file
else
    STEM=$(timeout 60 $PY - <<'EOF' 2>>"$BENCH_LOG"
import datetime, torch
from benchmarks.harness import device_slug
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"{device_slug(dev)}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")
EOF
)
fi
STEM=${STEM:-benchmarks}$SUFFIX
BENCH_ARGS=(--out-dir "$OUT" --name "$STEM" --no-plot --tier "$TIER")
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && BENCH_ARGS+=(--quick)
for family in $ONLY; do BENCH_ARGS+=(--only "$family"); done
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] && BENCH_ARGS+=(--compile-baselines on)
# The stage's kill time goes to the suite, which stops starting configurations in time for the
# one in progress to finish (benchmarks/suite.py: budget_for_hard_limit). As an absolute time:
# the interpreter's and torch's start-up (seconds) then count against the suite's budget.
BENCH_LIMIT=$(($(left) - RESERVE - 1))  # 1 s under run_stage's own limit, computed a moment later
BENCH_DEADLINE=$(($(date +%s) + BENCH_LIMIT))
BENCH_ARGS+=(--hard-deadline "$BENCH_DEADLINE")
run_stage bench "$BENCH_LIMIT" "$BENCH_LOG" $PY -m benchmarks "${BENCH_ARGS[@]}"
# The suite's header and table (the end of its output) in the main log.
grep -m 1 "^providers:" "$BENCH_LOG" >>"$LOG"
grep -E "^== .*: process|WARNING" "$BENCH_LOG" >>"$LOG"
sed -n '/^op  /,$p' "$BENCH_LOG" >>"$LOG"

post_limit() { local l=$(($(left) - 3)); [ $l -lt 5 ] && l=5; min 60 $l; }

# Package files updated from this run's rows, to commit over the package's own: the measured
# backend order of backend="auto" on this card (ace_kernels/dispatch_order.json; none when the
# run timed no op on two backends at one shape, as a costly-tier run never does) and the Triton
# kernels' fastest launch configurations on it (ace_kernels/tuned_configs.json; none when the
# run swept nothing: family tuning skipped or out of time). Their tools exit 3 when there is
# nothing to write.
# package_file WHAT MODULE FILE
package_file() {
    [ -f "$OUT/$STEM.json" ] || return 0
    timeout "$(post_limit)" $PY -m "benchmarks.$2" "$OUT/$STEM.json" --out "$OUT/$3" >>"$LOG" 2>&1
    case $? in
        0) ;;
        3) say "$1: this run holds none; nothing written" ;;
        *) say "$1: not written (see above)" ;;
    esac
}
ORDER=dispatch_order$SUFFIX.json
TUNED=tuned_configs$SUFFIX.json
package_file "dispatch order" dispatch_order "$ORDER"
package_file "tuned configurations" tuned_configs "$TUNED"

# The PNG from whatever rows were written, even when the suite was cut off (after the package
# files: the plot may take seconds that a suite cut off at its limit leaves few of). Before it, in
# the same process (one torch import less), each target of the run with the value each of its
# parts was judged on (python -m benchmarks.scorecard), into the main log.
if [ -f "$OUT/$STEM.json" ]; then
    timeout "$(post_limit)" $PY - "$OUT/$STEM.json" "$OUT/$STEM.png" >>"$LOG" 2>&1 <<'EOF'
import sys
from benchmarks import scorecard
from benchmarks.harness import load_rows
from benchmarks.plot import plot_rows
print()
try:  # whatever it meets, the PNG below is still drawn
    if scorecard.main([sys.argv[1]]) != 0:
        print("scorecard: not written (see above)")
except Exception as exc:
    print(f"scorecard: not written ({type(exc).__name__}: {exc})")
print()
rows = load_rows(sys.argv[1])
if not rows:
    sys.exit("plot: not drawn (no rows)")
try:
    plot_rows(rows, sys.argv[2], title=f"{rows[0]['device']} ({rows[0]['date']})")
except ImportError as exc:  # matplotlib: on the GPU image, not in every venv
    sys.exit(f"plot: not drawn ({type(exc).__name__}: {exc})")
print(f"plot: {sys.argv[2]} ({len(rows)} rows)")
EOF
else
    say "no result JSON was written"
fi

# Nothing else may land under $OUT (at most 8 files come back).
if [ "$OUT_WAS_EMPTY" = 1 ]; then
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name 'gpu_check.log' ! -name 'build.log' \
        ! -name 'tests.log' ! -name 'bench.log' ! -name "$STEM.json" ! -name "$STEM.png" \
        ! -name "$ORDER" ! -name "$TUNED" -exec rm -rf {} +
else
    say "$OUT held other files before this run: none removed (only an \$OUT that starts empty is swept)"
fi
say "done in $(($(date +%s) - START))s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit 0
