"""Hostile input (issue 5): SSRF refusal on the address actually connected to, caps checked before decoding,
and decoders fed truncated / corrupt / adversarial files answering with a clear 4xx, never a crash.

Every network test talks to 127.0.0.1 only: a "public" address is simulated by `netguard.override_network`,
whose fake resolver hands out a public IP and whose `route` dials that IP's connection to a local server.
"""
from __future__ import annotations

import base64
import io
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from mmpipe.shared.errors import (InvalidInputError, LimitExceededError, MediaDecodeError, MediaPolicyError,
                                  MediaTimeoutError, MMPipeError)
from mmpipe.shared.media import netguard
from mmpipe.shared.media.fetch import fetch_bytes
from mmpipe.shared.media.policy import MediaPolicy

PUBLIC_IP = "93.184.216.34"  # never dialled: `route` sends its connections to a 127.0.0.1 server


# ------------------------------------------------------------------------------------------- servers

class _Handler(BaseHTTPRequestHandler):
    body = b"public media"
    redirect_to: str | None = None
    hits: list[str]

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        if self.path.startswith("/redirect") and self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def _serve(body: bytes):
    handler = type("H", (_Handler,), {"body": body, "hits": [], "redirect_to": None})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


@pytest.fixture(scope="module")
def servers():
    """An "internal" server (secrets) and a "public" one, both really on 127.0.0.1."""
    internal, ih = _serve(b"INTERNAL SECRET")
    public, ph = _serve(b"public media")
    yield {"internal_port": internal.server_address[1], "public_port": public.server_address[1],
           "internal": ih, "public": ph}
    for s in (internal, public):
        s.shutdown()
        s.server_close()


class FakeDNS:
    """Answers from a script (one answer list per lookup, the last repeated); records every lookup."""

    def __init__(self, *answers: list[str]):
        self.answers = list(answers)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        i = min(len(self.lookups) - 1, len(self.answers) - 1)
        return list(self.answers[i])


def _route_public_to(port: int, dialled: list):
    def route(ip: str, p: int):
        dialled.append(ip)
        if ip == PUBLIC_IP:
            return "127.0.0.1", port
        return ip, p  # anything else is dialled as is (only 127.0.0.1 can occur in these tests)
    return route


def _strict(**kw) -> MediaPolicy:
    kw.setdefault("fetch_timeout_s", 3.0)
    kw.setdefault("allow_redirects", True)
    return MediaPolicy(allow_private_networks=False, **kw)


# ------------------------------------------------------------------------------------- classification

