"""The engine's CUDA path (Triton kernels, decode and mixed-step CUDA-graph staging) on the CPU, through
Triton's interpreter, token-identical to HF `generate`. The interpreter is chosen when triton is first
imported, so the checks run in a subprocess (tests/triton_interp_engine.py) with TRITON_INTERPRET=1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).parent


# 1-D RoPE, M-RoPE with image rows, the sparse-MoE decoder (DeepStack too; 2 of the 5 configs); Gemma 3
# (sliding window, bidirectional images) is slow in the interpreter (~3 CPU-minutes): its kernels' masks are
# checked in make test by test_engine_kernels_interp.py "masked"; the tiny Mistral 3 (every layer windowed: blocks
# behind the window given back, FREED_BLOCK entries in the graphs' static tables) in ~1 CPU-minute
@pytest.mark.parametrize("family, configs", [("llava", 5), ("qwen2_vl", 5), ("qwen3_vl_moe", 2), ("mistral3", 2),
                                             pytest.param("gemma3", 5, marks=pytest.mark.slow)])
def test_cuda_path_in_triton_interpreter_matches_generate(family, configs):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(HERE / "triton_interp_engine.py"), family], env=env, cwd=HERE.parent,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert r.stdout.count(f"ok {family} /") == configs, r.stdout
