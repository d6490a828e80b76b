"""Tiny random multimodal models, built offline, for tests, examples and CI.

No weights can be downloaded on the build machines, so every test that needs a real model builds one here:
a few hundred kilobytes of randomly initialised weights with the real architecture, a byte-level BPE
tokenizer trained locally with the `tokenizers` library, the real image / video / audio processors and a
chat template. The directory is written with `save_pretrained` and loads back with the ordinary Auto classes:

    AutoProcessor.from_pretrained(path)
    AutoModelForImageTextToText.from_pretrained(path)   # llava, qwen2_vl, qwen2_5_vl, llava_onevision, gemma3,
                                                        # idefics3, smolvlm, llava_next, internvl, mistral3
    AutoModelForMultimodalLM.from_pretrained(path)      # qwen2_audio, qwen2_5_omni (the Omni *thinker*), voxtral

`mmpipe_tiny.json` in the directory names the family and which Auto class loads it (`load_tiny_model` reads it).

Text decoders use `initializer_range=0.2`, so greedy outputs visibly depend on the inputs (with the usual 0.02
they barely do), and builds are seeded, so the same family always gives the same weights.

The chat templates take string contents or lists of parts of type "text", "image", "video" and "audio"
(whichever the family supports; another type raises), the roles system / user / assistant (ChatML ones also
`tool`, and `tools=` in the style of Qwen2.5's template), and
`add_generation_prompt`. Each media part becomes ONE placeholder token (plus its begin / end markers); the
processor expands it to the real number of feature tokens.

This module imports only the standard library at import time; torch and transformers are imported when a
model is built or loaded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = [
    "TINY_FAMILIES",
    "TINY_SPECS",
    "TINY_INFO_FILE",
    "TinyFamilySpec",
    "build_tiny_model",
    "default_tiny_dir",
    "ensure_tiny_model",
    "load_tiny_model",
    "read_tiny_info",
]

TINY_INFO_FILE = "mmpipe_tiny.json"
# Bump when a builder changes: cached models built by an older version are then rebuilt by ensure_tiny_model.
TINY_BUILD_VERSION = 2  # 2: the ChatML templates render tools, tool calls and tool results

LOADER_IMAGE_TEXT_TO_TEXT = "image_text_to_text"
LOADER_MULTIMODAL_LM = "multimodal_lm"
LOADER_FULL_OMNI = "qwen2_5_omni_full"  # Qwen2_5OmniForConditionalGeneration; load_tiny_model gives its thinker


@dataclass(frozen=True)
class TinyFamilySpec:
    """What a tiny family supports: its loader, its modalities and the placeholder token of each modality.

    `token_id_attrs` maps a modality to the attribute of `model.config` that holds its placeholder id.
    """

    family: str
    loader: str
    modalities: tuple[str, ...]
    placeholders: Mapping[str, str]
    token_id_attrs: Mapping[str, str] = field(default_factory=dict)


_TOKEN_ID_ATTRS = {"image": "image_token_id", "video": "video_token_id", "audio": "audio_token_id"}


def _spec(family: str, loader: str, placeholders: Mapping[str, str]) -> TinyFamilySpec:
    return TinyFamilySpec(
        family=family,
        loader=loader,
        modalities=tuple(placeholders),
        placeholders=dict(placeholders),
        token_id_attrs={m: _TOKEN_ID_ATTRS[m] for m in placeholders},
    )


_QWEN_VL_PLACEHOLDERS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}

TINY_SPECS: Mapping[str, TinyFamilySpec] = {
    s.family: s
    for s in (
        _spec("llava", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "<image>"}),
        _spec("qwen2_vl", LOADER_IMAGE_TEXT_TO_TEXT, _QWEN_VL_PLACEHOLDERS),
        _spec("qwen2_5_vl", LOADER_IMAGE_TEXT_TO_TEXT, _QWEN_VL_PLACEHOLDERS),
        _spec("qwen2_audio", LOADER_MULTIMODAL_LM, {"audio": "<|AUDIO|>"}),
        _spec("llava_onevision", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "<image>", "video": "<video>"}),
        _spec("qwen2_5_omni", LOADER_MULTIMODAL_LM, {"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>"}),
        _spec("qwen3_vl", LOADER_IMAGE_TEXT_TO_TEXT, _QWEN_VL_PLACEHOLDERS),
        _spec("qwen3_vl_moe", LOADER_IMAGE_TEXT_TO_TEXT, _QWEN_VL_PLACEHOLDERS),
        # a published-style Omni checkpoint: thinker + talker + token2wav (mmpipe serves the thinker only)
        _spec("qwen2_5_omni_full", LOADER_FULL_OMNI,
              {"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>"}),
        # the prompt's placeholder is <start_of_image> (config.boi_token_id); the processor adds the soft tokens
        TinyFamilySpec("gemma3", LOADER_IMAGE_TEXT_TO_TEXT, ("image",), {"image": "<start_of_image>"},
                       {"image": "boi_token_id"}),
        _spec("idefics3", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "<image>"}),
        _spec("smolvlm", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "<image>"}),
        _spec("llava_next", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "<image>"}),
        # the prompt's placeholders are <IMG_CONTEXT> (the processor writes <img>, its rows per tile, </img>) and
        # <video> (a `Frame{i}: <img>...</img>` line per frame); frames are image rows, the config names no video id
        TinyFamilySpec("internvl", LOADER_IMAGE_TEXT_TO_TEXT, ("image", "video"),
                       {"image": "<IMG_CONTEXT>", "video": "<video>"}, {"image": "image_token_id"}),
        _spec("mistral3", LOADER_IMAGE_TEXT_TO_TEXT, {"image": "[IMG]"}),
        _spec("voxtral", LOADER_MULTIMODAL_LM, {"audio": "[AUDIO]"}),
    )
}
TINY_FAMILIES: tuple[str, ...] = tuple(TINY_SPECS)

# --------------------------------------------------------------------------------------------------------------
# Sizes shared by every family. Vision inputs are 56 px (4x4 patches of 14 px); audio is 16 kHz, 16 mel bins.
# --------------------------------------------------------------------------------------------------------------
SEED = 0
VOCAB_SIZE = 480
PATCH = 14
IMAGE_SIZE = 56
SAMPLING_RATE = 16_000
MEL_BINS = 16
# Whisper-style encoders want exactly max_source_positions * 2 mel frames; at hop 160 / 16 kHz that is
# 200 frames = 2 s, so the feature extractor pads / cuts every clip to chunk_length = 2 s.
AUDIO_MAX_SOURCE_POSITIONS = 100
AUDIO_CHUNK_SECONDS = 2
_QWEN_VISION_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
QWEN3_PATCH = 16  # Qwen3-VL's patch size: 64-128 px inputs give 4-16 merged tokens a frame
_QWEN3_VISION_SIZE = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}

_TOKENIZER_CORPUS = (
    "system user assistant You are a helpful assistant. Answer the question briefly and clearly.",
    "Describe the image. What is in this picture? Describe the video. What happens in the clip?",
    "What's that sound? Listen to the audio and transcribe it. The quick brown fox jumps over the lazy dog.",
    "USER: ASSISTANT: Picture Video Audio 0 1 2 3 4 5 6 7 8 9 10 100 , . ? ! : ; ' \" ( ) [ ] - / \n",
    "a cat and a dog sit on a red chair in front of a blue wall; the colours, shapes and sizes differ.",
    "There is a man walking down the street with a woman. They are talking about the weather today.",
    "The people in the room are looking at the screen, where a small car drives along the road.",
    "Please tell me how many objects you can see, where they are, and what they are doing now.",
    "Hello, how are you? I am fine, thank you. Can you help me with this task? Yes, of course I can.",
    "The music is loud and the bird is singing in the tree near the house, while water is running.",
    "First, second, third: one, two, three, four, five, six, seven, eight, nine, ten frames per second.",
    "It was a good day: the sun was bright, the sky was clear and the children played in the park.",
    "This is a photo of a city at night with many lights, buildings, people, cars and a large bridge.",
    "Summarize the text, translate it into French, and write a short story about the main character.",
    "speech, noise, silence, voice, song, moving, frames, colour, colors, left, right, top, bottom, center",
)


# --------------------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------------------
def _content_block(media_markers: Mapping[str, str]) -> str:
    """Jinja that renders `message['content']`: a string, or a list of text / media parts."""
    branches = "".join(
        f"{{%- elif part['type'] == '{kind}' -%}}{{{{- {json.dumps(marker)} -}}}}\n"
        for kind, marker in media_markers.items()
    )
    return (
        "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
        "{%- else -%}{%- for part in message['content'] -%}\n"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}\n"
        f"{branches}"
        "{%- else -%}{{- raise_exception('unsupported content part type: ' ~ part['type']) -}}\n"
        "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    )


_CHECK_ROLE = (
    "{%- if message['role'] not in ('system', 'user', 'assistant') -%}"
    "{{- raise_exception('unsupported role: ' ~ message['role']) -}}{%- endif -%}\n"
)


# Qwen2.5's tool prompt, word for word: the tools as JSON lines in the system message, and the call format.
_TOOLS_PREAMBLE = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                   "provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _chatml_tools(media_markers: Mapping[str, str]) -> str:
    """With `tools`: Qwen2.5's system block (the first system message's text, else a default, then the tools)."""
    return (
        "{%- if tools -%}{{- '<|im_start|>system\\n' -}}\n"
        "{%- if messages[0]['role'] == 'system' -%}{%- set message = messages[0] -%}\n"
        + _content_block(media_markers)
        + "{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}\n"
        f"{{{{- {json.dumps(_TOOLS_PREAMBLE)} -}}}}\n"
        "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}\n"
        f"{{{{- {json.dumps(_TOOLS_POSTAMBLE)} -}}}}\n"
        "{%- endif -%}\n"
    )


# An assistant message's tool calls and the tool results, as Qwen2.5's template writes them.
_CHATML_TOOL_CALLS = (
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}\n"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' ~ fn['name'] ~ '\", \"arguments\": ' -}}{{- fn['arguments'] | tojson -}}"
    "{{- '}\\n</tool_call>' -}}{%- endfor -%}{%- endif -%}\n"
)


def chatml_template(media_markers: Mapping[str, str]) -> str:
    """Qwen-style ChatML: `<|im_start|>role\\n...<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`.

    With `tools` (transformers' `apply_chat_template(tools=...)`) it follows Qwen2.5's real template: the tools
    in the system message, assistant tool calls as `<tool_call>` blocks, consecutive `tool` messages as
    `<tool_response>` blocks of one user turn. Without tools the output is unchanged."""
    return (
        _chatml_tools(media_markers)
        + "{%- for message in messages -%}\n"
        "{%- if tools and loop.first and message['role'] == 'system' -%}\n"
        "{%- elif message['role'] == 'tool' -%}\n"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}\n"
        "{{- '\\n<tool_response>\\n' -}}\n"
        + _content_block(media_markers)
        + "{{- '\\n</tool_response>' -}}\n"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
        "{%- else -%}\n"
        + _CHECK_ROLE
        + "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}\n"
        + _content_block(media_markers)
        + _CHATML_TOOL_CALLS
        + "{{- '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


def llava_template(media_markers: Mapping[str, str]) -> str:
    """LLaVA-1.5 style: `system USER: <image>\\nquestion ASSISTANT: answer</s>`, generation prompt `ASSISTANT:`."""
    return (
        "{%- for message in messages -%}\n"
        + _CHECK_ROLE
        + "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}\n"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}{%- endif -%}\n"
        + _content_block(media_markers)
        + "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- else -%}{{- ' ' -}}{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}\n"
    )


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def train_tokenizer(
    special_tokens: Iterable[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    named_tokens: Mapping[str, str] | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on a fixed English corpus and wrap it as a transformers fast tokenizer.

    `special_tokens` are never split. `named_tokens` (e.g. {"image_token": "<image>"}) become tokenizer
    attributes (`tok.image_token`, `tok.image_token_id`), which the processors pick up.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    kwargs: dict[str, Any] = {"tokenizer_object": bpe, "eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    if named_tokens:
        kwargs["extra_special_tokens"] = dict(named_tokens)
    return PreTrainedTokenizerFast(**kwargs)


def _text_config(tok: PreTrainedTokenizerFast, **overrides: Any) -> dict[str, Any]:
    """A 2-layer, 64-wide decoder config with large init, so greedy tokens depend on the inputs."""
    cfg: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,  # None for the Qwen-style tokenizers (some configs default to 151643)
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.update(overrides)
    return cfg


# head_dim = 64 / 4 = 16 -> 8 rotary frequencies, split over (t, h, w)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen_vision_processors() -> tuple[Any, Any]:
    """Qwen2-VL image and video processors sized for 56-112 px inputs (4-16 merged tokens per frame)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(size=dict(_QWEN_VISION_SIZE), patch_size=PATCH, temporal_patch_size=2, merge_size=2)
    image = Qwen2VLImageProcessor(**common)
    video = Qwen2VLVideoProcessor(**common, do_sample_frames=False, cap_pixels_per_frame=True)
    return image, video


def _whisper_feature_extractor() -> Any:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=MEL_BINS,
        sampling_rate=SAMPLING_RATE,
        hop_length=160,
        chunk_length=AUDIO_CHUNK_SECONDS,
        n_fft=400,
    )


