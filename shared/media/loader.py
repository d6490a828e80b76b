"""The ingest core: any accepted media source -> one decoded, normalised, hashed `MediaItem`.

Owns: dispatch on (modality, source type), applying the server's media_io_kwargs (validated once, at
construction) and the MediaPolicy to every item, resampling audio to the model's rate, and computing
`content_hash` over exactly the data handed to the processor (after compositing / sampling / resampling).
Also: which encoded images it has decoded before (`KnownImages`: the digest of the encoded bytes, or of the
`data:` URL, and the request's decode limit -> content hash and size), so that a chat re-sending its image every
turn is fetched and hashed but not decoded again when the caller allows it (`defer_decode`: the item's decode
runs only if its pixels are needed, `MediaItem.materialize`; the request's decode budget is charged the same).
Must not: run model processors, cache embeddings, or import torch (tensors are handled by duck typing).
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidInputError, LimitExceededError, MediaDecodeError
from ..types import MODALITIES, MediaItem
from .budget import RequestBudget
from .decode_pool import DecodePool, remaining
from .audio import decode_audio, decode_input_audio, normalize_audio, resample
from .fetch import fetch_bytes
from .hashing import hash_audio, hash_bytes, hash_image, hash_rgb_array, hash_video
from .image import ImageIOOptions, check_pixels, decode_image, normalize_image, parse_image_io_kwargs
from .policy import MediaPolicy
from .video_readers import parse_video_backend
from .video import VideoIOOptions, check_frame_budget, decode_video, normalize_video, parse_video_io_kwargs

_BYTES_TYPES = (bytes, bytearray, memoryview)


def _is_tensor(x: Any) -> bool:
    return (type(x).__module__ or "").startswith("torch") and hasattr(x, "detach")


class _Laps:
    """Consecutive (step, start, end) time.perf_counter readings into `out`; nothing at all when it is None."""

    __slots__ = ("out", "t")

    def __init__(self, out: list[tuple[str, float, float]] | None):
        self.out = out
        self.t = time.perf_counter() if out is not None else 0.0

    def lap(self, step: str) -> None:
        if self.out is not None:
            now = time.perf_counter()
            self.out.append((step, self.t, now))
            self.t = now


class KnownImages:
    """Encoded images decoded before: (kind, digest of the encoded form, decode limit) -> (content hash, width,
    height). A bounded LRU, thread-safe. The decode limit is part of the key because it decides whether a large
    JPEG decodes downscaled (`image.fit_budget`), so the same bytes under another limit are other pixels."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[str, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[str, int, int] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: tuple, value: tuple[str, int, int]) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._entries.pop(key, None)


