"""Video decoding, frame sampling, and normalisation of in-memory frame stacks.

Owns: validating video media_io_kwargs (`num_frames`, `fps`), choosing which frames to decode, the duration,
frame and decoded-size caps (checked from the container header before frames are decoded), and turning lists of PIL images / arrays / tensors into one (T, H, W, 3) uint8 array.
The decoders themselves (PyAV by default, decord optionally) are in video_readers.py.
Must not: fetch anything, resize frames, or import torch at module import time (tensors are detected by
duck typing, so torch is only touched when the caller already passed a tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError, LimitExceededError, MediaDecodeError
from .budget import RequestBudget
from .policy import MediaPolicy
from .video_readers import DEFAULT_VIDEO_BACKEND, StreamHeader, open_video

VIDEO_IO_KEYS = ("num_frames", "fps")


@dataclass(frozen=True)
class VideoIOOptions:
    """Validated video media_io_kwargs.

    num_frames: sample this many frames evenly over the whole video.
    fps: sample at this rate; with num_frames too, num_frames is the upper bound on the fps sampling.
    Neither: all frames, evenly thinned to the policy's max_video_frames.
    """

    num_frames: int | None = None
    fps: float | None = None


def parse_video_io_kwargs(d: dict[str, Any] | None) -> VideoIOOptions:
    """Validate `media_io_kwargs["video"]`; InvalidInputError names the offending key/value."""
    if d is None:
        return VideoIOOptions()
    if not isinstance(d, dict):
        raise InvalidInputError(f"media_io_kwargs['video'] must be an object, got {type(d).__name__}",
                                param="media_io_kwargs.video")
    unknown = sorted(set(d) - set(VIDEO_IO_KEYS))
    if unknown:
        raise InvalidInputError(f"unknown video media_io_kwargs {unknown}; supported: {list(VIDEO_IO_KEYS)}",
                                param="media_io_kwargs.video")
    num_frames = d.get("num_frames")
    if num_frames is not None:
        # -1 is vLLM's "all frames"; accept it as None rather than refusing configs copied from vLLM.
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or (
                num_frames <= 0 and num_frames != -1):
            raise InvalidInputError(f"num_frames must be an integer > 0 (or -1 for all), got {num_frames!r}",
                                    param="media_io_kwargs.video.num_frames")
        num_frames = None if num_frames == -1 else int(num_frames)
    fps = d.get("fps")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not np.isfinite(fps) \
                or fps <= 0:
            raise InvalidInputError(f"fps must be a number > 0, got {fps!r}", param="media_io_kwargs.video.fps")
        fps = float(fps)
    return VideoIOOptions(num_frames=num_frames, fps=fps)


def _even(n_total: int, n: int) -> np.ndarray:
    # Same rule as vLLM's video loaders: linspace over [0, total-1], floored.
    return np.linspace(0, n_total - 1, n, dtype=int)


def sample_indices(total: int, src_fps: float, opts: VideoIOOptions, max_frames: int
                   ) -> tuple[np.ndarray, float | None]:
    """(frame indices to decode, their exact rate or None) for a video of `total` frames at `src_fps`.

    The rate is exact when frames were taken on a regular grid (all frames, or the requested fps); after
    even thinning to a count it is None and the caller derives it from the duration.
    """
    if opts.num_frames is not None and opts.num_frames > max_frames:
        raise LimitExceededError(
            f"num_frames={opts.num_frames} is more than the limit of {max_frames} video frames; request fewer")
    rate: float | None = src_fps if src_fps > 0 else None
    if opts.fps is not None and src_fps > 0:
        step = src_fps / opts.fps
        if step <= 1:
            idx = np.arange(total)
        else:
            n = max(1, int(np.ceil(total / step)))
            idx = np.unique(np.minimum(np.floor(np.arange(n) * step).astype(int), total - 1))
            rate = opts.fps
        if opts.num_frames is not None and len(idx) > opts.num_frames:
            idx, rate = idx[_even(len(idx), opts.num_frames)], None
    elif opts.num_frames is not None:
        if opts.num_frames < total:
            idx, rate = _even(total, opts.num_frames), None
        else:
            idx = np.arange(total)
    else:
        idx = np.arange(total)
    if len(idx) > max_frames:
        # Implicit sampling (all frames / fps) is thinned rather than refused: the client did not ask
        # for an exact count, and refusing long videos outright would be less useful.
        idx, rate = idx[_even(len(idx), max_frames)], None
    return idx, rate


def decode_video(data: bytes, opts: VideoIOOptions | None, policy: MediaPolicy, budget: RequestBudget | None = None,
                 backend: str = DEFAULT_VIDEO_BACKEND) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode encoded video bytes to ((T, H, W, 3) uint8, meta) with `backend` (video_readers.VIDEO_BACKENDS).
    `budget`: the request's decode budget, charged with frames sampled x frame size before any frame is decoded.

    meta: fps (source), sampled_fps, duration_s, frame_indices, total_num_frames, width, height.
    """
    opts = opts or VideoIOOptions()
    if not data:
        raise MediaDecodeError("video data is empty")
    reader = open_video(data, backend)
    try:
        # The header first: implausible or over-limit values are refused before any decoder allocates for them.
        probed_hw = _check_header(reader.header, len(data), policy)
        total, src_fps = reader.index()
        if total <= 0:
            raise MediaDecodeError("video has no frames")
        # Duration from the container index, before a single frame is decoded.
        max_s = policy.max_video_seconds
        if src_fps > 0 and total / src_fps > max_s:
            raise LimitExceededError(f"video is {total / src_fps:.1f} s long ({total} frames at {src_fps:g} fps), "
                                     f"more than the limit of {max_s:g} s (MMPIPE_MEDIA_MAX_VIDEO_SECONDS); "
                                     f"send a shorter clip")
        idx, rate = sample_indices(total, src_fps, opts, policy.max_video_frames)
        # Frame size from the stream header, so a tiny file claiming 16k x 16k frames is refused before
        # a single frame buffer is allocated; only if the header lacks it do we decode one frame to learn it.
        hw = probed_hw
        if hw is None:
            first = reader.frames(idx[:1])
            hw = int(first.shape[1]), int(first.shape[2])
        h, w = hw
        check_frame_budget(len(idx), h, w, policy, budget)
        frames = reader.frames(idx)
    finally:
        reader.close()
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    h, w = int(frames.shape[1]), int(frames.shape[2])  # what was actually decoded (rotation etc.)
    duration = total / src_fps if src_fps > 0 else None
    sampled_fps = rate if rate is not None else (len(idx) / duration if duration else None)
    meta = {"fps": src_fps or None, "sampled_fps": sampled_fps, "duration_s": duration,
            "frame_indices": [int(i) for i in idx], "total_num_frames": total, "width": w, "height": h}
    return frames, meta


