"""Whether the towers run their CUDA speed-ups: the one switch, `MMPIPE_COMPILE_TOWERS`.

On, a tower compiles the token-wise parts of its blocks with torch.compile and, on CUDA, replays small batches
as CUDA graphs (towers/cuda_graphs.py).

    MMPIPE_COMPILE_TOWERS=auto   (default) compile on CUDA, eager elsewhere
    MMPIPE_COMPILE_TOWERS=1      compile on any device (the CPU needs a C++ compiler)
    MMPIPE_COMPILE_TOWERS=0      never compile

A tower's explicit `compile=True/False` argument wins over the variable. Compilation is a speed-up only: the
eager path is the reference, and a tower whose compilation fails falls back to it (blocks.TokenOps).

Owns: reading that variable. Must not: import torch at import time.
"""
from __future__ import annotations

import os

ENV_VAR = "MMPIPE_COMPILE_TOWERS"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def compile_towers_enabled(device_type: str, override: bool | None = None) -> bool:
    """Whether a tower on `device_type` ("cuda", "cpu", ...) should compile; `override` wins when given."""
    if override is not None:
        return bool(override)
    raw = os.environ.get(ENV_VAR, "auto").strip().lower()
    if raw in ("", "auto"):
        return device_type == "cuda"
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR}={raw!r} is not valid: use auto, 1 or 0")