@pytest.mark.parametrize("url, cls", [
    ("http://127.0.0.1/x", "loopback"),
    ("http://[::1]/x", "loopback"),
    ("http://localhost/x", "loopback"),  # a name: checked on what it resolves to
    ("http://10.1.2.3/x", "private"),
    ("http://172.16.0.1/x", "private"),
    ("http://192.168.1.1/x", "private"),
    ("http://[fc00::1]/x", "private"),
    ("http://169.254.1.1/x", "link-local"),
    ("http://[fe80::1]/x", "link-local"),
    ("http://100.64.0.1/x", "carrier-grade NAT"),
    ("http://224.0.0.1/x", "multicast"),
    ("http://[ff02::1]/x", "multicast"),
    ("http://0.0.0.0/x", "unspecified"),
    ("http://[::]/x", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://100.100.100.200/", "cloud metadata"),
    ("http://[::ffff:127.0.0.1]/x", "IPv4-mapped"),
    ("http://[::ffff:169.254.169.254]/x", "cloud metadata"),
    ("http://[::127.0.0.1]/x", "IPv4-compatible"),
    ("http://[2002:7f00:1::]/x", "6to4"),
    ("http://[64:ff9b::a00:1]/x", "NAT64"),
    ("http://2130706433/x", "loopback"),       # decimal integer
    ("http://0x7f.1/x", "loopback"),           # hex + short form
    ("http://0x7f000001/x", "loopback"),
    ("http://127.1/x", "loopback"),
    ("http://017700000001/x", "loopback"),     # octal integer
    ("http://0xc0a80001/x", "private"),        # hex integer 192.168.0.1 (httpx itself refuses 0300.0250.0.1)
])
def test_private_addresses_refused_by_default(url, cls):
    with pytest.raises(MediaPolicyError) as ei:
        fetch_bytes(url, _strict())
    assert ei.value.http_status == 403 and ei.value.grpc_code == "PERMISSION_DENIED"
    assert cls in ei.value.message and "--allow-private-media-urls" in ei.value.message or \
        "metadata" in ei.value.message


def test_public_addresses_classified_public():
    for a in ("8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"):
        assert netguard.address_class(netguard.parse_ip_host(a)) is None, a


def test_legacy_ipv4_spellings_parse_like_inet_aton():
    import socket

    for s in ("2130706433", "0x7f.1", "0x7f000001", "127.1", "017700000001", "0300.0250.0.1", "1.2.3", "0"):
        assert str(netguard.parse_ip_host(s)) == socket.inet_ntoa(socket.inet_aton(s)), s
    for s in ("example.com", "1.2.3.4.5", "256.1.1.1", "0x", "1..2", "08.1.1.1"):
        ip = netguard.parse_ip_host(s)
        try:
            socket.inet_aton(s)
            ok = True
        except OSError:
            ok = False
        assert (ip is not None) == ok or s == "0x", s


def test_default_refuses_local_server_and_opt_in_reaches_it(servers, monkeypatch):
    url = f"http://127.0.0.1:{servers['internal_port']}/secret"
    before = len(servers["internal"].hits)
    with pytest.raises(MediaPolicyError, match="loopback"):
        fetch_bytes(url, _strict())
    assert len(servers["internal"].hits) == before  # refused before connecting
    assert fetch_bytes(url, MediaPolicy(allow_private_networks=True)) == b"INTERNAL SECRET"
    monkeypatch.setenv("MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS", "1")
    assert MediaPolicy().allow_private_networks is True and MediaPolicy.from_env().allow_private_networks
    assert fetch_bytes(url, MediaPolicy.from_env()) == b"INTERNAL SECRET"
    monkeypatch.setenv("MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS", "perhaps")
    with pytest.raises(InvalidInputError, match="MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS"):
        MediaPolicy.from_env()


def test_metadata_refused_even_with_opt_in():
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                "http://[::ffff:a9fe:a9fe]/"):
        with pytest.raises(MediaPolicyError, match="metadata"):
            fetch_bytes(url, MediaPolicy(allow_private_networks=True))


# --------------------------------------------------------------------------------------- DNS rebinding

def test_dns_rebinding_connects_to_the_checked_address(servers):
    """The attacker's DNS answers a public IP to the check and 127.0.0.1 to anything after: mmpipe resolves
    once, connects to the public IP it checked, and never reaches the internal server."""
    dns = FakeDNS([PUBLIC_IP], ["127.0.0.1"])
    dialled: list[str] = []
    internal_before = len(servers["internal"].hits)
    with netguard.override_network(resolve=dns, route=_route_public_to(servers["public_port"], dialled)):
        port = servers["internal_port"]  # the same port on both "hosts": a rebinding would land internally
        assert fetch_bytes(f"http://rebind.attacker.test:{port}/image.png", _strict()) == b"public media"
        assert dns.lookups == ["rebind.attacker.test"]  # resolved exactly once for the connection
        assert dialled == [PUBLIC_IP]
        # the next lookup of a new name answers 127.0.0.1: refused, naming the address class
        with pytest.raises(MediaPolicyError, match=r"resolves to 127\.0\.0\.1 \(loopback\)"):
            fetch_bytes(f"http://rebind2.attacker.test:{port}/image.png", _strict())
    assert len(servers["internal"].hits) == internal_before


def test_mixed_public_and_private_answers_refused(servers):
    dns = FakeDNS([PUBLIC_IP, "127.0.0.1"])
    dialled: list[str] = []
    with netguard.override_network(resolve=dns, route=_route_public_to(servers["public_port"], dialled)):
        with pytest.raises(MediaPolicyError, match="loopback"):
            fetch_bytes("http://mixed.attacker.test/x.png", _strict())
    assert dialled == []


@pytest.mark.parametrize("target", ["http://internal.attacker.test:{port}/secret", "http://127.0.0.1:{port}/secret",
                                    "http://[::ffff:127.0.0.1]:{port}/secret", "http://2130706433:{port}/secret",
                                    "http://169.254.169.254/latest/meta-data/"])
