"""The video decoders behind `decode_video`: PyAV (the default) and decord (optional, `mmpipe[decord]`).

Owns: the backend names (`VIDEO_BACKENDS`, `parse_video_backend`), reading the first video stream's header with
PyAV (`StreamHeader`: what the limits are checked against before any decoder allocates), and one reader per
backend that gives the frame count, the average rate and the RGB frames at given presentation-order indices.
Both readers index frames the same way (the stream's packets in presentation order: decord's `len(vr)` and
`vr[i]`) and report the same rate (the stream's average frame rate, decord's `get_avg_fps`), so
`video.sample_indices` picks the same frames whichever decodes them (tests/test_media_decode.py holds them to it).
Must not: sample, check limits or budgets (video.py does), or import decord unless that backend is chosen, or
import numpy / av at module import time (the stage config modules import the backend names).

Why PyAV by default: decord's last release is from 2021, it ships x86-64 wheels only (no aarch64: GH200,
Graviton, Apple silicon) and bundles FFmpeg 4.1 for untrusted input; PyAV wheels exist for every platform and
bundle a current FFmpeg. On the test clips PyAV also reads AV1 (decord cannot) and MPEG-TS at the right frames
(decord returns frames shifted by the stream's start time there).
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

from ..errors import InvalidInputError, MediaDecodeError

VIDEO_BACKENDS = ("pyav", "decord")
DEFAULT_VIDEO_BACKEND = "pyav"


def parse_video_backend(name: str | None, *, param: str = "video_backend") -> str:
    """A backend name checked against VIDEO_BACKENDS (None / "": the default), or InvalidInputError naming it."""
    if name is None or not str(name).strip():
        return DEFAULT_VIDEO_BACKEND
    value = str(name).strip().lower()
    if value not in VIDEO_BACKENDS:
        raise InvalidInputError(f"unknown video backend {name!r}; choose one of {list(VIDEO_BACKENDS)}",
                                param=param)
    if value == "decord":
        import importlib.util

        if importlib.util.find_spec("decord") is None:
            raise InvalidInputError("video backend 'decord' is not installed: pip install 'mmpipe[decord]' "
                                    "(x86-64 only), or use the default 'pyav'", param=param)
    return value


@dataclass(frozen=True)
class StreamHeader:
    """What the container says about its first video stream, before a frame is decoded (0 / None: not given)."""

    frames: int
    width: int
    height: int
    seconds: float | None


def _unreadable(nbytes: int, e: BaseException) -> MediaDecodeError:
    return MediaDecodeError(f"cannot decode video ({nbytes} bytes): not a readable video container/codec "
                            f"({type(e).__name__})")


def _header_of(container: Any, nbytes: int) -> StreamHeader:
    if not container.streams.video:
        raise MediaDecodeError(f"media ({nbytes} bytes) contains no video stream")
    st = container.streams.video[0]
    cc = st.codec_context
    seconds = None
    if st.duration and st.time_base:
        seconds = float(st.duration * st.time_base)
    elif container.duration:
        seconds = container.duration / 1e6  # AV_TIME_BASE microseconds
    return StreamHeader(frames=int(st.frames or 0), width=int(cc.width or 0), height=int(cc.height or 0),
                        seconds=seconds)


class VideoReader(Protocol):
    """One open video. `header` first; `index()` before `frames()`; `close()` always."""

    header: StreamHeader

    def index(self) -> tuple[int, float]:
        """(frames in the stream, average rate in fps or 0.0 when the container gives none)."""

    def frames(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), H, W, 3) uint8 RGB of the frames at these ascending presentation-order indices."""

    def close(self) -> None: ...


