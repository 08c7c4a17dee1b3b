#!/usr/bin/env bash
# The GPU figures issues 3 and 5 ask for, on a lent GPU machine, in calls that each fit 10 minutes.
#
#   here, once:     make gpu-wheels                      # bitsandbytes as Python 3.12 wheels in .whl/
#   on the machine: bash tools/gpu_bench.sh train        # (device tool: run, carry [".whl"])
#                   bash tools/gpu_bench.sh rest
#   here, after:    python bench.py --targets-from train.jsonl rest.jsonl
#
# Each part writes its JSON lines to $OUT (or ./gpu-out) as it measures, so a part cut short by
# its time limit still returns what it measured. The machine's own torch and transformers are used;
# only bitsandbytes (the quantised LM) is carried. Not run by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
train|rest) ;;
*) echo "usage: bash tools/gpu_bench.sh train|rest" >&2; exit 2 ;;
esac
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$out/gpu.txt"

case "${1:-}" in
train)  # issue 3's training target and its same-run baselines (29 naive at batch 4, 627 at 64 on an H100)
    timeout 540 python3 bench.py --shapes real --only train --batches 256 --naive-batches 4,64 --compile \
        --profile --variants reduce-overhead@256 --out "$out/train.jsonl" 2>&1 | tee "$out/train.log"
    ;;
rest)   # extraction, generation, latency (cold included), the LM-head loss, and issue 5's quantised LM
    timeout 300 python3 bench.py --shapes real --only extract,generate,latency,cold,loss --compile \
        --batches 256 --out "$out/rest.jsonl" 2>&1 | tee "$out/rest.log"
    timeout 200 python3 bench.py --shapes real --only quantized --batches 64 --out "$out/quantized.jsonl" \
        2>&1 | tee "$out/quantized.log"
    ;;
esac
