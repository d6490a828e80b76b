"""Apply chat templates: the one passed in wins, else the model's own, else a built-in fallback per family.

Fallbacks follow each family's published format, with one placeholder per media part. A model of a family
without a fallback and without a template of its own gets a clear error naming --chat-template.
"""
from __future__ import annotations

from typing import Any

import jinja2

from mmpipe.shared.errors import InvalidInputError

from .template_options import ChatTemplateOptions

_CHATML_BODY = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE"
    "{% elif c['type'] == 'video' %}VIDEO"
    "{% elif c['type'] == 'audio' %}AUDIO"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chatml(image: str, video: str, audio: str) -> str:
    return _CHATML_BODY.replace("IMAGE", image).replace("VIDEO", video).replace("AUDIO", audio)


_IDEFICS3 = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is string %}: {{ m['content'] }}{% else %}"
    "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _mistral(media: str, marker: str) -> str:
    """Mistral's format: the system message in [SYSTEM_PROMPT] tags, user turns in [INST] ... [/INST], assistant
    turns closed by </s>; a `media` part is `marker`."""
    return (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == '{media}' %}}{marker}{{% elif c['type'] == 'text' %}}{{{{ c['text'] }}}}{{% endif %}}"
        "{% endfor %}{% endif %}"
        "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[/INST]"
        "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
    )


FALLBACK_TEMPLATES: dict[str, str] = {
    "llava": (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'system' %}{% else %}ASSISTANT: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "qwen2_vl": _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>", ""),
    "qwen2_5_vl": _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>", ""),
    "qwen3_vl": _chatml("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>", ""),
    "qwen2_audio": _chatml("", "", "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"),
    "llava_onevision": _chatml("<image>\n", "<video>\n", ""),
    # Gemma 3's published format: a system message is folded into the first user turn, assistant turns are
    # "model", an image part is <start_of_image> (the processor / assemble.py expand it)
    "gemma3": (
        "{{ bos_token }}{% set sys = '' %}{% set ns = namespace(sys='') %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = (m['content'] if m['content'] is string else m['content'][0]['text']) ~ '\n\n' %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if m['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    # Idefics3 / SmolVLM's published format: "<bos>User:<image>question<end_of_utterance>\nAssistant:", the role
    # followed by ':' when the message starts with an image, ': ' otherwise
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    # Mistral-Small-3.1's format; an image part is [IMG] (the processor / assemble.py expand it)
    "mistral3": _mistral("image", "[IMG]"),
    # Voxtral: the same format; an audio part is [AUDIO], which assemble.py expands to [BEGIN_AUDIO] + the rows
    # (mistral-common's own encoding)
    "voxtral": _mistral("audio", "[AUDIO]"),
    "qwen2_5_omni": _chatml("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>",
                            "<|audio_bos|><|AUDIO|><|audio_eos|>"),
    # InternVL3-hf's format: an image part is <IMG_CONTEXT> (the processor / assemble.py add <img> ... </img>)
    "internvl": _chatml("<IMG_CONTEXT>\n", "<video>\n", ""),
}
# llava-v1.6-vicuna writes LLaVA-1.5's format (the -mistral checkpoints ship their own [INST] template)
FALLBACK_TEMPLATES["llava_next"] = FALLBACK_TEMPLATES["llava"]
FALLBACK_TEMPLATES["qwen3_vl_moe"] = FALLBACK_TEMPLATES["qwen3_vl"]


def resolve_template(family: str, processor: Any, override: str | None) -> str:
    if override:
        return override
    own = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if isinstance(own, dict):  # processors may hold several named templates
        own = own.get("default") or next(iter(own.values()), None)
    if own:
        return own
    if family in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[family]
    raise InvalidInputError(f"the model has no chat template and mmpipe has no fallback for {family!r}; "
                            f"pass one with chat_template= (--chat-template)", param="chat_template")


def load_template_arg(value: str | None) -> str | None:
    """--chat-template takes a file path or the template text itself (as vLLM does)."""
    if value is None:
        return None
    import os

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def apply_template(processor: Any, template: str, conversation: list[dict[str, Any]], *,
                   options: ChatTemplateOptions | None = None, tools: list[dict[str, Any]] | None = None) -> str:
    """The one rendering path of every chat prompt (gateway and offline `LLM`): transformers' `apply_chat_template`
    with the request's checked template inputs (`options`: add_generation_prompt, continue_final_message,
    chat_template_kwargs, documents; None: the defaults) and `tools` (the request's function tools in OpenAI's
    shape, shared/tools)."""
    options = options or ChatTemplateOptions()
    options.check_conversation(conversation)
    try:
        return processor.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                       tools=tools, **options.render_kwargs())
    # what a template raises on inputs it cannot render (chat_template_kwargs reach its expressions): a 400
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        # transformers' own continue_final_message check: the template dropped the final message's text
        cut = options.continue_final_message and "continue_final_message" in str(e)
        raise InvalidInputError(f"applying the chat template failed: {e}",
                                param="continue_final_message" if cut else "messages") from e


_PROBE_TOOL = {"type": "function", "function": {"name": "mmpipe_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def renders_tools(processor: Any, template: str | None) -> bool:
    """Whether `template` shows `tools` to the model (many multimodal checkpoints' templates ignore them, and
    then the model never sees its tools: pass a tool-aware --chat-template)."""
    if not template:
        return False
    try:
        text = apply_template(processor, template, [{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL])
    except InvalidInputError:
        return False
    return "mmpipe_probe_tool" in text
