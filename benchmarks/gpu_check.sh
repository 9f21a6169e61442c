#!/usr/bin/env bash
# djc's GPU checks in one call, everything measured written to one folder:
#   1. install what the machine lacks (pydantic, pyyaml, pytest-timeout): from the wheelhouse .whl/ when it is
#      there (no network needed), else with pip from PyPI; djc itself from this checkout;
#   2. the tests marked `gpu` (tests/test_step.py, tests/test_device.py): a CUDA step of every method equals the
#      CPU step, no host sync in a step, bf16 and channels-last reach the convolutions, compile, DDP over NCCL;
#   3. `djc bench throughput --device cuda`: SeCu's djc step against its same-work plain loop on ResNet-18 (32 px,
#      batch 512) and ResNet-50 (224 px, batch 256); every method's step against the plain loop of its network at
#      the ResNet-18 setting; FLOPs per step and TFLOP/s against a dense bf16 matmul timed on the same GPU;
#      torch.profiler summaries where SeCu's ratio is below 0.97 or a method's cluster side above 10% of its step.
# OUT gets summary.md (read it first; also printed last, so the run's output tail carries it), env.txt,
# install.log, tests.log, tests.xml, bench.log, throughput-cuda.md / .json and profiles.txt (every profile the bench
# wrote, one after another). Exit status 0 when every phase passed.
#
# On a GPU machine lent through the `device` tool (no network; python3 3.12 with torch 2.11, no pydantic):
#   here, first:  benchmarks/wheelhouse.sh        # builds .whl/ (about 6 MiB, git-ignored)
#   then ONE run call:
#       command:   bash benchmarks/gpu_check.sh
#       carry:     [".whl"]
#       timeout_s: 480
#   The phases stop themselves within 450 s (install 75, tests 200, bench 170); files come back under files_at,
#   the first 8 by name only: summary.md carries the tests' outcomes, the failures' assertion lines and the tables.
#
# On your own CUDA machine (network, djc's dependencies installed or not):
#   bash benchmarks/gpu_check.sh [OUT]            # OUT: this argument, else $OUT, else runs/gpu_check
#
# Environment: PYTHON (default python3); WHEELHOUSE (default .whl); GPU_CHECK_BENCH_ARGS (more arguments for
# `djc bench throughput`); GPU_CHECK_ALLOW_CPU=1 rehearses the script on a machine without CUDA (the gpu tests
# report their skips, the bench runs on the CPU: a check of the script, not a measurement).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHL=${WHEELHOUSE:-.whl}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/djc-gpu-check-site}  # wheels installed here, never into the system
GPU_TESTS="tests/test_step.py tests/test_device.py"  # every test file with `gpu` tests (tests/test_gpu_check.py)
STATUS=0
declare -a ROWS=()

phase() {  # phase NAME SECONDS LOG CMD...: run CMD under a time limit, log it, record status and seconds
    local name=$1 limit=$2 log=$3 t0 rc
    shift 3
    t0=$(date +%s)
    echo "[gpu_check] $name (at most ${limit} s) -> $log"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - t0 ))
    local result="ok"
    [ $rc -eq 124 ] && result="timed out after ${limit} s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="failed (exit $rc)"
    [ $rc -ne 0 ] && STATUS=1
    ROWS+=("| $name | $result | $secs | $log |")
    echo "[gpu_check] $name: $result in ${secs} s"
    return $rc
}

