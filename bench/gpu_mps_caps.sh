#!/usr/bin/env bash
# The served benchmark under the CUDA MPS daemon with the generator's share of the SMs capped
# (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE through `mmpipe serve --stage-env`), to see whether the encoder's tower,
# which shares the GPU with decode, gets to the first token sooner. Then a host profile of the structured-outputs
# bench at batch 64 (py-spy, if its wheel is in .whl). Carry .whl. Results under $OUT.
#   CAPS="100 60 40" bash bench/gpu_mps_caps.sh
cd "$(dirname "$0")/.."
NAME=gpu_mps_caps; . bench/gpu_common.sh
MODEL=/tmp/mmpipe-bench/qwen2_5_vl_3b_random
python3 bench/build_3b_model.py "$MODEL" || { say "model build failed"; exit 1; }
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && say "MPS daemon started" || { say "no MPS"; exit 1; }
ARGS="--no-offline --no-hf --no-tower --client-procs 4 --serve-arg=--api-server-count --serve-arg=2 --levels ${LEVELS:-8,16,64}"
for cap in ${CAPS:-100 60 40}; do
  extra=""
  [ "$cap" = 100 ] || extra="--serve-arg=--stage-env --serve-arg=generator:CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$cap"
  say "serve bench, MPS, generator SM cap $cap%"
  # shellcheck disable=SC2086
  timeout 200 python3 bench/serve_bench.py --model "$MODEL" --out /tmp/w/cap$cap --budget-s 180 --reserve-s 0 $ARGS $extra
  cp /tmp/w/cap$cap/serve_bench.json "$OUT/serve_mps_cap$cap.json"; cp /tmp/w/cap$cap/serve_bench.md "$OUT/serve_mps_cap$cap.md"
done
echo quit | nvidia-cuda-mps-control; sleep 2
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
if [ "${STRUCTURED:-1}" = 1 ]; then
  say "structured bench, batch 64, under py-spy"
  SB="python3 bench/structured_bench.py --model $MODEL --batches 64 --repeats 2 --out $OUT/structured_b64"
  if command -v py-spy >/dev/null; then
    timeout 200 py-spy record --subprocesses --rate 200 --format raw -o "$OUT/structured_b64.pyspy.txt" -- $SB || say "py-spy failed"
  else
    timeout 200 $SB
  fi
fi
say done
