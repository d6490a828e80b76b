"""A sequence's prefix-cache block keys (Sequence.block_key: the prompt's ids and positions serialised once and
sliced per block) are the keys of the block_hash.block_key definition, block by block: 1-D and M-RoPE positions,
media items inside, across and at the edge of blocks, prompts ending mid-block, generated tokens after the
prompt, and other block sizes of the same sequence."""
from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest
import torch

from mmpipe.shared.engine.block_hash import block_key, block_media, root_key
from mmpipe.shared.engine.sequence import Sequence
from mmpipe.shared.types import EngineRequest, MMSpan, SamplingParams


def _definition(parent: bytes, token_ids, positions: bytes, media) -> bytes:
    """block_hash.block_key as first written (one update per part), which every stored key follows."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    h.update(positions)
    for key, rel_start, length in media:
        kb = key.encode("utf-8")
        h.update(struct.pack("<iiI", rel_start, length, len(kb)))
        h.update(kb)
    return h.digest()


def _reference_keys(seq: Sequence, n: int, bs: int, mrope: bool) -> list[bytes]:
    """The chain as block_hash defines it, from the sequence's tokens, positions and spans."""
    L = seq.num_prompt_tokens
    rows = np.asarray(seq.mrope_positions if seq.mrope_positions is not None
                      else torch.arange(L).expand(3, -1)).astype("<i4")
    keys, parent = [], root_key("ns", bs, mrope)
    for i in range(n):
        a, b = i * bs, (i + 1) * bs
        pos = b""
        if mrope:
            cols = [rows[:, j] if j < L else np.array([j + d for d in seq.mrope_deltas], dtype="<i4")
                    for j in range(a, b)]
            pos = np.stack(cols, axis=1).astype("<i4").tobytes()
        media = block_media(seq.mm_spans, a, b)
        parent = _definition(parent, seq.token_ids[a:b], pos, media)
        assert block_key(keys[-1] if keys else root_key("ns", bs, mrope), seq.token_ids[a:b], pos, media) == parent
        keys.append(parent)
    return keys


@pytest.mark.parametrize("seed", range(30))
def test_sequence_keys_equal_the_definition(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 90)
    mrope = seed % 2 == 0
    ids = [rng.randrange(0, 5000) for _ in range(L)]
    spans, pos_rows = [], None
    start = rng.randint(0, max(0, L - 1))
    if L > 2 and seed % 3:
        length = rng.randint(1, L - start)
        spans = [MMSpan(offset=start, length=length, key=f"mmpipe:v1:image:hash:{seed:064x}")]
    mm = torch.zeros(sum(s.length for s in spans), 4) if spans else None
    mm_pos = torch.arange(start, start + spans[0].length) if spans else None
    if mrope:
        pos_rows = torch.tensor([[rng.randint(0, 50) for _ in range(L)] for _ in range(3)], dtype=torch.long)
    req = EngineRequest(request_id=str(seed), prompt_token_ids=ids, sampling=SamplingParams(max_tokens=30),
                        mm_embeds=mm, mm_positions=mm_pos, mrope_positions=pos_rows,
                        mrope_delta=0, mm_spans=spans)
    seq = Sequence(req, max_model_len=4096, eos_token_ids=[], generator=None)
    seq.token_ids += [rng.randrange(0, 5000) for _ in range(rng.randint(0, 40))]  # generated tokens
    for bs in (4, 16, 5):
        n = len(seq.token_ids) // bs
        seq.block_hashes = []
        half = seq.extend_block_keys(n // 2, root_key("ns", bs, mrope), bs, mrope)[:]  # grown in two steps
        keys = seq.extend_block_keys(n, root_key("ns", bs, mrope), bs, mrope)
        assert keys[:n // 2] == half and keys == _reference_keys(seq, n, bs, mrope), (seed, bs)
