"""Container health check for the mmpipe images (Docker HEALTHCHECK, compose `healthcheck`).

    python /opt/mmpipe/healthcheck.py                 # gRPC health of 127.0.0.1:$MMPIPE_PORT (stage services)
    python /opt/mmpipe/healthcheck.py grpc HOST:PORT  # gRPC health (grpc.health.v1, service "") elsewhere
    python /opt/mmpipe/healthcheck.py http URL        # HTTP 200, e.g. the gateway's http://127.0.0.1:8000/health

Exit 0 when SERVING / 200, 1 otherwise (the reason on stderr). Standard library + grpcio only: it must not
import mmpipe (torch) or it would cost seconds and hundreds of MB every interval.
"""
from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = float(os.environ.get("MMPIPE_HEALTHCHECK_TIMEOUT", "3"))


def check_grpc(addr: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            print(f"grpc health {addr}: {e.code().name} {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"grpc health {addr}: {status}", file=sys.stderr)
        return 1
    return 0


def check_http(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as e:  # any failure is "unhealthy"; the reason goes to the health log
        print(f"http health {url}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else os.environ.get("MMPIPE_HEALTHCHECK", "grpc")
    target = argv[2] if len(argv) > 2 else None
    if mode == "grpc":
        return check_grpc(target or f"127.0.0.1:{os.environ.get('MMPIPE_PORT', '50051')}")
    if mode == "http":
        return check_http(target or f"http://127.0.0.1:{os.environ.get('MMPIPE_PORT', '8000')}/health")
    print(f"unknown mode {mode!r}: use grpc or http", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
