#!/usr/bin/env bash
# The GPU checks, as one script (issue 8, requirement 8; the gpu-marked tests; the CUDA latency
# table). Run on a CUDA machine from the repository root:
#
#     bash bench/gpu.sh OUTDIR [SECONDS] [BATCHES] [STEPS]
#
# Every step is logged to OUTDIR/gpu.log and gets what is left of SECONDS (default 540), so a
# slow step never leaves the later ones without an answer; what finished is packed into
# OUTDIR/results.tgz (run JSONs and job reports, no weights). Steps, most wanted first:
#   quality: bench/quality.py's 0.25 cell on CUDA, for each timing batch in BATCHES (default
#            "64"): gates and Torch-Pruning at a FLOPs target, then gates at a latency target
#            (the table measured on this GPU at that batch);
#   tests:   pytest -m gpu on the files that hold GPU tests (the other test files import the
#            service's packages, which a bare CUDA image lacks; add new GPU test files here);
#   table:   bench/latency.py --device cuda --quick (table build time, predicted vs measured).
# STEPS (default "quality tests table") picks which run.
set -u
out=${1:?usage: bench/gpu.sh OUTDIR [SECONDS] [BATCHES] [STEPS]}
budget=${2:-540}
batches=${3:-64}
steps=${4:-quality tests table}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu.log"
py=${PYTHON:-python3}
cache=${HAWADA_GPU_CACHE:-/tmp/hawada-gpu-cache}
end=$((SECONDS + budget))
export PYTHONUNBUFFERED=1

step() {  # step CAP_SECONDS NAME COMMAND...: run with the lesser of CAP and what is left
    local cap=$1 name=$2
    shift 2
    local left=$((end - SECONDS))
    ((left < cap)) && cap=$left
    if ((cap < 10)); then
        echo "=== $name: skipped, ${left}s left" | tee -a "$log"
        return
    fi
    echo "=== $name (at most ${cap}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout "$cap" "$@" >>"$log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s" | tee -a "$log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.cuda.is_available())'
} >>"$log" 2>&1

wants() { [[ " $steps " == *" $1 "* ]]; }
if wants quality; then
    for b in $batches; do
        q="$py bench/quality.py --device cuda --threads 8 --cells 0.25:0 --cache $cache"
        step 200 "quality-flops-b$b" $q --latency-batch "$b" --methods gates,tp
        step 200 "quality-latency-b$b" $q --latency-batch "$b" --methods gates --metric latency
    done
fi
wants tests && step 120 pytest-gpu $py -m pytest -m gpu -p no:cacheprovider -q \
    tests/test_data.py tests/test_export_resnet.py tests/test_latency.py tests/test_lut.py \
    tests/test_pipeline.py
wants table && step 150 latency-table $py bench/latency.py --device cuda --quick

(cd "$cache" 2>/dev/null && tar czf "$out/results.tgz" --exclude='*.safetensors' \
    --exclude='*.pt' --exclude='*.onnx' --exclude='*.pt2' .) >>"$log" 2>&1
echo "=== done after ${SECONDS}s" | tee -a "$log"
