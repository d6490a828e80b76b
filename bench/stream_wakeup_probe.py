"""What one streamed message costs the receiving process, by transport (issue 10, the gateway's per-token CPU).

A server sends 64 small messages (40 bytes, a token's chunk) `--gap-ms` apart on one stream; a client in its
own process receives them, and its CPU time (getrusage, user + system) per message is printed for three ways to
receive: grpc.aio (what the gateway uses), a sync gRPC stream read in a thread that hands each message to the
event loop, and a raw asyncio TCP stream (the floor for any Python asyncio receiver that sleeps between
messages). Run: `python bench/stream_wakeup_probe.py --gap-ms 2` (and `--gap-ms 0` for back-to-back messages;
`--uvloop` receives on uvloop's event loop).
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import threading

N = 64
PAYLOAD = b"x" * 40


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _ident(b: bytes) -> bytes:
    return b


async def _grpc_server(port: int, gap: float):
    import grpc
    from grpc import aio

    async def stream(req, ctx):
        for _ in range(N):
            await asyncio.sleep(gap)
            yield PAYLOAD

    h = grpc.method_handlers_generic_handler("probe.P", {"S": grpc.unary_stream_rpc_method_handler(
        stream, _ident, _ident)})
    s = aio.server()
    s.add_generic_rpc_handlers((h,))
    s.add_insecure_port(f"127.0.0.1:{port}")
    await s.start()
    return s


async def _raw_server(port: int, gap: float):
    async def handle(r, w):
        await r.readexactly(1)
        for _ in range(N):
            await asyncio.sleep(gap)
            w.write(PAYLOAD)
            await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def _client(mode: str, port: int, reps: int) -> float:
    if mode == "raw":
        async def one():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"g")
            got = 0
            while got < N * len(PAYLOAD):
                d = await r.read(len(PAYLOAD))
                if not d:
                    break
                got += len(d)
            w.close()
    elif mode == "aio":
        from grpc import aio

        ch = aio.insecure_channel(f"127.0.0.1:{port}")
        call = ch.unary_stream("/probe.P/S", request_serializer=_ident, response_deserializer=_ident)

        async def one():
            async for _ in call(b""):
                pass
    else:
        import grpc

        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = ch.unary_stream("/probe.P/S", request_serializer=_ident, response_deserializer=_ident)
        loop = asyncio.get_running_loop()

        async def one():
            q: asyncio.Queue = asyncio.Queue()

            def pump():
                for m in call(b""):
                    loop.call_soon_threadsafe(q.put_nowait, m)
                loop.call_soon_threadsafe(q.put_nowait, None)

            threading.Thread(target=pump, daemon=True).start()
            while (await q.get()) is not None:
                pass
    for _ in range(2):
        await one()
    t = _cpu()
    for _ in range(reps):
        await one()
    return (_cpu() - t) / reps / N


async def _main(gap_ms: float, reps: int, uv: bool) -> None:
    for mode, port in (("aio", 50991), ("thread", 50992), ("raw", 50993)):
        server = await (_raw_server if mode == "raw" else _grpc_server)(port, gap_ms / 1000)
        p = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", mode, "--port", str(port),
                                                 "--reps", str(reps), *(["--uvloop"] if uv else []),
                                                 stdout=asyncio.subprocess.PIPE)
        out, _ = await p.communicate()
        print(f"{mode:>6}{' uvloop' if uv else ''}  gap {gap_ms:g} ms: {float(out) * 1e6:.0f} us of receiver CPU "
              "per message", flush=True)
        if mode == "raw":
            server.close()
        else:
            await server.stop(None)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--client")
    ap.add_argument("--port", type=int)
    ap.add_argument("--uvloop", action="store_true", help="receive on uvloop's event loop instead of asyncio's")
    a = ap.parse_args()
    if a.client:
        if a.uvloop:
            import uvloop

            print(uvloop.run(_client(a.client, a.port, a.reps)))
        else:
            print(asyncio.run(_client(a.client, a.port, a.reps)))
    else:
        asyncio.run(_main(a.gap_ms, a.reps, a.uvloop))
