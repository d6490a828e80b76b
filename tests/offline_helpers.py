"""Shared by the offline-API tests: tiny models, synthetic media and the transformers oracle."""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ENGINE = os.environ.get("MMPIPE_TEST_ENGINE", "mmpipe")
# What each tiny family takes (the parity tests' matrix).
FAMILY_MODALITIES = {
    "llava": ("image",),
    "qwen2_vl": ("image", "video"),
    "qwen2_5_vl": ("image", "video"),
    "qwen2_audio": ("audio",),
    "llava_onevision": ("image", "video"),
    "qwen2_5_omni": ("image", "video", "audio"),
    "qwen3_vl": ("image", "video"),
    "qwen3_vl_moe": ("image", "video"),
    "gemma3": ("image",),
    "idefics3": ("image",),
    "smolvlm": ("image",),
    "llava_next": ("image",),
    "internvl": ("image", "video"),
    "mistral3": ("image",),
    "voxtral": ("audio",),
}


def make_image(w: int = 112, h: int = 84, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_video(n: int = 4, h: int = 56, w: int = 84, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def make_audio(seconds: float = 1.0, sr: int = 16000, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=None)
def oracle_model(path: str):
    """A separately loaded HF model + processor: the correctness oracle."""
    from mmpipe.shared.models.tiny import load_tiny_model

    model, processor = load_tiny_model(path)
    return model.eval(), processor


@torch.inference_mode()
def hf_generate(path: str | Path, text: str, *, images=None, videos=None, audio=None, max_new_tokens: int = 8,
                add_special_tokens: bool = True, **processor_kwargs) -> list[int]:
    """Greedy token ids from transformers' own `model.generate(**processor(...))` (`processor_kwargs`: e.g. the
    `video_metadata` of a clip of known fps)."""
    model, processor = oracle_model(str(path))
    kw = dict(processor_kwargs)
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = videos
    if audio:
        kw["audio"] = audio
        kw["sampling_rate"] = processor.feature_extractor.sampling_rate
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=add_special_tokens, **kw)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def wav_b64(a: np.ndarray, sr: int = 16000) -> str:
    """A clip as a base64 float WAV (lossless: the same samples come back)."""
    import base64

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, a, sr, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


@torch.inference_mode()
def hf_chat_generate(path: str | Path, content: list, *, max_new_tokens: int = 8) -> list[int]:
    """Voxtral's oracle: its processor takes audio only through mistral-common's chat encoding, so one user turn
    of `content` (text strings and audio arrays, in order) goes through `processor.apply_chat_template`, then
    transformers' own `model.generate`."""
    model, processor = oracle_model(str(path))
    parts = [{"type": "text", "text": c} if isinstance(c, str) else {"type": "audio", "base64": wav_b64(c)}
             for c in content]
    inputs = processor.apply_chat_template([{"role": "user", "content": parts}])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def chat_prompt(path: str | Path, messages: list[dict]) -> str:
    _, processor = oracle_model(str(path))
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Every tiny family, built once per test session (a few seconds in all)."""
    from mmpipe.shared.models.tiny import TINY_FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_model(f, root / f) for f in TINY_FAMILIES}


def write_mp4(path: Path, frames: np.ndarray, fps: int = 4) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames.shape[1], frames.shape[2]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
