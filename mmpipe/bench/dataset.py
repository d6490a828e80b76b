"""A random multimodal dataset for served benchmarks: photo-like JPEGs of one size, a fraction reused from a fixed
pool (cache hits on a server with an embedding cache), and one prompt text.

Fresh images never repeat within a run (one seed counter); the pool is built once and sent during warm-up, so a
reused image is a hit from the first measured request. The draw sequence is deterministic for a seed.
"""
from __future__ import annotations

import base64
import io
import random

DEFAULT_PROMPT = "What is in this image? Describe it in a few words."


def jpeg_bytes(seed: int, size: int) -> bytes:
    """A random photo-like JPEG: smooth colour fields (upsampled noise) plus fine grain, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (max(2, size // 16),) * 2 + (3,), dtype=np.uint8))
    arr = np.asarray(base.resize((size, size), Image.BILINEAR), dtype=np.int16)
    arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def chat_messages(images: tuple[bytes, ...], prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """One user turn: each image as a data-URL `image_url` part, then the prompt text."""
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(j)}} for j in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


class RandomMultimodalDataset:
    """Images of `image_size` px, drawn fresh or (with probability `reuse_fraction` each) from a pool of
    `pool_size` images."""

    def __init__(self, image_size: int, pool_size: int, seed: int = 0):
        if image_size < 2:
            raise ValueError(f"image size must be at least 2 px, got {image_size}")
        self.size = image_size
        self.next_seed = 1_000_000 * (seed + 1)
        self.rng = random.Random(seed)
        self.pool = [jpeg_bytes(10 + i, image_size) for i in range(pool_size)]

    def fresh(self) -> bytes:
        self.next_seed += 1
        return jpeg_bytes(self.next_seed, self.size)

    def image(self, reuse_fraction: float) -> bytes:
        if reuse_fraction > 0 and self.pool and self.rng.random() < reuse_fraction:
            return self.pool[self.rng.randrange(len(self.pool))]
        return self.fresh()

    def sample(self, n: int, reuse_fraction: float = 0.0) -> list[bytes]:
        """`n` images, each reused from the pool with probability `reuse_fraction`."""
        if not 0.0 <= reuse_fraction <= 1.0:
            raise ValueError(f"reuse fraction must be in [0, 1], got {reuse_fraction}")
        if reuse_fraction > 0 and not self.pool:
            raise ValueError("a reuse fraction above 0 needs a pool of at least one image")
        return [self.image(reuse_fraction) for _ in range(n)]

    def requests(self, n: int, images_per_request: int, reuse_fraction: float = 0.0) -> list[tuple[bytes, ...]]:
        """`n` requests' images (an empty tuple each with images_per_request=0: text only)."""
        return [tuple(self.sample(images_per_request, reuse_fraction)) for _ in range(n)]