def test_redirect_hop_to_private_address_refused(servers, target):
    port = servers["internal_port"]
    servers["public"].redirect_to = target.format(port=port)
    dns = FakeDNS([PUBLIC_IP], ["127.0.0.1"])
    dialled: list[str] = []
    before = len(servers["internal"].hits)
    try:
        with netguard.override_network(resolve=dns, route=_route_public_to(servers["public_port"], dialled)):
            with pytest.raises(MediaPolicyError) as ei:
                fetch_bytes("http://cdn.attacker.test/redirect", _strict())
    finally:
        servers["public"].redirect_to = None
    assert ei.value.http_status == 403
    assert len(servers["internal"].hits) == before and "127.0.0.1" not in dialled


def test_allow_list_applied_on_redirect_and_connect(servers):
    """The allow-list is checked on every hop's host, the private check on every hop's resolved address."""
    servers["public"].redirect_to = "http://evil.test/x.png"
    dns = FakeDNS([PUBLIC_IP])
    try:
        with netguard.override_network(resolve=dns, route=_route_public_to(servers["public_port"], [])):
            with pytest.raises(MediaPolicyError, match="evil.test"):
                fetch_bytes("http://media.example.com/redirect",
                            _strict(allowed_media_domains=("example.com",)))
    finally:
        servers["public"].redirect_to = None


def test_slow_dns_is_a_504_not_a_hang():
    def slow(host, port):
        time.sleep(1.5)
        return [PUBLIC_IP]

    t = time.monotonic()
    with netguard.override_network(resolve=slow, route=lambda ip, p: ("127.0.0.1", 9)):
        with pytest.raises(MediaTimeoutError) as ei:
            fetch_bytes("http://slow-dns.test/x.png", _strict(fetch_timeout_s=0.3))
    assert ei.value.http_status == 504 and time.monotonic() - t < 1.4


def test_unresolvable_host_is_a_4xx():
    def nx(host, port):
        import socket
        raise socket.gaierror(-2, "Name or service not known")

    with netguard.override_network(resolve=nx):
        with pytest.raises(InvalidInputError) as ei:
            fetch_bytes("http://nx.test/x.png", _strict())
    assert 400 <= ei.value.http_status < 500 and "nx.test" in ei.value.message


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "gopher://example.com/", "dict://example.com:11211/",
                                 "ws://example.com/", "jar:http://example.com/x!/y", "file://example.com/etc/passwd",
                                 "/etc/passwd", "file:///etc/passwd"])
def test_other_schemes_refused(url):
    with pytest.raises(MediaPolicyError) as ei:
        fetch_bytes(url, _strict())
    assert ei.value.http_status == 403


# ------------------------------------------------------------------------------------ flags and gateway

def test_flags_wire_the_opt_in(monkeypatch):
    import argparse

    from mmpipe.services.gateway.config import add_cli_args, config_from_args
    from mmpipe.services.ingest.config import IngestConfig

    monkeypatch.delenv("MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS", raising=False)
    gw = lambda *a: config_from_args(add_cli_args(argparse.ArgumentParser()).parse_args(["--model", "m", *a]))
    assert gw().allow_private_media_urls is False and gw("--allow-private-media-urls").allow_private_media_urls
    assert gw().trust_request_chat_template is False

    def ing(*a):
        p = argparse.ArgumentParser()
        IngestConfig.add_args(p)
        return IngestConfig.from_args(p.parse_args(["--model", "m", "--encoder-addr", "127.0.0.1:1", *a]))
    assert ing().allow_private_media_urls is False and ing("--allow-private-media-urls").allow_private_media_urls
    monkeypatch.setenv("MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS", "1")
    assert gw().allow_private_media_urls and ing().allow_private_media_urls
    import inspect

    from mmpipe.llm import LLM
    assert "allow_private_media_urls" in inspect.signature(LLM.__init__).parameters


