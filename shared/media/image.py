"""Image decoding and normalisation to RGB.

Owns: validating image media_io_kwargs (`rgba_background_color`), decoding encoded bytes to a fully
loaded RGB PIL image (pixel-count cap checked from the header BEFORE pixels are decoded, truncated or
corrupt files refused), and alpha compositing of transparent images over the background colour.
Must not: fetch anything, resize, or apply model-specific preprocessing (that is the processor's job).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from ..errors import InvalidInputError, LimitExceededError, MediaDecodeError
from .budget import RequestBudget

DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
IMAGE_IO_KEYS = ("rgba_background_color",)
# Formats PIL may even try. Anything else (EPS shells out to Ghostscript, and dozens of rarely used
# parsers widen the attack surface) is refused before a plugin looks at the bytes.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "JPEG2000", "ICO", "PPM", "TGA",
                         "QOI")


@dataclass(frozen=True)
class ImageIOOptions:
    """Validated image media_io_kwargs."""

    rgba_background_color: tuple[int, int, int] = DEFAULT_BACKGROUND


def parse_image_io_kwargs(d: dict[str, Any] | None) -> ImageIOOptions:
    """Validate `media_io_kwargs["image"]`; InvalidInputError names the offending key/value."""
    if d is None:
        return ImageIOOptions()
    if not isinstance(d, dict):
        raise InvalidInputError(f"media_io_kwargs['image'] must be an object, got {type(d).__name__}",
                                param="media_io_kwargs.image")
    unknown = sorted(set(d) - set(IMAGE_IO_KEYS))
    if unknown:
        raise InvalidInputError(f"unknown image media_io_kwargs {unknown}; supported: {list(IMAGE_IO_KEYS)}",
                                param="media_io_kwargs.image")
    color = d.get("rgba_background_color", DEFAULT_BACKGROUND)
    param = "media_io_kwargs.image.rgba_background_color"
    if not isinstance(color, (list, tuple)) or len(color) != 3:
        raise InvalidInputError(
            f"rgba_background_color must be a list of 3 integers 0-255 (R, G, B), got {color!r}", param=param)
    for c in color:
        # bool is an int subclass, and 255.0 is not an int: both are refused so the colour is unambiguous.
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= 255:
            raise InvalidInputError(
                f"rgba_background_color must be 3 integers in 0-255, got {color!r} (bad value {c!r})",
                param=param)
    return ImageIOOptions(rgba_background_color=tuple(int(c) for c in color))  # type: ignore[arg-type]


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """LimitExceededError when width*height exceeds the decompression-bomb cap."""
    if max_pixels is not None and width * height > max_pixels:
        raise LimitExceededError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            f"send a smaller image")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ICO_MAGIC = b"\x00\x00\x01\x00"


def _ico_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """(width, height) of every frame of an ICO, each from the frame's own header (PNG IHDR or BMP info header).
    The directory's sizes can disagree with the frames, and PIL's ICO plugin decodes the first frame inside
    Image.open (only warning afterwards when the size differs), so this is read before PIL sees the bytes."""
    try:
        (count,) = struct.unpack_from("<H", data, 4)
        out = []
        for k in range(count):
            (offset,) = struct.unpack_from("<I", data, 6 + 16 * k + 12)
            head = data[offset:offset + 24]
            if head[:8] == _PNG_MAGIC:
                w, h = struct.unpack_from(">II", head, 16)  # IHDR
            else:
                w, h = struct.unpack_from("<ii", head, 4)  # BITMAPINFOHEADER; its height spans XOR + AND masks
                w, h = abs(w), abs(h) // 2
            out.append((int(w), int(h)))
    except struct.error:
        raise MediaDecodeError(f"ICO image ({len(data)} bytes) has a truncated directory or frame header") from None
    return out


def _check_frames_first(data: bytes, max_pixels: int | None, budget: RequestBudget | None) -> None:
    """Formats whose directory can disagree with the frames inside: every frame is checked on its own header
    before PIL opens the file (which, for ICO, already decodes)."""
    if data[:4] != _ICO_MAGIC:
        return
    limit = budget.image_limit() if budget is not None else None
    for w, h in _ico_frame_sizes(data):
        check_pixels(w, h, max_pixels)
        if limit is not None and w * h > limit:
            raise LimitExceededError(
                f"ICO frame is {w}x{h} = {w * h} pixels, more than the {limit} this server decodes per image for "
                f"this model (--max-image-decode-pixels / MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS)")


def fit_budget(img: Image.Image, budget: RequestBudget | None) -> None:
    """Before the pixels are decoded: shrink a JPEG that is larger than the request's per-image decode limit
    (PIL draft: the DCT decodes at 1/2, 1/4 or 1/8 scale, so the full-size pixels are never allocated), refuse
    any other image above it, then charge the request's pixel budget with what will be decoded."""
    if budget is None:
        return
    limit = budget.image_limit()
    w, h = img.size
    if w * h > limit and img.format == "JPEG":
        for scale in (2, 4, 8):
            if -(-w // scale) * -(-h // scale) <= limit:
                img.draft(img.mode, (-(-w // scale), -(-h // scale)))
                break
    if img.width * img.height > limit:
        raise LimitExceededError(
            f"image is {w}x{h} = {w * h} pixels, more than the {limit} this server decodes per image for this "
            f"model (--max-image-decode-pixels / MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS; JPEGs up to 8x larger are "
            f"decoded downscaled); send a smaller image")
    budget.charge_pixels(img.width * img.height, f"image {img.width}x{img.height}")


def decode_image(data: bytes, opts: ImageIOOptions | None = None, *, max_pixels: int | None = 100_000_000,
                 budget: RequestBudget | None = None) -> Image.Image:
    """Decode encoded image bytes to a fully loaded RGB PIL image (first frame of animations).
    `budget`: the request's decode budget, checked and charged from the header (`fit_budget`)."""
    opts = opts or ImageIOOptions()
    if not data:
        raise MediaDecodeError("image data is empty")
    # PIL's own bomb check (process-global Image.MAX_IMAGE_PIXELS, 89M warns / 179M raises) still runs
    # inside open(); we do not touch that global (other code shares it) and apply the policy's cap
    # ourselves from the header below. Silencing its warning is skipped: catch_warnings is not thread-safe.
    _check_frames_first(data, max_pixels, budget)
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise LimitExceededError(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError from plugins, ...
        raise MediaDecodeError(f"cannot decode image ({len(data)} bytes): not a readable image in a supported "
                               f"format ({', '.join(ALLOWED_IMAGE_FORMATS)}): {type(e).__name__}") from None
    # Header parsed, pixels not yet decoded: refuse huge images before allocating them.
    check_pixels(img.width, img.height, max_pixels)
    fit_budget(img, budget)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped the process-global switch; we still must not accept truncated files silently.
        raise MediaDecodeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled in this process; refusing "
                               "to decode because truncated images would be silently accepted")
    try:
        img.load()  # full decode now: truncation / corrupt data raise here, not later inside a processor
    except Exception as e:
        raise MediaDecodeError(
            f"image data is truncated or corrupt ({img.format or 'unknown'} {img.width}x{img.height}, "
            f"{len(data)} bytes): {e}") from None
    return normalize_image(img, opts)


def normalize_image(img: Image.Image, opts: ImageIOOptions | None = None) -> Image.Image:
    """Return an RGB image: transparent modes composited over the background, others converted, RGB as is."""
    opts = opts or ImageIOOptions()
    if not isinstance(img, Image.Image):
        raise InvalidInputError(f"expected a PIL image, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        # Palette/grayscale with a tRNS entry: expand to real alpha first, then composite like RGBA.
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "RGBa":  # premultiplied alpha: PIL un-premultiplies on conversion
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "La":
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "LA"):
        return _composite(img, opts.rgba_background_color)
    if mode.startswith("I;16"):
        # PIL's convert("RGB") clips 16-bit values at 255 (nearly all white): scale to 8 bits instead.
        arr = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _composite(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite over an opaque colour: out = round((fg*a + bg*(255-a)) / 255), exact in integers.

    PIL's masked paste computes exactly that (its BLEND rounding is round-to-nearest of /255) in place, one
    8-bit row at a time: the peak is the source plus the RGB result, never a wide-integer copy of the image."""
    if img.mode == "LA":
        img = img.convert("RGBA")  # L + alpha: the grey channel is expanded, the alpha band kept
    out = Image.new("RGB", img.size, bg)
    out.paste(img, (0, 0), mask=img)  # RGBA into RGB: the colour bands are pasted through the alpha band
    return out
