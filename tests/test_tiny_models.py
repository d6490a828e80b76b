"""Tiny offline models (shared/models/tiny.py) and the `mmpipe tiny-model` subcommand.

Every family is built from scratch, loaded back with the Auto classes, and run through processor + greedy
`generate` once per supported modality with two different media items: the generated tokens must differ,
which proves the outputs depend on the media (the point of initializer_range=0.2).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2.exceptions import TemplateError
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor

from mmpipe.cli import main
from mmpipe.shared.models import tiny
from mmpipe.shared.models.tiny import (
    TINY_FAMILIES, TINY_INFO_FILE, TINY_SPECS, build_tiny_model, default_tiny_dir, ensure_tiny_model,
    load_tiny_model, read_tiny_info,
)

AUTO_CLASSES = {"image_text_to_text": AutoModelForImageTextToText, "multimodal_lm": AutoModelForMultimodalLM}
EXPECTED_LOADER = {
    "llava": "image_text_to_text", "qwen2_vl": "image_text_to_text", "qwen2_5_vl": "image_text_to_text",
    "llava_onevision": "image_text_to_text", "qwen2_audio": "multimodal_lm", "qwen2_5_omni": "multimodal_lm",
    "qwen3_vl": "image_text_to_text", "qwen3_vl_moe": "image_text_to_text",
    "qwen2_5_omni_full": "qwen2_5_omni_full",
    "gemma3": "image_text_to_text", "idefics3": "image_text_to_text", "smolvlm": "image_text_to_text",
    "llava_next": "image_text_to_text", "internvl": "image_text_to_text", "mistral3": "image_text_to_text", "voxtral": "multimodal_lm",
}
MAX_DIR_BYTES = 2_000_000


def make_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def make_video(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)  # (T, H, W, C)


def make_audio(seed: int, seconds: float = 1.0, sr: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (220 + 400 * seed) * t)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


MEDIA = {
    "image": lambda seed: {"images": [make_image(seed)]},
    "video": lambda seed: {"videos": [make_video(seed)]},
    "audio": lambda seed: {"audio": [make_audio(seed)], "sampling_rate": 16_000},
}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def greedy(model, processor, prompt: str, **media) -> list[int]:
    inputs = processor(text=prompt, return_tensors="pt", **media)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_builds_loads_and_depends_on_media(family: str, tmp_path: Path) -> None:
    spec = TINY_SPECS[family]
    path = build_tiny_model(family, tmp_path / family)

    info = read_tiny_info(path)
    assert info["family"] == family and info["loader"] == EXPECTED_LOADER[family]
    assert dir_bytes(path) < MAX_DIR_BYTES

    # Voxtral: the HF tokenizer files (what mmpipe reads); its tekken.json (mistral-common) is the oracle's, below
    processor = AutoProcessor.from_pretrained(path, **({"mistral_format": False} if family == "voxtral" else {}))
    if info["loader"] in AUTO_CLASSES:
        model = AUTO_CLASSES[info["loader"]].from_pretrained(path).eval()
    else:  # a full Qwen2.5-Omni checkpoint: its thinker is the text model
        model, _ = load_tiny_model(path)
        assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    tok = processor.tokenizer
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert 400 <= len(tok) <= 500
    assert len(tok.tokenize(" the people are walking")) <= 6  # ordinary words are not split into bytes

    # string contents, a system prompt and a past assistant turn; text-only generation works
    chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]},
    ]
    # VoxtralProcessor.apply_chat_template always encodes through its tokenizer: render with the tokenizer
    templater = processor.tokenizer if family == "voxtral" else processor
    text_prompt = templater.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "You are a helpful assistant." in text_prompt and "Tell me a story." in text_prompt
    assert len(greedy(model, processor, text_prompt)) >= 1

    if family == "qwen2_5_omni_full":
        return  # its thinker is the qwen2_5_omni builder's (that case runs the media); talker: test_stage_weights
    if family == "voxtral":
        _voxtral_depends_on_audio(path, model, processor)
        return
    for modality in ("image", "video", "audio"):
        messages = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": "What is this?"}]}]
        if modality not in spec.modalities:
            with pytest.raises(TemplateError):  # the model's own template (SmolVLM's processor swaps in
                # transformers' built-in video template for a video part unless a template is passed)
                processor.apply_chat_template(messages, chat_template=processor.chat_template,
                                              add_generation_prompt=True, tokenize=False)
            continue
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        placeholder = spec.placeholders[modality]
        assert prompt.count(placeholder) == 1  # one placeholder per media part, expanded by the processor
        if modality in spec.token_id_attrs:  # InternVL's frames are image rows: its config names no video id
            token_id = getattr(model.config, spec.token_id_attrs[modality])
            assert token_id == tok.convert_tokens_to_ids(placeholder)

        first = greedy(model, processor, prompt, **MEDIA[modality](1))
        second = greedy(model, processor, prompt, **MEDIA[modality](2))
        assert len(first) == 4
        assert first != second, f"{family}: greedy tokens do not depend on the {modality}"


def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model("llava", tmp_path / "a")
    b = build_tiny_model("llava", tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown tiny model family"):
        default_tiny_dir("gpt5")


def test_default_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MMPIPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_tiny_dir("llava") == tmp_path / "home" / ".cache" / "mmpipe" / "tiny" / "llava"
    monkeypatch.setenv("MMPIPE_CACHE_DIR", str(tmp_path / "cache"))
    assert default_tiny_dir("qwen2_vl") == tmp_path / "cache" / "tiny" / "qwen2_vl"


def test_ensure_builds_once_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMPIPE_CACHE_DIR", str(tmp_path))
    built: list[str] = []
    real_build = tiny.build_tiny_model

    def counting_build(family: str, out_dir: str | Path) -> Path:
        built.append(family)
        return real_build(family, out_dir)

    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    path = ensure_tiny_model("qwen2_audio")
    assert path == tmp_path / "tiny" / "qwen2_audio"
    assert ensure_tiny_model("qwen2_audio") == path
    assert built == ["qwen2_audio"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["qwen2_audio"]  # no temp dirs left

    # a model written by an older builder version is replaced
    info = read_tiny_info(path)
    (path / TINY_INFO_FILE).write_text(json.dumps({**info, "version": -1}))
    assert ensure_tiny_model("qwen2_audio") == path
    assert built == ["qwen2_audio", "qwen2_audio"]
    assert read_tiny_info(path)["version"] == info["version"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["qwen2_audio"]


def test_cli_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli" / "llava"
    assert main(["tiny-model", "llava", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed
    info = read_tiny_info(out)
    assert (info["family"], info["loader"]) == ("llava", "image_text_to_text")
    assert (out / "model.safetensors").is_file()


def test_cli_rejects_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tiny-model", "nope", str(tmp_path)])
    assert exc.value.code == 2


def test_load_tiny_model_uses_the_named_auto_class(tmp_path: Path) -> None:
    model, processor = load_tiny_model(build_tiny_model("qwen2_audio", tmp_path / "a"))
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration" and not model.training
    assert type(processor).__name__ == "Qwen2AudioProcessor"


def _voxtral_depends_on_audio(path: Path, model, processor) -> None:
    """Voxtral's processor takes audio only through mistral-common (tekken.json): the chat template writes one
    [AUDIO] per clip, mistral-common's encoding of the clip is [BEGIN_AUDIO] + 375 [AUDIO] a 30 s chunk."""
    from offline_helpers import hf_chat_generate

    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is this?"}]}]
    tok = processor.tokenizer
    assert tok.apply_chat_template(messages, tokenize=False).count("[AUDIO]") == 1
    with pytest.raises(TemplateError):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    oracle = AutoProcessor.from_pretrained(path)  # MistralCommonBackend, from tekken.json
    assert type(oracle.tokenizer).__name__ == "MistralCommonBackend"
    assert oracle.tokenizer.convert_tokens_to_ids("[INST]") == processor.tokenizer.convert_tokens_to_ids("[INST]")
    first = hf_chat_generate(path, [make_audio(1, seconds=6.0), "What is this?"], max_new_tokens=4)
    second = hf_chat_generate(path, [make_audio(2, seconds=6.0), "What is this?"], max_new_tokens=4)
    assert len(first) == 4 and first != second, "voxtral: greedy tokens do not depend on the audio"