def test_gateway_precheck_refuses_private_literals():
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.prepare import Preparer

    strict = Preparer(GatewayConfig(model="m"), info=None)
    for url in ("http://127.0.0.1:8080/x.png", "http://[::ffff:10.0.0.1]/x", "http://2130706433/",
                "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(MediaPolicyError) as ei:
            strict.precheck_url(url, "image")
        assert ei.value.param == "image_url"
    strict.precheck_url("http://example.com/x.png", "image")  # names are left to ingest (no DNS here)
    trusting = Preparer(GatewayConfig(model="m", allow_private_media_urls=True), info=None)
    trusting.precheck_url("http://127.0.0.1:8080/x.png", "image")
    with pytest.raises(MediaPolicyError, match="metadata"):
        trusting.precheck_url("http://169.254.169.254/", "image")


def test_gateway_refuses_request_chat_template():
    from mmpipe.services.gateway.config import GatewayConfig
    from mmpipe.services.gateway.prepare import Preparer
    from mmpipe.services.gateway.types import ChatInput

    inp = ChatInput(model="m", messages=[{"role": "user", "content": "hi"}], sampling=None,
                    chat_template="{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
    with pytest.raises(InvalidInputError, match="--trust-request-chat-template") as ei:
        Preparer(GatewayConfig(model="m"), info=None).chat(inp)
    assert ei.value.param == "chat_template"


# ------------------------------------------------------------------------------------------ caps: images

def _chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def png_declaring(w: int, h: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * min(w, 64)))) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(50000, 50000), (12000, 12000), (1, 200_000_000)])
def test_png_pixel_bomb_refused_before_allocation(w, h):
    import tracemalloc

    from mmpipe.shared.media.image import decode_image

    data = png_declaring(w, h)
    assert len(data) < 200
    tracemalloc.start()
    t = time.monotonic()
    with pytest.raises(LimitExceededError) as ei:
        decode_image(data, max_pixels=100_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ei.value.http_status == 400 and time.monotonic() - t < 1.0
    assert peak < 16 * 1024 * 1024  # nothing near w*h*3 bytes was allocated


def _gif_declaring(w: int, h: int) -> bytes:
    b = io.BytesIO()
    Image.new("P", (4, 4)).save(b, "GIF")
    d = bytearray(b.getvalue())
    struct.pack_into("<HH", d, 6, w, h)  # the logical screen size
    return bytes(d)


def test_gif_screen_bomb_refused():
    from mmpipe.shared.media.image import decode_image

    with pytest.raises(LimitExceededError):
        decode_image(_gif_declaring(65535, 65535), max_pixels=100_000_000)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_multi_frame_images_decode_only_the_first_frame(fmt):
    from mmpipe.shared.media.image import decode_image

    frames = [Image.new("RGB", (16, 16), (i % 256, 0, 0)) for i in range(300)]
    b = io.BytesIO()
    frames[0].save(b, fmt, save_all=True, append_images=frames[1:])
    t = time.monotonic()
    img = decode_image(b.getvalue(), max_pixels=10_000)
    assert img.size == (16, 16) and time.monotonic() - t < 2.0


def test_tiff_with_huge_second_page_decodes_first_only():
    from mmpipe.shared.media.image import decode_image

    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "TIFF", save_all=True, append_images=[Image.new("L", (4000, 4000))])
    assert decode_image(b.getvalue(), max_pixels=1000).size == (8, 8)


# ------------------------------------------------------------------------------------ caps: video, audio

