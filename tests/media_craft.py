"""Media files that are small on disk and huge decoded, built in the tests (issue 16), and a peak-RSS reader.

rgba_png_bomb: a transparent RGBA PNG of any size, compressed row by row; long_720p_mp4: 350 black 720p frames in
17 KB; flac: a real FLAC whose STREAMINFO may claim more samples than it holds; hwm: a process's peak RSS (VmHWM).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

MiB = 1024 * 1024
# What a decode of the crafted files costs (hundreds of MB to GB); a header check costs next to nothing.
RSS_BOUND = 120 * MiB


# --- the crafted files --------------------------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def rgba_png_bomb(w: int = 9000, h: int = 9000) -> bytes:
    """A fully transparent RGBA PNG, compressed row by row (never w*h*4 bytes in memory here)."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 4 * w)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def long_720p_mp4(frames: int = 350) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 1280, 720, "yuv420p", {"preset": "ultrafast"}
        f = av.VideoFrame.from_ndarray(np.zeros((720, 1280, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def flac(seconds: float, sr: int, channels: int, claim_frames: int | None = None) -> bytes:
    """A real FLAC of quiet noise; `claim_frames`: STREAMINFO's total-samples field rewritten to claim that many."""
    import soundfile as sf

    rng = np.random.default_rng(3)
    b = io.BytesIO()
    sf.write(b, (rng.standard_normal((int(seconds * sr), channels)) * 0.05).astype(np.float32), sr, format="FLAC")
    data = bytearray(b.getvalue())
    if claim_frames is not None:
        # fLaC, block header (4 bytes), STREAMINFO: ... bytes 13-17 of it hold 4 bits of bps and 36 bits of samples
        off = 4 + 4 + 13
        packed = int.from_bytes(data[off:off + 5], "big")
        packed = (packed & ~((1 << 36) - 1)) | claim_frames
        data[off:off + 5] = packed.to_bytes(5, "big")
        data[off + 5 + 0:off + 5 + 16] = bytes(16)  # MD5 unset: the claim is not checked against it
    return bytes(data)


def hwm(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
