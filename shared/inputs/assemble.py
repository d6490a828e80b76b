"""Expand placeholders and build the EngineRequest for one prompt (the generator side of the pipeline).

Each placeholder token becomes `num_tokens` copies (one per embedding row; an adapter may wrap them in tokens
of its own and use another feature token, `ModelAdapter.item_tokens`: Gemma 3), the rows are recorded with
their flat prompt positions, each item with its span and cache key (what the engine's prefix cache keys its
blocks by), and M-RoPE families get their (3, L) positions and rope delta. This is the same expansion the HF
processor does on the prompt string, done on token ids so cached items need no pixels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mmpipe.shared.errors import InvalidInputError, LimitExceededError
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import EngineRequest, MMEmbedding, MMSpan, SamplingParams


class ExpandedPrompt(NamedTuple):
    token_ids: list[int]            # placeholders expanded
    positions: list[int]            # flat prompt positions of the mm rows, in row order
    ordered: list[MMEmbedding]      # the embeddings in prompt order
    spans: list[MMSpan]             # per item in prompt order: its positions and its cache key


def expand_prompt(token_ids: list[int], embeddings: list[MMEmbedding], placeholder_ids: dict[str, int],
                  keys: list[str | None] | None = None,
                  item_tokens: dict[str, ItemTokens] | None = None) -> ExpandedPrompt:
    """`embeddings` are in prompt order per modality; `keys[i]` is the cache key of `embeddings[i]` (None: the
    item has none); `item_tokens` (per modality) wraps each item's rows and names their token (default: the
    placeholder repeated)."""
    if keys is not None and len(keys) != len(embeddings):
        raise InvalidInputError(f"{len(keys)} embedding keys for {len(embeddings)} embeddings", param="embeddings")
    keyed = list(zip(embeddings, keys if keys is not None else [None] * len(embeddings)))
    by_id = {pid: m for m, pid in placeholder_ids.items()}
    queues = {m: [ek for ek in keyed if ek[0].modality == m] for m in placeholder_ids}
    out: list[int] = []
    positions: list[int] = []
    ordered: list[MMEmbedding] = []
    spans: list[MMSpan] = []
    for t in token_ids:
        m = by_id.get(t)
        if m is None:
            out.append(t)
            continue
        emb, key = queues[m].pop(0)
        wrap = item_tokens.get(m) if item_tokens else None
        if wrap is not None:
            out.extend(wrap.before)
        spans.append(MMSpan(offset=len(out), length=emb.num_tokens, key=key))
        positions.extend(range(len(out), len(out) + emb.num_tokens))
        out.extend([t if wrap is None else wrap.feature] * emb.num_tokens)
        if wrap is not None:
            out.extend(wrap.after)
        ordered.append(emb)
    return ExpandedPrompt(out, positions, ordered, spans)


def build_engine_request(adapter: ModelAdapter, request_id: str, token_ids: list[int],
                         embeddings: list[MMEmbedding], sampling: SamplingParams, *,
                         max_model_len: int | None = None, eos_token_ids: list[int] | None = None,
                         mm_keys: list[str | None] | None = None) -> EngineRequest:
    """`mm_keys` (parallel to `embeddings`): each item's embedding cache key, the identity its KV blocks are
    shared under (the key must name exactly these rows: it is the key they were read or stored under)."""
    ids, positions, ordered, spans = expand_prompt(token_ids, embeddings, adapter.placeholder_ids(), mm_keys,
                                                   adapter.item_tokens())
    if max_model_len is not None:
        need = len(ids) + (sampling.max_tokens or 0) if sampling.max_tokens else len(ids) + 1
        if len(ids) >= max_model_len or need > max_model_len:
            raise LimitExceededError(
                f"the prompt is {len(ids)} tokens after expanding media placeholders; with max_tokens="
                f"{sampling.max_tokens} it needs {need} > max_model_len={max_model_len}", param="max_tokens")
    mm = None
    if ordered:
        mm = torch.cat([e.tensor.reshape(-1, e.tensor.shape[-1]) for e in ordered], dim=0)
    mrope = None
    delta = 0
    if adapter.uses_mrope:
        # positions need each modality's items in their own order of appearance
        pos_delta = adapter.mrope_positions(torch.tensor(ids, dtype=torch.long), ordered)
        if pos_delta is not None:
            mrope, delta = pos_delta
    return EngineRequest(request_id=request_id, prompt_token_ids=ids, sampling=sampling, mm_embeds=mm,
                         mm_positions=torch.tensor(positions, dtype=torch.long) if positions else None,
                         mrope_positions=mrope, mrope_delta=delta,
                         eos_token_ids=list(eos_token_ids or []), mm_spans=spans)
