"""The event loop every service process runs on: uvloop's when it is installed (what uvicorn's `loop="auto"`
and vLLM's API server pick), else asyncio's. MMPIPE_EVENT_LOOP=asyncio forces asyncio's (A/B runs, or a
platform where uvloop misbehaves); =uvloop requires uvloop.

Why: a streaming gateway or generator sleeps between tokens, and every wake-up costs a turn of the loop; uvloop's
turn is cheaper (bench/stream_wakeup_probe.py --uvloop; BENCHMARKS.md, "Gateway CPU per request"). grpc.aio
runs on any asyncio-compatible loop."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from mmpipe.services.common.cli_args import BadEnv, env_choice

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def loop_choice() -> str:
    """auto, uvloop or asyncio, from MMPIPE_EVENT_LOOP (a bad value raises, naming the variable)."""
    v = env_choice("EVENT_LOOP", "auto", CHOICES)
    if isinstance(v, BadEnv):
        raise v.error()
    return v


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop."""
    choice = loop_choice()
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise RuntimeError("MMPIPE_EVENT_LOOP=uvloop, but uvloop is not installed: pip install uvloop "
                                   "(or unset MMPIPE_EVENT_LOOP)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
