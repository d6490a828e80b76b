"""M-RoPE position ids of a Qwen-VL prompt, in numpy: transformers' `get_rope_index`, one array op per run.

transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL `get_rope_index` groups the prompt's token types with a Python
`itertools.groupby` over every token (a lambda call per token: ~0.5 ms for a 1,000-token chat, on every turn of
it), then builds each run's positions with small torch ops. This computes the same (3, L) positions and rope
delta from the same inputs with a handful of numpy ops per run: the runs are found with one vectorised
comparison. Rules, as transformers has them (tests/test_mrope.py checks equality against it):

  * a text run [a, b) takes positions cur .. cur + (b - a) - 1 on all three rows; cur advances by its length;
  * a vision run takes the next grid (t, h, w) of its modality, and its rows are the merged grid
    (t, h // merge, w // merge) in t-major order: row 0 is the frame index (times the video's time interval,
    quantised with float32 arithmetic and truncated, as transformers' `(arange * interval).long()`), rows 1 and
    2 the merged row and column, each plus cur; cur then advances by max(h, w) // merge (not by the run's
    highest position);
  * the delta is max(positions) + 1 - L (generated tokens continue from the prompt's highest position).

The callers (shared/models/qwen_vl.py, qwen3_vl.py) pass the grids in prompt order per modality and, for
Qwen2.5-VL videos, each video's interval (tokens_per_second * second_per_grid_t); Qwen3-VL splits each video
into one (1, h, w) grid per frame, as its `get_rope_index` does. Pure numpy: no torch, no weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(token_ids: np.ndarray, image_id: int | None, video_id: int | None) -> np.ndarray:
    """(L,) int8: 1 where the token is the image placeholder, 2 the video placeholder, else 0."""
    types = np.zeros(token_ids.shape[0], dtype=np.int8)
    if image_id is not None:
        types[token_ids == image_id] = IMAGE
    if video_id is not None:
        types[token_ids == video_id] = VIDEO
    return types


def rope_index(types: np.ndarray, grids: dict[int, Sequence[Sequence[int]]], merge: int,
               intervals: Sequence[float | None] | None = None) -> tuple[np.ndarray, int]:
    """(3, L) int64 positions and the rope delta. `types`: `token_types` of the prompt; `grids[IMAGE]` /
    `grids[VIDEO]`: the (t, h, w) patch grids in prompt order; `intervals[k]`: the k-th video's temporal
    interval as the float32 transformers multiplies by (None: the frame index as is). ValueError when a run
    and its grid disagree (transformers fails there too)."""
    n = int(types.shape[0])
    out = np.empty((3, n), dtype=np.int64)
    if n == 0:
        return out, 0
    bounds = [0, *(np.flatnonzero(types[1:] != types[:-1]) + 1).tolist(), n]
    kinds = types[bounds[:-1]].tolist()
    nxt = {IMAGE: 0, VIDEO: 0}
    cur = 0
    top = 0  # the highest position so far (the delta's max, tracked instead of reduced)
    for kind, a, b in zip(kinds, bounds[:-1], bounds[1:]):
        if kind == TEXT:
            out[:, a:b] = np.arange(cur, cur + b - a, dtype=np.int64)
            cur += b - a
            top = max(top, cur - 1)
            continue
        items = grids.get(kind) or ()
        k = nxt[kind]
        if k >= len(items):
            raise ValueError(f"the prompt has more {'image' if kind == IMAGE else 'video'} runs than grids")
        nxt[kind] = k + 1
        t, h, w = (int(x) for x in items[k])
        lt, lh, lw = t, h // merge, w // merge
        if lt * lh * lw != b - a:
            raise ValueError(f"a run of {b - a} placeholder tokens for a grid of {lt * lh * lw} merged patches")
        interval = intervals[k] if (kind == VIDEO and intervals is not None) else None
        if interval is None:
            frames = np.arange(cur, cur + lt, dtype=np.int64)
        else:  # float32 as transformers' `(torch.arange(t) * interval).long()` (interval a float32 scalar)
            frames = (np.arange(lt, dtype=np.float32) * np.float32(interval)).astype(np.int64) + cur
        # each row of the run as its (t, h, w) grid: a view (a contiguous slice), filled by broadcasting
        out[0, a:b].reshape(lt, lh, lw)[...] = frames[:, None, None]
        out[1, a:b].reshape(lt, lh, lw)[...] = np.arange(cur, cur + lh, dtype=np.int64)[:, None]
        out[2, a:b].reshape(lt, lh, lw)[...] = np.arange(cur, cur + lw, dtype=np.int64)
        top = max(top, int(frames.max()), cur + max(lh, lw) - 1)
        cur += max(h, w) // merge
    return out, top + 1 - n


def float32_interval(tokens_per_second: float, second_per_grid_t: float) -> float:
    """transformers' `tokens_per_second * second_per_grid_ts[k]`, the latter a float32 tensor element: the
    product rounded to float32 (as a Python float, exact)."""
    return float(np.float32(tokens_per_second) * np.float32(second_per_grid_t))
