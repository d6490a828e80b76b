"""gRPC over TLS and mTLS (services/common/tls.py), with certificates made here by `cryptography`.

  * one-way TLS, in process: a TLS client gets through; a plaintext client and a client that trusts another
    CA are refused;
  * mTLS between two real stage processes: ingest (mTLS server, and an mTLS client of the encoder) and the
    encoder (mTLS server); an Ingest call runs end to end through both; a plaintext client and a TLS client
    without a certificate are refused; docker/healthcheck.py reports SERVING over mTLS.
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from services_helpers import start_stage_process
from tls_helpers import Certs, certs  # noqa: F401  (fixture)

from mmpipe.services.common.tls import ClientTLS, ServerTLS, client_tls_from_env

ROOT = Path(__file__).resolve().parents[1]


def _health(addr: str, tls: ClientTLS | None, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING, or the gRPC code of a failed check."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = (grpc.secure_channel(addr, tls.credentials(), options=tls.channel_options()) if tls
          else grpc.insecure_channel(addr))
    with ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _wait_serving(addr: str, tls: ClientTLS, proc, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if _health(addr, tls, 1.0) == "SERVING":
            return
        time.sleep(0.1)
    raise RuntimeError(f"{addr} not SERVING over TLS; log tail:\n{log.read_text(errors='replace')[-3000:]}")


def _png(seed: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- one-way TLS, in process ------------------------------------------------------------------------------
def test_one_way_tls_refuses_plaintext_and_untrusted_clients(certs: Certs) -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    from mmpipe.services.common.grpc_server import server_options
    from mmpipe.shared.cache.embedded_redis import free_port

    async def main() -> dict[str, str]:
        server = grpc.aio.server(options=server_options())
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        tls = ServerTLS(certs.server_cert, certs.server_key)  # no CA file: no client certificate needed
        assert not tls.mutual
        port = server.add_secure_port(f"127.0.0.1:{free_port()}", tls.credentials())
        await server.start()
        addr = f"127.0.0.1:{port}"
        try:
            checks = {
                "tls": ClientTLS(ca_file=certs.ca),
                "tls by name": ClientTLS(ca_file=certs.ca, server_name="localhost"),
                "plaintext": None,
                "other CA": ClientTLS(ca_file=certs.other_ca),
            }
            return {k: await asyncio.to_thread(_health, addr, v) for k, v in checks.items()}
        finally:
            await server.stop(0)

    got = asyncio.run(main())
    assert got["tls"] == "SERVING" and got["tls by name"] == "SERVING"
    assert got["plaintext"] == "UNAVAILABLE"
    assert got["other CA"] == "UNAVAILABLE"


def test_tls_flags_are_checked(certs: Certs, tmp_path: Path) -> None:
    from mmpipe.services.common.tls import _client_tls, _server_tls
    from mmpipe.shared.errors import InvalidInputError

    assert _server_tls(None, None, None) is None and _client_tls(None, None, None, "x") is None
    with pytest.raises(InvalidInputError, match="both --tls-cert-file and --tls-key-file"):
        _server_tls(certs.server_cert, None, None)
    with pytest.raises(InvalidInputError, match="no such file"):
        _server_tls(certs.server_cert, str(tmp_path / "missing.key"), None)
    with pytest.raises(InvalidInputError, match="go together"):
        _client_tls(certs.ca, certs.client_cert, None, None)
    env = {"MMPIPE_STAGE_TLS_CA_FILE": certs.ca, "MMPIPE_STAGE_TLS_CERT_FILE": certs.client_cert,
           "MMPIPE_STAGE_TLS_KEY_FILE": certs.client_key}
    assert client_tls_from_env(env) == ClientTLS(certs.ca, certs.client_cert, certs.client_key)
    assert client_tls_from_env({}) is None


# --- mTLS between two real stage processes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_stages(qwen2_vl_dir, redis_server, certs: Certs, tmp_path_factory):  # noqa: F811
    server = ["--tls-cert-file", certs.server_cert, "--tls-key-file", certs.server_key, "--tls-ca-file", certs.ca]
    client = ["--stage-tls-ca-file", certs.ca, "--stage-tls-cert-file", certs.client_cert,
              "--stage-tls-key-file", certs.client_key]
    log_dir = tmp_path_factory.mktemp("mtls-logs")
    enc = start_stage_process("encoder", qwen2_vl_dir, redis_server, extra=server, log_dir=log_dir, wait=False)
    ing = start_stage_process("ingest", qwen2_vl_dir, redis_server, encoder_addr=enc.addr, extra=server + client,
                              log_dir=log_dir, wait=False)
    tls = ClientTLS(certs.ca, certs.client_cert, certs.client_key)
    try:
        for p in (enc, ing):
            _wait_serving(p.addr, tls, p.proc, p.log_path)
        yield {"encoder": enc, "ingest": ing, "tls": tls}
    finally:
        ing.stop()
        enc.stop()


def test_ingest_to_encoder_over_mtls_end_to_end(mtls_stages, certs: Certs) -> None:
    from mmpipe.services.common.convert import MediaSource
    from mmpipe.services.common.stage_clients import IngestClient, make_channel

    url = "data:image/png;base64," + base64.b64encode(_png(4242)).decode()

    async def main():
        client = IngestClient(make_channel(mtls_stages["ingest"].addr, tls=mtls_stages["tls"]), timeout_s=60)
        try:
            return await client.ingest([MediaSource(modality="image", url=url)])
        finally:
            await client.close()

    refs = asyncio.run(main())
    # ingest decoded and hashed, asked the encoder (Lookup), had it encode (Encode): both hops over mTLS
    assert len(refs) == 1 and refs[0].num_tokens > 0 and ":image:hash:" in refs[0].key


def test_mtls_refuses_plaintext_and_certificateless_clients(mtls_stages, certs: Certs) -> None:
    for name in ("encoder", "ingest"):
        addr = mtls_stages[name].addr
        assert _health(addr, mtls_stages["tls"]) == "SERVING"
        assert _health(addr, None) == "UNAVAILABLE", f"{name} answered a plaintext client"
        assert _health(addr, ClientTLS(ca_file=certs.ca)) == "UNAVAILABLE", f"{name} answered without a client cert"
        other = ClientTLS(certs.other_ca, certs.client_cert, certs.client_key)
        assert _health(addr, other) == "UNAVAILABLE", f"{name} was trusted with the wrong CA"


def test_docker_healthcheck_speaks_mtls(mtls_stages, certs: Certs, monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("mmpipe_healthcheck", ROOT / "docker" / "healthcheck.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    addr = mtls_stages["encoder"].addr
    for k in ("MMPIPE_STAGE_TLS_CA_FILE", "MMPIPE_STAGE_TLS_CERT_FILE", "MMPIPE_STAGE_TLS_KEY_FILE",
              "MMPIPE_TLS_CERT_FILE", "MMPIPE_TLS_KEY_FILE", "MMPIPE_TLS_CA_FILE", "MMPIPE_STAGE_TLS_SERVER_NAME"):
        monkeypatch.delenv(k, raising=False)
    assert hc.check_grpc(addr) == 1  # plaintext against an mTLS server
    # as inside the stage's own container: its server identity and CA, nothing else
    monkeypatch.setenv("MMPIPE_TLS_CERT_FILE", certs.server_cert)
    monkeypatch.setenv("MMPIPE_TLS_KEY_FILE", certs.server_key)
    monkeypatch.setenv("MMPIPE_TLS_CA_FILE", certs.ca)
    assert hc.check_grpc(addr) == 0, capsys.readouterr().err
    monkeypatch.setenv("MMPIPE_STAGE_TLS_SERVER_NAME", "localhost")
    assert hc.check_grpc(addr) == 0, capsys.readouterr().err
