"""Named regression tests, one per crash the hostile-input fuzzing found (issue 5). Each names what used to
happen; each must now be a clear 4xx and leave the process serving.
"""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import subprocess
import sys
import zipfile

import pytest

from mmpipe.shared.errors import InvalidInputError, MMPipeError
from mmpipe.shared.media.policy import MediaPolicy


def test_decord_bad_alloc_abort_on_forged_stts_sample_count(tmp_path):
    """Found by mutating a 1.7 KB mp4: an stts entry claiming 2^31 samples made decord throw std::bad_alloc,
    which aborted the whole ingest process (SIGABRT). Now PyAV reads the header first and refuses it."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    d = bytearray(buf.getvalue())
    struct.pack_into(">I", d, d.index(b"stts") + 12, 0x7F000000)
    path = tmp_path / "stts.mp4"
    path.write_bytes(bytes(d))
    code = ("import sys\nfrom mmpipe.shared.media.loader import MediaLoader\nfrom mmpipe.shared.media.policy import "
            "MediaPolicy\nfrom mmpipe.shared.errors import MMPipeError\ntry:\n    MediaLoader(MediaPolicy()).load("
            "'video', open(sys.argv[1], 'rb').read())\nexcept MMPipeError as e:\n    print('STATUS', e.http_status)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "STATUS 400" in r.stdout, (r.returncode, r.stderr[-1500:])


def test_torch_zip_bomb_inflated_before_size_check():
    """A 195 KB torch.save archive re-zipped with DEFLATE inflated to 200 MB inside torch.load before the
    tensor-size check could run (and to gigabytes with larger payloads). Now compressed records are refused
    before torch.load sees the archive."""
    import tracemalloc

    import torch

    from mmpipe.shared.media.embeds import decode_tensor_b64

    raw = io.BytesIO()
    torch.save(torch.zeros(4_000_000), raw)
    bomb = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info.filename))
    payload = base64.b64encode(bomb.getvalue()).decode()
    assert len(payload) < 100_000
    tracemalloc.start()
    with pytest.raises(InvalidInputError, match="compressed"):
        decode_tensor_b64(payload, param="image_embeds", max_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("url", ["http://[", "//[", "file://[x/", "http://[::1", "https://a]b/"])
def test_fetch_invalid_ipv6_url_raised_value_error(url):
    """urllib.parse.urlsplit raises ValueError('Invalid IPv6 URL'); fetch_bytes let it escape (a 500)."""
    from mmpipe.shared.media.fetch import fetch_bytes

    with pytest.raises(MMPipeError) as ei:
        fetch_bytes(url, MediaPolicy())
    assert 400 <= ei.value.http_status < 500


@pytest.mark.parametrize("url", ["http://[", "http://x:99999/a.png", "http://x:abc/a.png"])
def test_gateway_precheck_invalid_url_raised_value_error(url):
    """The gateway's URL pre-check had the same urlsplit ValueError (and bad ports): a 500 on the HTTP API."""
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.prepare import Preparer

    with pytest.raises(InvalidInputError) as ei:
        Preparer(GatewayConfig(model="m"), info=None).precheck_url(url, "image")
    assert ei.value.param == "image_url"


@pytest.mark.parametrize("field, value", [("stop_token_ids", [-1]), ("stop_token_ids", [2**40]), ("seed", 2**70),
                                          ("top_k", 2**40), ("max_tokens", 2**40)])
def test_sampling_values_out_of_wire_range_were_500(field, value):
    """schemathesis: POST /v1/completions with stop_token_ids=[-1] died in protobuf (ValueError: Value out of
    range) when the request was converted for the generator: a 500. SamplingParams now refuses it (400)."""
    from mmpipe.shared.types import SamplingParams

    with pytest.raises(InvalidInputError) as ei:
        SamplingParams(**{field: value})
    assert ei.value.param == field


@pytest.fixture(scope="module")
def gateway():
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.core import GatewayCore
    from mmpipe.services.gateway.http.app import build_app
    from mmpipe.services.gateway.model_info import load_model_info
    from mmpipe.services.gateway.stages import StageClients
    from mmpipe.shared.cache.embedded_redis import free_port
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("qwen2_5_omni"))
    info = load_model_info(model)
    loop = asyncio.new_event_loop()

    async def make():
        down = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        return build_app(GatewayCore(GatewayConfig(model=model, served_model_names=("tiny",)), info,
                                     StageClients(*down)))

    app = loop.run_until_complete(make())
    yield app, loop
    loop.close()


