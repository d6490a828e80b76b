"""Fetch-policy tests for shared/media against a real HTTP server on 127.0.0.1 (no other host is contacted).

Covers: domain allow-list, redirects (followed / disabled / escaping the allow-list / loops), timeouts,
the byte cap, HTTP errors, data: URLs, local-path confinement, unsupported schemes, and loader round trips.
"""
from __future__ import annotations

import base64
import io
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from mmpipe.shared.errors import (InvalidInputError, MediaFetchError, MediaPolicyError, MediaTimeoutError)
from mmpipe.shared.media.fetch import fetch_bytes
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy

LARGE = 2 * 1024 * 1024


def _png(size=(32, 24), color=(10, 200, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "PNG")
    return b.getvalue()


def _mp4(n=16, w=64, h=48, fps=8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = i * 15
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _wav(seconds=1.0, sr=22050) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    b = io.BytesIO()
    sf.write(b, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV")
    return b.getvalue()


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, tuple[str, bytes]] = {}
    port = 0

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "application/octet-stream", headers=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up first (timeout / size-cap tests): expected
            pass

    def do_GET(self):  # noqa: N802 - http.server naming
        path = urllib.parse.urlsplit(self.path).path
        if path in self.files:
            ctype, body = self.files[path]
            return self._send(200, body, ctype)
        if path == "/redirect":
            return self._send(302, headers={"Location": "/image.png"})
        if path == "/redirect-rel":
            return self._send(301, headers={"Location": "image.png"})
        if path == "/redirect-chain":
            return self._send(307, headers={"Location": "/redirect"})
        if path == "/redirect-away":  # same server, but under a host name that is not allowed
            return self._send(302, headers={"Location": f"http://localhost:{self.port}/image.png"})
        if path == "/redirect-file":
            return self._send(302, headers={"Location": "file:///etc/passwd"})
        if path == "/loop":
            return self._send(302, headers={"Location": "/loop"})
        if path == "/slow":
            time.sleep(2.0)
            return self._send(200, b"late")
        if path == "/drip":  # each byte arrives quickly, the whole body does not
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return None
        if path == "/large":
            return self._send(200, b"\0" * LARGE)
        if path == "/large-nolength":  # no Content-Length: the cap must be enforced while streaming
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(LARGE // 65536):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return None
        if path == "/forbidden":
            return self._send(403, b"no")
        return self._send(404, b"not found")


@pytest.fixture(scope="module")
def server():
    files = {"/image.png": ("image/png", _png()), "/video.mp4": ("video/mp4", _mp4()),
             "/audio.wav": ("audio/wav", _wav())}
    handler = type("H", (_Handler,), {"files": files})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    handler.port = srv.server_address[1]
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{handler.port}", files
    srv.shutdown()
    srv.server_close()


def _pol(**kw) -> MediaPolicy:
    kw.setdefault("allowed_media_domains", ("127.0.0.1",))
    kw.setdefault("allow_redirects", True)
    kw.setdefault("fetch_timeout_s", 5.0)
    kw.setdefault("allow_private_networks", True)  # the test server is on 127.0.0.1: opt in explicitly
    return MediaPolicy(**kw)


# ------------------------------------------------------------------------------------------------ domains

def test_allowed_domain_ok(server):
    base, files = server
    assert fetch_bytes(f"{base}/image.png", _pol()) == files["/image.png"][1]
    assert fetch_bytes(f"{base}/image.png", _pol(allowed_media_domains=None)) == files["/image.png"][1]


def test_domain_refused_names_host_and_fix(server):
    base, _ = server
    with pytest.raises(MediaPolicyError) as ei:
        fetch_bytes(f"{base}/image.png", _pol(allowed_media_domains=("example.com",)))
    assert "127.0.0.1" in ei.value.message and "--allowed-media-domains" in ei.value.message
    assert ei.value.http_status == 403


def test_host_matching_rules():
    p = MediaPolicy(allowed_media_domains=("Example.COM.", "10.0.0.1"))
    assert p.host_allowed("example.com") and p.host_allowed("img.cdn.example.com")
    assert not p.host_allowed("badexample.com") and not p.host_allowed("example.com.evil.net")
    assert p.host_allowed("10.0.0.1") and not p.host_allowed("x.10.0.0.1")
    # userinfo must not fool the check: the real host here is evil.net
    with pytest.raises(MediaPolicyError, match="evil.net"):
        fetch_bytes("http://example.com@evil.net/x.png", p)


# ---------------------------------------------------------------------------------------------- redirects

def test_redirect_followed_when_allowed(server):
    base, files = server
    for path in ("/redirect", "/redirect-rel", "/redirect-chain"):
        assert fetch_bytes(base + path, _pol()) == files["/image.png"][1]


def test_redirect_refused_when_disabled_by_field(server):
    base, _ = server
    with pytest.raises(MediaPolicyError, match="redirect"):
        fetch_bytes(f"{base}/redirect", _pol(allow_redirects=False))


@pytest.mark.parametrize("value", ["0", "false", "False"])
def test_redirect_refused_when_disabled_by_env(server, monkeypatch, value):
    base, files = server
    monkeypatch.setenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", value)
    p = MediaPolicy.from_env(allowed_media_domains=("127.0.0.1",), allow_private_networks=True)
    assert p.allow_redirects is False
    assert MediaPolicy().allow_redirects is False  # a plain construction honours the env too
    with pytest.raises(MediaPolicyError, match="MMPIPE_MEDIA_URL_ALLOW_REDIRECTS"):
        fetch_bytes(f"{base}/redirect", p)
    assert fetch_bytes(f"{base}/image.png", p) == files["/image.png"][1]  # non-redirects still fine


def test_env_parsing(monkeypatch):
    monkeypatch.setenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "1")
    monkeypatch.setenv("MMPIPE_MEDIA_FETCH_TIMEOUT", "2.5")
    monkeypatch.setenv("MMPIPE_MEDIA_MAX_BYTES", "1234")
    p = MediaPolicy.from_env()
    assert (p.allow_redirects, p.fetch_timeout_s, p.max_bytes) == (True, 2.5, 1234)
    assert MediaPolicy.from_env(max_bytes=99).max_bytes == 99
    monkeypatch.setenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "maybe")
    with pytest.raises(InvalidInputError, match="MMPIPE_MEDIA_URL_ALLOW_REDIRECTS"):
        MediaPolicy.from_env()
    monkeypatch.delenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS")
    monkeypatch.delenv("MMPIPE_MEDIA_FETCH_TIMEOUT")
    monkeypatch.delenv("MMPIPE_MEDIA_MAX_BYTES")
    p = MediaPolicy.from_env()
    assert (p.allow_redirects, p.fetch_timeout_s, p.max_bytes) == (True, 10.0, 50 * 1024 * 1024)


def test_redirect_escaping_allow_list_refused(server):
    base, _ = server
    with pytest.raises(MediaPolicyError) as ei:
        fetch_bytes(f"{base}/redirect-away", _pol())
    assert "localhost" in ei.value.message and "redirect" in ei.value.message


def test_redirect_to_file_scheme_refused(server):
    base, _ = server
    with pytest.raises(MediaPolicyError, match="file"):
        fetch_bytes(f"{base}/redirect-file", _pol(allowed_local_media_path="/"))


def test_redirect_loop_capped(server):
    base, _ = server
    with pytest.raises(MediaFetchError, match="too many redirects"):
        fetch_bytes(f"{base}/loop", _pol(max_redirects=3))


# ------------------------------------------------------------------------------------ timeouts, size, errors

def test_timeout(server):
    base, _ = server
    t = time.monotonic()
    with pytest.raises(MediaTimeoutError) as ei:
        fetch_bytes(f"{base}/slow", _pol(fetch_timeout_s=0.4))
    assert time.monotonic() - t < 1.8
    assert ei.value.http_status == 504 and "MMPIPE_MEDIA_FETCH_TIMEOUT" in ei.value.message


def test_fetch_timeout_is_per_modality(server):
    base, files = server
    p = _pol(image_fetch_timeout_s=0.3, video_fetch_timeout_s=30.0, audio_fetch_timeout_s=0.3)
    t = time.monotonic()
    with pytest.raises(MediaTimeoutError) as ei:
        fetch_bytes(f"{base}/slow", p, "image")
    assert time.monotonic() - t < 1.5 and "MMPIPE_MEDIA_FETCH_TIMEOUT_IMAGE" in ei.value.message
    # the media loader passes the item's modality: an image URL gets the image timeout
    with pytest.raises(MediaTimeoutError, match="MMPIPE_MEDIA_FETCH_TIMEOUT_IMAGE"):
        MediaLoader(policy=p).load("image", f"{base}/slow")
    assert p.fetch_timeout("video") == 30.0 and p.fetch_timeout(None) == 5.0  # _pol's modality-less timeout
    assert fetch_bytes(f"{base}/image.png", p, "video") == files["/image.png"][1]


def test_fetch_timeout_and_redirect_env_names_as_vllm(monkeypatch):
    for var in ("MMPIPE_MEDIA_FETCH_TIMEOUT", "MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "VLLM_MEDIA_URL_ALLOW_REDIRECTS",
                *(f"MMPIPE_MEDIA_FETCH_TIMEOUT_{m}" for m in ("IMAGE", "VIDEO", "AUDIO")),
                *(f"VLLM_{m}_FETCH_TIMEOUT" for m in ("IMAGE", "VIDEO", "AUDIO"))):
        monkeypatch.delenv(var, raising=False)
    p = MediaPolicy.from_env()
    assert [p.fetch_timeout(m) for m in ("image", "video", "audio", None)] == [5.0, 30.0, 10.0, 10.0]  # vLLM's
    monkeypatch.setenv("MMPIPE_MEDIA_FETCH_TIMEOUT", "7")  # the old single knob: default of all three
    monkeypatch.setenv("VLLM_VIDEO_FETCH_TIMEOUT", "60")
    monkeypatch.setenv("VLLM_AUDIO_FETCH_TIMEOUT", "20")
    monkeypatch.setenv("MMPIPE_MEDIA_FETCH_TIMEOUT_AUDIO", "3")  # ours wins over vLLM's name
    p = MediaPolicy()
    assert [p.fetch_timeout(m) for m in ("image", "video", "audio", None)] == [7.0, 60.0, 3.0, 7.0]
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "soon")
    with pytest.raises(InvalidInputError, match="VLLM_IMAGE_FETCH_TIMEOUT"):
        MediaPolicy.from_env()
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "0")
    with pytest.raises(InvalidInputError, match="image_fetch_timeout_s"):
        MediaPolicy.from_env()
    monkeypatch.delenv("VLLM_IMAGE_FETCH_TIMEOUT")
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")
    assert MediaPolicy.from_env().allow_redirects is False
    monkeypatch.setenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "1")  # set, ours wins
    assert MediaPolicy.from_env().allow_redirects is True
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "perhaps")
    monkeypatch.delenv("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS")
    with pytest.raises(InvalidInputError, match="VLLM_MEDIA_URL_ALLOW_REDIRECTS"):
        MediaPolicy.from_env()