class MediaLoader:
    """Loads media items under one policy and one set of media_io_kwargs (thread-safe: its only mutable state
    is the KnownImages memo, which has its own lock)."""

    def __init__(self, policy: MediaPolicy | None = None, media_io_kwargs: dict[str, Any] | str | None = None,
                 pool: DecodePool | None = None, video_backend: str | None = None):
        """pool: decode encoded bytes in these worker processes (decode_pool.py) instead of this one.
        video_backend: the video decoder, "pyav" (None: the default) or "decord" (video_readers.py)."""
        self.policy = policy if policy is not None else MediaPolicy.from_env()
        self.pool = pool
        self.video_backend = parse_video_backend(video_backend)
        kw = media_io_kwargs
        if isinstance(kw, str):  # the CLI flag is a JSON string, as in vLLM's --media-io-kwargs
            try:
                kw = json.loads(kw) if kw.strip() else None
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"media_io_kwargs is not valid JSON: {e}", param="media_io_kwargs") from None
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            raise InvalidInputError(f"media_io_kwargs must be an object keyed by modality, got {type(kw).__name__}",
                                    param="media_io_kwargs")
        unknown = sorted(set(kw) - set(MODALITIES))
        if unknown:
            raise InvalidInputError(f"unknown media_io_kwargs modality {unknown}; allowed keys: {list(MODALITIES)}",
                                    param="media_io_kwargs")
        self.known_images = KnownImages()
        self.image_opts: ImageIOOptions = parse_image_io_kwargs(kw.get("image"))
        self.video_opts: VideoIOOptions = parse_video_io_kwargs(kw.get("video"))
        audio_kw = kw.get("audio")
        if audio_kw:  # no audio IO options exist yet: refuse rather than silently ignore them
            raise InvalidInputError(f"unknown audio media_io_kwargs {sorted(audio_kw) if isinstance(audio_kw, dict) else audio_kw!r}; "
                                    f"audio takes no options (the model's sampling rate is applied automatically)",
                                    param="media_io_kwargs.audio")

    # ------------------------------------------------------------------------------------------ public

    def load(self, modality: str, source: Any, *, target_sampling_rate: int | None = None,
             uuid: str | None = None, timings: list[tuple[str, float, float]] | None = None,
             budget: RequestBudget | None = None, name: str | None = None,
             defer_decode: bool = False) -> MediaItem:
        """Decode/validate `source` as `modality` ("image" | "video" | "audio").

        source: URL (http(s), data:, file://) or local path string, raw bytes, or an in-memory object
        (PIL image / HxWx3 array for images; (T,H,W,3) array, tensor or list of frames, optionally as a
        (frames, {"fps": ...}) pair, for videos; (array, sampling_rate) for audio).
        timings: when given, gets ("fetch" | "decode" | "hash", start, end) in time.perf_counter seconds, in
        that order (fetch: the encoded bytes, from the URL or the caller; decode: to the normalised pixels,
        frames or resampled samples; hash: the content hash).
        budget: the request's decode budget (`MediaPolicy.budget`, one per request, shared by its items):
        charged from each item's header before it is decoded; None: only the policy's per-item caps apply.
        name: how errors name the item (e.g. "items[2]"; default the modality).
        defer_decode: an encoded image (URL, data: URL, bytes) this loader has decoded before under the same decode
        limit comes back with its content hash, its size and `data` None: `item.materialize()` decodes it when the
        pixels are needed (a caller that finds its embedding cached never does). The budget is charged as if decoded.
        """
        if modality not in MODALITIES:
            raise InvalidInputError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}",
                                    param="modality")
        if source is None:
            raise InvalidInputError(f"{modality} source is missing")
        laps = _Laps(timings)
        if modality == "image":
            item = self._load_image(source, laps, budget, name or modality, defer_decode)
        elif modality == "video":
            item = self._load_video(source, laps, budget, name or modality)
        else:
            item = self._load_audio(source, target_sampling_rate, laps, budget, name or modality)
        item.uuid = uuid
        return item

    def load_audio(self, source: Any, target_sr: int | None = None, *, uuid: str | None = None) -> MediaItem:
        """`load("audio", ...)` resampled to `target_sr` (the model's feature-extractor rate)."""
        return self.load("audio", source, target_sampling_rate=target_sr, uuid=uuid)

    def load_input_audio(self, data_b64: str, fmt: str, *, target_sampling_rate: int | None = None,
                         uuid: str | None = None, budget: RequestBudget | None = None) -> MediaItem:
        """An OpenAI `input_audio` part ({"data": base64, "format": ...}) -> audio MediaItem."""
        wav, sr = decode_input_audio(data_b64, fmt, max_seconds=self.policy.max_audio_seconds,
                                     max_bytes=self.policy.max_bytes, max_samples=self.policy.max_audio_samples,
                                     budget=budget)
        item = self._finish_audio(wav, sr, target_sampling_rate)
        item.uuid = uuid
        return item

    # ------------------------------------------------------------------------------------------ helpers

    def _bytes_of(self, source: Any, modality: str) -> bytes | None:
        """Encoded bytes for URL/path/bytes sources; None for in-memory objects."""
        if isinstance(source, str):
            return fetch_bytes(source, self.policy, modality)
        if isinstance(source, _BYTES_TYPES):
            b = bytes(source)
            if len(b) > self.policy.max_bytes:
                raise LimitExceededError(f"{modality} data of {len(b)} bytes is larger than the media size cap "
                                         f"of {self.policy.max_bytes} bytes")
            return b
        return None

    def _in_pool(self, kind: str, data: bytes, opts: Any, budget: RequestBudget | None, name: str
                  ) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode in a worker process; the request's budget is charged with what the worker charged."""
        assert self.pool is not None
        arr, meta, (pixels, seconds) = self.pool.decode(
            kind, data, {"opts": opts, "policy": self.policy, "limits": remaining(budget),
                         "video_backend": self.video_backend}, name)
        if budget is not None:
            if pixels:
                budget.charge_pixels(pixels, name)
            if seconds:
                budget.charge_audio(seconds, name)
        return arr, meta

    def _load_image(self, source: Any, laps: _Laps, budget: RequestBudget | None, name: str,
                    defer: bool = False) -> MediaItem:
        limit = budget.image_limit() if budget is not None else None
        known = None
        if defer and isinstance(source, str) and source[:5].lower() == "data:":
            # the same data: URL again: neither its base64 nor its image needs decoding
            known = ("url", hash_bytes(source.encode("utf-8")), limit)
            hit = self.known_images.get(known)
            if hit is not None:
                return self._deferred_image(hit, known, source, laps, budget, name)
        data = self._bytes_of(source, "image")
        laps.lap("fetch")
        if defer and data is not None and known is None:
            known = ("bytes", hash_bytes(data), limit)
            hit = self.known_images.get(known)
            if hit is not None:
                return self._deferred_image(hit, known, data, laps, budget, name)
        digest = None
        if data is not None:
            img, digest = self._decode_image(data, budget, name, laps)
        elif isinstance(source, Image.Image):
            check_pixels(source.width, source.height, self.policy.max_image_pixels)
            if budget is not None:  # already decoded by the caller: only the request's total is charged
                budget.charge_pixels(source.width * source.height, f"image {source.width}x{source.height}")
            try:
                source.load()  # a lazily opened image may still be truncated on disk
            except Exception as e:
                raise MediaDecodeError(f"image could not be loaded: {e}") from None
            img = normalize_image(source, self.image_opts)
        elif isinstance(source, np.ndarray):
            arr = source
            if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
                raise InvalidInputError(f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got "
                                        f"{arr.dtype} {arr.shape}")
            check_pixels(arr.shape[1], arr.shape[0], self.policy.max_image_pixels)
            if budget is not None:
                budget.charge_pixels(arr.shape[0] * arr.shape[1], f"image {arr.shape[1]}x{arr.shape[0]}")
            arr = np.ascontiguousarray(arr)
            img = normalize_image(Image.fromarray(arr), self.image_opts)
            if arr.ndim == 3 and arr.shape[-1] == 3:  # an RGB image as it is: its pixels are the array's bytes
                laps.lap("decode")
                digest = hash_rgb_array(arr)
        else:
            raise InvalidInputError(f"unsupported image source type {type(source).__name__}; send a URL, "
                                    f"bytes or a PIL image")
        if digest is None:
            laps.lap("decode")
            digest = hash_image(img)
        laps.lap("hash")
        if known is not None:
            self.known_images.put(known, (digest, img.width, img.height))
        return MediaItem("image", img, digest, meta={"width": img.width, "height": img.height})

    def _decode_image(self, data: bytes, budget: RequestBudget | None, name: str,
                      laps: _Laps | None = None) -> tuple[Image.Image, str]:
        """The decoded RGB image and its content hash (from the decode pool's array where it made one)."""
        if self.pool is not None:
            arr = self._in_pool("image", data, self.image_opts, budget, name)[0]
            img = Image.fromarray(arr, "RGB")
        else:
            arr, img = None, decode_image(data, self.image_opts, max_pixels=self.policy.max_image_pixels,
                                          budget=budget)
        if laps is not None:
            laps.lap("decode")
        return img, hash_rgb_array(arr) if arr is not None else hash_image(img)

    def _deferred_image(self, hit: tuple[str, int, int], known: tuple, source: Any, laps: _Laps,
                        budget: RequestBudget | None, name: str) -> MediaItem:
        """An image decoded before: its hash and size now, its pixels when `materialize()` asks. The request's
        budget is charged what the decode charged (the decoded size); the later decode runs under a copy of the
        budget (the same per-image limit, so the same pixels; nothing charged twice) and must give the same hash."""
        digest, width, height = hit
        if budget is not None:
            budget.charge_pixels(width * height, f"image {width}x{height}")
        for step in ("fetch", "decode", "hash"):
            laps.lap(step)
        limits = budget.limits if budget is not None else None

        def decode() -> Image.Image:
            data = self._bytes_of(source, "image") if isinstance(source, str) else source
            img, again = self._decode_image(data, RequestBudget(limits) if limits is not None else None, name)
            if again != digest:  # a decoder that is not deterministic: never key another image's pixels
                self.known_images.drop(known)
                raise MediaDecodeError("the image decoded to other pixels than the first time; send it again")
            return img

        return MediaItem("image", None, digest, meta={"width": width, "height": height}, decode=decode)

    def _load_video(self, source: Any, laps: _Laps, budget: RequestBudget | None, name: str) -> MediaItem:
        data = self._bytes_of(source, "video")
        laps.lap("fetch")
        if data is not None:
            if self.pool is not None:
                frames, meta = self._in_pool("video", data, self.video_opts, budget, name)
            else:
                frames, meta = decode_video(data, self.video_opts, self.policy, budget, self.video_backend)
            laps.lap("decode")
            digest = hash_video(frames, meta.get("sampled_fps"))
            laps.lap("hash")
            return MediaItem("video", frames, digest, meta=meta)
        given: dict[str, Any] = {}
        if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], dict):
            source, given = source  # (frames, metadata) as vLLM accepts for pre-decoded videos
        if not (isinstance(source, (list, tuple, np.ndarray)) or _is_tensor(source)):
            raise InvalidInputError(f"unsupported video source type {type(source).__name__}; send a URL, bytes, "
                                    f"a (T, H, W, 3) uint8 array/tensor or a list of frames")
        frames = normalize_video(source, max_frames=self.policy.max_video_frames,
                                 max_pixels=self.policy.max_image_pixels)
        t, h, w = (int(x) for x in frames.shape[:3])
        check_frame_budget(t, h, w, self.policy, None)
        if budget is not None:  # already decoded by the caller: only the request's total is charged
            budget.charge_pixels(t * h * w, f"video: {t} frames of {w}x{h}")
        fps = given.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise InvalidInputError(f"video metadata fps must be a number > 0, got {fps!r}")
        meta = {"fps": float(fps) if fps else None, "sampled_fps": float(fps) if fps else None,
                "duration_s": t / float(fps) if fps else None,
                "frame_indices": list(given.get("frame_indices", range(t))), "total_num_frames": t,
                "width": w, "height": h}
        laps.lap("decode")
        digest = hash_video(frames, meta.get("sampled_fps"))
        laps.lap("hash")
        return MediaItem("video", frames, digest, meta=meta)

    def _load_audio(self, source: Any, target_sr: int | None, laps: _Laps, budget: RequestBudget | None,
                    name: str) -> MediaItem:
        data = self._bytes_of(source, "audio")
        laps.lap("fetch")
        if data is not None and self.pool is not None:
            wav, meta = self._in_pool("audio", data, None, budget, name)
            sr = int(meta["sampling_rate"])
        elif data is not None:
            wav, sr = decode_audio(data, max_seconds=self.policy.max_audio_seconds,
                                   max_samples=self.policy.max_audio_samples, budget=budget)
        else:
            wav, sr = normalize_audio(source, max_seconds=self.policy.max_audio_seconds)
            if budget is not None:
                budget.charge_audio(wav.shape[0] / sr)
        return self._finish_audio(wav, sr, target_sr, laps)

    def _finish_audio(self, wav: np.ndarray, sr: int, target_sr: int | None,
                      laps: _Laps | None = None) -> MediaItem:
        orig = sr
        if target_sr is not None:
            if isinstance(target_sr, bool) or not isinstance(target_sr, (int, np.integer)) or target_sr <= 0:
                raise InvalidInputError(f"target sampling rate must be a positive integer, got {target_sr!r}")
            wav, sr = resample(wav, sr, int(target_sr)), int(target_sr)
        # Hash AFTER resampling: the hash must describe exactly what the feature extractor sees.
        meta = {"sampling_rate": sr, "orig_sampling_rate": orig, "duration_s": wav.shape[0] / sr,
                "num_samples": int(wav.shape[0])}
        laps = laps or _Laps(None)
        laps.lap("decode")
        digest = hash_audio(wav, sr)
        laps.lap("hash")
        return MediaItem("audio", wav, digest, meta=meta)
