"""Tenant isolation of UUID-keyed cache entries (docs/security.md, "Isolation"), and the API-key checks.

End to end through the real gateway with two API keys (one from --api-key, one from --api-key-file) over the
real stage processes of `stage_stack` and their Redis:
  * tenant A stores uuid "x"; tenant B asking for uuid "x" with a null payload gets 400 not-cached, never A's
    embedding; B sending its own image with uuid "x" gets its own entry; A still gets A's;
  * content without a uuid is shared by hash: B's request for A's image does no encoder or ingest work;
  * without --trust-tenant-header the tenant header is ignored;
  * the public gRPC API (over TLS here) applies the same tenant.
Unit level: tenant ids are stable and reveal nothing of the key; every key is compared with
hmac.compare_digest on equal-length digests; the offline LLM keeps tenant None.
"""
from __future__ import annotations

import base64
import hmac
import io
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from services_helpers import GatewayProcess, start_gateway_process
from tls_helpers import Certs, certs  # noqa: F401  (fixture)

from mmpipe.services.gateway.http import auth

KEY_A = "sk-tenant-a-0123456789"
KEY_B = "sk-tenant-b-a-longer-key-9876543210"
GREEDY = {"temperature": 0.0, "max_tokens": 2}


def _png(seed: int) -> str:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- unit: keys, tenants, constant-time comparison ----------------------------------------------------------
@dataclass(frozen=True)
class _Cfg:
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    trust_tenant_header: bool = False

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        from mmpipe.services.gateway.config import GatewayConfig

        return GatewayConfig.all_api_keys.fget(self)  # the real property, on this stand-in


def test_tenant_id_is_stable_distinct_and_not_the_key() -> None:
    a, b = auth.tenant_of_key(KEY_A), auth.tenant_of_key(KEY_B)
    assert a == auth.tenant_of_key(KEY_A) and a != b
    assert KEY_A not in a and "tenant-a" not in a and a.startswith("key-") and len(a) == 4 + 32


def test_tenant_comes_from_the_key_or_a_trusted_header_only() -> None:
    from mmpipe.shared.errors import AuthenticationError, InvalidInputError

    cfg = _Cfg(api_key=KEY_A, api_keys=(KEY_B,))
    assert auth.authenticate(cfg, f"Bearer {KEY_A}", None) == auth.tenant_of_key(KEY_A)
    assert auth.authenticate(cfg, f"Bearer {KEY_B}", "someone-else") == auth.tenant_of_key(KEY_B)  # not trusted
    for bad in (None, "Bearer", f"Basic {KEY_A}", f"Bearer {KEY_A}x", f"Bearer {KEY_A[:-1]}"):
        with pytest.raises(AuthenticationError):
            auth.authenticate(cfg, bad, None)
    trusted = _Cfg(api_key=KEY_A, trust_tenant_header=True)
    assert auth.authenticate(trusted, f"Bearer {KEY_A}", "team-1") == "hdr-team-1"
    assert auth.authenticate(trusted, f"Bearer {KEY_A}", None) == auth.tenant_of_key(KEY_A)
    with pytest.raises(InvalidInputError):
        auth.authenticate(trusted, f"Bearer {KEY_A}", "a b")
    # no keys: the default tenant, unless a trusted proxy names one
    assert auth.authenticate(_Cfg(), None, "team-1") is None
    assert auth.authenticate(_Cfg(trust_tenant_header=True), None, "team-1") == "hdr-team-1"


def test_every_key_is_compared_with_compare_digest_on_equal_lengths(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ("k", KEY_A, KEY_B, "x" * 300)
    for token in ("", "k", "wrong", KEY_B, "y" * 1000):
        calls.clear()
        if token in keys:
            assert auth.check_api_key(keys, f"Bearer {token}") == token
        else:
            with pytest.raises(auth.AuthenticationError):
                auth.check_api_key(keys, f"Bearer {token}")
        # every configured key compared (no early exit), always on fixed-size digests whatever the lengths
        assert len(calls) == len(keys), token
        assert set(calls) == {(32, 32)}, (token, calls)


def test_api_key_list_and_file(tmp_path: Path) -> None:
    from mmpipe.services.gateway.config import add_cli_args, config_from_args

    f = tmp_path / "keys"
    f.write_text(f"# one key per line\n{KEY_B}\n\nsk-c\n")
    import argparse

    args = add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--model", "m", "--api-key", f"{KEY_A},sk-d", "--api-key-file", str(f)])
    assert config_from_args(args).all_api_keys == (KEY_A, "sk-d", KEY_B, "sk-c")


def test_offline_llm_keeps_the_default_tenant(qwen2_vl_dir, redis_url) -> None:  # noqa: F811
    from PIL import Image

    from mmpipe import LLM, SamplingParams

    llm = LLM(qwen2_vl_dir, mm_cache=redis_url, device="cpu")
    img = Image.fromarray(np.random.default_rng(7).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    llm.generate({"prompt": prompt, "multi_modal_data": {"image": img},
                  "multi_modal_uuids": {"image": ["offline-x"]}}, SamplingParams(max_tokens=1))
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys("*offline-x")]
    assert len(keys) == 1 and keys[0].endswith(":image:uuid:-:offline-x")


# --- end to end: two API keys through the real gateway ------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(stage_stack, qwen2_vl_dir, certs: Certs, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("tenants")
    keyfile = d / "keys"
    keyfile.write_text(f"{KEY_B}\n")
    addrs = {"ingest": stage_stack.ingest_addr, "encoder": stage_stack.encoder_addr,
             "generator": stage_stack.generator_addr}
    gw = start_gateway_process(qwen2_vl_dir, addrs, d, [
        "--api-key-file", str(keyfile), "--tls-cert-file", certs.server_cert, "--tls-key-file", certs.server_key,
        "--shutdown-grace-s", "2"], env={"MMPIPE_API_KEY": KEY_A})
    try:
        gw.wait_healthy(90)
        yield gw
    finally:
        gw.stop()


def _chat(gw: GatewayProcess, key: str, url: str | None, uuid: str | None = None, headers: dict | None = None
          ) -> httpx.Response:
    part: dict = {"type": "image_url", "image_url": {"url": url} if url else None}
    if uuid is not None:
        part["uuid"] = uuid
    body = {"model": "tiny", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}],
            **GREEDY}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})


