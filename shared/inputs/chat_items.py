"""Chat media parts -> ItemRefs, with the same rules as `multi_modal_data` (limits, embeds switch, uuids).

`input_audio` becomes a `data:` URL so that one loader path decodes every kind of audio payload; base64
`image_embeds` / `audio_embeds` are decoded without unpickling (see shared/media/embeds.py) when a validator is given, and left
as sent otherwise (the gateway: its encoder validates them). The offline API and the gateway share these rules.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from mmpipe.shared.chat.messages import MediaPart
from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.inputs.parse import ItemRef, ParseOptions, check_limits

_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
               "webm": "audio/webm", "m4a": "audio/mp4", "pcm16": "audio/wav"}


def input_audio_to_url(payload: dict[str, Any]) -> str:
    fmt = str(payload.get("format") or "wav").lower()
    if fmt not in _AUDIO_MIME:
        raise InvalidInputError(f"input_audio.format {fmt!r} is not supported; use one of {', '.join(_AUDIO_MIME)}",
                                param="input_audio.format")
    return f"data:{_AUDIO_MIME[fmt]};base64,{payload['data']}"


def chat_item_refs(parts: list[MediaPart], opts: ParseOptions) -> list[ItemRef]:
    counts = Counter(p.modality for p in parts)
    for m in counts:
        if m not in opts.modalities:
            raise UnsupportedError(f"this model does not take {m} input (it takes {', '.join(opts.modalities)})",
                                   param="messages")
    check_limits(dict(counts), opts.limit_mm_per_prompt)
    index: Counter[str] = Counter()
    refs = []
    for p in parts:
        uuid = p.uuid if opts.cache_enabled else None
        if p.payload is None and not opts.cache_enabled:
            raise InvalidInputError(f"a {p.modality} part has no payload, which needs the multimodal cache, but the "
                                    f"cache is disabled", param="messages")
        source: Any = p.payload
        is_embeds = p.kind == "embeds"
        if is_embeds:
            if not opts.enable_mm_embeds:
                raise UnsupportedError(f"{p.modality}_embeds parts need enable_mm_embeds=True (--enable-mm-embeds)",
                                       param=f"{p.modality}_embeds")
            if source is not None and opts.embeds_validator is not None:
                # in-process: decode and validate now; the gateway leaves the payload raw for the encoder
                source = _one_embedding(p.modality, source, opts)
        elif p.kind == "input_audio" and source is not None:
            source = input_audio_to_url(source)
        refs.append(ItemRef(modality=p.modality, index=index[p.modality], source=source, uuid=uuid,
                            is_embeds=is_embeds))
        index[p.modality] += 1
    return refs


def _one_embedding(modality: str, payload: Any, opts: ParseOptions) -> Any:
    from mmpipe.shared.media.embeds import decode_tensor_b64

    param = f"{modality}_embeds"
    if isinstance(payload, str):
        payload = decode_tensor_b64(payload, param=param)
    elif isinstance(payload, dict):
        payload = {k: decode_tensor_b64(v, param=f"{param}.{k}") if isinstance(v, str) else v
                   for k, v in payload.items()}
    embs = opts.embeds_validator(modality, payload)
    if len(embs) != 1:
        raise InvalidInputError(f"one {param} part must hold exactly one item, got {len(embs)}; use one part per "
                                f"item", param=param)
    return embs[0]