def _mp4(n=8, w=64, h=48, fps=8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _wav(seconds=1.0, sr=8000) -> bytes:
    import soundfile as sf

    b = io.BytesIO()
    sf.write(b, np.zeros(int(seconds * sr), np.float32), sr, format="WAV")
    return b.getvalue()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return _mp4()


def test_video_duration_frames_and_bytes_caps(mp4):
    from mmpipe.shared.media.video import VideoIOOptions, decode_video

    with pytest.raises(LimitExceededError, match="MMPIPE_MEDIA_MAX_VIDEO_SECONDS"):
        decode_video(mp4, None, MediaPolicy(max_video_seconds=0.5))
    with pytest.raises(LimitExceededError, match="pixels"):
        decode_video(mp4, None, MediaPolicy(max_image_pixels=1000))
    with pytest.raises(LimitExceededError, match="bytes"):
        decode_video(mp4, None, MediaPolicy(max_video_decoded_bytes=64 * 48 * 3 * 2))
    with pytest.raises(LimitExceededError, match="num_frames"):
        decode_video(mp4, VideoIOOptions(num_frames=8), MediaPolicy(max_video_frames=4))
    frames, _ = decode_video(mp4, None, MediaPolicy(max_video_frames=4))  # implicit sampling is thinned
    assert frames.shape[0] == 4


def test_audio_duration_cap_from_header_and_bounded_decode():
    from mmpipe.shared.media.audio import decode_audio

    with pytest.raises(LimitExceededError):
        decode_audio(_wav(2.0), max_seconds=1.0)
    # a WAV whose data chunk claims ~3 days of audio in a few bytes: refused, or only what is there decoded
    d = bytearray(_wav(0.01))
    i = d.index(b"data")
    struct.pack_into("<I", d, i + 4, 0xFFFFFF00)
    try:
        wav, _ = decode_audio(bytes(d), max_seconds=600)
        assert wav.shape[0] <= 80
    except (LimitExceededError, MediaDecodeError):
        pass
    # absurd sample rate / channel count in the header
    d = bytearray(_wav(0.01))
    struct.pack_into("<I", d, 24, 0x7FFFFFFF)
    with pytest.raises(MediaDecodeError):
        decode_audio(bytes(d), max_seconds=600)


def test_video_with_forged_frame_count_is_refused_not_aborted(tmp_path, mp4):
    """Regression: decord throws std::bad_alloc (process abort) on an mp4 whose stts claims 2^31 frames.
    Run in a child process so that a regression fails this test instead of killing the suite."""
    d = bytearray(mp4)
    i = d.index(b"stts")
    struct.pack_into(">I", d, i + 12, 0x7F000000)  # first entry's sample_count
    path = tmp_path / "bomb.mp4"
    path.write_bytes(bytes(d))
    code = ("import sys\nfrom mmpipe.shared.media.video import decode_video\nfrom mmpipe.shared.media.policy import "
            "MediaPolicy\nfrom mmpipe.shared.errors import MMPipeError\ntry:\n    decode_video(open(sys.argv[1], 'rb')"
            ".read(), None, MediaPolicy())\nexcept MMPipeError as e:\n    print('REFUSED', e.http_status, e.message)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED 400" in r.stdout and "frames" in r.stdout


# ------------------------------------------------------------------------ corrupt and truncated media

def _image_samples() -> dict[str, bytes]:
    img = Image.fromarray((np.random.RandomState(0).rand(24, 32, 3) * 255).astype(np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "JPEG2000", "ICO", "PPM", "TGA", "QOI", "AVIF"):
        b = io.BytesIO()
        try:
            img.save(b, fmt)
        except (KeyError, OSError, ValueError):  # an encoder this Pillow build lacks: its decoder is moot too
            continue
        out[fmt] = b.getvalue()
    return out


IMAGES = _image_samples()


def _corruptions(data: bytes) -> dict[str, bytes]:
    rnd = np.random.RandomState(len(data))
    flipped = bytearray(data)
    for p in rnd.randint(8, len(data), 12):
        flipped[p] ^= 0xFF
    return {"empty": b"", "header only": data[:16], "truncated half": data[: len(data) // 2],
            "truncated -1": data[:-1] if len(data) > 40 else data[:8], "flipped": bytes(flipped),
            "garbage": bytes(rnd.randint(0, 256, 512, dtype=np.uint8)), "zeros": b"\0" * 4096}


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_corrupt_images_are_4xx(fmt):
    from mmpipe.shared.media.image import decode_image

    for name, data in _corruptions(IMAGES[fmt]).items():
        try:
            decode_image(data)
        except MMPipeError as e:
            assert 400 <= e.http_status < 500, (fmt, name, e)
        # decoding without an error is fine too (a flipped byte may land in a pixel): no crash is the rule


def test_corrupt_videos_are_4xx(mp4):
    import av

    from mmpipe.shared.media.video import decode_video

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    for fmt, data in (("mp4", mp4), ("webm", buf.getvalue())):
        for name, bad in _corruptions(data).items():
            try:
                decode_video(bad, None, MediaPolicy())
            except MMPipeError as e:
                assert 400 <= e.http_status < 500, (fmt, name, e)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_corrupt_audio_is_4xx(fmt):
    import soundfile as sf

    from mmpipe.shared.media.audio import decode_audio

    b = io.BytesIO()
    sf.write(b, (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), 8000, format=fmt)
    for name, bad in _corruptions(b.getvalue()).items():
        try:
            decode_audio(bad, max_seconds=600)
        except MMPipeError as e:
            assert 400 <= e.http_status < 500, (fmt, name, e)


@pytest.mark.parametrize("s", ["%%%%", "YQ", "Zm9v!", "====", "a" * 5, "data:image/png;base64,@@", "\x00\x01"])
def test_bad_base64_is_invalid_input(s):
    from mmpipe.shared.media.audio import decode_input_audio
    from mmpipe.shared.media.fetch import b64decode_strict

    for call in (lambda: b64decode_strict(s, what="x"), lambda: decode_input_audio(s, "wav"),
                 lambda: fetch_bytes("data:image/png;base64," + s, MediaPolicy())):
        try:
            call()
        except MMPipeError as e:
            assert 400 <= e.http_status < 500


# ------------------------------------------------------------------------------------------ tensors

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _saved(obj, **kw) -> bytes:
    import torch

    b = io.BytesIO()
    torch.save(obj, b, **kw)
    return b.getvalue()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tensor_payloads_refused_with_clear_errors(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save as st_save

    from mmpipe.shared.media.embeds import decode_tensor_b64

    marker = tmp_path / "pwned"
    zipped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_saved(torch.zeros(1_000_000)))) as zin, \
            zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info.filename))
    cases = {
        "dtype int64": (_saved(torch.arange(6).reshape(2, 3)), "dtype"),
        "dtype bool": (_saved(torch.ones(2, 2, dtype=torch.bool)), "dtype"),
        "dtype complex": (_saved(torch.ones(2, 2, dtype=torch.complex64)), "dtype"),
        "rank 0": (_saved(torch.tensor(1.0)), "dimension"),
        "empty": (_saved(torch.zeros(0, 4)), "non-empty"),
        "NaN": (_saved(torch.tensor([[1.0, float("nan")]])), "NaN"),
        "Inf": (_saved(torch.tensor([[float("-inf"), 1.0]])), "Inf"),
        "huge declared size (stride 0)": (_saved(torch.ones(1).as_strided((1 << 20, 1 << 20), (0, 0))), "limit"),
        "pickle in archive runs code": (_saved({"t": _RunsCode(str(marker))}), "loadable"),
        "raw pickle runs code": (pickle.dumps(_RunsCode(str(marker))), "loadable"),
        "legacy format": (_saved(torch.ones(2, 2), _use_new_zipfile_serialization=False), "legacy"),
        "zip bomb (deflated records)": (zipped.getvalue(), "compressed"),
        "sparse": (_saved(torch.eye(3).to_sparse()), "dense"),
        "two tensors": (_saved([torch.ones(2), torch.ones(2)]), "single tensor"),
        "safetensors two tensors": (st_save({"a": torch.ones(2), "b": torch.ones(2)}), "exactly one"),
        "safetensors int": (st_save({"a": torch.ones(2, dtype=torch.int32)}), "dtype"),
        "safetensors bad header": (b"\x10\0\0\0\0\0\0\0{\"a\": [1, 2, 3]}" + b"\0" * 8, "safetensors"),
        "truncated archive": (_saved(torch.ones(64, 8))[:300], "archive"),
    }
    for name, (raw, needle) in cases.items():
        with pytest.raises(InvalidInputError) as ei:
            decode_tensor_b64(_b64(raw), param="image_embeds", max_bytes=1 << 20)
        assert ei.value.param == "image_embeds" and ei.value.http_status == 400, name
        assert needle.lower() in ei.value.message.lower(), (name, ei.value.message)
    assert not marker.exists()


def test_good_tensor_payloads_still_load():
    import torch
    from safetensors.torch import save as st_save

    from mmpipe.shared.media.embeds import decode_tensor_b64, encode_tensor_b64

    t = torch.randn(4, 8)
    assert torch.equal(decode_tensor_b64(encode_tensor_b64(t), param="p"), t)
    assert torch.equal(decode_tensor_b64(_b64(st_save({"x": t})), param="p"), t)
    assert torch.equal(decode_tensor_b64(encode_tensor_b64(t.to(torch.bfloat16)), param="p"), t.to(torch.bfloat16))
