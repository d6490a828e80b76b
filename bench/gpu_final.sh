#!/usr/bin/env bash
# One GPU call for a session's end: the GPU tests (-m gpu), the prefill kernel's key splits and the kernels of a
# cached turn (bench/prefill_attn_probe.py --splits, bench/cached_turn_kernels.py), the prefix-cache TTFT
# section, where a cached turn's time goes (bench/chat_host_profile.py on the GPU, cache on and off), the
# structured-outputs cost at batch 1 and 64 with its host stages, and the served benchmark under MPS. Carry .whl (bench/gpu_wheels.sh fills it).
#   bash bench/gpu_final.sh     # TESTS=0 / KERNELS=0 / PREFIX=0 / STAGES=0 / STRUCTURED=0 / SERVE=0 skip a part;
#                               # PYSPY=1 runs the prefix section under py-spy (collapsed stacks; bench/pyspy_top.py)
cd "$(dirname "$0")/.."
NAME=gpu_final; . bench/gpu_common.sh
if [ "${TESTS:-1}" = 1 ]; then
  say "gpu tests"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_engine_gpu.py tests/test_towers.py tests/test_pixel_wire.py} 2>&1 | tail -15
fi
MODEL=/tmp/mmpipe-bench/qwen2_5_vl_3b_random
python3 bench/build_3b_model.py "$MODEL" || { say "model build failed"; exit 1; }
if [ "${KERNELS:-1}" = 1 ]; then
  say "prefill attention probe, key splits"
  timeout 150 python3 bench/prefill_attn_probe.py --skip-old --splits 1,2,4,8 --out "$OUT/prefill_attn_splits.json" \
    | grep -v "^\[sdpa"
  say "projection GEMMs at short-step sizes, default against TunableOp"
  timeout 150 python3 bench/gemm_shapes_probe.py --out "$OUT/gemm_shapes.json"
  say "cached-turn kernels"
  timeout 300 python3 bench/cached_turn_kernels.py --model "$MODEL" --out "$OUT/cached_turn_kernels"
fi
if [ "${PREFIX:-1}" = 1 ]; then
  say "prefix cache ttft"
  PB="python3 bench/prefix_cache_bench.py --model $MODEL --sections ttft --out $OUT/prefix_cache_ttft"
  if [ "${PYSPY:-0}" = 1 ]; then
    timeout 240 py-spy record --rate 1000 --format raw -o "$OUT/prefix.pyspy.txt" -- $PB | tail -12
  else
    timeout 200 $PB | tail -12
  fi
fi
if [ "${STAGES:-1}" = 1 ]; then
  for side in on off; do
    say "cached-turn host stages, prefix cache $side"
    timeout 150 python3 bench/chat_host_profile.py --model "$MODEL" --device cuda --repeats 15 --threads 4 \
      $([ $side = off ] && echo --no-prefix-cache) --json "$OUT/chat_stages_$side.json" | tail -42
  done
fi
if [ "${STRUCTURED:-1}" = 1 ]; then
  say "structured bench"
  timeout 240 python3 bench/structured_bench.py --model "$MODEL" --batches 1,64 --repeats 3 --stages \
    --out "$OUT/structured"
  [ "${NO_PREFETCH:-1}" = 1 ] && timeout 120 python3 bench/structured_bench.py --model "$MODEL" --batches 64 \
    --repeats 3 --no-prefetch --out "$OUT/structured_no_prefetch"
fi
if [ "${SERVE:-1}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && say "MPS daemon started"
  say "serve bench, MPS"
  timeout 200 python3 bench/serve_bench.py --model "$MODEL" --out /tmp/w/final --budget-s 180 --reserve-s 0 \
    --no-offline --no-hf --no-tower --client-procs 4 --serve-arg=--api-server-count --serve-arg=2 \
    --levels "${LEVELS:-1,8,16,64}"
  cp /tmp/w/final/serve_bench.json "$OUT/serve_mps.json"; cp /tmp/w/final/serve_bench.md "$OUT/serve_mps.md"
  echo quit | nvidia-cuda-mps-control
fi
say done
