"""A stage-shaped gRPC server for the re-resolution test: the real `services.common.grpc_server.serve` (options,
interceptor, health, signals) built from the real stage flags, serving one RPC that answers with its own address.

    python tests/grpc_whoami_server.py --model none --host 127.0.0.1 --port P --grpc-max-connection-age-ms 300

No model: the re-resolution behaviour is the transport's, and a model load would only slow the test down.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

import grpc

from mmpipe.services.common.cli_args import add_server_args, server_config
from mmpipe.services.common.grpc_server import serve
from mmpipe.services.common.metrics import ServiceMetrics

import mmpipe.services.common.grpc_server as _gs  # noqa: E402

# Stage servers bind with SO_REUSEPORT off, so a taken port is an error and not a silent second listener; these
# test replicas turn it on to share 127.0.0.1:PORT, the stand-in for two pods behind one address.
_server_options = _gs.server_options
_gs.server_options = lambda *a, **k: [o for o in _server_options(*a, **k) if o[0] != "grpc.so_reuseport"] + [
    ("grpc.so_reuseport", 1)]

SERVICE = "mmpipe.test.Whoami"
METHOD = f"/{SERVICE}/Who"


def main() -> None:
    p = argparse.ArgumentParser()
    add_server_args(p, default_port=0)
    cfg = server_config(p.parse_args())
    logging.basicConfig(level=cfg.log_level)
    me = f"{cfg.host}:{cfg.port}/{os.getpid()}".encode()  # replicas can share an address (SO_REUSEPORT)

    async def who(request: bytes, context) -> bytes:
        return me

    def register(server: grpc.aio.Server) -> list[str]:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(who)})])
        return [SERVICE]

    async def load() -> None:
        return None

    asyncio.run(serve(name="whoami", cfg=cfg, metrics=ServiceMetrics("whoami", "none"), register=register,
                      load=load))


if __name__ == "__main__":
    main()