def test_total_deadline_not_per_read(server):
    base, _ = server
    t = time.monotonic()
    with pytest.raises(MediaTimeoutError):
        fetch_bytes(f"{base}/drip", _pol(fetch_timeout_s=0.5))
    assert time.monotonic() - t < 1.5


@pytest.mark.parametrize("path", ["/large", "/large-nolength"])
def test_oversized_refused(server, path):
    base, _ = server
    with pytest.raises(MediaFetchError) as ei:
        fetch_bytes(base + path, _pol(max_bytes=1024 * 1024))
    assert "1048576" in ei.value.message and "MMPIPE_MEDIA_MAX_BYTES" in ei.value.message


@pytest.mark.parametrize("path,code", [("/missing", 404), ("/forbidden", 403)])
def test_http_error_status(server, path, code):
    base, _ = server
    with pytest.raises(MediaFetchError, match=str(code)):
        fetch_bytes(base + path, _pol())


def test_connection_refused_is_fetch_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(MediaFetchError):
        fetch_bytes(f"http://127.0.0.1:{port}/x.png", _pol())


def test_query_string_redacted_in_errors(server):
    base, _ = server
    with pytest.raises(MediaFetchError) as ei:
        fetch_bytes(f"{base}/missing?X-Amz-Signature=secret123", _pol())
    assert "secret123" not in ei.value.message