def _check_header(header: StreamHeader, nbytes: int, policy: MediaPolicy) -> tuple[int, int] | None:
    """Refuse implausible or over-limit header values. Returns (height, width) when the header gives them."""
    frames, w, h, seconds = header.frames, header.width, header.height, header.seconds
    if frames > nbytes:  # every frame costs at least one byte of payload
        raise MediaDecodeError(f"video header declares {frames} frames in a {nbytes}-byte file; it is corrupt")
    if w < 0 or h < 0 or (w and h and w * h > policy.max_image_pixels):
        raise LimitExceededError(f"video frames are {w}x{h}, more than the limit of {policy.max_image_pixels} "
                                 f"pixels per frame")
    if seconds is not None and seconds > policy.max_video_seconds:
        raise LimitExceededError(f"video is {seconds:.1f} s long, more than the limit of "
                                 f"{policy.max_video_seconds:g} s (MMPIPE_MEDIA_MAX_VIDEO_SECONDS); send a shorter "
                                 f"clip")
    return (h, w) if w and h else None


def check_frame_budget(t: int, h: int, w: int, policy: MediaPolicy, budget: RequestBudget | None = None) -> None:
    """Refuse `t` frames of `w`x`h` over a cap, then charge them to the request's budget (frames x frame size)."""
    if h * w > policy.max_image_pixels:
        raise LimitExceededError(f"video frames are {w}x{h}, more than the limit of {policy.max_image_pixels} "
                                 f"pixels per frame")
    if budget is not None and h * w > budget.image_limit():
        raise LimitExceededError(f"video frames are {w}x{h} = {h * w} pixels, more than the {budget.image_limit()} "
                                 f"this server decodes per frame for this model (--max-image-decode-pixels / "
                                 f"MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS)")
    nbytes = t * h * w * 3
    if nbytes > policy.max_video_decoded_bytes:
        raise LimitExceededError(
            f"decoding {t} frames of {w}x{h} would take {nbytes} bytes, more than the limit of "
            f"{policy.max_video_decoded_bytes}; request fewer frames (media_io_kwargs video num_frames/fps)")
    if budget is not None:
        budget.charge_pixels(t * h * w, f"video: {t} frames of {w}x{h}")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an ndarray, a torch tensor (duck-typed, no torch import) or a PIL image."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__ or ""
    if mod.startswith("torch") and hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    try:
        from PIL import Image
        if isinstance(x, Image.Image):
            from .image import normalize_image
            return np.asarray(normalize_image(x))
    except ImportError:  # pragma: no cover - pillow is a hard dependency
        pass
    raise InvalidInputError(f"video frames must be numpy arrays, torch tensors or PIL images, got "
                            f"{type(x).__name__}")


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "iub":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InvalidInputError(f"video pixel values must be in 0-255, got {arr.min()}..{arr.max()} "
                                    f"({arr.dtype})")
        return arr.astype(np.uint8)
    # Floats are ambiguous (0-1 or 0-255?): make the client say which by converting.
    raise InvalidInputError(f"video frames must be uint8 (0-255), got dtype {arr.dtype}; convert before "
                            f"sending (e.g. (x * 255).round().astype(uint8) for 0-1 floats)")