install() {
    # Missing modules, as pip requirements: with a wheelhouse, each package and its dependencies by name (--no-deps,
    # nothing resolved against an index); with network, pip resolves the dependencies itself.
    local missing
    missing=$("$PY" - "$([ -d "$WHL" ] && echo wheelhouse || echo network)" <<'EOF'
import importlib, sys
wheelhouse = sys.argv[1] == "wheelhouse"
needs = [  # (import check, requirement with network, wheels from the wheelhouse)
    ("from pydantic import model_validator", "pydantic>=2.5,<3",
     "pydantic pydantic-core annotated-types typing-inspection typing-extensions"),
    ("import yaml", "pyyaml", "pyyaml"),
    ("import pytest", "pytest", "pytest pluggy iniconfig packaging pygments"),
    ("import pytest_timeout", "pytest-timeout", "pytest-timeout"),
]
missing = []
for check, req, wheels in needs:
    try:
        exec(check)
    except ImportError:
        missing.append(wheels if wheelhouse else req)
print(" ".join(missing))
EOF
    ) || return 1
    echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    echo "missing: ${missing:-nothing}"
    if [ -n "$missing" ] && [ -d "$WHL" ]; then
        rm -rf "$SITE" && mkdir -p "$SITE"
        # shellcheck disable=SC2086
        if ! "$PY" -m pip install --no-index --find-links "$WHL" --no-deps --target "$SITE" $missing; then
            echo "pip could not install from $WHL; unpacking the wheels into $SITE instead"
            for req in $missing; do
                local whl
                whl=$(ls "$WHL"/"${req//-/_}"-*.whl 2>/dev/null | head -n 1)
                [ -n "$whl" ] || { echo "no wheel for $req in $WHL"; return 1; }
                "$PY" -m zipfile -e "$whl" "$SITE" || return 1
            done
        fi
    elif [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        "$PY" -m pip install $missing || return 1
    fi
    if [ -d "$WHL" ]; then  # djc itself, as the issue's recipe; PYTHONPATH below serves if the machine refuses it
        "$PY" -m pip install --no-deps --no-index --find-links "$WHL" -e . \
            || echo "pip install -e . failed: djc is imported from $REPO through PYTHONPATH"
    fi
    "$PY" -c "import djc.config, djc.step, djc.bench.throughput, pytest, pytest_timeout, torchvision; \
import djc; print('djc from', djc.__file__)"
}

export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ---- the machine
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available()); \
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} >"$OUT/env.txt" 2>&1
DEVICE_LINE=$(grep -E "^(gpu|torch) " "$OUT/env.txt" | tr '\n' ' ')
echo "[gpu_check] $DEVICE_LINE"

# ---- 1. install
export PY WHL SITE REPO
export -f install  # run by `timeout` in a child bash
if ! phase install 75 install.log bash -c install; then
    echo "[gpu_check] install failed: see $OUT/install.log"
    printf '%s\n' "# djc GPU check: install failed" "" "$DEVICE_LINE" "" "$(tail -n 20 "$OUT/install.log")" \
        >"$OUT/summary.md"
    exit 1
fi

DEV=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "[gpu_check] torch sees no CUDA device; GPU_CHECK_ALLOW_CPU=1 rehearses the script on the CPU"
        printf '%s\n' "# djc GPU check: no CUDA device" "" "$DEVICE_LINE" >"$OUT/summary.md"
        exit 3
    fi
    DEV=cpu
    echo "[gpu_check] no CUDA: rehearsal on the CPU (gpu tests skip, the bench runs on the CPU)"
fi

# ---- 2. the gpu tests
# shellcheck disable=SC2086
phase "gpu tests" 200 tests.log "$PY" -m pytest -m gpu -rA -p no:cacheprovider --timeout 150 \
    --junitxml "$OUT/tests.xml" $GPU_TESTS

# ---- 3. the bench
# shellcheck disable=SC2086
phase bench 170 bench.log "$PY" -m djc.cli bench throughput --device "$DEV" --out "$OUT" ${GPU_CHECK_BENCH_ARGS:-}

# ---- summary
{
    echo "# djc GPU check, $(date -u +%Y-%m-%d)"
    echo
    echo "$DEVICE_LINE(env.txt has nvidia-smi and versions)"
    [ "$DEV" = cpu ] && echo && echo "**No CUDA device: a rehearsal of the script on the CPU, not a measurement.**"
    echo
    echo "| phase | result | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "## gpu tests"
    echo
    echo '```'
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|^\[compile\]|^=+ .*(passed|failed|skipped|error).* =+$" "$OUT/tests.log"
    echo '```'
    # What failed, in the summary itself: the device tool brings back only the first files of OUT by name.
    failures=$(grep -E "^E   " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 20)
    if [ -n "$failures" ]; then
        echo
        echo "failures (assertion lines, counted):"
        echo
        echo '```'
        echo "$failures"
        echo '```'
    fi
    echo
    echo "## throughput"
    echo
    if [ -f "$OUT/throughput-$DEV.md" ]; then cat "$OUT/throughput-$DEV.md"; else tail -n 30 "$OUT/bench.log"; fi
    profiles=$(cd "$OUT" && ls profile-*.txt 2>/dev/null)
    echo
    echo "## profiles"
    echo
    echo "${profiles:-none: every ratio held (SeCu >= 0.97, every cluster side <= 10%)}${profiles:+ (all in profiles.txt)}"
} >"$OUT/summary.md"
# One profiles.txt instead of a file per case: the device tool returns only the first 8 files of OUT by name, and
# five profiles pushed summary.md out of them (session 41).
if [ -n "$profiles" ]; then
    (cd "$OUT" && for f in $profiles; do echo "===== $f"; cat "$f"; echo; done >profiles.txt && rm -f $profiles)
fi
cat "$OUT/summary.md"
echo "[gpu_check] summary: $OUT/summary.md (exit $STATUS)"
exit $STATUS
