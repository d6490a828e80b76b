"""`mmpipe gateway`: run the OpenAI-compatible HTTP API and the public gRPC API in front of the stages.

Loads only the model's tokenizer, processor and config (no weights). Flags are named as in `vllm serve`
and default to their MMPIPE_* environment variables. With --api-server-count N, N gateway processes serve the
same ports (services/gateway/workers.py).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mmpipe.services.gateway.config import add_cli_args  # stdlib-only module

    p = subparsers.add_parser(
        "gateway", help="run the gateway: OpenAI-compatible HTTP + public gRPC API over ingest/encoder/generator",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_cli_args(p)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from mmpipe.services.common.logs import setup_logging
    from mmpipe.services.gateway.config import config_from_args
    from mmpipe.services.gateway.server import serve
    from mmpipe.shared.errors import MMPipeError

    try:
        cfg = config_from_args(args)
    except MMPipeError as e:
        print(f"mmpipe gateway: error: {e.message}")
        return 2
    setup_logging("gateway", cfg.log_level, cfg.log_format)
    if cfg.api_server_count > 1:
        from mmpipe.services.gateway.workers import run_workers

        return run_workers(cfg)
    asyncio.run(serve(cfg))
    return 0
