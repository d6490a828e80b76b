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