class PyAVReader:
    """Decodes from memory with PyAV. `index` demuxes the stream without decoding (counting its packets, as decord
    does); `frames` decodes from the start up to the last wanted frame, in a container of its own (so a second
    call starts afresh), and converts only the wanted frames to RGB (the YUV->RGB conversion is most of the cost
    of a small frame). Frames of a stream whose size changes midway are scaled to the first one's size, as
    decord does."""

    def __init__(self, data: bytes):
        self._data = data
        self._count = 0
        self._c = self._open()
        try:
            self.header = _header_of(self._c, len(data))
        except BaseException:
            self._c.close()
            raise

    def _open(self) -> Any:
        import av  # lazy: FFmpeg's libraries are for the video and audio paths only

        try:
            return av.open(io.BytesIO(self._data), mode="r")
        except Exception as e:  # av.error.InvalidDataError and friends
            raise _unreadable(len(self._data), e) from None

    def index(self) -> tuple[int, float]:
        st = self._c.streams.video[0]
        try:
            self._count = sum(1 for p in self._c.demux(st) if p.size)
        except Exception as e:
            raise _unreadable(len(self._data), e) from None
        return self._count, float(st.average_rate) if st.average_rate else 0.0

    def frames(self, idx: np.ndarray) -> np.ndarray:
        import numpy as np

        wanted = {int(i): k for k, i in enumerate(idx)}
        last = int(idx[-1])
        out: np.ndarray | None = None
        pos = got = 0
        c = self._open()
        from av.video.reformatter import VideoReformatter

        # One reformatter for the whole call: it keeps its swscale context while the frame format stays the same
        # (frame.to_ndarray(format=...) builds a new one per frame: half the decode time of a small clip).
        rgb = VideoReformatter()
        try:
            st = c.streams.video[0]
            st.thread_type = "AUTO"  # frame + slice threads: the same frames, decoded sooner
            for packet in c.demux(st):  # its last packet is empty and flushes the delayed (B-) frames
                for frame in packet.decode():
                    k = wanted.get(pos)
                    pos += 1
                    if k is not None:
                        if out is None:
                            out = np.empty((len(idx), frame.height, frame.width, 3), np.uint8)
                        out[k] = rgb.reformat(frame, format="rgb24", width=out.shape[2],
                                              height=out.shape[1]).to_ndarray()
                        got += 1
                    if pos > last:
                        break
                if pos > last:
                    break
        except Exception as e:
            raise MediaDecodeError(f"video is truncated or corrupt: decoding {len(idx)} of {self._count} "
                                   f"frames failed ({type(e).__name__}: {e})") from None
        finally:
            c.close()
        if out is None or got < len(idx):
            raise MediaDecodeError(f"video is truncated or corrupt: the stream indexes {self._count} frames but "
                                   f"only {pos} decode")
        return out

    def close(self) -> None:
        self._c.close()


class DecordReader:
    """decord on a temp file, behind a PyAV header check.

    decord trusts the container header: a 2 KB mp4 whose sample table claims 2^31 frames makes it throw
    std::bad_alloc, which aborts the whole process; so PyAV reads the header first and decord only ever opens
    files whose header is plausible (video.py checks it between `header` and `index`). A temp file rather than
    decord's file-object reader: on failure decord logs the "uri", which for an in-memory reader is the raw
    media bytes (megabytes of binary in the server log)."""

    def __init__(self, data: bytes):
        import av

        self._nbytes = len(data)
        self._vr: Any = None
        fd, self._path = tempfile.mkstemp(prefix="mmpipe-video-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                with av.open(self._path, mode="r") as c:
                    self.header = _header_of(c, len(data))
            except MediaDecodeError:
                raise
            except Exception as e:
                raise _unreadable(len(data), e) from None
        except BaseException:
            self.close()
            raise

    def index(self) -> tuple[int, float]:
        import decord  # lazy, and only when chosen (mmpipe[decord])

        try:
            self._vr = decord.VideoReader(self._path, num_threads=1)
            return len(self._vr), float(self._vr.get_avg_fps() or 0.0)
        except Exception as e:  # decord raises RuntimeError / DECORDError / AssertionError
            raise _unreadable(self._nbytes, e) from None

    def frames(self, idx: np.ndarray) -> np.ndarray:
        try:
            return self._vr.get_batch(idx.tolist()).asnumpy()
        except Exception as e:
            # Typically a truncated stream whose header promised more frames than it holds.
            raise MediaDecodeError(f"video is truncated or corrupt: decoding {len(idx)} of {len(self._vr)} "
                                   f"frames failed ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        self._vr = None
        try:
            os.unlink(self._path)
        except OSError:
            pass


def open_video(data: bytes, backend: str = DEFAULT_VIDEO_BACKEND) -> VideoReader:
    """An open reader of `backend` (a name from parse_video_backend) on the encoded bytes."""
    if backend == "pyav":
        return PyAVReader(data)
    if backend == "decord":
        return DecordReader(data)
    raise InvalidInputError(f"unknown video backend {backend!r}; choose one of {list(VIDEO_BACKENDS)}",
                            param="video_backend")
