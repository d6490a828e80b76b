"""Expand placeholders and build the EngineRequest for one prompt (the generator side of the pipeline).

Each placeholder token becomes `num_tokens` copies (one per embedding row; an adapter may wrap them in tokens
of its own and use another feature token, `ModelAdapter.item_tokens`: Gemma 3), the rows are recorded with
their flat prompt positions, each item with its span and cache key (what the engine's prefix cache keys its
blocks by), and M-RoPE families get their (3, L) positions and rope delta. This is the same expansion the HF
processor does on the prompt string, done on token ids so cached items need no pixels (the expansion itself:
`expand.py`, which the gateway's router shares).
"""
from __future__ import annotations

import numpy as np
import torch

from mmpipe.shared.engine.sequence import prompt_ids_array
from mmpipe.shared.errors import InvalidInputError, LimitExceededError
from mmpipe.shared.models.base import ItemTokens, ModelAdapter
from mmpipe.shared.types import EngineRequest, MMEmbedding, SamplingParams

from .expand import ExpandedPrompt, expand_prompt

__all__ = ["ExpandedPrompt", "build_engine_request", "expand_prompt"]


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
    if ordered:  # one item: its tensor as it is (the engine reads the rows, never writes them)
        rows = [e.tensor.reshape(-1, e.tensor.shape[-1]) for e in ordered]
        mm = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    mrope = None
    delta = 0
    if adapter.uses_mrope:
        # positions need each modality's items in their own order of appearance
        pos_delta = adapter.mrope_positions(torch.from_numpy(prompt_ids_array(ids).astype(np.int64)), ordered)
        if pos_delta is not None:
            mrope, delta = pos_delta
    return EngineRequest(request_id=request_id, prompt_token_ids=ids, sampling=sampling, mm_embeds=mm,
                         mm_positions=_long_tensor(positions) if positions else None,
                         mrope_positions=mrope, mrope_delta=delta,
                         eos_token_ids=list(eos_token_ids or []), mm_spans=spans,
                         bad_words_token_ids=bad_words_token_ids(adapter.tokenizer, sampling.bad_words or []))


def _long_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(values, dtype=torch.long), through numpy (torch.tensor of a Python list is ~4x slower)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's SamplingParams.update_from_tokenizer: each word as it tokenizes at the start of a text, and with
    a leading space when that gives a different first token and as many tokens (a word in mid-text)."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            continue
        out.append(list(plain))
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(list(spaced))
    return out
