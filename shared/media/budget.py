"""The decode budget of one request: how many pixels and audio seconds its media may decode to, in all and per item.

Owns: `RequestBudget` (one per request; thread-safe, the items of a request load concurrently), the rule that
derives an image's decode ceiling from what the model keeps (`item_image_pixels`), and the LimitExceededError
naming the limit (and the flag / variable that raises it) when a header says an item would go beyond.
Decoders charge the budget from the header (PIL size, container metadata, sound file frames), BEFORE any pixel or
sample is decoded, so a request over its budget costs a header parse, not gigabytes.
Must not: decode anything, read the environment (the ceilings come from MediaPolicy), or import heavy libraries.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import LimitExceededError

# An input image may be this many times larger than the largest image the model's processor keeps (Qwen-VL's
# max_pixels): past that, decoding full size only to be resized away is waste, and a bomb's way in.
IMAGE_OVERSIZE = 4


def item_image_pixels(max_image_pixels: int, max_image_decode_pixels: int, model_max_pixels: int | None) -> int:
    """Pixels one image (or video frame) may decode to: the policy's floor, raised to IMAGE_OVERSIZE x the pixels
    the model keeps after resizing (when its processor caps them), never above the header cap `max_image_pixels`."""
    need = IMAGE_OVERSIZE * int(model_max_pixels) if model_max_pixels else 0
    return min(int(max_image_pixels), max(int(max_image_decode_pixels), need))


@dataclass(frozen=True)
class BudgetLimits:
    """The ceilings of one request (validated positive by MediaPolicy / the caller)."""

    image_pixels: int  # per image / video frame, decoded
    request_pixels: int  # all images + all video frames of the request, decoded
    request_audio_seconds: float  # all audio of the request


class RequestBudget:
    """What one request has decoded so far, against its BudgetLimits. `charge_*` raise before the decode."""

    def __init__(self, limits: BudgetLimits):
        self.limits = limits
        self.pixels = 0
        self.audio_seconds = 0.0
        self._lock = threading.Lock()

    def image_limit(self) -> int:
        return self.limits.image_pixels

    def charge_pixels(self, n: int, what: str) -> None:
        """Reserve `n` decoded pixels for `what` ("image 1000x800", "video: 32 frames of 640x480")."""
        with self._lock:
            total = self.pixels + int(n)
            if total > self.limits.request_pixels:
                raise LimitExceededError(
                    f"{what} would decode {int(n)} pixels, bringing the request to {total}, more than its budget of "
                    f"{self.limits.request_pixels} decoded pixels (--max-request-pixels / "
                    f"MMPIPE_MEDIA_MAX_REQUEST_PIXELS); send fewer or smaller items, or fewer video frames")
            self.pixels = total

    def charge_audio(self, seconds: float, what: str = "audio") -> None:
        with self._lock:
            total = self.audio_seconds + float(seconds)
            if total > self.limits.request_audio_seconds:
                raise LimitExceededError(
                    f"{what} of {seconds:.1f} s brings the request to {total:.1f} s of audio, more than its budget "
                    f"of {self.limits.request_audio_seconds:g} s (--max-request-audio-seconds / "
                    f"MMPIPE_MEDIA_MAX_REQUEST_AUDIO_SECONDS); send shorter clips")
            self.audio_seconds = total
