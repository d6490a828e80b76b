"""The video test clips: one small clip per container / codec / pixel format the video decoders must read.

Built with PyAV's bundled FFmpeg encoders, deterministic (seeded noise plus a moving bar, so every frame differs
and a wrong frame index shows). Used by the decoder parity tests (tests/test_media_decode.py) and the decode
benchmark (bench/video_decode_bench.py).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """name; container format; encoder; pixel format; frames; size; rate; encoder options."""

    name: str
    fmt: str
    codec: str
    pix_fmt: str = "yuv420p"
    frames: int = 24
    width: int = 64
    height: int = 48
    fps: int = 8
    options: dict[str, str] = field(default_factory=dict)


# Every codec family decord's FFmpeg decodes and that shows up in practice; B-frames (x264/x265 defaults) put
# presentation order != decode order, which is where frame indexing goes wrong.
CLIPS: tuple[ClipSpec, ...] = (
    ClipSpec("h264-mp4", "mp4", "libx264"),
    ClipSpec("h264-bframes-gop4-mp4", "mp4", "libx264", frames=40, options={"bf": "3", "g": "4"}),
    ClipSpec("h264-yuv444-mkv", "matroska", "libx264", pix_fmt="yuv444p"),
    ClipSpec("h264-odd-size-mov", "mov", "libx264", pix_fmt="yuv444p", width=65, height=47),
    ClipSpec("hevc-mp4", "mp4", "libx265", options={"x265-params": "log-level=none"}),
    ClipSpec("hevc-10bit-mkv", "matroska", "libx265", pix_fmt="yuv420p10le", options={"x265-params": "log-level=none"}),
    ClipSpec("vp8-webm", "webm", "libvpx"),
    ClipSpec("vp9-webm", "webm", "libvpx-vp9"),
    ClipSpec("av1-mkv", "matroska", "libsvtav1", width=64, height=64, options={"preset": "12", "crf": "10"}),
    ClipSpec("mpeg4-avi", "avi", "mpeg4"),
    ClipSpec("mpeg2-ts", "mpegts", "mpeg2video"),
    ClipSpec("mjpeg-avi", "avi", "mjpeg", pix_fmt="yuvj420p"),
    ClipSpec("h264-25fps-large-mp4", "mp4", "libx264", frames=75, width=320, height=240, fps=25),
)


def clip_frames(spec: ClipSpec) -> np.ndarray:
    """The (T, H, W, 3) uint8 RGB frames a clip encodes."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)
    base = (base.astype(np.int32) // 4 + 96).astype(np.uint8)  # low-contrast noise: compressible, still textured
    out = np.empty((spec.frames, spec.height, spec.width, 3), np.uint8)
    for i in range(spec.frames):
        f = base.copy()
        x = (i * 3) % spec.width
        f[:, x:x + 4] = (255, 32, 32)          # a bar that moves 3 px a frame
        f[: spec.height // 4, : spec.width // 4, 1] = (i * 9) % 256  # the frame index, in a green patch
        out[i] = f
    return out


def encode_clip(spec: ClipSpec) -> bytes:
    """The encoded bytes of `spec`."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=spec.fmt) as c:
        s = c.add_stream(spec.codec, rate=spec.fps)
        s.width, s.height, s.pix_fmt = spec.width, spec.height, spec.pix_fmt
        if spec.options:
            s.options = dict(spec.options)
        for a in clip_frames(spec):
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()
