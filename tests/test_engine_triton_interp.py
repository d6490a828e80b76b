"""The engine's CUDA path (Triton kernels, decode and mixed-step CUDA-graph staging) on the CPU, through
Triton's interpreter, token-identical to HF `generate`. The interpreter is chosen when triton is first
imported, so the checks run in a subprocess (tests/triton_interp_engine.py) with TRITON_INTERPRET=1, one per
family, all started in the background when collection ends (tests/background_runs.py); the tests run last."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from background_runs import BackgroundRuns, failure

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).parent


RUNS = BackgroundRuns("family", lambda family: [sys.executable, str(HERE / "triton_interp_engine.py"), family],
                      env={"TRITON_INTERPRET": "1"}, cwd=HERE.parent, timeout_s=540, needs="triton")


# 1-D RoPE, M-RoPE with image rows, the sparse-MoE decoder (DeepStack too; 2 of the 5 configs); Gemma 3
# (sliding window, bidirectional images) is slow in the interpreter (~3 CPU-minutes): its kernels' masks are
# checked in make test by test_engine_kernels_interp.py "masked"; the tiny Mistral 3 (every layer windowed: blocks
# behind the window given back, FREED_BLOCK entries in the graphs' static tables) in ~1 CPU-minute
@pytest.mark.parametrize("family, configs", [("llava", 5), ("qwen2_vl", 5), ("qwen3_vl_moe", 2), ("mistral3", 2),
                                             pytest.param("gemma3", 5, marks=pytest.mark.slow)])
def test_cuda_path_in_triton_interpreter_matches_generate(family, configs):
    r = RUNS.result(family)
    assert r.returncode == 0, failure(family, r)
    assert r.stdout.count(f"ok {family} /") == configs, failure(family, r, f"{configs} configs expected")
