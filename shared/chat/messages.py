"""Parse OpenAI chat messages (content parts as in vLLM's multimodal docs) without touching any media.

Recognised parts: text, image_url, image_pil, image_embeds, video_url, input_audio, audio_url, audio_embeds
(vLLM's: `{"type": "audio_embeds", "audio_embeds": <base64 tensor or a dict of them>}`). Every media
part may carry `uuid`, and its payload may be None when it does. The result is the conversation in the shape
HF chat templates expect (`{"type": "image"}` placeholders) plus one `MediaPart` per media part, in order.
An assistant message's `tool_calls` (OpenAI's shape, `arguments` a JSON string) reach the template with their
arguments as an object, as transformers' templates (Qwen2.5's `arguments | tojson`) and vLLM expect them;
`tool` messages (tool results, with `tool_call_id`) pass through.
Pure Python: the gateway uses it without importing torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import InvalidInputError

ROLES = ("system", "user", "assistant", "tool", "developer")

# part type -> (modality, kind); kind says how the payload is given
PART_TYPES: dict[str, tuple[str, str]] = {
    "image_url": ("image", "url"),
    "image_pil": ("image", "object"),
    "image_embeds": ("image", "embeds"),
    "video_url": ("video", "url"),
    "audio_url": ("audio", "url"),
    "input_audio": ("audio", "input_audio"),
    "audio_embeds": ("audio", "embeds"),
}


@dataclass
class MediaPart:
    modality: str
    kind: str  # "url" | "object" | "embeds" | "input_audio"
    payload: Any | None  # URL string, PIL image, embeds (tensor / base64 / dict), {"data", "format"}, or None
    uuid: str | None


@dataclass
class ParsedChat:
    conversation: list[dict[str, Any]]
    parts: list[MediaPart]


def _url_of(value: Any, part_type: str, idx: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        url = value.get("url")
        if url is None or isinstance(url, str):
            return url
    raise InvalidInputError(f"{idx}.{part_type} must be a URL string or {{'url': ...}}", param=f"{idx}.{part_type}")


def _parse_part(part: Any, idx: str) -> tuple[dict[str, Any], MediaPart | None]:
    if isinstance(part, str):
        return {"type": "text", "text": part}, None
    if not isinstance(part, dict) or "type" not in part:
        raise InvalidInputError(f"{idx} must be an object with a 'type'", param=idx)
    ptype = part["type"]
    if ptype == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidInputError(f"{idx}.text must be a string", param=f"{idx}.text")
        return {"type": "text", "text": part["text"]}, None
    if ptype not in PART_TYPES:
        raise InvalidInputError(f"{idx} has unknown content part type {ptype!r}; supported: text, "
                                f"{', '.join(PART_TYPES)}", param=f"{idx}.type")
    modality, kind = PART_TYPES[ptype]
    uuid = part.get("uuid")
    if uuid is not None and (not isinstance(uuid, str) or not uuid):
        raise InvalidInputError(f"{idx}.uuid must be a non-empty string", param=f"{idx}.uuid")
    raw = part.get(ptype)
    if kind == "url":
        payload = _url_of(raw, ptype, idx)
    elif kind == "input_audio":
        if raw is not None and (not isinstance(raw, dict) or not isinstance(raw.get("data"), str)):
            raise InvalidInputError(f"{idx}.input_audio must be {{'data': base64, 'format': ...}}",
                                    param=f"{idx}.input_audio")
        payload = raw
    else:
        payload = raw
    if payload is None and uuid is None:
        raise InvalidInputError(f"{idx}.{ptype} is empty; a media part may only leave its payload out when it "
                                f"carries a uuid of a cached item", param=f"{idx}.{ptype}")
    return {"type": modality}, MediaPart(modality=modality, kind=kind, payload=payload, uuid=uuid)


def _tool_calls(calls: Any, idx: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls with each call's arguments parsed from JSON text into an object."""
    at = f"{idx}.tool_calls"
    if not isinstance(calls, list):
        raise InvalidInputError(f"{at} must be a list of tool calls", param=at)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInputError(f"{at}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', "
                                    f"'arguments'}}}}", param=f"{at}[{j}].function")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise InvalidInputError(f"{at}[{j}].function.arguments is not valid JSON: {e}",
                                        param=f"{at}[{j}].function.arguments") from None
        if not isinstance(args, dict):
            raise InvalidInputError(f"{at}[{j}].function.arguments must be a JSON object",
                                    param=f"{at}[{j}].function.arguments")
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def parse_messages(messages: Any) -> ParsedChat:
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list", param="messages")
    conversation: list[dict[str, Any]] = []
    parts: list[MediaPart] = []
    for i, msg in enumerate(messages):
        idx = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise InvalidInputError(f"{idx} needs a role, one of {', '.join(ROLES)}", param=f"{idx}.role")
        content = msg.get("content")
        out = {k: v for k, v in msg.items() if k != "content"}
        if msg.get("tool_calls") is not None:
            if msg["role"] != "assistant":
                raise InvalidInputError(f"{idx}.tool_calls is only allowed on assistant messages",
                                        param=f"{idx}.tool_calls")
            out["tool_calls"] = _tool_calls(msg["tool_calls"], idx)
        if content is None or isinstance(content, str):
            out["content"] = content or ""
        elif isinstance(content, list):
            converted = []
            for j, part in enumerate(content):
                tpl, media = _parse_part(part, f"{idx}.content[{j}]")
                converted.append(tpl)
                if media is not None:
                    parts.append(media)
            out["content"] = converted
        else:
            raise InvalidInputError(f"{idx}.content must be a string or a list of parts", param=f"{idx}.content")
        conversation.append(out)
    return ParsedChat(conversation=conversation, parts=parts)