def _post(gateway, path, body):
    import httpx

    app, loop = gateway

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw") as c:
            return await c.post(path, json=body)

    return loop.run_until_complete(go())


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": 2**70}, "seed"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://["}}]}]}, "malformed"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]}, "metadata"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}"
                                               "{% endfor %}"}, "--trust-request-chat-template"),
])
def test_gateway_answers_4xx_for_former_500s(gateway, path, body, needle):
    r = _post(gateway, path, body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"] + str(err["param"])


# --- issue 16: found when tried as an attacker would ----------------------------------------------------------
def _post_raw(gateway, path, content: bytes):
    import httpx

    app, loop = gateway

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw") as c:
            return await c.post(path, content=content, headers={"content-type": "application/json"})

    return loop.run_until_complete(go())


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", rb'{"model": "tiny", "prompt": "hi \ud800 there", "max_tokens": 1}', "prompt"),
    ("/v1/completions", rb'{"model": "tiny", "prompt": "x", "stop": ["ok", "\udfff"]}', "stop[1]"),
    ("/v1/chat/completions", rb'{"model": "tiny", "messages": [{"role": "user", "content": "a\udc00"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", rb'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", '
                             rb'"uuid": "\ud800", "image_url": null}]}]}', "messages[0].content[0].uuid"),
])
def test_lone_surrogate_in_a_string_field_was_500(gateway, path, body, param):
    """A `\\ud800` escape is valid JSON but not valid Unicode: the tokenizer raised TypeError, and errors that
    quoted the value failed to encode their own JSON (UnicodeEncodeError): 500s. Now a 400 naming the field."""
    r = _post_raw(gateway, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_a_surrogate_pair_is_still_accepted(gateway):
    """An escaped emoji (`\\ud83d\\ude00`, a valid pair) passes the check and reaches the core (stages down: 503)."""
    r = _post_raw(gateway, "/v1/completions", rb'{"model": "tiny", "prompt": "hi \ud83d\ude00", "max_tokens": 1}')
    assert r.status_code == 503 and "surrogate" not in r.text, r.text


def test_error_json_never_fails_on_text_it_quotes():
    """The error body quotes user text; a lone surrogate in it made JSONResponse raise (500)."""
    from mmpipe.services.gateway.http.errors import error_response

    r = error_response(InvalidInputError("bad uuid '\ud800'", param="x\udfff"))
    assert r.status_code == 400 and b"\\\\ud800" in r.body


@pytest.fixture(scope="module")
def qwen_adapter():
    from mmpipe.shared.models.registry import load_adapter
    from mmpipe.shared.models.tiny import ensure_tiny_model

    return load_adapter(str(ensure_tiny_model("qwen2_vl")), device="cpu", part="lm")


@pytest.mark.parametrize("grid, needle", [
    ([[1, 3, 4]], "multiples of the merge size"),  # 12 patches // 4 = 3 rows: used to pass, then fail in M-RoPE
    ([[1.0, 4.0, 4.0]], "integers"),
    ([[1, 4, 4.5]], "integers"),
    ([[True, True, True]], "integers"),
    ([[1, 2**40, 4]], "multiples of the merge size"),
])
def test_qwen_grid_not_integer_or_not_merge_multiple_was_500(qwen_adapter, grid, needle):
    """Qwen-VL grids must be integer (t, h, w) with h, w multiples of spatial_merge_size: a float or odd grid
    was accepted, cached, and then failed in the generator's M-RoPE positions on every repeat (500). Validation
    runs before any cache write (encoder PutEmbeddings, offline LLM), so nothing is cached."""
    import torch

    hidden = qwen_adapter.hidden_size
    with pytest.raises(InvalidInputError, match=needle) as ei:
        qwen_adapter.embeds_from_user("image", {"image_embeds": torch.zeros(3, hidden),
                                                "image_grid_thw": torch.tensor(grid)})
    assert ei.value.param == "image_grid_thw"
    ok = qwen_adapter.embeds_from_user("image", {"image_embeds": torch.zeros(4, hidden),
                                                 "image_grid_thw": torch.tensor([[1, 4, 4]])})
    assert ok[0].meta["grid_thw"] == [1, 4, 4]


def test_grpc_image_grid_thw_keeps_its_integer_dtype():
    """The public gRPC API sends image_grid_thw as a base64 tensor, which was decoded as float-only: an int64
    grid was refused and a float one was an INTERNAL error. Integer dtypes are kept; floats are a 400."""
    import torch

    from mmpipe.services.common.pb import gateway_pb2
    from mmpipe.services.gateway.embeds import decode_user_embeds
    from mmpipe.services.gateway.grpc_api.servicer import part_to_dict
    from mmpipe.shared.inputs.parse import ItemRef
    from mmpipe.shared.media.embeds import encode_tensor_b64

    def part(grid):
        pb = gateway_pb2.ContentPart(image_embeds=gateway_pb2.ImageEmbeds(
            data=encode_tensor_b64(torch.ones(4, 8)), image_grid_thw=encode_tensor_b64(grid)))
        return ItemRef(modality="image", index=0, source=part_to_dict(pb, "p")["image_embeds"], is_embeds=True)

    tensors, rows = decode_user_embeds(part(torch.tensor([[1, 4, 4]], dtype=torch.int64)))
    assert tensors["image_grid_thw"].dtype == torch.int64 and tensors["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert rows == 4
    with pytest.raises(InvalidInputError) as ei:
        decode_user_embeds(part(torch.tensor([[1.0, 4.0, 4.0]])))
    assert ei.value.param == "image_embeds.image_grid_thw" and "dtype" in ei.value.message


def test_expanded_image_embeds_are_sized_before_they_are_materialised():
    """A 2.4 KB torch.save of an expanded (stride-0) tensor described 77 MB; it passed the size check of the
    view, was made contiguous and cached before the generator found the prompt too long. The row count is now
    checked against what the prompt has room for (max_model_len) before anything is materialised."""
    import tracemalloc

    import torch

    from mmpipe.shared.errors import LimitExceededError
    from mmpipe.shared.media.embeds import decode_tensor_b64

    buf = io.BytesIO()
    torch.save(torch.ones(1, 2048).expand(10_000, 2048), buf)  # 8 KB of storage, an 82 MB view
    payload = base64.b64encode(buf.getvalue()).decode()
    assert len(payload) < 16_000
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="rows") as ei:
        decode_tensor_b64(payload, param="image_embeds", max_rows=4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ei.value.param == "image_embeds" and peak < 4 * 1024 * 1024
    with pytest.raises(InvalidInputError, match="exceeds the limit"):  # and the materialised size, on its own
        decode_tensor_b64(payload, param="image_embeds", max_bytes=1 << 20)


def test_redirect_to_a_non_http_url_was_500():
    """httpx builds the next request of every redirect even when not following it, and raised InvalidURL (not
    an HTTPError) for `data:` / `mailto:` / `javascript:` Locations: a 500. Now a 403 like file:// targets."""
    import http.server
    import threading

    from mmpipe.shared.errors import MediaPolicyError
    from mmpipe.shared.media.fetch import fetch_bytes

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", {"/d": "data:image/png;base64,AAAA", "/m": "mailto:a@b.c",
                                          "/j": "javascript:alert(1)"}[self.path])
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for p in ("/d", "/m", "/j"):
            with pytest.raises(MediaPolicyError, match="not an http"):
                fetch_bytes(f"http://127.0.0.1:{srv.server_port}{p}", MediaPolicy(allow_private_networks=True))
    finally:
        srv.shutdown()
        srv.server_close()


