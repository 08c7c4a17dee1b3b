#!/usr/bin/env bash
# The GPU figures issues 3 and 5 ask for, in ONE call on a lent GPU machine: a task's whole device
# budget is 15 minutes, the machine's start included, so there is no second call to count on.
#
#   here, once:     make gpu-wheels                      # bitsandbytes as Python 3.12 wheels in .whl/
#   on the machine: bash tools/gpu_bench.sh              # (device tool: run, carry [".whl"], timeout_s 560)
#   here, after:    python bench.py --targets-from <files_at>/bench.jsonl
#
# The parts run most important first, each under its own time cap and all within DEADLINE seconds
# (default 480), so a slow compile costs only the parts after it. Every measurement is appended
# to $OUT/bench.jsonl as it is made, and all output goes to $OUT/bench.log (three files in all:
# the device tool returns at most eight). The machine's own torch and transformers are used; only
# bitsandbytes (the quantised LM) is carried. Not run by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
deadline=$((SECONDS + ${DEADLINE:-480}))
mkdir -p "$out"
: >"$out/bench.jsonl"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} | tee "$out/gpu.txt"

# part NAME CAP_SECONDS BENCH_ARGS...: bench.py under min(CAP, time left); its lines join bench.jsonl.
part() {
    local name=$1 cap=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 20)); then
        echo "== $name: skipped, ${left}s left" | tee -a "$out/bench.log"
        return
    fi
    echo "== $name: up to ${cap}s: bench.py $*" | tee -a "$out/bench.log"
    local part_file
    part_file=$(mktemp)  # its own file: two dry runs on one machine must not mix their parts
    # -k: a part stuck where SIGTERM never reaches Python (inside a CUDA call or a compiler) is killed
    # 10 s later, or it would eat the parts after it and the call's whole budget.
    timeout -k 10 "$cap" python3 bench.py --shapes "${SHAPES:-real}" "$@" --out "$part_file" >>"$out/bench.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - deadline + ${DEADLINE:-480}))s of the run" | tee -a "$out/bench.log"
    cat "$part_file" >>"$out/bench.jsonl" 2>/dev/null
    rm -f "$part_file"
}

# Issue 3's training target at batch 256, with its same-run naive baselines (H100: 29 at 4, 627 at 64).
part train 150 --only train --batches 256 --naive-batches 4,64
# Extraction, batched generation, one-image latency (its compiled decode step last, so a slow
# compile costs nothing measured before it).
part rest 170 --only extract,generate,latency --compile --batches 256
# Issue 5: peak memory of the 8-bit and 4-bit frozen LM.
part quantized 90 --only quantized --batches 64
# The compiled training step, CUDA graphs, and a profile of what limits the step.
part compiled 150 --only train --batches 256 --naive-batches 4 --compile --profile --variants reduce-overhead@256
# Process start to printed caption, and the LM-head loss alone.
part cold 90 --only cold,loss --batches 256
# What the transformer adapter (ClipCap's mapper, 8 layers) costs against the MLP measured above.
part transformer 90 --only train --batches 256 --naive-batches 4 --adapter-kind transformer
python3 bench.py --targets-from "$out/bench.jsonl" 2>&1 | tee -a "$out/bench.log"