def _audio_encoder_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=AUDIO_MAX_SOURCE_POSITIONS,
        initializer_range=0.2,  # with 0.02 the audio features barely move the greedy tokens
    )
    cfg.update(overrides)
    return cfg


def _qwen_vit_config(**overrides: Any) -> dict[str, Any]:
    """Qwen2.5-VL / Omni windowed ViT: 2 blocks, the second with full attention."""
    cfg: dict[str, Any] = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    cfg.update(overrides)
    return cfg


def _ids(tok: PreTrainedTokenizerFast, **tokens: str) -> dict[str, int]:
    return {name: tok.convert_tokens_to_ids(t) for name, t in tokens.items()}


# --------------------------------------------------------------------------------------------------------------
# One builder per family: each returns (model, processor), not yet saved.
# --------------------------------------------------------------------------------------------------------------
_Built = tuple["PreTrainedModel", "ProcessorMixin"]

_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _build_llava() -> _Built:
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                          named_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=llava_template({"image": "<image>\n"}))
    return model, processor


def _build_qwen_vl(version: str) -> _Built:
    import transformers as tf

    tok = train_tokenizer(_CHATML + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                          eos="<|im_end|>", pad="<|endoftext|>",
                          named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    token_ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    text = _text_config(tok, rope_parameters=dict(_MROPE))
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=2, temporal_patch_size=2)
        model_cls, config_cls, processor_cls = (
            tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, tf.Qwen2VLProcessor)
    else:
        vision = _qwen_vit_config(tokens_per_second=2)
        model_cls, config_cls, processor_cls = (
            tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor)
    model = model_cls(config_cls(text_config=text, vision_config=vision, **token_ids))
    image_processor, video_processor = _qwen_vision_processors()
    markers = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
               "video": "<|vision_start|><|video_pad|><|vision_end|>"}
    processor = processor_cls(image_processor=image_processor, video_processor=video_processor, tokenizer=tok,
                              chat_template=chatml_template(markers))
    return model, processor