def _uuid_entries(redis_url: str, uuid: str) -> dict[str, bytes]:
    r = redis.Redis.from_url(redis_url)
    return {k.decode(): r.get(k) for k in r.keys(f"*:image:uuid:*:{uuid}")}


def test_a_uuid_is_private_to_its_tenant(gateway: GatewayProcess, stage_stack, redis_server) -> None:  # noqa: F811
    uuid = f"x-{time.monotonic_ns()}"  # the session's Redis is shared: a uuid no other test uses
    a_img, b_img = _png(101), _png(202)
    assert _chat(gateway, KEY_A, a_img, uuid).status_code == 200, "A stores uuid x"

    r = _chat(gateway, KEY_B, None, uuid)
    assert r.status_code == 400, r.text
    assert "not in the embedding cache" in r.json()["error"]["message"]
    # a tenant header is not trusted without --trust-tenant-header
    r = _chat(gateway, KEY_B, None, uuid, headers={"X-MMPipe-Tenant": auth.tenant_of_key(KEY_A)})
    assert r.status_code == 400, r.text

    assert _chat(gateway, KEY_B, b_img, uuid).status_code == 200, "B stores its own uuid x"
    entries = _uuid_entries(redis_server, uuid)
    tenants = {k.split(":uuid:")[1].rsplit(":", 1)[0] for k in entries}
    assert tenants == {auth.tenant_of_key(KEY_A), auth.tenant_of_key(KEY_B)}, entries.keys()
    a_val, b_val = (entries[next(k for k in entries if auth.tenant_of_key(t) in k)] for t in (KEY_A, KEY_B))
    assert a_val != b_val, "B's uuid x must hold B's embedding, not A's"

    # both can now refer to "their" x without media; neither entry was overwritten
    assert _chat(gateway, KEY_A, None, uuid).status_code == 200
    assert _chat(gateway, KEY_B, None, uuid).status_code == 200
    assert _uuid_entries(redis_server, uuid) == entries


def test_content_hash_entries_are_shared(gateway: GatewayProcess, stage_stack) -> None:  # noqa: F811
    def work() -> tuple[float, float]:
        return (stage_stack.metric("encoder", "mmpipe_encoder_items_encoded_total"),
                stage_stack.metric("ingest", "mmpipe_ingest_items_preprocessed_total"))

    img = _png(int(time.monotonic_ns() % 1_000_000) + 1000)
    start = work()
    assert _chat(gateway, KEY_A, img).status_code == 200
    before = work()
    assert before[0] > start[0] and before[1] > start[1], "A's new image is encoded once"

    assert _chat(gateway, KEY_B, img).status_code == 200
    assert work() == before, "B's copy of the same content must be a cache hit by hash (no encoder work)"


def test_grpc_api_over_tls_applies_the_same_tenant(gateway: GatewayProcess, certs: Certs) -> None:  # noqa: F811
    from mmpipe.client import MMPipeClient
    from mmpipe.shared.errors import AuthenticationError, NotCachedError

    uuid = f"g-{time.monotonic_ns()}"
    assert _chat(gateway, KEY_A, _png(303), uuid).status_code == 200
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": uuid},
                                        {"type": "text", "text": "hi"}]}]
    with MMPipeClient(gateway.grpc_addr, api_key=KEY_A, timeout=60, tls_ca_file=certs.ca) as a:
        assert a.chat(msg, model="tiny", **GREEDY).finish_reason is not None
    with MMPipeClient(gateway.grpc_addr, api_key=KEY_B, timeout=60, tls_ca_file=certs.ca) as b:
        with pytest.raises(NotCachedError):
            b.chat(msg, model="tiny", **GREEDY)
    with MMPipeClient(gateway.grpc_addr, api_key="sk-nobody", timeout=60, tls_ca_file=certs.ca) as c:
        with pytest.raises(AuthenticationError):
            c.chat(msg, model="tiny", **GREEDY)
