#!/usr/bin/env bash
# The GPU sections, end to end, on the lent GPU machine once run.sh has unpacked the staged site:
#
#   bash benchmarks/gpu/suite.sh [OUT_DIR] [STEP...]
#
# Steps, in the order they run (all by default): host engine serving draft draft-paged draft-copying ngram ngram-paged
# moe.
# Each writes its section into OUT_DIR/RESULTS-gpu.md (not RESULTS.md: those sections are the CPU host's) and its
# raw report and log into OUT_DIR (default /tmp/vmetal-gpu-results); a step that fails is logged and the next one
# runs; OUT_DIR/DONE marks the end. The dense models are Qwen3 in Qwen3-0.6B's shape, bfloat16 (random weights, or
# weights that copy for ngram and draft-copying). The results file kept here is benchmarks/RESULTS-gpu.md: copy
# OUT_DIR/RESULTS-gpu.md over it as the scripts wrote it.
#
# A lease ends a call at 10 minutes and this takes ~20, so start it detached and collect it in later calls:
#   setsid nohup bash benchmarks/gpu/suite.sh /tmp/res >/tmp/suite.out 2>&1 &
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-/tmp/vmetal-gpu-results}
shift || true
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(host engine serving draft draft-paged draft-copying ngram ngram-paged moe)
mkdir -p "$out"
rm -f "$out/DONE"
results="$out/RESULTS-gpu.md"
model=/tmp/model
gpu=(--shape qwen3-0.6b --dtype bfloat16)
export VLLM_MLX_DEVICE=gpu PYTHONUNBUFFERED=1

step() {
    local name=$1
    shift
    echo "=== $(date -u +%H:%M:%S) $name: $*" | tee -a "$out/suite.log"
    if bash "$root/benchmarks/gpu/run.sh" python3 "$@" --results "$results" --json "$out/$name.json" \
        >"$out/$name.log" 2>&1; then
        echo "=== $(date -u +%H:%M:%S) $name: done" | tee -a "$out/suite.log"
    else
        echo "=== $(date -u +%H:%M:%S) $name: FAILED (rc $?), see $name.log" | tee -a "$out/suite.log"
    fi
}

for s in "${steps[@]}"; do
    case $s in
    host) step host benchmarks/bench_host.py "${gpu[@]}" --rows 1,32 --tokens 128 --trials 5 ;;
    engine) step engine benchmarks/bench_engine.py "${gpu[@]}" --concurrency 32 --max-tokens 256 --prompt-len 16 \
        --trials 5 --budget 300 --model-dir "$model" ;;
    serving) step serving benchmarks/bench_serving.py "${gpu[@]}" --concurrency 32,64 --trials 5 --input-len 128 \
        --output-len 128 --model-dir "$model" --log-dir "$out/serving-logs" ;;
    draft) step draft benchmarks/bench_draft.py "${gpu[@]}" --draft-layers 4 --trials 5 ;;
    draft-paged) step draft-paged benchmarks/bench_draft.py "${gpu[@]}" --draft-layers 4 --trials 5 --paged ;;
    # the same pair cut from the copying model, which keeps nearly every draft (bench_draft.py's docstring)
    draft-copying) step draft-copying benchmarks/bench_draft.py --shape qwen3-0.6b-copying --dtype bfloat16 \
        --draft-layers 4 --trials 5 ;;
    # n-gram speculation on Qwen3-0.6B's shape with weights that copy their context (vmetal.bench.copying)
    ngram) step ngram benchmarks/bench_speculative.py --shape qwen3-0.6b-copying --dtype bfloat16 --trials 5 ;;
    ngram-paged) step ngram-paged benchmarks/bench_speculative.py --shape qwen3-0.6b-copying --dtype bfloat16 \
        --trials 5 --paged ;;
    moe)  # issue 14's MoE rows: decode and C=32 serving against mlx-lm on two depth-cut MoE shapes (~11 GB each)
        for moe in qwen3-30b-a3b-cut gpt-oss-20b-cut; do
            step "engine-$moe" benchmarks/bench_engine.py --shape "$moe" --dtype bfloat16 --model-dir "/tmp/$moe" \
                --concurrency 32 --max-tokens 128 --prompt-len 16 --trials 3
            step "serving-$moe" benchmarks/bench_serving.py --shape "$moe" --dtype bfloat16 --model-dir "/tmp/$moe" \
                --backends paged,mlx_lm --concurrency 32 --trials 3 --input-len 128 --output-len 128 \
                --log-dir "$out/serving-logs-$moe"
            rm -rf "/tmp/$moe"  # the card's disk holds one at a time beside the staged site
        done ;;
    *) echo "unknown step $s (host engine serving draft draft-paged ngram ngram-paged moe)" >&2; exit 2 ;;
    esac
done
touch "$out/DONE"
