# Sourced by the bench/gpu_*.sh scripts on the GPU machine (repo root, .whl carried; bench/gpu_wheels.sh fills
# it): NAME=<script> before sourcing. Sets OUT (default /tmp/<NAME>_out), tees the log there, defines `say`,
# installs the carried wheels into /tmp/site and puts them, the tree and .whl/bin's redis-server on the paths.
set -uo pipefail
OUT=${OUT:-/tmp/${NAME}_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$NAME.log") 2>&1
say() { echo "[$NAME ${SECONDS}s] $*"; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { say "wheel install failed (carry .whl: bash bench/gpu_wheels.sh fills it)"; exit 1; }
chmod +x .whl/bin/redis-server 2>/dev/null
export PATH="$PWD/.whl/bin:/tmp/site/bin:$PATH" PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,compute_mode,memory.total --format=csv,noheader