def _build_qwen2_vl() -> _Built:
    return _build_qwen_vl("2")


def _build_qwen2_5_vl() -> _Built:
    return _build_qwen_vl("2.5")


def _build_qwen2_audio() -> _Built:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    named = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    tok = train_tokenizer(_CHATML + list(named.values()), eos="<|im_end|>", pad="<|endoftext|>",
                          named_tokens=named)
    config = Qwen2AudioConfig(
        audio_config=_audio_encoder_config(),
        text_config=_text_config(tok, model_type="qwen2"),
        audio_token_index=tok.audio_token_id,
    )
    model = Qwen2AudioForConditionalGeneration(config)
    processor = Qwen2AudioProcessor(
        feature_extractor=_whisper_feature_extractor(), tokenizer=tok,
        chat_template=chatml_template({"audio": "<|audio_bos|><|AUDIO|><|audio_eos|>\n"}))
    return model, processor


def _build_llava_onevision() -> _Built:
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
    )

    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    tok = train_tokenizer(_CHATML + ["<image>", "<video>"], eos="<|im_end|>", pad="<|endoftext|>",
                          named_tokens={"image_token": "<image>", "video_token": "<video>"})
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                           vision_use_head=False),
        text_config=_text_config(tok, model_type="qwen2"),
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chatml_template({"image": "<image>\n", "video": "<video>\n"}),
    )
    return model, processor


