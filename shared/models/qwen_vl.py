"""Qwen2-VL and Qwen2.5-VL (dynamic-resolution ViT, Qwen2 text model with 3-D M-RoPE): image and video.

M-RoPE needs each item's (t, h, w) grid, so the grid travels in the embedding's metadata; the LM side
rebuilds the position ids from the expanded prompt with transformers' `get_rope_index` rules (in numpy:
mrope.py). Without them generation silently falls back to 1-D positions and gives different tokens.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.models._features import split_by_tokens
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.mm_kwargs import PARAM, KwargRule
from mmpipe.shared.models.mrope import IMAGE, VIDEO, float32_interval, rope_index, token_types
from mmpipe.shared.types import MMEmbedding, ProcessedItem


class QwenVLBase(ModelAdapter):
    """Shared by the Qwen vision families (and the Omni thinker's vision half)."""

    uses_mrope = True
    tower_modules = ("model.visual",)

    @functools.cached_property
    def merge_size(self) -> int:
        """Read once: the config is fixed after loading, and a transformers config attribute costs microseconds
        (this is read on every request's M-RoPE positions)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def _grid_tokens(self, grid: list[int]) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size ** 2)

    def _item_meta(self, modality: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if modality == "image":
            return {"grid_thw": tensors["image_grid_thw"][0].tolist()}
        if modality == "video":
            meta: dict[str, Any] = {"grid_thw": tensors["video_grid_thw"][0].tolist()}
            for k in ("second_per_grid_ts", "video_second_per_grid"):
                if k in tensors:
                    meta["second_per_grid_t"] = float(tensors[k][0])
            return meta
        return super()._item_meta(modality, tensors)

    def _encode_vision(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        """Items of any sizes in one forward of our tower (towers/qwen_vision.py) over the HF weights: grid
        metadata once on the host, one batched attention call per layer, compiled on CUDA."""
        from mmpipe.shared.models.towers.qwen_vision import QwenVisionTower, find_visual

        key, gkey = ("pixel_values", "image_grid_thw") if modality == "image" else (
            "pixel_values_videos", "video_grid_thw")
        tower = QwenVisionTower.of(find_visual(self.model))
        grids = [tuple(int(x) for x in g) for it in items for g in it.tensors[gkey].tolist()]  # host ints
        pixels = torch.cat([it.tensors[key] for it in items], dim=0)
        return split_by_tokens(tower(pixels, grids), items)

    def _embeds_from_dict(self, modality: str, value: dict) -> list[MMEmbedding]:
        """vLLM's Qwen-VL form: {"image_embeds": (sum_tokens, hidden) or (n, F, hidden), "image_grid_thw": (n, 3)}."""
        key, gkey = f"{modality}_embeds", f"{modality}_grid_thw"
        if key not in value or gkey not in value:
            raise InvalidInputError(f"{self.family} {modality} embeddings need both {key!r} and {gkey!r}", param=key)
        emb, grid = value[key], self._checked_grid(value[gkey], gkey)
        sizes = [self._grid_tokens(g) for g in grid.tolist()]
        if not isinstance(emb, torch.Tensor):
            raise InvalidInputError(f"{key} must be a tensor", param=key)
        if emb.ndim == 3:
            emb = emb.reshape(-1, emb.shape[-1])
        if emb.ndim != 2 or emb.shape[0] != sum(sizes):
            raise InvalidInputError(
                f"{key} has shape {tuple(emb.shape)} but {gkey}={grid.tolist()} needs {sum(sizes)} rows "
                f"(t*h*w/{self.merge_size ** 2} per item)", param=key)
        out = []
        for t, g in zip(torch.split(emb, sizes), grid.tolist()):
            meta: dict[str, Any] = {"grid_thw": [int(x) for x in g]}
            if modality == "video":
                meta["second_per_grid_t"] = float(value.get("second_per_grid_t", 1.0))
            out.append(self._checked_embedding(modality, t, meta))
        return out

    def _checked_grid(self, value: Any, gkey: str) -> torch.Tensor:
        """A user's (num_items, 3) grid: integers (a float grid would be cached and then fail in the M-RoPE
        positions: a 500 on every repeat), positive, with h and w multiples of the merge size (the tower merges
        merge_size x merge_size patches into one token; anything else has no consistent row count)."""
        try:
            grid = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidInputError(f"{gkey} must be (num_items, 3) integers ({e})", param=gkey) from None
        if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
            raise InvalidInputError(f"{gkey} must hold integers, got dtype {grid.dtype}", param=gkey)
        if grid.ndim == 1:
            grid = grid[None]
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.numel() == 0 or (grid <= 0).any():
            raise InvalidInputError(f"{gkey} must be (num_items, 3) positive ints, got {tuple(grid.shape)}", param=gkey)
        m = self.merge_size
        if (grid[:, 1:] % m != 0).any() or (grid > 1 << 20).any():
            raise InvalidInputError(f"{gkey}={grid.tolist()[:4]}: h and w must be multiples of the merge size {m} "
                                    f"(and at most 2^20)", param=gkey)
        return grid.to(torch.int64)

    def _checked_embedding(self, modality: str, t: torch.Tensor, meta: dict[str, Any]) -> MMEmbedding:
        if "grid_thw" not in meta and modality in ("image", "video"):
            raise InvalidInputError(
                f"{self.family} needs {modality}_grid_thw with precomputed {modality} embeddings (M-RoPE positions "
                f"depend on it): pass {{'{modality}_embeds': ..., '{modality}_grid_thw': ...}}",
                param=f"{modality}_embeds")
        return super()._checked_embedding(modality, t, meta)

    def _grids(self, embeddings: list[MMEmbedding], modality: str) -> torch.Tensor | None:
        g = [e.meta["grid_thw"] for e in embeddings if e.modality == modality]
        return torch.tensor(g, dtype=torch.long) if g else None


class Qwen2VLAdapter(QwenVLBase):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = ("image", "video")
    # vLLM's per-request Qwen-VL settings. min/max_pixels reach the image and the video processor (transformers
    # routes the flat keys to both); fps / num_frames make the video processor sample the decoded frames.
    request_mm_kwargs = {
        "min_pixels": KwargRule("int", 1, capped=True, doc="smallest resized image/frame, in pixels"),
        "max_pixels": KwargRule("int", 1, capped=True, doc="largest resized image/frame, in pixels"),
        "fps": KwargRule("float", 1e-3, excludes=("num_frames",), doc="video frames sampled per second"),
        "num_frames": KwargRule("int", 1, capped=True, excludes=("fps",), doc="video frames to sample"),
        "max_frames": KwargRule("int", 1, capped=True, doc="at most this many sampled video frames"),
    }

    @classmethod
    def mm_kwargs_ceilings(cls, processor: Any, server: dict[str, Any]) -> dict[str, float]:
        """The server's max_pixels (its flag, else the image processor's size.longest_edge) caps both pixel keys;
        its max_frames (flag, else the video processor's) caps both frame counts."""
        size = getattr(processor.image_processor, "size", None)
        max_pixels = server.get("max_pixels", getattr(size, "longest_edge", None))
        video = getattr(processor, "video_processor", None)
        max_frames = server.get("max_frames", getattr(video, "max_frames", None))
        caps = {"min_pixels": max_pixels, "max_pixels": max_pixels, "num_frames": max_frames,
                "max_frames": max_frames}
        return {k: v for k, v in caps.items() if v is not None}

    def _call_kwargs(self, modality: str, mm: dict[str, Any]) -> dict[str, Any]:
        """min_pixels / max_pixels as the sub-processor's `size` (what transformers' deprecated flat keys do: the
        item's sub-processor size with those edges replaced), unless the kwargs set a size themselves."""
        out = dict(mm)
        lo, hi = out.pop("min_pixels", None), out.pop("max_pixels", None)
        nested = "images_kwargs" if modality == "image" else "videos_kwargs"
        sub = getattr(self.processor, "image_processor" if modality == "image" else "video_processor", None)
        if (lo is None and hi is None) or sub is None or "size" in out or nested in out:
            return dict(mm)
        size = getattr(sub, "size", None)
        out[nested] = {"size": {"shortest_edge": lo if lo is not None else size.shortest_edge,
                                "longest_edge": hi if hi is not None else size.longest_edge}}
        return out

    @classmethod
    def check_mm_kwargs(cls, effective: dict[str, Any]) -> None:
        lo, hi = effective.get("min_pixels"), effective.get("max_pixels")
        if lo is not None and hi is not None and lo > hi:
            raise InvalidInputError(f"{PARAM}: min_pixels ({lo}) is above max_pixels ({hi})",
                                    param=f"{PARAM}.min_pixels")

    def placeholder_token(self, modality: str) -> str:
        self.check_modality(modality)
        return self.processor.image_token if modality == "image" else self.processor.video_token

    def _encode_batch(self, modality: str, items: list[ProcessedItem]) -> list[torch.Tensor]:
        return self._encode_vision(modality, items)

    def mrope_positions(self, token_ids: torch.Tensor, embeddings: list[MMEmbedding]) -> tuple[torch.Tensor, int]:
        """transformers' `get_rope_index` for this family, in numpy (shared/models/mrope.py: the same positions,
        without its per-token Python loop)."""
        ids = token_ids.reshape(-1).numpy()
        types = token_types(ids, self.placeholder_id("image"), self.placeholder_id("video"))
        videos = [e for e in embeddings if e.modality == "video"]
        grids = {IMAGE: [e.meta["grid_thw"] for e in embeddings if e.modality == "image"],
                 VIDEO: self._video_rope_grids(videos)}
        pos, delta = rope_index(types, grids, self.merge_size, self._video_intervals(videos) if videos else None)
        return torch.from_numpy(pos), delta

    def _video_rope_grids(self, videos: list[MMEmbedding]) -> list[list[int]]:
        return [e.meta["grid_thw"] for e in videos]

    def _video_intervals(self, videos: list[MMEmbedding]) -> list[float | None] | None:
        """Each video's temporal position step (None: the frame index; Qwen2-VL)."""
        return None


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _video_intervals(self, videos: list[MMEmbedding]) -> list[float | None] | None:
        """tokens_per_second * second_per_grid_t per video, in float32 as transformers computes it."""
        tps = self.model.config.vision_config.tokens_per_second
        return [float32_interval(tps, e.meta.get("second_per_grid_t", 1.0)) for e in videos]
