#!/usr/bin/env bash
# Is the RGB benchmark's gap to issue 14's 0.60 a matter of compute? The SimCLR reference's probe
# (benchmarks/shapes_probe.py, djc's step in one process) on a GPU, four runs side by side on the one device:
#   A  the job as it is (50 epochs of batch 64: what 2 CPU cores train in ~8 minutes)
#   B  8x the passes: 400 epochs of batch 256 (12,700 steps)
#   C  B with the encoder 4x as wide (model.width=64)
#   D  ResNet-18 (CIFAR stem) on 32-px views, batch 256, 200 epochs, Adam lr 0.002
# or, with SHAPES_GPU_SET=budget, schedules that end within the time (annealed), two of them ones 2 CPU cores
# train in under 10 minutes:
#   E  batch 256, 64 epochs (1,984 steps; ~7 min on 2 cores)     F  batch 128, 64 epochs (4,032 steps; ~8 min)
#   G  C's encoder, 100 epochs                                   H  D's ResNet-18, 60 epochs
# or, with SHAPES_GPU_SET=pairs, the two-stage recipe through djc itself (`djc bench quality`, every run with
# `djc train --in-process`: the lent machines have no Ray): jobs/shapes_lt_simclr_gpu.yaml as the pretext and the
# five methods' shapes jobs on its frozen features, SHAPES_GPU_SEEDS seeds (default 3), its table in
# OUT/quality.md and each pair minus k-means on its pretext in OUT/pairs.md (issue 14's 3 seeds and issue 17's
# pairs on a pretext whose features hold the classes; about 3 minutes a seed on an H200 by the probes' times, so 3
# seeds may take two calls: the second continues);
# SHAPES_GPU_BENCH_ARGS adds arguments (a CPU rehearsal: "model.backbone=conv4 optim.epochs=1").
# Otherwise benchmarks/features_graph.py on each one's final features: k-means, knn-merge (overcluster 100) and the
# nearest-class-mean ceiling (docs/results.md, "Where the gap to 0.60 sits").
#
# On a GPU machine lent through the `device` tool (no network; build .whl/ first with benchmarks/wheelhouse.sh):
#   run: command "bash benchmarks/shapes_gpu.sh", carry [".whl"], timeout_s 500
# Each probe stops its training after SHAPES_GPU_MINUTES (default 4.5) whatever its schedule; a line with
# "final": true and ep below the schedule's epochs says it was cut. Everything printed goes to OUT/shapes_gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/shapes_gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MIN=${SHAPES_GPU_MINUTES:-4.5}
DEV=${SHAPES_GPU_DEVICE:-cuda}
SITE=${TMPDIR:-/tmp}/djc-shapes-gpu-site
if ! "$PY" -c "import pydantic, yaml" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl --no-deps --target "$SITE" \
        pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/shapes_gpu.log"
JOB=jobs/shapes_lt_simclr.yaml
probe() {  # probe NAME OVERRIDES...
    local name=$1
    shift
    "$PY" benchmarks/shapes_probe.py "$JOB" seed=0 "$@" --device "$DEV" --threads 3 --minutes "$MIN" \
        --eval-every "${SHAPES_GPU_EVAL_EVERY:-2000}" --tag "$name" --save "$OUT/$name.pt" 2>&1 | grep -E '^\{|Error|error' | sed "s/^/[$name] /"
}
{
    echo "# shapes on $DEV, $(date -u +%Y-%m-%dT%H:%M:%SZ), djc $(git rev-parse --short HEAD 2>/dev/null)"
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    if [ "${SHAPES_GPU_SET:-compute}" = pairs ]; then
        # The run dirs stay out of OUT (too many files to come back) and in the checkout, which a warm device
        # machine keeps between calls: the same command again continues a bench its time limit cut (--reuse).
        BENCH=${SHAPES_GPU_BENCH_DIR:-runs/shapes_gpu_bench}
        gpu=$([ "$DEV" = cuda ] && echo true || echo false)
        # shellcheck disable=SC2086
        "$PY" -m djc.cli bench quality --config jobs/shapes_lt_p2ot.yaml jobs/shapes_lt_dcl.yaml \
            jobs/shapes_lt_statdec.yaml jobs/shapes_lt.yaml jobs/shapes_lt_aecm.yaml \
            --pretext jobs/shapes_lt_simclr_gpu.yaml --pretext-head --pair-neighbors 20 --stages pairs \
            --data shapes: --seeds "${SHAPES_GPU_SEEDS:-3}" --out "$BENCH" --reuse trainer.in_process=true \
            trainer.num_workers=1 trainer.use_gpu=$gpu eval.map=none eval.gallery_pages=0 \
            ${SHAPES_GPU_BENCH_ARGS:-} 2>&1 | grep -E "^\[djc bench\]|^\||error|Error"
        cp "$BENCH/quality.md" "$BENCH/pairs.md" "$OUT/" 2>/dev/null
        exit 0
    elif [ "${SHAPES_GPU_SET:-compute}" = budget ]; then
        NAMES="E F G H"
        probe E optim.epochs=64 data.batch_size=256 &
        probe F optim.epochs=64 data.batch_size=128 &
        probe G optim.epochs=100 data.batch_size=256 model.width=64 &
        probe H model.backbone=resnet18_cifar augment.out_size=32 data.batch_size=256 optim.epochs=60 optim.lr=0.002 &
    else
        NAMES="A B C D"
        probe A &
        probe B optim.epochs=400 data.batch_size=256 &
        probe C optim.epochs=400 data.batch_size=256 model.width=64 &
        probe D model.backbone=resnet18_cifar augment.out_size=32 data.batch_size=256 optim.epochs=200 optim.lr=0.002 &
    fi
    wait
    for name in $NAMES; do
        [ -f "$OUT/$name.pt" ] || { echo "[$name] no features saved"; continue; }
        "$PY" benchmarks/features_graph.py "$OUT/$name.pt" --threads 4 --only kmeans,overcluster,ncm 2>&1 \
            | grep -E '^\{|Error' | sed "s/^/[$name graph] /" &
    done
    wait
    rm -f "$OUT"/*.pt  # 2-20 MB each; the device tool returns few files
} 2>&1 | tee "$LOG"
