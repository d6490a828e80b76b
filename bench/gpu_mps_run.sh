#!/usr/bin/env bash
# The served-stack benchmark twice on one GPU: as it is (every stage process its own CUDA context, time-sliced),
# then with the CUDA MPS control daemon running (the stages' kernels share the GPU concurrently), plus the
# Gemma-3-sized decode row of `make bench`. Carry .whl (see bench/gpu_serve_run.sh). Results under $OUT.
#   bash bench/gpu_mps_run.sh
cd "$(dirname "$0")/.."
NAME=gpu_mps_run; . bench/gpu_common.sh
if [ -n "${GPU_TESTS:-}" ]; then  # e.g. GPU_TESTS="tests/test_towers.py tests/test_engine_gpu.py" GPU_K="gemma3 or cuda_tower"
  say "gpu tests: $GPU_TESTS"
  # shellcheck disable=SC2086
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS ${GPU_K:+-k "$GPU_K"} 2>&1 | tail -15
fi
if [ "${GEMMA3:-1}" = 1 ]; then
  say "gemma3 decode row"
  timeout 150 python3 bench/engine_bench.py --gemma3 --out "$OUT/engine_bench_gemma3" --concurrency 1,8,32 --prompt-len 4000
fi
[ "${SERVE:-1}" = 1 ] || { say done; exit 0; }
MODEL=/tmp/mmpipe-bench/qwen2_5_vl_3b_random
python3 bench/build_3b_model.py "$MODEL" || { say "model build failed"; exit 1; }
ARGS="--no-offline --no-hf --no-tower --client-procs 4 --serve-arg=--api-server-count --serve-arg=2 --levels ${LEVELS:-8,16,64}"
say "serve bench, no MPS"
# shellcheck disable=SC2086
timeout 230 python3 bench/serve_bench.py --model "$MODEL" --out /tmp/w/nomps --budget-s 200 --reserve-s 0 $ARGS
cp /tmp/w/nomps/serve_bench.json "$OUT/serve_nomps.json"; cp /tmp/w/nomps/serve_bench.md "$OUT/serve_nomps.md"
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && say "MPS daemon started"
  sleep 1
  python3 -c "import torch; x=torch.ones(4,device='cuda'); print('cuda under MPS ok', float(x.sum()))" || say "CUDA under MPS failed"
  say "serve bench, MPS"
  # shellcheck disable=SC2086
  timeout 230 python3 bench/serve_bench.py --model "$MODEL" --out /tmp/w/mps --budget-s 200 --reserve-s 0 $ARGS
  cp /tmp/w/mps/serve_bench.json "$OUT/serve_mps.json"; cp /tmp/w/mps/serve_bench.md "$OUT/serve_mps.md"
  echo quit | nvidia-cuda-mps-control; sleep 2
  tail -20 $CUDA_MPS_LOG_DIRECTORY/control.log > "$OUT/mps_control.log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
else
  say "no nvidia-cuda-mps-control on this machine"
fi
say "done"