def _build_qwen2_5_omni() -> _Built:
    """The Qwen2.5-Omni thinker (the text-generating half; no talker / token2wav).

    Note: Qwen2_5OmniProcessor applies its own class-level video size (at least 128*28*28 px a frame) over the
    video processor's, so a small video still gives ~144 tokens a frame pair unless the caller passes
    `videos_kwargs={"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}}`.
    """
    from transformers import (
        Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
    )

    named = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    tok = train_tokenizer(_CHATML + list(named.values()), eos="<|im_end|>", pad="<|endoftext|>",
                          named_tokens=named)
    ids = _ids(tok, **named)
    config = Qwen2_5OmniThinkerConfig(
        audio_config=_audio_encoder_config(n_window=50, output_dim=64),
        vision_config=_qwen_vit_config(),
        text_config=_text_config(tok, rope_parameters=dict(_MROPE)),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        user_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        initializer_range=0.2,  # the thinker initialises lm_head itself, from its own (not the text) config
    )
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    image_processor, video_processor = _qwen_vision_processors()
    markers = {"image": "<|vision_bos|><|IMAGE|><|vision_eos|>",
               "video": "<|vision_bos|><|VIDEO|><|vision_eos|>",
               "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>"}
    processor = Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=video_processor,
                                     feature_extractor=_whisper_feature_extractor(), tokenizer=tok,
                                     chat_template=chatml_template(markers))
    return model, processor


def _build_qwen3_vl_like(moe: bool) -> _Built:
    """Qwen3-VL: Qwen3 decoder with q/k norm, interleaved M-RoPE, DeepStack from two tower layers into the first
    two decoder layers, 16 px patches (64-128 px inputs), frame timestamps in video prompts. `moe`: the sparse-MoE
    decoder (`qwen3_vl_moe`): 4 experts, top-2, in every layer but the last (a dense MLP, `mlp_only_layers`), so a
    model mixes both kinds of layer as the published ones can; 2 * moe_intermediate_size != hidden, so the
    checkpoint's transposed expert layout cannot be read the wrong way round."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, \
        Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = train_tokenizer(_CHATML + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                          eos="<|im_end|>", pad="<|endoftext|>",
                          named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    token_ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    text = _text_config(tok, num_hidden_layers=3, head_dim=16,
                        rope_parameters={**_MROPE, "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                    mlp_only_layers=[2])
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=QWEN3_PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], initializer_range=0.2)
    config_cls, model_cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    model = model_cls(config_cls(text_config=text, vision_config=vision, **token_ids))
    common = dict(size=dict(_QWEN3_VISION_SIZE), patch_size=QWEN3_PATCH, temporal_patch_size=2, merge_size=2)
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen3VLVideoProcessor(**common, do_sample_frames=False, cap_pixels_per_frame=True)
    markers = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
               "video": "<|vision_start|><|video_pad|><|vision_end|>"}
    processor = Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor, tokenizer=tok,
                                 chat_template=chatml_template(markers))
    return model, processor


def _build_qwen3_vl() -> _Built:
    return _build_qwen3_vl_like(moe=False)


def _build_qwen3_vl_moe() -> _Built:
    return _build_qwen3_vl_like(moe=True)


def _build_qwen2_5_omni_full() -> _Built:
    """A full Qwen2.5-Omni checkpoint (`model_type: qwen2_5_omni`): the tiny thinker plus a talker and token2wav,
    as published checkpoints hold them. mmpipe reads the thinker's weights only."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    thinker, processor = _build_qwen2_5_omni()
    tc = thinker.config
    talker = dict(
        vocab_size=tc.text_config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, embedding_size=tc.text_config.hidden_size,
        rope_parameters=dict(_MROPE), spatial_merge_size=2,
        audio_token_index=tc.audio_token_index, image_token_index=tc.image_token_index,
        video_token_index=tc.video_token_index, vision_start_token_id=tc.vision_start_token_id,
        vision_end_token_id=processor.tokenizer.convert_tokens_to_ids("<|vision_eos|>"),
        audio_start_token_id=tc.audio_start_token_id, audio_end_token_id=tc.audio_end_token_id,
        tts_text_start_token_id=1, tts_text_end_token_id=2, tts_text_pad_token_id=3,
        tts_codec_start_token_id=4, tts_codec_end_token_id=5, tts_codec_pad_token_id=6,
        tts_codec_mask_token_id=7)
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ff_mult=1, emb_dim=32,
                        head_dim=16, num_embeds=64, mel_dim=16, enc_emb_dim=32, enc_dim=32, enc_channels=[32, 32, 64],
                        enc_kernel_sizes=[5, 3, 1], enc_dilations=[1, 2, 1], enc_attention_channels=16,
                        enc_res2net_scale=2, enc_se_channels=16, repeats=1, block_size=4, look_ahead_layers=[0],
                        look_backward_layers=[0]),
        bigvgan_config=dict(mel_dim=16, upsample_initial_channel=32, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2], upsample_kernel_sizes=[4]))
    config = Qwen2_5OmniConfig(thinker_config=tc.to_dict(), talker_config=talker, token2wav_config=token2wav,
                               enable_audio_output=True)
    model = Qwen2_5OmniForConditionalGeneration(config)
    model.thinker.load_state_dict(thinker.state_dict())
    return model, processor


