"""Tiny synthetic media items for the warm-up forward each service runs before it reports SERVING."""
from __future__ import annotations

from mmpipe.shared.types import MediaItem

_DUMMY_HASH = "0" * 64


def warmup_items(adapter) -> list[MediaItem]:
    """One small item per modality the model takes (a 56x56 image, a 2-frame video, 0.5 s of audio)."""
    import numpy as np
    from PIL import Image

    out = []
    for m in adapter.modalities:
        if m == "image":
            out.append(MediaItem("image", Image.new("RGB", (56, 56), (127, 127, 127)), _DUMMY_HASH))
        elif m == "video":
            out.append(MediaItem("video", np.full((2, 56, 56, 3), 127, np.uint8), _DUMMY_HASH,
                                 meta={"fps": 2.0, "sampled_fps": 2.0, "total_num_frames": 2,
                                       "frame_indices": [0, 1], "duration_s": 1.0}))
        elif m == "audio":
            sr = adapter.audio_sampling_rate or 16000
            out.append(MediaItem("audio", np.zeros(sr // 2, np.float32), _DUMMY_HASH, meta={"sampling_rate": sr}))
    return out
