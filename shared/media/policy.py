"""The media fetch/decode policy: which sources may be read and how much of them.

Owns: `MediaPolicy` (an immutable value object) and the ONE place that reads the media-related
environment variables (`env_defaults`). Every fetch and decode in `shared/media` is checked against a
policy passed in explicitly.
Must not: do any I/O besides reading environment variables, or import heavy libraries.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import RequestBudget

from ..errors import InvalidInputError

MiB = 1024 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# Decode caps: defaults, and the variable that overrides each.
_DECODE_CAPS: dict[str, Any] = {"max_image_pixels": 100_000_000, "max_video_frames": 1024,
                                "max_video_seconds": 3600.0, "max_video_decoded_bytes": 2 * 1024 * MiB,
                                "max_audio_seconds": 600.0, "max_image_decode_pixels": 16 * MiB,
                                "max_audio_samples": 600 * 48_000 * 2, "max_request_pixels": 256 * MiB,
                                "max_request_audio_seconds": 1200.0}
_CAP_ENV = {"max_image_pixels": "MMPIPE_MEDIA_MAX_IMAGE_PIXELS", "max_video_frames": "MMPIPE_MEDIA_MAX_VIDEO_FRAMES",
            "max_video_seconds": "MMPIPE_MEDIA_MAX_VIDEO_SECONDS",
            "max_video_decoded_bytes": "MMPIPE_MEDIA_MAX_VIDEO_DECODED_BYTES",
            "max_audio_seconds": "MMPIPE_MEDIA_MAX_AUDIO_SECONDS",
            "max_image_decode_pixels": "MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS",
            "max_audio_samples": "MMPIPE_MEDIA_MAX_AUDIO_SAMPLES",
            "max_request_pixels": "MMPIPE_MEDIA_MAX_REQUEST_PIXELS",
            "max_request_audio_seconds": "MMPIPE_MEDIA_MAX_REQUEST_AUDIO_SECONDS"}


# Fetch timeouts per modality, as vLLM's (VLLM_IMAGE_FETCH_TIMEOUT, ...): (field, MMPIPE_ name, vLLM name, default).
FETCH_TIMEOUTS: dict[str, tuple[str, str, str, float]] = {
    "image": ("image_fetch_timeout_s", "MMPIPE_MEDIA_FETCH_TIMEOUT_IMAGE", "VLLM_IMAGE_FETCH_TIMEOUT", 5.0),
    "video": ("video_fetch_timeout_s", "MMPIPE_MEDIA_FETCH_TIMEOUT_VIDEO", "VLLM_VIDEO_FETCH_TIMEOUT", 30.0),
    "audio": ("audio_fetch_timeout_s", "MMPIPE_MEDIA_FETCH_TIMEOUT_AUDIO", "VLLM_AUDIO_FETCH_TIMEOUT", 10.0),
}
# Boolean settings: (field, the variables that set it, first one set wins).
_BOOL_ENV = {"allow_redirects": ("MMPIPE_MEDIA_URL_ALLOW_REDIRECTS", "VLLM_MEDIA_URL_ALLOW_REDIRECTS"),
             "allow_private_networks": ("MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS",)}


def _seconds(var: str) -> float | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInputError(f"{var}={raw!r} is not a number of seconds", param=var) from None


def env_defaults() -> dict[str, Any]:
    """Read the media environment variables (the only env access in shared/media).

    MMPIPE_MEDIA_URL_ALLOW_REDIRECTS (else vLLM's VLLM_MEDIA_URL_ALLOW_REDIRECTS): "0"/"false"/"no"/"off" ->
        False, "1"/"true"/... -> True (default True).
    MMPIPE_MEDIA_FETCH_TIMEOUT_{IMAGE,VIDEO,AUDIO} (else vLLM's VLLM_{IMAGE,VIDEO,AUDIO}_FETCH_TIMEOUT, else
        MMPIPE_MEDIA_FETCH_TIMEOUT): seconds a fetch of that modality may take (vLLM's defaults 5 / 30 / 10).
    MMPIPE_MEDIA_FETCH_TIMEOUT: seconds, float > 0: the default of the three above, and the timeout of a fetch
        of no particular modality (default 10).
    MMPIPE_MEDIA_MAX_BYTES: int > 0 (default 50 MiB).
    MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS: boolean (default False): let http(s) media reach loopback, private,
        link-local, CGNAT ... addresses (cloud metadata endpoints stay refused).
    MMPIPE_MEDIA_MAX_IMAGE_PIXELS, MMPIPE_MEDIA_MAX_VIDEO_FRAMES, MMPIPE_MEDIA_MAX_VIDEO_SECONDS,
    MMPIPE_MEDIA_MAX_VIDEO_DECODED_BYTES, MMPIPE_MEDIA_MAX_AUDIO_SECONDS, MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS,
    MMPIPE_MEDIA_MAX_AUDIO_SAMPLES: the decode caps; MMPIPE_MEDIA_MAX_REQUEST_PIXELS,
    MMPIPE_MEDIA_MAX_REQUEST_AUDIO_SECONDS: the per-request budget (see MediaPolicy).
    A malformed value raises InvalidInputError naming the variable: a typo in a security setting must not
    silently fall back to the permissive default.
    """
    out: dict[str, Any] = {"allow_redirects": True, "fetch_timeout_s": 10.0, "max_bytes": 50 * MiB,
                           "allow_private_networks": False, **_DECODE_CAPS}
    for key, names in _BOOL_ENV.items():
        for var in names:
            raw = os.environ.get(var, "").strip().lower()
            if not raw:
                continue
            if raw not in _TRUE | _FALSE:
                raise InvalidInputError(f"{var}={raw!r} is not a boolean; use 0/false or 1/true", param=var)
            out[key] = raw in _TRUE
            break
    for key, var in _CAP_ENV.items():
        raw = os.environ.get(var, "").strip()
        if raw:
            kind = type(_DECODE_CAPS[key])
            try:
                out[key] = kind(raw)
            except ValueError:
                raise InvalidInputError(f"{var}={raw!r} is not a{'n integer' if kind is int else ' number'}",
                                        param=var) from None
    every = _seconds("MMPIPE_MEDIA_FETCH_TIMEOUT")
    if every is not None:
        out["fetch_timeout_s"] = every
    for key, ours, vllms, default in FETCH_TIMEOUTS.values():
        own, theirs = _seconds(ours), _seconds(vllms)
        out[key] = own if own is not None else theirs if theirs is not None else every if every is not None else default
    raw = os.environ.get("MMPIPE_MEDIA_MAX_BYTES", "").strip()
    if raw:
        try:
            out["max_bytes"] = int(raw)
        except ValueError:
            raise InvalidInputError(f"MMPIPE_MEDIA_MAX_BYTES={raw!r} is not an integer byte count",
                                    param="MMPIPE_MEDIA_MAX_BYTES") from None
    return out


def _env(name: str) -> Any:
    # default_factory hook: a plain `MediaPolicy()` honours the operator's environment too, so a
    # component that forgets `from_env` cannot silently re-enable redirects the operator turned off.
    return field(default_factory=lambda: env_defaults()[name])


def normalize_host(host: str) -> str:
    """Lower-case, strip brackets and the trailing root dot, IDNA-encode: the form allow-lists compare."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        h.encode("ascii")
    except UnicodeEncodeError:
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # left as is: it will then simply not match any (ascii) allow-list entry
    return h


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class MediaPolicy:
    """What the media loader may fetch and how large decoded media may get.

    allowed_media_domains: None = any host; otherwise an http(s) host must equal an entry or be a
        subdomain of it (IP-literal entries match only exactly).
    allow_redirects: follow 3xx at all (each hop is still checked against the allow-list).
    {image,video,audio}_fetch_timeout_s: seconds one fetch of that modality may take, all hops and the body
        (vLLM's 5 / 30 / 10 by default); fetch_timeout_s: the same for a fetch of no particular modality.
    allowed_local_media_path: folder whose files may be read; None = local files refused.
    allow_private_networks: let http(s) media reach non-public addresses (loopback, RFC 1918, ULA,
        link-local, CGNAT, ...; checked on the address actually connected to, every hop). Cloud metadata
        endpoints stay refused. Off by default: only trusted deployments should turn it on.
    max_video_seconds: longest video (from the container header) that is decoded at all.
    max_image_pixels: header cap of any image / frame (decompression bombs).
    max_image_decode_pixels: pixels an image or video frame is decoded to, unless the model keeps more (then
        budget.IMAGE_OVERSIZE x its max_pixels, up to max_image_pixels); a JPEG above it is decoded downscaled
        (PIL draft), any other format is refused.
    max_audio_samples: samples x channels one audio item may hold (decoded in blocks, downmixed as it goes).
    max_request_pixels / max_request_audio_seconds: the per-request budget of decoded pixels (images + video
        frames) and audio seconds, charged from headers before decoding (shared/media/budget.py).
    """

    allowed_media_domains: tuple[str, ...] | None = None
    allow_redirects: bool = _env("allow_redirects")
    allowed_local_media_path: str | None = None
    fetch_timeout_s: float = _env("fetch_timeout_s")  # a fetch of no particular modality
    image_fetch_timeout_s: float = _env("image_fetch_timeout_s")
    video_fetch_timeout_s: float = _env("video_fetch_timeout_s")
    audio_fetch_timeout_s: float = _env("audio_fetch_timeout_s")
    max_bytes: int = _env("max_bytes")
    max_image_pixels: int = _env("max_image_pixels")
    max_video_frames: int = _env("max_video_frames")
    max_audio_seconds: float = _env("max_audio_seconds")
    max_redirects: int = 5
    # Not a user-facing knob in vLLM, but frames * H * W * 3 of a decoded video must be bounded too:
    # 1024 4K frames would be 25 GB. 2 GiB is ~290 frames of 1080p.
    max_video_decoded_bytes: int = _env("max_video_decoded_bytes")
    allow_private_networks: bool = _env("allow_private_networks")
    max_video_seconds: float = _env("max_video_seconds")
    max_image_decode_pixels: int = _env("max_image_decode_pixels")
    max_audio_samples: int = _env("max_audio_samples")
    max_request_pixels: int = _env("max_request_pixels")
    max_request_audio_seconds: float = _env("max_request_audio_seconds")

    def __post_init__(self) -> None:
        doms = self.allowed_media_domains
        if doms is not None:
            if isinstance(doms, str):  # a bare string would otherwise be iterated char by char
                doms = (doms,)
            norm = tuple(normalize_host(d) for d in doms if str(d).strip())
            object.__setattr__(self, "allowed_media_domains", norm)
        for name in ("fetch_timeout_s", "image_fetch_timeout_s", "video_fetch_timeout_s", "audio_fetch_timeout_s",
                     "max_bytes", "max_image_pixels", "max_video_frames",
                     "max_audio_seconds", "max_video_decoded_bytes", "max_video_seconds", "max_image_decode_pixels",
                     "max_audio_samples", "max_request_pixels", "max_request_audio_seconds"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise InvalidInputError(f"MediaPolicy.{name} must be a positive number, got {v!r}", param=name)
        for name in ("allow_redirects", "allow_private_networks"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"MediaPolicy.{name} must be a bool, got {getattr(self, name)!r}",
                                        param=name)
        if not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise InvalidInputError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects!r}",
                                    param="max_redirects")

    @classmethod
    def from_env(cls, **overrides: Any) -> "MediaPolicy":
        """Policy from the environment (see `env_defaults`), with explicit keyword overrides on top."""
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise InvalidInputError(f"unknown MediaPolicy field(s): {sorted(unknown)}")
        return cls(**{**env_defaults(), **overrides})

    def budget(self, model_max_pixels: int | None = None) -> "RequestBudget":
        """A fresh decode budget for one request; `model_max_pixels`: the largest image the model's processor
        keeps under the request's effective settings (Qwen-VL max_pixels), None when it does not cap them."""
        from .budget import BudgetLimits, RequestBudget, item_image_pixels

        return RequestBudget(BudgetLimits(
            image_pixels=item_image_pixels(self.max_image_pixels, self.max_image_decode_pixels, model_max_pixels),
            request_pixels=self.max_request_pixels, request_audio_seconds=self.max_request_audio_seconds))

    def fetch_timeout(self, modality: str | None) -> float:
        """Seconds one fetch (every redirect hop and the body) of `modality` may take."""
        spec = FETCH_TIMEOUTS.get(modality or "")
        return getattr(self, spec[0]) if spec else self.fetch_timeout_s

    @staticmethod
    def fetch_timeout_env(modality: str | None) -> str:
        """The variable that sets `fetch_timeout(modality)` (for error messages)."""
        spec = FETCH_TIMEOUTS.get(modality or "")
        return spec[1] if spec else "MMPIPE_MEDIA_FETCH_TIMEOUT"

    def host_allowed(self, host: str) -> bool:
        """True when `host` may be fetched: no allow-list, exact match, or a subdomain of an entry."""
        if self.allowed_media_domains is None:
            return True
        h = normalize_host(host)
        if not h:
            return False
        for d in self.allowed_media_domains:
            if h == d:
                return True
            # "evil.127.0.0.1" is a DNS name anyone can own, not part of an IP: IP entries match exactly.
            if not _is_ip(d) and h.endswith("." + d):
                return True
        return False


def parse_domain_list(value: str | None) -> list[str] | None:
    """MMPIPE_ALLOWED_MEDIA_DOMAINS as every service reads it: comma and/or whitespace separated."""
    import re

    items = [d for d in re.split(r"[,\s]+", value or "") if d]
    return items or None