def _write_omni_speakers(out: Path) -> None:
    """`spk_dict.pt`, which Qwen2_5OmniForConditionalGeneration.from_pretrained requires (speaker conditioning for
    audio out; mmpipe never reads it). Zero tensors of the talker's shapes stand in for a real speaker."""
    import torch

    torch.save({"Chelsie": {"bos_token": 4, "cond": torch.zeros(32), "ref_mel": torch.zeros(8, 16)}},
               out / "spk_dict.pt")


# Files a family needs besides what save_pretrained writes.
_EXTRA_FILES = {"qwen2_5_omni_full": _write_omni_speakers}

# Gemma 3: a 16-token sliding window (prompts in the tests are longer), so the engine's window is exercised
GEMMA3_SLIDING_WINDOW = 16
GEMMA3_IMAGE_TOKENS = 4  # 4x4 SigLIP patches average-pooled 2x2


def gemma_template(media_markers: Mapping[str, str]) -> str:
    """Gemma style: `<bos><start_of_turn>user\\n...<end_of_turn>\\n`, the assistant's turns named `model`,
    generation prompt `<start_of_turn>model\\n` (a system message is a turn of its own here)."""
    return (
        "{{- bos_token -}}\n"
        "{%- for message in messages -%}\n"
        + _CHECK_ROLE
        + "{{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\\n' -}}\n"
        + _content_block(media_markers)
        + "{{- '<end_of_turn>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}\n"
    )


