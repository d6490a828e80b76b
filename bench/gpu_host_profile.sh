#!/usr/bin/env bash
# Host profiles on the GPU machine, one call: py-spy over the prefix-cache TTFT section (where a cached turn's
# 7-8 ms go) and over the structured-outputs bench at batch 64 (what the grammar adds to a step). Carry .whl
# (bench/gpu_wheels.sh fills it). Collapsed stacks under $OUT (*.pyspy.txt); bench/pyspy_top.py reads them.
cd "$(dirname "$0")/.."
NAME=gpu_host_profile . bench/gpu_common.sh
MODEL=/tmp/mmpipe-bench/qwen2_5_vl_3b_random
python3 bench/build_3b_model.py "$MODEL" || { say "model build failed"; exit 1; }
if [ "${PREFIX:-1}" = 1 ]; then
  say "prefix ttft under py-spy"
  timeout 240 py-spy record --rate ${RATE:-1000} --format raw -o "$OUT/prefix.pyspy.txt" -- \
    python3 bench/prefix_cache_bench.py --model "$MODEL" --sections ttft --repeats ${REPEATS:-8} \
    --out "$OUT/prefix_cache_ttft" | tail -12
fi
if [ "${STAGES:-1}" = 1 ]; then
  say "cached-turn stages, cache on and off"
  timeout 150 python3 bench/chat_host_profile.py --model "$MODEL" --device cuda --repeats 15 --threads 4 \
    --json "$OUT/chat_stages_on.json" | tail -40
  timeout 150 python3 bench/chat_host_profile.py --model "$MODEL" --device cuda --repeats 15 --threads 4 \
    --no-prefix-cache --json "$OUT/chat_stages_off.json" | tail -40
fi
if [ "${STRUCTURED:-1}" = 1 ]; then
  say "structured bench under py-spy"
  timeout 200 py-spy record --threads --rate ${RATE:-1000} --format raw -o "$OUT/structured.pyspy.txt" -- \
    python3 bench/structured_bench.py --model "$MODEL" --batches 64 --repeats 3 --out "$OUT/structured"
fi
say done
