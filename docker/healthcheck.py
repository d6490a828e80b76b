"""Container health check for the mmpipe images (Docker HEALTHCHECK, compose `healthcheck`).

    python /opt/mmpipe/healthcheck.py                 # gRPC health of 127.0.0.1:$MMPIPE_PORT (stage services)
    python /opt/mmpipe/healthcheck.py grpc HOST:PORT  # gRPC health (grpc.health.v1, service "") elsewhere
    python /opt/mmpipe/healthcheck.py http URL        # HTTP 200, e.g. the gateway's http://127.0.0.1:8000/health

gRPC over TLS when the container serves TLS (MMPIPE_TLS_CERT_FILE) or has stage-client TLS settings: the CA is
MMPIPE_STAGE_TLS_CA_FILE, else MMPIPE_TLS_CA_FILE, else the system roots; the client certificate (for mTLS) is
MMPIPE_STAGE_TLS_CERT_FILE / _KEY_FILE, else, when the server requires one (MMPIPE_TLS_CA_FILE), the stage's own
MMPIPE_TLS_CERT_FILE / _KEY_FILE (issue it for clientAuth too); MMPIPE_STAGE_TLS_SERVER_NAME names the
certificate's host when it is not 127.0.0.1.
Exit 0 when SERVING / 200, 1 otherwise (the reason on stderr). Standard library + grpcio only: it must not
import mmpipe (torch) or it would cost seconds and hundreds of MB every interval.
"""
from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = float(os.environ.get("MMPIPE_HEALTHCHECK_TIMEOUT", "3"))


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_channel(addr: str):
    """A plaintext or TLS channel to `addr`, as the MMPIPE_*TLS* variables of this container say."""
    import grpc

    e = os.environ.get
    if not (e("MMPIPE_TLS_CERT_FILE") or e("MMPIPE_STAGE_TLS_CA_FILE") or e("MMPIPE_STAGE_TLS_CERT_FILE")):
        return grpc.insecure_channel(addr)
    ca = e("MMPIPE_STAGE_TLS_CA_FILE") or e("MMPIPE_TLS_CA_FILE")
    cert, key = e("MMPIPE_STAGE_TLS_CERT_FILE"), e("MMPIPE_STAGE_TLS_KEY_FILE")
    if not cert and e("MMPIPE_TLS_CA_FILE"):  # the server wants a client certificate: present our own
        cert, key = e("MMPIPE_TLS_CERT_FILE"), e("MMPIPE_TLS_KEY_FILE")
    creds = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                         certificate_chain=_read(cert))
    name = e("MMPIPE_STAGE_TLS_SERVER_NAME")
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", name)] if name else [])


def check_grpc(addr: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc_channel(addr) as channel:
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