def test_refused_symlink_does_not_name_its_target(tmp_path):
    """A symlink under --allowed-local-media-path pointing outside was refused with a message naming the
    resolved target (e.g. a /proc/<pid>/... path). Now only the client's own path is named."""
    from mmpipe.shared.errors import MediaPolicyError
    from mmpipe.shared.media.fetch import fetch_bytes

    root = tmp_path / "media"
    root.mkdir()
    secret = tmp_path / "secret-target-dir"
    secret.mkdir()
    (secret / "x.png").write_bytes(b"x")
    (root / "link.png").symlink_to(secret / "x.png")
    with pytest.raises(MediaPolicyError) as ei:
        fetch_bytes(f"file://{root}/link.png", MediaPolicy(allowed_local_media_path=str(root)))
    assert "secret-target-dir" not in ei.value.message and str(tmp_path) not in ei.value.message.replace(
        f"{root}/link.png", "")


@pytest.mark.parametrize("text", ["uuid \u00e9\u4e2d\u6587 not cached", "x" * 100_000, "\ud800 lone"])
def test_grpc_error_status_is_ascii_and_bounded(text):
    """User text copied into a gRPC error (details, param metadata) turned a client error into INTERNAL
    (non-ASCII metadata) or RESOURCE_EXHAUSTED (over gRPC's 8 KB metadata limit). The one mapping escapes and
    truncates it."""
    import grpc

    from mmpipe.services.common.grpc_server import error_status

    code, details, md = error_status(InvalidInputError(text, param=text))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for value in [details, *(v for _, v in md)]:
        assert value.isascii() and value.isprintable() and len(value) <= 1024