def _build_gemma3() -> _Built:
    """Gemma 3: SigLIP tower + pooling projector, a Gemma 3 decoder with sliding layers between global ones
    (separate local rope base, linear rope scaling on the global layers), q/k norms, query_pre_attn_scalar.

    transformers initialises the projector to zeros and every RMSNorm weight (used as 1 + weight) to zeros;
    both are redrawn here so the image and each norm visibly move the tokens. Pan-and-scan stays off."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *named.values()],
                          bos="<bos>", eos="<end_of_turn>", pad="<pad>", named_tokens=named)
    ids = _ids(tok, **named)
    text = _text_config(
        tok, model_type="gemma3_text", num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=GEMMA3_SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"], initializer_range=0.2,
                          tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if "norm" in name and "vision_tower" not in name and p.dim() == 1:
                p.normal_(0.0, 0.1)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size=size, do_pan_and_scan=False),
                                tokenizer=tok, image_seq_length=GEMMA3_IMAGE_TOKENS,
                                chat_template=gemma_template({"image": "<start_of_image>"}))
    return model, processor


# Idefics3 / SmolVLM: 56 px tiles of 4x4 patches, pixel-shuffled 2x2 into 4 tokens a tile; images are scaled to a
# longest edge of at most 112 px, so a large image is split into up to 2x2 tiles plus the global one (4-20 tokens)
IDEFICS3_TILE = 56
IDEFICS3_LONGEST_EDGE = 112
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_TILE_TOKENS = (IDEFICS3_TILE // PATCH) ** 2 // IDEFICS3_SCALE_FACTOR ** 2


def idefics3_template(bos: str, media_markers: Mapping[str, str]) -> str:
    """Idefics3 / SmolVLM style: `<bos>User:<image>question<end_of_utterance>\nAssistant: answer...`, the role
    capitalised and followed by ':' before a media part, ': ' otherwise; generation prompt `Assistant:`."""
    return (
        f"{{{{- {json.dumps(bos)} -}}}}\n"
        "{%- for message in messages -%}\n"
        + _CHECK_ROLE
        + "{{- message['role'] | capitalize -}}\n"
        "{%- if message['content'] is not string and message['content'][0]['type'] != 'text' -%}{{- ':' -}}"
        "{%- else -%}{{- ': ' -}}{%- endif -%}\n"
        + _content_block(media_markers)
        + "{{- '<end_of_utterance>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}\n"
    )


def _build_idefics3_like(family: str) -> _Built:
    """Idefics3 / SmolVLM: a SigLIP-style tower over 56 px tiles (the image split into tiles plus a global one,
    each tile's `<row_i_col_j>` and the `<fake_token_around_image>` / `<global-img>` markers in the prompt), the
    pixel-shuffle connector, a Llama decoder."""
    import transformers as tf

    bos = "<|im_start|>" if family == "smolvlm" else "<|begin_of_text|>"
    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    if family == "smolvlm":
        named["video_token"] = "<video>"
    tok = train_tokenizer(["<|endoftext|>", bos, *named.values(), *grid], bos=bos, eos="<end_of_utterance>",
                          pad="<|endoftext|>", named_tokens=named)
    text = _text_config(tok, model_type="llama", tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IDEFICS3_TILE, patch_size=PATCH, initializer_range=0.2)
    config_cls, model_cls, image_cls, processor_cls = {
        "idefics3": (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3ImageProcessor,
                     tf.Idefics3Processor),
        "smolvlm": (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMImageProcessor,
                    tf.SmolVLMProcessor),
    }[family]
    config = config_cls(text_config=text, vision_config=vision, scale_factor=IDEFICS3_SCALE_FACTOR,
                        image_token_id=tok.image_token_id, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    model = model_cls(config)
    sizes = dict(size={"longest_edge": IDEFICS3_LONGEST_EDGE}, max_image_size={"longest_edge": IDEFICS3_TILE})
    kwargs: dict[str, Any] = dict(image_processor=image_cls(**sizes), tokenizer=tok,
                                  image_seq_len=IDEFICS3_TILE_TOKENS)
    if family == "smolvlm":  # the processor requires one; mmpipe serves SmolVLM images only (smolvlm.py says why)
        kwargs["video_processor"] = tf.SmolVLMVideoProcessor(**sizes, num_frames=4, fps=1)
    processor = processor_cls(**kwargs, chat_template=idefics3_template(bos, {"image": "<image>"}))
    return model, processor


def _build_idefics3() -> _Built:
    return _build_idefics3_like("idefics3")


def _build_smolvlm() -> _Built:
    return _build_idefics3_like("smolvlm")
# LLaVA-NeXT's anyres grid (multiples of the 56 px tile): a 112x84 image is tiled 2x2, a 56x112 one 1x2
LLAVA_NEXT_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _build_llava_next() -> _Built:
    """LLaVA-NeXT (llava-v1.6-vicuna style): CLIP tower, anyres tiles of the best-fitting pinpoint plus the
    whole image, unpadded to the image's aspect ratio with an `image_newline` row after each feature row;
    Llama decoder. The number of rows depends on the image size."""
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                          named_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=llava_template({"image": "<image>\n"}))
    return model, processor


# InternVL: 56 px tiles of 4x4 patches, pixel-shuffled 2x2 into 4 rows a tile; up to 4 tiles plus a thumbnail
INTERNVL_TILE_TOKENS = 4
INTERNVL_MAX_TILES = 4


def _build_internvl() -> _Built:
    """InternVL (transformers-format, InternVL3-hf style): InternViT tower over dynamic tiles (the best grid of
    up to INTERNVL_MAX_TILES 56 px tiles plus a thumbnail), pixel shuffle (downsample 0.5), MLP projector, Qwen2
    decoder. Each image is `<img>` + rows + `</img>` in the prompt; the chat template writes `<IMG_CONTEXT>` for an
    image and `<video>` for a video (one 56 px tile a frame)."""
    from transformers import (
        GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
        InternVLVideoProcessor,
    )

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = train_tokenizer(_CHATML + list(named.values()), eos="<|im_end|>", pad="<|endoftext|>", named_tokens=named)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.2, layer_scale_init_value=1.0)
    config = InternVLConfig(vision_config=vision, text_config=_text_config(tok, model_type="qwen2"),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=INTERNVL_TILE_TOKENS, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(config)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1,
                                              max_patches=INTERNVL_MAX_TILES),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=tok, image_seq_length=INTERNVL_TILE_TOKENS,
        chat_template=chatml_template({"image": "<IMG_CONTEXT>\n", "video": "<video>\n"}))
    return model, processor
# Mistral 3: 8 px Pixtral patches merged 2x2, so one image token per 16 px; images fit in 64 px (at most 4 x 4
# tokens, each row closed by [IMG_BREAK], the last by [IMG_END]). Every decoder layer is windowed (Mistral's
# `sliding_window` without `layer_types`), 24 tokens: the prompts in the tests are longer.
MISTRAL3_PATCH = 8
MISTRAL3_LONGEST_EDGE = 64
MISTRAL3_SLIDING_WINDOW = 24


def mistral_template(media_markers: Mapping[str, str]) -> str:
    """Mistral style (Mistral-Small-3.1): `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>`;
    the model answers right after `[/INST]`, so the generation prompt adds nothing."""
    return (
        "{{- bos_token -}}\n"
        "{%- for message in messages -%}\n"
        + _CHECK_ROLE
        + "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' -}}\n"
        "{%- elif message['role'] == 'user' -%}{{- '[INST]' -}}{%- endif -%}\n"
        + _content_block(media_markers)
        + "{%- if message['role'] == 'system' -%}{{- '[/SYSTEM_PROMPT]' -}}\n"
        "{%- elif message['role'] == 'user' -%}{{- '[/INST]' -}}{%- else -%}{{- eos_token -}}{%- endif -%}\n"
        "{%- endfor -%}\n"
    )


def _build_mistral3() -> _Built:
    """Mistral 3: the Pixtral tower (2-D RoPE over each image's own patch grid, block-diagonal attention across
    images), RMSNorm + 2x2 patch merger + MLP projector, a Mistral decoder with every layer windowed."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, \
        PixtralProcessor

    markers = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                           "[/SYSTEM_PROMPT]", *markers], bos="<s>", eos="</s>", pad="<pad>",
                          named_tokens={"image_token": "[IMG]"})
    text = _text_config(tok, model_type="mistral", head_dim=16, sliding_window=MISTRAL3_SLIDING_WINDOW,
                        tie_word_embeddings=False)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=MISTRAL3_LONGEST_EDGE, patch_size=MISTRAL3_PATCH,
                  initializer_range=0.2)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tok.image_token_id,
                            spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config)
    image_processor = PixtralImageProcessor(size={"longest_edge": MISTRAL3_LONGEST_EDGE},
                                            patch_size={"height": MISTRAL3_PATCH, "width": MISTRAL3_PATCH})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=MISTRAL3_PATCH,
                                 spatial_merge_size=2, chat_template=mistral_template({"image": "[IMG]"}))
    return model, processor


