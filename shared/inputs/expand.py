"""Placeholder expansion on token ids: each media placeholder becomes one token per embedding row.

The one implementation, used by the generator (`assemble.py`, which adds the rows and M-RoPE positions) and by
the gateway's prefix-aware router (services/gateway/routing.py), which needs the expanded ids to key the same
blocks the engine will. Pure Python, no torch: an item is anything with `.modality` and `.num_tokens` (an
`MMEmbedding`, or the gateway's `MediaRef`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.types import MMSpan


class MediaItem(Protocol):
    modality: str
    num_tokens: int


class ExpandedPrompt(NamedTuple):
    token_ids: list[int]            # placeholders expanded
    positions: list[int]            # flat prompt positions of the mm rows, in row order
    ordered: list[Any]              # the items in prompt order
    spans: list[MMSpan]             # per item in prompt order: its positions and its cache key


def expand_prompt(token_ids: Sequence[int], items: Sequence[MediaItem], placeholder_ids: dict[str, int],
                  keys: Sequence[str | None] | None = None,
                  item_tokens: dict[str, Any] | None = None) -> ExpandedPrompt:
    """`items` are in prompt order per modality; `keys[i]` is the cache key of `items[i]` (None: the item has
    none); `item_tokens` (per modality, `ModelAdapter.item_tokens`: `.before`, `.feature`, `.after`) wraps each
    item's rows and names their token (default: the placeholder repeated). An item whose meta carries the
    processor's own `expansion` (Qwen3-VL's frame timestamps) is expanded as that."""
    if keys is not None and len(keys) != len(items):
        raise InvalidInputError(f"{len(keys)} embedding keys for {len(items)} embeddings", param="embeddings")
    keyed = list(zip(items, keys if keys is not None else [None] * len(items)))
    by_id = {pid: m for m, pid in placeholder_ids.items()}
    queues = {m: [ek for ek in keyed if ek[0].modality == m] for m in placeholder_ids}
    out: list[int] = []
    positions: list[int] = []
    ordered: list[Any] = []
    spans: list[MMSpan] = []
    ids = token_ids if isinstance(token_ids, list) else list(token_ids)
    done = 0  # ids[:done] are in `out`; the text between placeholders is copied in slices (C speed)
    for i in sorted(j for pid in by_id for j in _occurrences(ids, pid)):
        out.extend(ids[done:i])
        done = i + 1
        t = ids[i]
        m = by_id[t]
        if not queues[m]:
            raise InvalidInputError(f"the prompt has more {m} placeholders than {m} items", param="embeddings")
        item, key = queues[m].pop(0)
        expansion = (getattr(item, "meta", None) or {}).get("expansion")
        wrap = item_tokens.get(m) if item_tokens else None
        if expansion is None:
            if wrap is not None:
                out.extend(wrap.before)
            spans.append(MMSpan(offset=len(out), length=item.num_tokens, key=key))
            positions.extend(range(len(out), len(out) + item.num_tokens))
            out.extend([t if wrap is None else wrap.feature] * item.num_tokens)
            if wrap is not None:
                out.extend(wrap.after)
        else:
            spans.extend(_expand_item(out, positions, expansion, t if wrap is None else wrap.feature,
                                      item.num_tokens, key))
        ordered.append(item)
    out.extend(ids[done:])
    return ExpandedPrompt(out, positions, ordered, spans)


def _occurrences(ids: list[int], value: int) -> list[int]:
    """Indices of `value` in `ids` (list.index: a C scan, not a Python loop per token)."""
    found: list[int] = []
    i = -1
    try:
        while True:
            i = ids.index(value, i + 1)
            found.append(i)
    except ValueError:
        return found


def _expand_item(out: list[int], positions: list[int], expansion: list[int], feature: int, num_tokens: int,
                 key: str | None) -> list[MMSpan]:
    """Append an item whose processor expansion holds text tokens too (Qwen3-VL's frame timestamps, InternVL's
    frame lines); its rows are the `feature` tokens; one span per run of rows, the n-th run keyed `key#n` (each
    run names different rows)."""
    rows = [i for i, x in enumerate(expansion) if x == feature]
    if len(rows) != num_tokens:
        raise InvalidInputError(f"an item's expansion has {len(rows)} placeholders for {num_tokens} embedding rows",
                                param="embeddings")
    base = len(out)
    out.extend(int(x) for x in expansion)
    positions.extend(base + i for i in rows)
    runs: list[list[int]] = []
    for i in rows:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [MMSpan(offset=base + a, length=b - a, key=None if key is None else f"{key}#{n}")
            for n, (a, b) in enumerate(runs)]
