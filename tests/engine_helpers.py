"""Shared helpers for the engine tests: tiny models of every family, prompts with media, their embedding rows
(computed with the HF model's own feature methods), M-RoPE positions, and HF `generate` references.

A `Case` holds everything one family's tests need; `run_engine` drives an engine through a scripted
arrival / abort schedule and collects tokens per request.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe.shared.types import EngineRequest, MMSpan, SamplingParams

REF_TOKENS = 16  # HF reference length; greedy references are prefix-consistent, so shorter runs truncate it


def make_image(w: int = 56, h: int = 56, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_video(n_frames: int = 4, h: int = 56, w: int = 56, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n_frames, h, w, 3), dtype=np.uint8)


def make_audio(seconds: float = 1.0, sr: int = 16000, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * (1 + seed) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@dataclass
class Prompt:
    """One prompt of a family: processor inputs, the engine-side pieces and the HF greedy reference."""

    inputs: Any
    token_ids: list[int]
    mm_embeds: torch.Tensor | None
    mm_positions: torch.Tensor | None
    mrope_positions: torch.Tensor | None
    mrope_delta: int
    ref: list[int] = field(default_factory=list)

    def request(self, request_id: str, sampling: SamplingParams | None = None, **overrides) -> EngineRequest:
        sampling = sampling or SamplingParams(max_tokens=REF_TOKENS, temperature=0.0)
        req = EngineRequest(request_id=request_id, prompt_token_ids=list(self.token_ids), sampling=sampling,
                            mm_embeds=self.mm_embeds, mm_positions=self.mm_positions,
                            mrope_positions=self.mrope_positions, mrope_delta=self.mrope_delta,
                            eos_token_ids=list(overrides.pop("eos_token_ids", self.eos)))
        return dataclasses.replace(req, **overrides)

    eos: list[int] = field(default_factory=list)

    def mm_spans(self, keys: list[str | None] | None = None) -> list[MMSpan]:
        """One MMSpan per contiguous run of media rows (one run per item in these prompts), keyed by `keys` or
        by a hash of the item's rows (its content, as the embedding cache's content-hash key would be)."""
        if self.mm_positions is None:
            return []
        pos = self.mm_positions.tolist()
        runs, start = [], 0
        for i in range(1, len(pos) + 1):
            if i == len(pos) or pos[i] != pos[i - 1] + 1:
                runs.append((start, i))
                start = i
        if keys is None:
            keys = ["test:hash:" + hashlib.blake2b(self.mm_embeds[a:b].contiguous().numpy().tobytes(),
                                                   digest_size=32).hexdigest() for a, b in runs]
        return [MMSpan(offset=pos[a], length=b - a, key=k) for (a, b), k in zip(runs, keys)]


@dataclass
class Case:
    family: str
    model: Any
    processor: Any
    prompts: list[Prompt]


# --------------------------------------------------------------------------------------------------------------
# Building prompts per family
# --------------------------------------------------------------------------------------------------------------
def _media_parts(family: str) -> list[tuple[list[dict], dict]]:
    """Three prompts per family: (chat content, processor media kwargs). The last is text only."""
    img = [{"type": "image"}]
    vid = [{"type": "video"}]
    aud = [{"type": "audio"}]
    txt = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    if family == "llava":
        return [(img + txt("Describe the image."), {"images": [make_image(seed=0)]}),
                (img + txt("What is in this picture? Tell me briefly."), {"images": [make_image(seed=1)]}),
                (txt("Hello, how are you?"), {})]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return [(img + vid + txt("Describe the image and the video."),
                 {"images": [make_image(112, 84, seed=0)], "videos": [make_video(4, 56, 84)]}),
                (img + txt("What is in this picture?"), {"images": [make_image(84, 112, seed=1)]}),
                (txt("Hello, how are you? Tell me a story."), {})]
    if family == "qwen2_audio":
        return [(aud + txt("What's that sound?"), {"audio": [make_audio(1.0, seed=0)]}),
                (aud + txt("Listen to the audio and transcribe it."), {"audio": [make_audio(1.5, seed=1)]}),
                (txt("Hello, how are you?"), {})]
    if family == "llava_onevision":
        return [(img + txt("Describe the image."), {"images": [make_image(112, 84, seed=0)]}),
                (vid + txt("What happens in the clip?"), {"videos": [make_video(4, 56, 56)]}),
                (txt("Hello, how are you?"), {})]
    if family == "qwen2_5_omni":
        return [(img + aud + txt("Describe all of it."),
                 {"images": [make_image(112, 84, seed=0)], "audio": [make_audio(1.0, seed=0)]}),
                (vid + txt("What happens in the clip?"), {"videos": [make_video(4, 56, 84)]}),
                (txt("Hello, how are you?"), {})]
    if family == "gemma3":  # prompts longer than the 16-token sliding window; two images in the first
        return [(img + txt("Describe the image and this one:") + img + txt(" What is in each picture? Tell me."),
                 {"images": [make_image(112, 84, seed=0), make_image(56, 56, seed=3)]}),
                (img + txt("What is in this picture? Please tell me how many objects you see."),
                 {"images": [make_image(84, 112, seed=1)]}),
                (txt("Hello, how are you? Tell me a story about the people in the room and the car."), {})]
    raise ValueError(family)


def _processor_kwargs(family: str, media: dict) -> dict:
    kw = dict(media)
    if "audio" in kw:
        kw["sampling_rate"] = 16000
    if "videos" in kw and family in ("qwen2_5_vl", "qwen2_5_omni"):
        kw["videos_kwargs"] = {"fps": 2.0}
    return kw


def _qwen2_audio_features(model, input_features, feature_attention_mask) -> torch.Tensor:
    """Qwen2-Audio has no get_audio_features: tower with a bidirectional mask, projector, keep valid frames."""
    from transformers.masking_utils import create_bidirectional_mask

    tower, proj = model.model.audio_tower, model.model.multi_modal_projector
    feat_lens, out_lens = tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
    b, _, n_frames = input_features.shape
    max_seq = (n_frames - 2) // 2 + 1
    mask2d = (torch.arange(max_seq)[None, :] < feat_lens[:, None]).long()
    enc_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(b, max_seq, 1),
                                         attention_mask=mask2d)
    per_clip = proj(tower(input_features, attention_mask=enc_mask).last_hidden_state)
    keep = torch.arange(per_clip.shape[1])[None, :] < out_lens[:, None]
    return per_clip[keep]


def _features(family: str, model, inputs) -> dict[str, torch.Tensor]:
    """modality -> (rows, hidden) features in placeholder order, with the model's own methods."""
    out: dict[str, torch.Tensor] = {}
    if "pixel_values" in inputs:
        if family in ("llava", "gemma3"):
            o = model.get_image_features(pixel_values=inputs["pixel_values"])
        elif family == "llava_onevision":
            o = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                         batch_num_images=inputs.get("batch_num_images"))
        else:
            o = model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        out["image"] = _with_deepstack(o)
    if "pixel_values_videos" in inputs:
        if family == "llava_onevision":
            o = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
        else:
            o = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                         video_grid_thw=inputs["video_grid_thw"])
        out["video"] = _with_deepstack(o)
    if "input_features" in inputs:
        if family == "qwen2_audio":
            out["audio"] = _qwen2_audio_features(model, inputs["input_features"], inputs["feature_attention_mask"])
        else:
            out["audio"] = model.get_audio_features(inputs["input_features"],
                                                    inputs["feature_attention_mask"]).last_hidden_state
    return out