# Voxtral: the real 30 s audio chunks (1500 encoder frames, 4 frames a token: 375 tokens a chunk), so the tiny
# model's token counts are those of mistral-common's audio config; 16 mel bins and a 32-wide encoder keep it fast.
VOXTRAL_TOKENS_PER_CHUNK = 375
# mistral-common's Tekken special tokens, at the ranks of Voxtral's tekken.json (VoxtralProcessor hard-codes the
# audio token id 24); the rest of the special range is filled with <SPECIAL_n> by mistral-common itself.
_TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
                    "<SPECIAL_20>", "<SPECIAL_21>", "<SPECIAL_22>", "<SPECIAL_23>", "[AUDIO]", "[BEGIN_AUDIO]",
                    "[TRANSCRIBE]")
_TEKKEN_NUM_SPECIAL = 32
# tiktoken's split pattern of Mistral's Tekken tokenizers
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                   r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tekken(path: Path, *, audio: Mapping[str, Any] | None = None) -> Path:
    """A Tekken tokenizer file (mistral-common's `tekken.json`, version v7) with a byte-level BPE trained on the
    fixed corpus: every byte, then the merges in the order they were learned (tiktoken's ranks)."""
    import base64

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - _TEKKEN_NUM_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    to_byte = {u: b for b, u in bytes_to_unicode().items()}
    merged = [bytes(to_byte[c] for c in t) for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    pieces = [bytes([b]) for b in range(256)] + [m for m in merged if len(m) > 1]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": b.decode("utf-8", "replace")}
             for i, b in enumerate(pieces)]
    data: dict[str, Any] = {
        "config": {"pattern": _TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
                   "default_vocab_size": len(vocab) + _TEKKEN_NUM_SPECIAL,
                   "default_num_special_tokens": _TEKKEN_NUM_SPECIAL, "version": "v7"},
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(_TEKKEN_SPECIALS)],
        "version": 1, "type": "Tekken"}
    if audio is not None:
        data["audio"] = dict(audio)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _build_voxtral() -> _Built:
    """Voxtral: a Whisper-style audio encoder over 30 s chunks of 16-bin log-mel (1500 frames each), 4 frames
    concatenated into one token by the MLP projector, a Llama decoder.

    Voxtral's processor takes audio only through mistral-common (`apply_chat_template` with a MistralCommonBackend
    tokenizer), so the directory holds both: `tekken.json` (mistral-common's tokenizer, whose audio config pads
    clips to 30 s and counts 12.5 tokens a second, what the oracle runs) and the same vocabulary as an HF
    tokenizer (`tokenizer.json`, transformers' own tekken conversion) with a chat template, which mmpipe renders
    prompts with. The builder returns the processor with the HF tokenizer; `_write_voxtral_tekken` adds the rest."""
    from transformers import LlamaConfig, VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor, \
        WhisperFeatureExtractor
    from transformers.integrations.mistral import convert_tekken_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = convert_tekken_tokenizer(str(write_tekken(Path(d) / "tekken.json", audio=_VOXTRAL_AUDIO)),
                                       chat_template=mistral_template({"audio": "[AUDIO]"}))
    tok.init_kwargs.pop("vocab_file", None)  # the temporary file: the saved tokenizer.json is the whole tokenizer
    audio = dict(model_type="voxtral_encoder", hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_mel_bins=MEL_BINS, max_source_positions=1500, initializer_range=0.2)
    text = LlamaConfig(**_text_config(tok, head_dim=16, tie_word_embeddings=False))
    config = VoxtralConfig(audio_config=audio, text_config=text, audio_token_id=tok.convert_tokens_to_ids("[AUDIO]"))
    model = VoxtralForConditionalGeneration(config)
    fe = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=160, chunk_length=30,
                                 n_fft=400)
    processor = VoxtralProcessor(feature_extractor=fe, tokenizer=tok)
    processor.chat_template = tok.chat_template  # its __init__ takes none; saved as chat_template.jinja
    return model, processor


