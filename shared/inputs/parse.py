"""Parse and validate one vLLM-style prompt before any work is done.

A prompt is a string, or a dict with `prompt` (or `prompt_token_ids`), `multi_modal_data` and
`multi_modal_uuids`. This module applies vLLM's rules (every modality listed in the uuids, list lengths
that match, `None` items only with a uuid and an enabled cache, `limit_mm_per_prompt`) and turns the
prompt into token ids plus an ordered list of `ItemRef`s. It never fetches, decodes or encodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mmpipe.shared.errors import InvalidInputError, LimitExceededError, UnsupportedError
from mmpipe.shared.types import MODALITIES

# multi_modal_data keys that carry precomputed embeddings instead of media.
EMBEDS_KEYS = {"image_embeds": "image", "video_embeds": "video", "audio_embeds": "audio"}


@dataclass
class ItemRef:
    """One media item of a prompt, not yet resolved to an embedding."""

    modality: str
    index: int  # position among the prompt's items of this modality (= placeholder order)
    source: Any | None  # user data (PIL image, URL, array, ...) or None for a UUID-only item
    uuid: str | None = None
    is_embeds: bool = False  # source is a precomputed embedding tensor / dict


@dataclass
class ParsedPrompt:
    prompt: str | None
    token_ids: list[int]
    items: list[ItemRef]


@dataclass(frozen=True)
class ParseOptions:
    modalities: tuple[str, ...]
    limit_mm_per_prompt: dict[str, int] | None
    enable_mm_embeds: bool
    cache_enabled: bool
    # adapter.embeds_from_user: validates precomputed embeddings (shape, hidden size) into MMEmbeddings
    embeds_validator: Callable[[str, Any], list[Any]] | None = None


def _as_list(value: Any, modality: str) -> list[Any]:
    if value is None:
        return [None]
    if isinstance(value, list):
        if modality == "video" and value and not _is_video_item(value[0]):
            return [value]  # a list of frames is ONE video
        return list(value)
    if modality == "audio" and isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], tuple):
        return [value]
    return [value]


def _is_video_item(x: Any) -> bool:
    """Inside a video list: is x a whole video (array (T,H,W,3), URL, list of frames) rather than one frame?"""
    if isinstance(x, (str, bytes, list)) or x is None:
        return True
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) == 4


def split_multi_modal_data(mm_data: dict[str, Any], opts: ParseOptions) -> dict[str, tuple[list[Any], bool]]:
    """{modality: (items, is_embeds)} with unknown keys rejected."""
    if not isinstance(mm_data, dict):
        raise InvalidInputError("multi_modal_data must be a dict of modality -> item(s)", param="multi_modal_data")
    out: dict[str, tuple[list[Any], bool]] = {}
    for key, value in mm_data.items():
        if key in EMBEDS_KEYS:
            modality, is_embeds = EMBEDS_KEYS[key], True
        elif key in MODALITIES:
            modality, is_embeds = key, False
        else:
            raise InvalidInputError(f"unknown modality {key!r} in multi_modal_data; use one of "
                                    f"{', '.join(MODALITIES)} (or *_embeds)", param="multi_modal_data")
        if modality not in opts.modalities:
            raise UnsupportedError(f"this model does not take {modality} input (it takes "
                                   f"{', '.join(opts.modalities)})", param="multi_modal_data")
        if is_embeds or _looks_like_embeds(value):
            if not opts.enable_mm_embeds:
                raise UnsupportedError(f"precomputed {modality} embeddings need enable_mm_embeds=True "
                                       f"(--enable-mm-embeds)", param="multi_modal_data")
            out[modality] = (_validated_embeds(modality, value, opts), True)
        else:
            if modality in out:
                raise InvalidInputError(f"{modality} given twice in multi_modal_data", param="multi_modal_data")
            out[modality] = (_as_list(value, modality), False)
    return out


def _looks_like_embeds(value: Any) -> bool:
    """vLLM passes precomputed image embeddings under the plain modality key: a 3-D float tensor or a dict."""
    if isinstance(value, dict):
        return any(k.endswith("_embeds") for k in value)
    mod = type(value).__module__
    return mod.startswith("torch") and getattr(value, "ndim", 0) == 3 and value.is_floating_point()


def _validated_embeds(modality: str, value: Any, opts: ParseOptions) -> list[Any]:
    """Precomputed embeddings are checked here, before any model work: one MMEmbedding per item
    (a None entry in a list stays None: a UUID-only item)."""
    if opts.embeds_validator is None:
        raise UnsupportedError("precomputed embeddings are not accepted here", param="multi_modal_data")
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:
            out.extend([None] if v is None else opts.embeds_validator(modality, v))
        return out
    return opts.embeds_validator(modality, value)


def check_limits(counts: dict[str, int], limits: dict[str, int] | None) -> None:
    if not limits:
        return
    for modality, n in counts.items():
        limit = limits.get(modality)
        if limit is not None and n > limit:
            raise LimitExceededError(f"this prompt has {n} {modality} item(s) but at most {limit} are allowed "
                                     f"(limit_mm_per_prompt / --limit-mm-per-prompt)", param=modality)


def parse_items(mm_data: dict[str, Any] | None, mm_uuids: dict[str, Any] | None,
                opts: ParseOptions) -> list[ItemRef]:
    if not mm_data:
        if mm_uuids:
            raise InvalidInputError("multi_modal_uuids given without multi_modal_data", param="multi_modal_uuids")
        return []
    per_mod = split_multi_modal_data(mm_data, opts)
    check_limits({m: len(v[0]) for m, v in per_mod.items()}, opts.limit_mm_per_prompt)
    uuids = _check_uuids(per_mod, mm_uuids)
    refs: list[ItemRef] = []
    for modality, (items, is_embeds) in per_mod.items():
        ulist = uuids.get(modality) if uuids is not None else None
        for i, src in enumerate(items):
            uuid = ulist[i] if ulist is not None and opts.cache_enabled else None
            if uuid is not None and not isinstance(uuid, str):
                raise InvalidInputError(f"multi_modal_uuids[{modality!r}][{i}] must be a string or None",
                                        param="multi_modal_uuids")
            if src is None:
                if not opts.cache_enabled:
                    raise InvalidInputError(f"{modality} item {i} is None, which needs the multimodal cache, but the "
                                            f"cache is disabled", param="multi_modal_data")
                if uuid is None:
                    raise InvalidInputError(f"{modality} item {i} is None and has no uuid: a media item may only be "
                                            f"left out when its uuid names a cached embedding", param="multi_modal_data")
            refs.append(ItemRef(modality=modality, index=i, source=src, uuid=uuid, is_embeds=is_embeds))
    return refs


def _check_uuids(per_mod: dict[str, tuple[list[Any], bool]], mm_uuids: dict[str, Any] | None
                 ) -> dict[str, list[str | None]] | None:
    if mm_uuids is None:
        return None
    if not isinstance(mm_uuids, dict):
        raise InvalidInputError("multi_modal_uuids must be a dict of modality -> uuid(s)", param="multi_modal_uuids")
    out: dict[str, list[str | None]] = {}
    for modality, (items, _) in per_mod.items():
        if modality not in mm_uuids:
            raise InvalidInputError(f"multi_modal_uuids must list every modality in multi_modal_data; "
                                    f"{modality!r} is missing", param="multi_modal_uuids")
        u = mm_uuids[modality]
        ulist = list(u) if isinstance(u, (list, tuple)) else [u]
        if len(ulist) != len(items):
            raise InvalidInputError(f"multi_modal_uuids[{modality!r}] has {len(ulist)} entries but there are "
                                    f"{len(items)} {modality} item(s)", param="multi_modal_uuids")
        out[modality] = ulist
    extra = set(mm_uuids) - set(per_mod)
    if extra:
        raise InvalidInputError(f"multi_modal_uuids names modalities without data: {sorted(extra)}",
                                param="multi_modal_uuids")
    return out


def check_placeholders(token_ids: list[int], items: list[ItemRef], placeholder_ids: dict[str, int],
                       tokens: dict[str, str]) -> None:
    """Each modality's placeholder count in the prompt must equal its number of items."""
    ids = token_ids if isinstance(token_ids, list) else list(token_ids)
    for modality, pid in placeholder_ids.items():
        n_ph = ids.count(pid)
        n_items = sum(1 for r in items if r.modality == modality)
        if n_ph != n_items:
            raise InvalidInputError(
                f"the prompt has {n_ph} {modality} placeholder(s) ({tokens[modality]}) but {n_items} {modality} "
                f"item(s) were given; put one {tokens[modality]} in the prompt per item", param="prompt")