def test_one_tenant_cannot_fill_the_embedding_cache(redis_url):
    """Ten 2.4 KB image_embeds requests filled 770 MB of Redis and evicted another tenant's entries. The
    encoder charges what PutEmbeddings writes to the tenant (in Redis, shared by every replica) and refuses
    writes beyond its share of the capacity with 429 / RESOURCE_EXHAUSTED; other tenants keep theirs."""
    import redis

    from mmpipe.services.encoder.tenant_share import TenantCacheShare, cache_capacity_bytes
    from mmpipe.shared.errors import QuotaExceededError

    client = redis.Redis.from_url(redis_url)
    capacity = cache_capacity_bytes(client, None)
    assert capacity == 256 * 1024 * 1024  # the session server's maxmemory
    now = [1000.0]
    share = TenantCacheShare(client, limit_bytes=1000, window_s=60, clock=lambda: now[0])
    share.charge("key-a", 600)
    with pytest.raises(QuotaExceededError, match="tenant-cache-share") as ei:
        share.charge("key-a", 600)
    assert (ei.value.http_status, ei.value.grpc_code) == (429, "RESOURCE_EXHAUSTED")
    assert share.used("key-a") == 600  # a refused write is not counted
    share.charge("key-b", 900)  # another tenant has its own share
    share.charge(None, 900)  # and so has the default tenant
    now[0] += 61  # the window has passed: a's old writes no longer count
    share.charge("key-a", 900)
    assert share.used("key-a") == 900
    assert 0 < client.ttl(share._keys("key-a")[-1]) <= 61
    TenantCacheShare(client, limit_bytes=0, window_s=60).charge("key-a", 10**12)  # 0: off
    client.close()


# --- issue 16, "the new surfaces fuzzed": structured outputs ---------------------------------------------------
def _nested_schema(levels: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(levels):
        s = {"type": "object", "properties": {"a": s}}
    return s


_MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": _MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": _nested_schema(300)}}}, "response_format.json_schema.schema"),
    ({"model": "tiny", "messages": _MSGS, "structured_outputs": {"json": _nested_schema(300)}},
     "structured_outputs.json"),
    ({"model": "tiny", "messages": _MSGS, "structured_outputs": {"json": "[" * 5000 + "]" * 5000}},
     "structured_outputs.json"),
    ({"model": "tiny", "messages": _MSGS, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": _nested_schema(300)}}]},
     "tools[0].function.parameters"),
])
def test_deeply_nested_schema_was_500(gateway, body, param):
    """A schema given as JSON text (structured_outputs.json as a string; the public gRPC API's field always is
    one) nested 5,000 deep made json.loads raise RecursionError: a 500. Schemas given as objects got past Python
    and were refused by llguidance's own recursion limit, in its words. Now one rule refuses every schema nested
    deeper than 64 levels, before anything parses, hashes or compiles it: a 400 naming the field and the limit
    (shared/structured/limits.py)."""
    r = _post(gateway, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "levels deep" in err["message"], err


def test_wide_schema_compile_time_is_bounded(gateway):
    """One object of 10,000 optional properties (290 KB) took llguidance 3.4 s to validate and 10-50 s to build
    a matcher: the gateway's worker thread and then the generator's engine loop (every request in the batch)
    were held that long. Now a spec over 32 KiB is a 400 at once, and the costliest spec under the limit
    (optional properties filling it) compiles, matcher included, in a bounded time."""
    import time

    from transformers import AutoTokenizer

    from mmpipe.shared.models.tiny import ensure_tiny_model
    from mmpipe.shared.structured import StructuredOutputsParams
    from mmpipe.shared.structured.grammar import GrammarCompiler
    from mmpipe.shared.structured.limits import SpecLimits

    from mmpipe.shared.errors import LimitExceededError

    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}
    t0 = time.monotonic()
    r = _post(gateway, "/v1/chat/completions", {"model": "tiny", "messages": _MSGS,
                                                "structured_outputs": {"json": wide}})
    limit = SpecLimits.from_env().max_bytes
    assert r.status_code == 400 and f"at most {limit}" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 2
    def optional(n: int) -> dict:
        return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}

    n = limit // 20
    while True:  # the most optional properties that fit the limit
        try:
            fits = StructuredOutputsParams(json=optional(n))
            break
        except LimitExceededError:
            n -= 50
    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2_vl")))
    compiler.ll_tokenizer  # noqa: B018 - built once, outside the timing
    t0 = time.monotonic()
    compiler.matcher(fits)
    took = time.monotonic() - t0
    print(f"{n} optional properties ({len(fits.spec()[1])} bytes): compiled in {took:.2f} s")
    assert took < 10, took


