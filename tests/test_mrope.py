"""M-RoPE positions in numpy (shared/models/mrope.py) equal transformers' `get_rope_index`, for Qwen2-VL,
Qwen2.5-VL (videos with fractional seconds per grid) and Qwen3-VL (videos split per frame by timestamps): the
same (3, L) positions and rope delta on random prompts of text, images and videos in any order, a prompt that
ends in an image and a text-only prompt included."""
from __future__ import annotations

import random

import pytest
import torch

from mmpipe.shared.models.registry import load_adapter
from mmpipe.shared.models.tiny import ensure_tiny_model
from mmpipe.shared.types import MMEmbedding

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return load_adapter(str(ensure_tiny_model(request.param)), device="cpu", part="lm")


def _prompt(adapter, rng: random.Random, n_items: int, end_in_item: bool):
    """(token ids, embeddings in prompt order) with random grids; Qwen3-VL videos get text between frames."""
    m = adapter.merge_size
    img, vid = adapter.placeholder_id("image"), adapter.placeholder_id("video")
    text = [t for t in range(10, 60) if t not in (img, vid)]
    ids: list[int] = [rng.choice(text) for _ in range(rng.randint(0, 7))]
    embs: list[MMEmbedding] = []
    for k in range(n_items):
        modality = rng.choice(["image", "video"])
        t = 1 if modality == "image" else rng.randint(1, 4)
        h, w = m * rng.randint(1, 4), m * rng.randint(1, 4)
        meta = {"grid_thw": [t, h, w]}
        if modality == "video":
            meta["second_per_grid_t"] = rng.choice([0.5, 1.0, 1 / 3, 0.7, 2.0, 1.37])
        per_frame = h * w // (m * m)
        if modality == "video" and adapter.family == "qwen3_vl":
            for _ in range(t):
                ids += [rng.choice(text) for _ in range(rng.randint(1, 3))] + [vid] * per_frame
        else:
            ids += [img if modality == "image" else vid] * (t * per_frame)
        embs.append(MMEmbedding(modality, torch.zeros(t * per_frame, 4), meta))
        if not (end_in_item and k == n_items - 1):
            ids += [rng.choice(text) for _ in range(rng.randint(1, 9))]
    return ids, embs


def _transformers(adapter, ids: list[int], embs: list[MMEmbedding]):
    """The adapter's call before mrope.py: the model's own get_rope_index."""
    t = torch.tensor(ids, dtype=torch.long).reshape(1, -1)
    types = torch.zeros_like(t, dtype=torch.int32)
    types[t == adapter.placeholder_id("image")] = 1
    types[t == adapter.placeholder_id("video")] = 2

    def grids(m):
        g = [e.meta["grid_thw"] for e in embs if e.modality == m]
        return torch.tensor(g, dtype=torch.long) if g else None

    extra = {}
    secs = [e.meta.get("second_per_grid_t", 1.0) for e in embs if e.modality == "video"]
    if adapter.family == "qwen2_5_vl" and secs:
        extra["second_per_grid_ts"] = torch.tensor(secs)
    pos, delta = adapter.model.model.get_rope_index(t, mm_token_type_ids=types, image_grid_thw=grids("image"),
                                                    video_grid_thw=grids("video"),
                                                    attention_mask=torch.ones_like(t), **extra)
    return pos[:, 0], int(delta.reshape(-1)[0])


@pytest.mark.parametrize("seed", range(40))
def test_positions_equal_transformers(adapter, seed):
    rng = random.Random(seed)
    ids, embs = _prompt(adapter, rng, n_items=rng.randint(0, 4), end_in_item=seed % 5 == 0)
    if not embs:  # transformers' get_rope_index wants a vision + text prompt: text only is the 1-D positions
        pos, delta = adapter.mrope_positions(torch.tensor(ids, dtype=torch.long), embs)
        assert torch.equal(pos, torch.arange(len(ids)).expand(3, -1)) and delta == 0
        return
    want, want_delta = _transformers(adapter, ids, embs)
    got, got_delta = adapter.mrope_positions(torch.tensor(ids, dtype=torch.long), embs)
    assert got.dtype == torch.long and got.shape == want.shape
    assert torch.equal(got, want), (seed, (got != want).nonzero()[:5])
    assert got_delta == want_delta


def test_a_run_that_does_not_match_its_grid_is_refused(adapter):
    m = adapter.merge_size
    ids = [11] + [adapter.placeholder_id("image")] * 3 + [12]
    with pytest.raises(ValueError):
        adapter.mrope_positions(torch.tensor(ids), [MMEmbedding("image", torch.zeros(3, 4),
                                                                {"grid_thw": [1, 2 * m, 2 * m]})])