def _with_deepstack(o) -> torch.Tensor:
    """The rows of a features output; Qwen3-VL's deepstack features concatenated after the base embedding along
    the hidden dimension (vLLM's layout, what the engine takes)."""
    base = _flat(o.pooler_output)
    deep = getattr(o, "deepstack_features", None)
    return torch.cat([base, *(_flat(layer) for layer in deep)], dim=-1) if deep else base


def _flat(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in x])
    return x.reshape(-1, x.shape[-1])


def _mrope(family: str, model, inputs) -> tuple[torch.Tensor | None, int]:
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        kw = dict(mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                  video_grid_thw=inputs.get("video_grid_thw"), attention_mask=am)
        if family == "qwen2_5_vl" and "second_per_grid_ts" in inputs:
            kw["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    elif family == "qwen2_5_omni":
        fam = inputs.get("feature_attention_mask")
        kw = dict(image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
                  attention_mask=am, use_audio_in_video=False,
                  audio_seqlens=fam.sum(-1) if fam is not None else None,
                  second_per_grids=inputs.get("video_second_per_grid"))
    else:
        return None, 0
    pos, delta = model.model.get_rope_index(ids, **kw)
    return pos[:, 0, :].clone(), int(delta.reshape(-1)[0])


def _load(path: Path):
    from mmpipe.shared.models.tiny import load_tiny_model

    a, b = load_tiny_model(path)
    return (a, b) if isinstance(a, torch.nn.Module) else (b, a)  # (model, processor)


@torch.no_grad()
def build_prompt(family: str, model, processor, messages: list[dict], media: dict) -> Prompt:
    """One Prompt from chat messages and the processor's media kwargs ({"images": [...], "videos": [...]}),
    with its embedding rows, M-RoPE positions and the HF greedy reference."""
    cfg = model.config
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, return_tensors="pt", **_processor_kwargs(family, media))
    ids = inputs["input_ids"]
    feats = _features(family, model, inputs)
    pos_list, rows = [], []
    for modality, f in feats.items():
        tid = getattr(cfg, f"{modality}_token_id")
        p = (ids[0] == tid).nonzero(as_tuple=True)[0]
        assert p.numel() == f.shape[0], (family, modality, p.numel(), f.shape)
        pos_list.append(p)
        rows.append(f)
    mrope, delta = _mrope(family, model, inputs)
    ref = model.generate(**inputs, max_new_tokens=REF_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None  # generate caches it; the next prompt must recompute
    return Prompt(inputs=inputs, token_ids=ids[0].tolist(), mm_embeds=torch.cat(rows) if rows else None,
                  mm_positions=torch.cat(pos_list) if pos_list else None, mrope_positions=mrope, mrope_delta=delta,
                  ref=_strip(ref, eos), eos=eos)


@torch.no_grad()
def build_case(family: str, out_dir: Path) -> Case:
    from mmpipe.shared.models.tiny import build_tiny_model

    model, processor = _load(build_tiny_model(family, out_dir))
    prompts = [build_prompt(family, model, processor, [{"role": "user", "content": content}], media)
               for content, media in _media_parts(family)]
    return Case(family, model, processor, prompts)


def _strip(ref: list[int], eos: list[int]) -> list[int]:
    """HF output up to and including the first EOS (what the engine emits)."""
    for i, t in enumerate(ref):
        if t in eos:
            return ref[: i + 1]
    return ref


# --------------------------------------------------------------------------------------------------------------
# Driving an engine
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    tokens: dict[str, list[int]]
    logprobs: dict[str, list[float]]
    finish: dict[str, str | None]
    steps: int
    cached: dict[str, int] = field(default_factory=dict)  # num_cached_tokens reported per request


def run_engine(engine, arrivals: dict[int, list[EngineRequest]], aborts: dict[int, list[str]] | None = None,
               max_steps: int = 10_000) -> RunResult:
    """Add requests at the given step numbers (0 = before the first step), abort at others, run to the end."""
    aborts = aborts or {}
    tokens: dict[str, list[int]] = {}
    lps: dict[str, list[float]] = {}
    finish: dict[str, str | None] = {}
    cached: dict[str, int] = {}
    last = max(list(arrivals) + list(aborts) + [0])
    step = 0
    while step <= last or engine.has_unfinished_requests():
        for req in arrivals.get(step, []):
            tokens[req.request_id], lps[req.request_id], finish[req.request_id] = [], [], None
            engine.add_request(req)
        for rid in aborts.get(step, []):
            engine.abort_request(rid)
        for out in engine.step():
            assert finish[out.request_id] is None, f"output after finish for {out.request_id}"
            tokens[out.request_id] += out.new_token_ids
            cached[out.request_id] = out.num_cached_tokens
            if out.logprobs is not None:
                lps[out.request_id] += out.logprobs
            if out.finished:
                finish[out.request_id] = out.finish_reason
        step += 1
        assert step < max_steps, "engine did not finish"
    return RunResult(tokens, lps, finish, step, cached)


# --------------------------------------------------------------------------------------------------------------
# One build per family per test process (the test modules share them)
# --------------------------------------------------------------------------------------------------------------
_CASES: dict[str, Case] = {}
_TMP: list[Any] = []


def get_case(family: str) -> Case:
    if family not in _CASES:
        import tempfile

        if not _TMP:
            _TMP.append(tempfile.TemporaryDirectory(prefix="mmpipe-engine-tests-"))
        torch.manual_seed(0)
        _CASES[family] = build_case(family, Path(_TMP[0].name) / family)
    return _CASES[family]


def first_mm_span(prompt: Prompt) -> tuple[int, int]:
    """(first index, number of rows) of the first contiguous run of multimodal rows in a prompt."""
    pos = sorted(prompt.mm_positions.tolist())
    n = 1
    while n < len(pos) and pos[n] == pos[0] + n:
        n += 1
    return pos[0], n