_I64_MIN = -2 ** 63
# each of these segfaulted llguidance 1.9.1's grammar validation (found by the random fuzz run of 2026-12-02;
# minimised by a sweep over numeric edges: every crash was an integer range whose bounds both land on i64::MIN)
_ENGINE_CRASHERS = [
    {"type": "integer", "minimum": _I64_MIN, "maximum": _I64_MIN},
    {"type": "integer", "minimum": -1e300, "maximum": -1e300},
    {"type": "integer", "exclusiveMinimum": -1e300, "maximum": _I64_MIN - 1},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": _I64_MIN, "maximum": _I64_MIN + 1}}},
]


@pytest.mark.parametrize("schema", _ENGINE_CRASHERS)
def test_integer_range_at_i64_min_segfaulted_the_grammar_engine(gateway, schema):
    """The gateway compiled response_format schemas in its own process, so one of these took it down with
    every stream it served. Now a numeric bound past +-2**53 is a 400 naming the field before anything compiles
    (shared/structured/limits.py), and the engine runs in a worker process (the next test)."""
    r = _post(gateway, "/v1/chat/completions", {"model": "tiny", "messages": _MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and "2**53" in err["message"], err
    ok = _post(gateway, "/v1/chat/completions", {"model": "tiny", "messages": _MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": -2 ** 53}}}})
    assert ok.status_code == 503, ok.text  # compiled and passed; the stages of this fixture are down


@pytest.mark.parametrize("spec", [{"json": "false"}, {"json": False}])
def test_the_false_schema_as_text_was_500(gateway, spec):
    """`structured_outputs.json` as the text "false" (the JSON schema no value satisfies) passed the "exactly one
    kind" check as a string, then parsed to False, which the spec took for "not given": StopIteration, a 500.
    Found by a random fuzz run. Now a 400 naming the field, as the object form is."""
    r = _post(gateway, "/v1/chat/completions", {"model": "tiny", "messages": _MSGS, "structured_outputs": spec})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "structured_outputs.json" and "`false`" in err["message"], err


@pytest.fixture()
def isolated_compiler():
    from transformers import AutoTokenizer

    from mmpipe.shared.models.tiny import ensure_tiny_model
    from mmpipe.shared.structured.grammar import GrammarCompiler

    c = GrammarCompiler(AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2_vl")), isolate=True)
    yield c
    c.sandbox.close()


def test_a_grammar_engine_crash_costs_one_spec_not_the_process(isolated_compiler, monkeypatch):
    """Defence in depth for the next crash nobody has found yet: with the bound check switched off, the real
    crashing schema reaches llguidance, in the gateway's grammar worker. The spec is a 400 naming the field,
    the worker is replaced, this process lives on, a repeat is refused from the cache without a second crash,
    and the next spec compiles."""
    from mmpipe.shared.structured import StructuredOutputsParams, limits

    monkeypatch.setattr(limits, "_check_bound", lambda *a: None)
    crash = StructuredOutputsParams(json=_ENGINE_CRASHERS[0])
    for _ in range(2):
        with pytest.raises(InvalidInputError) as ei:
            isolated_compiler.compile(crash)
        assert ei.value.param == "structured_outputs.json"
        assert "crashed (SIGSEGV)" in ei.value.message, (
            f"{ei.value.message!r}: llguidance no longer crashes on this schema (upgraded?); pick another "
            "crasher or switch this test to the worker's CPU/timeout path")
    assert isolated_compiler.sandbox.replaced == 1
    assert "integer" in isolated_compiler.compile(StructuredOutputsParams(json={"type": "integer", "maximum": 5}))


def test_a_grammar_compile_past_its_time_is_a_400(isolated_compiler, monkeypatch):
    """A spec the engine takes too long over (here 10,000 optional properties, 3+ s to validate, with the size
    limit raised and the compile timeout at 1 s) is stopped: a 400 naming the field, the worker replaced."""
    from mmpipe.shared.structured import StructuredOutputsParams
    from mmpipe.shared.structured.limits import MAX_BYTES_ENV

    monkeypatch.setenv(MAX_BYTES_ENV, str(1 << 20))
    isolated_compiler.sandbox.timeout_s = 1.0
    isolated_compiler.compile(StructuredOutputsParams(regex="[ab]+"))  # the worker started: startup not charged
    wide = StructuredOutputsParams(json={"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(10_000)}})
    with pytest.raises(InvalidInputError) as ei:
        isolated_compiler.compile(wide)
    assert "took longer than 1 s" in ei.value.message and ei.value.param == "structured_outputs.json", ei.value
    assert isolated_compiler.sandbox.replaced == 1
    assert isolated_compiler.compile(StructuredOutputsParams(choice=["yes", "no"]))