def normalize_video(obj: Any, *, max_frames: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 C-contiguous array from a list of PIL images/arrays, an ndarray or a tensor."""
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise InvalidInputError("video has no frames (empty list)")
        frames = [_as_uint8(_to_numpy(f)) for f in obj]
        for i, f in enumerate(frames):
            if f.ndim != 3 or f.shape[-1] != 3:
                raise InvalidInputError(f"video frame {i} has shape {tuple(f.shape)}; each frame must be "
                                        f"(H, W, 3) RGB")
            if f.shape != frames[0].shape:
                raise InvalidInputError(f"video frame {i} has shape {tuple(f.shape)} but frame 0 has "
                                        f"{tuple(frames[0].shape)}; all frames must have the same size")
        if max_frames is not None and len(frames) > max_frames:
            raise LimitExceededError(f"video has {len(frames)} frames, more than the limit of {max_frames}")
        if max_pixels is not None and frames[0].shape[0] * frames[0].shape[1] > max_pixels:
            raise LimitExceededError(f"video frames of {frames[0].shape[1]}x{frames[0].shape[0]} exceed the "
                                     f"limit of {max_pixels} pixels")
        return np.ascontiguousarray(np.stack(frames))
    arr = _to_numpy(obj)
    if arr.ndim != 4:
        hint = " (a single frame? add a leading time axis)" if arr.ndim == 3 else ""
        raise InvalidInputError(f"video array must have rank 4 (T, H, W, 3), got shape {tuple(arr.shape)}{hint}")
    if arr.shape[-1] != 3:
        hint = " (channels-first? transpose to (T, H, W, 3))" if arr.shape[1] == 3 else ""
        raise InvalidInputError(f"video array must have 3 RGB channels last (T, H, W, 3), got shape "
                                f"{tuple(arr.shape)}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InvalidInputError(f"video array has an empty dimension: shape {tuple(arr.shape)}")
    if max_frames is not None and arr.shape[0] > max_frames:
        raise LimitExceededError(f"video has {arr.shape[0]} frames, more than the limit of {max_frames}")
    if max_pixels is not None and arr.shape[1] * arr.shape[2] > max_pixels:
        raise LimitExceededError(f"video frames of {arr.shape[2]}x{arr.shape[1]} exceed the limit of "
                                 f"{max_pixels} pixels")
    return np.ascontiguousarray(_as_uint8(arr))