_VOXTRAL_AUDIO = {"sampling_rate": SAMPLING_RATE, "frame_rate": 12.5, "chunk_length_s": 30.0,
                  "audio_encoding_config": {"num_mel_bins": MEL_BINS, "hop_length": 160, "window_size": 400}}


def _write_voxtral_tekken(out: Path) -> None:
    """mistral-common's tokenizer beside the HF one: the same vocabulary, with the audio config."""
    write_tekken(out / "tekken.json", audio=_VOXTRAL_AUDIO)


_EXTRA_FILES["voxtral"] = _write_voxtral_tekken


_BUILDERS = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen2_audio": _build_qwen2_audio,
    "llava_onevision": _build_llava_onevision,
    "qwen2_5_omni": _build_qwen2_5_omni,
    "qwen3_vl": _build_qwen3_vl,
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    "qwen2_5_omni_full": _build_qwen2_5_omni_full,
    "gemma3": _build_gemma3,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "llava_next": _build_llava_next,
    "internvl": _build_internvl,
    "mistral3": _build_mistral3,
    "voxtral": _build_voxtral,
}
assert set(_BUILDERS) == set(TINY_FAMILIES)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def _check_family(family: str) -> TinyFamilySpec:
    try:
        return TINY_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}") from None


def build_tiny_model(family: str, out_dir: str | Path) -> Path:
    """Build the tiny random model of `family` into `out_dir` (created if needed) and return its path.

    Writes the model weights and config, generation_config (eos / pad ids), the processor with its tokenizer
    and chat template, and `mmpipe_tiny.json` ({"family", "loader", ...}). Deterministic: the weights are
    drawn from a fixed seed without disturbing the caller's global RNG state.
    """
    spec = _check_family(family)
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, processor = _BUILDERS[family]()
    model.eval()
    tok = processor.tokenizer
    tok.chat_template = processor.chat_template  # so a bare AutoTokenizer renders prompts the same way
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family in _EXTRA_FILES:
        _EXTRA_FILES[family](out)
    info = {
        "family": spec.family,
        "loader": spec.loader,
        "modalities": list(spec.modalities),
        "placeholders": dict(spec.placeholders),
        "version": TINY_BUILD_VERSION,
    }
    (out / TINY_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_tiny_info(path: str | Path) -> dict[str, Any]:
    """The `mmpipe_tiny.json` of a tiny model directory."""
    return json.loads((Path(path) / TINY_INFO_FILE).read_text())


def load_tiny_model(path: str | Path) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load (model in eval mode, processor) from a tiny model directory with the Auto class it names."""
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor

    info = read_tiny_info(path)
    if info["loader"] == LOADER_FULL_OMNI:
        from transformers import Qwen2_5OmniForConditionalGeneration

        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path).thinker.eval()
        return model, AutoProcessor.from_pretrained(path)
    model_cls = {LOADER_IMAGE_TEXT_TO_TEXT: AutoModelForImageTextToText,
                 LOADER_MULTIMODAL_LM: AutoModelForMultimodalLM}[info["loader"]]
    model = model_cls.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def default_tiny_dir(family: str) -> Path:
    """Cache location of a tiny model: `$MMPIPE_CACHE_DIR/tiny/<family>`, by default under ~/.cache/mmpipe."""
    _check_family(family)
    root = os.environ.get("MMPIPE_CACHE_DIR") or Path.home() / ".cache" / "mmpipe"
    return Path(root).expanduser() / "tiny" / family


def _is_current(path: Path) -> bool:
    try:
        return read_tiny_info(path).get("version") == TINY_BUILD_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_model(family: str) -> Path:
    """Return the cached tiny model of `family`, building it on first use.

    The model is built into a temporary sibling directory and renamed into place, so a reader never sees a
    half-written model and concurrent builders do not clash (the first rename wins). A directory written by
    an older builder version is replaced.
    """
    target = default_tiny_dir(family)
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.build-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should read like any other directory
    try:
        build_tiny_model(family, tmp)
        if target.exists() and not _is_current(target):
            stale = Path(tempfile.mkdtemp(prefix=f".{family}.stale-", dir=target.parent))
            os.replace(target, stale / family)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target):  # lost a race to a builder whose result is unusable: surface the error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