# ----------------------------------------------------------------------------------------------- data URLs

def test_data_url_base64_and_percent():
    raw = b"\x89PNG\r\n\x00\xffhello"
    b64 = base64.b64encode(raw).decode()
    assert fetch_bytes(f"data:image/png;base64,{b64}", _pol()) == raw
    assert fetch_bytes(f"data:application/octet-stream,{urllib.parse.quote_from_bytes(raw)}", _pol()) == raw
    assert fetch_bytes("data:,a%20b", _pol()) == b"a b"


def test_data_url_errors():
    with pytest.raises(InvalidInputError, match="base64"):
        fetch_bytes("data:image/png;base64,@@@not-base64@@@", _pol())
    with pytest.raises(InvalidInputError, match="data:"):
        fetch_bytes("data:image/png;base64", _pol())
    big = base64.b64encode(b"\0" * 4096).decode()
    with pytest.raises(MediaFetchError, match="size cap"):
        fetch_bytes(f"data:image/png;base64,{big}", _pol(max_bytes=1000))


# ------------------------------------------------------------------------------------------------- local

@pytest.fixture()
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "img.png").write_bytes(_png())
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    os.symlink(secret, allowed / "link.png")
    os.symlink(allowed / "sub" / "img.png", allowed / "inner_link.png")  # symlink staying inside: fine
    return allowed, secret


def test_local_inside_allowed_ok(media_dir):
    allowed, _ = media_dir
    p = _pol(allowed_local_media_path=str(allowed))
    want = (allowed / "sub" / "img.png").read_bytes()
    assert fetch_bytes(str(allowed / "sub" / "img.png"), p) == want
    assert fetch_bytes((allowed / "sub" / "img.png").as_uri(), p) == want
    assert fetch_bytes("sub/img.png", p) == want  # relative to the allowed folder
    assert fetch_bytes(str(allowed / "inner_link.png"), p) == want
    assert fetch_bytes(str(allowed / "sub" / ".." / "sub" / "img.png"), p) == want


def test_local_dotdot_escape_refused(media_dir):
    allowed, secret = media_dir
    p = _pol(allowed_local_media_path=str(allowed))
    for path in (str(allowed / ".." / "secret.txt"), "../secret.txt", "file://" + str(allowed) + "/../secret.txt"):
        with pytest.raises(MediaPolicyError) as ei:
            fetch_bytes(path, p)
        assert "outside the allowed folder" in ei.value.message


def test_local_symlink_escape_refused(media_dir):
    allowed, _ = media_dir
    with pytest.raises(MediaPolicyError, match="symlink"):
        fetch_bytes(str(allowed / "link.png"), _pol(allowed_local_media_path=str(allowed)))


def test_local_prefix_sibling_refused(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media-evil").mkdir()
    (tmp_path / "media-evil" / "x.png").write_bytes(b"x")
    with pytest.raises(MediaPolicyError):  # "/media-evil" starts with "/media" but is not inside it
        fetch_bytes(str(tmp_path / "media-evil" / "x.png"), _pol(allowed_local_media_path=str(tmp_path / "media")))


def test_local_refused_without_folder(media_dir):
    allowed, _ = media_dir
    for src in (str(allowed / "sub" / "img.png"), (allowed / "sub" / "img.png").as_uri()):
        with pytest.raises(MediaPolicyError, match="--allowed-local-media-path"):
            fetch_bytes(src, _pol())


def test_local_missing_and_remote_file_host(media_dir):
    allowed, _ = media_dir
    p = _pol(allowed_local_media_path=str(allowed))
    with pytest.raises(MediaFetchError, match="does not exist"):
        fetch_bytes(str(allowed / "nope.png"), p)
    with pytest.raises(MediaPolicyError, match="host"):
        fetch_bytes("file://otherhost/etc/passwd", p)
    with pytest.raises(MediaFetchError, match="regular file"):
        fetch_bytes(str(allowed / "sub"), p)
    with pytest.raises(MediaFetchError, match="size cap"):
        fetch_bytes(str(allowed / "sub" / "img.png"), _pol(allowed_local_media_path=str(allowed), max_bytes=10))


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "gopher://127.0.0.1/x", "javascript:alert(1)",
                                 "s3://bucket/key.png"])
def test_unsupported_scheme(url):
    with pytest.raises(MediaPolicyError, match="unsupported media URL scheme"):
        fetch_bytes(url, _pol(allowed_local_media_path="/"))


# ---------------------------------------------------------------------------------------- loader over HTTP

def test_loader_end_to_end_over_http(server):
    base, _ = server
    loader = MediaLoader(_pol(), {"video": {"num_frames": 4}})
    img = loader.load("image", f"{base}/image.png")
    assert img.modality == "image" and img.data.mode == "RGB" and img.data.size == (32, 24)
    assert len(img.content_hash) == 64
    vid = loader.load("video", f"{base}/video.mp4")
    assert vid.data.shape == (4, 48, 64, 3) and vid.meta["frame_indices"] == [0, 5, 10, 15]
    aud = loader.load("audio", f"{base}/audio.wav", target_sampling_rate=16000)
    assert aud.meta["sampling_rate"] == 16000 and aud.meta["orig_sampling_rate"] == 22050
    assert abs(aud.data.shape[0] - 16000) <= 1 and aud.data.dtype == np.float32
    with pytest.raises(MediaPolicyError):
        MediaLoader(_pol(allowed_media_domains=("example.org",))).load("image", f"{base}/image.png")
