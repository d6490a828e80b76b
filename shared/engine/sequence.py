"""Sequence: the engine's mutable state of one request (tokens, progress, KV blocks, multimodal rows)."""
from __future__ import annotations

import enum
import struct
from typing import Any

import numpy as np
import torch

from mmpipe.shared.types import EngineRequest, MMSpan

from .block_hash import block_key, block_media, chain_keys, media_bytes, token_bytes

_NO_LIMIT = 1 << 62


def prompt_ids_array(token_ids: Any) -> np.ndarray:
    """The prompt's ids as an (L,) little-endian int32 array (read-only), packed in one C call. ValueError when
    an id is not an integer or outside int32 (no vocabulary is that large)."""
    ids = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
    try:
        return np.frombuffer(token_bytes(ids), dtype="<i4")
    except struct.error as e:
        raise ValueError(f"prompt token ids must be integers in int32 range ({e})") from None


def host_array(x: Any, dtype: Any) -> np.ndarray:
    """A CPU tensor, array or list as a numpy array of `dtype` (no copy when it already is one)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def mm_runs(positions: Any) -> list[tuple[int, int]]:
    """[start, end) of each run of contiguous prompt positions (transformers' token_type_ids blocks)."""
    pos = sorted(set(int(p) for p in positions.reshape(-1).tolist()))
    runs: list[tuple[int, int]] = []
    for p in pos:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request inside the engine.

    `token_ids` is prompt + generated tokens; `num_computed_tokens` of them have their K/V in the cache.
    Preemption frees the blocks and resets `num_computed_tokens` to 0: the next prefill recomputes the prompt
    and the generated tokens (after whatever prefix the cache still holds), with the same multimodal rows and
    positions, so the output continues unchanged.

    Sliding windows (window.py): when every layer is windowed, the blocks before the first one its next query
    can see are given back as it advances; their entries stay in `block_table` as `FREED_BLOCK`, the first
    `num_freed_blocks` entries, so entry i still holds tokens [i * block_size, (i + 1) * block_size).

    Prefix caching: `block_hashes` are the keys of its full blocks (block_hash.py), computed once per block and
    kept across preemptions (they depend on content only); `num_committed_blocks` of its table are registered
    in (or were taken from) the block manager's cache; tokens at and after `hash_limit` (the first row of an
    unnamed media item) are never keyed.
    """

    def __init__(self, req: EngineRequest, *, max_model_len: int, eos_token_ids: list[int],
                 generator: torch.Generator | None, bidirectional_mm: bool = False,
                 prompt_ids: np.ndarray | None = None):
        """`prompt_ids`: `prompt_ids_array(req.prompt_token_ids)` when the caller has it (validation packs it)."""
        self.request_id = req.request_id
        self.sampling = req.sampling
        # the prompt as int32 (validated ids: packed once, then the block keys and chunk staging read it) and as
        # Python ints (the list that grows with the generated tokens)
        self._prompt_i32 = prompt_ids_array(req.prompt_token_ids) if prompt_ids is None else prompt_ids
        self.token_ids: list[int] = self._prompt_i32.tolist()
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_freed_blocks = 0  # leading table entries given back behind the window (window.FREED_BLOCK)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.generator = generator
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []
        self.num_committed_blocks = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at the first admission
        self.admitted = False
        self.grammar = None  # llguidance matcher of a structured-outputs request (structured/masks.py)
        self.grammar_slot = -1  # its row of the bitmask table, and the tokens its matcher has consumed
        self.grammar_tokens = 0

        sp = req.sampling
        # EOS ends a sequence unless ignore_eos; both EOS and stop ids are held back until min_tokens are out.
        self.eos_token_ids = frozenset() if sp.ignore_eos else frozenset(int(t) for t in eos_token_ids)
        self.stop_token_ids = frozenset(int(t) for t in (sp.stop_token_ids or []))
        self.suppress_ids = sorted(self.eos_token_ids | self.stop_token_ids)
        room = max_model_len - self.num_prompt_tokens
        self.max_tokens = room if sp.max_tokens is None else min(sp.max_tokens, room)
        self.max_model_len = max_model_len
        self.want_logprobs = sp.logprobs is not None
        self.num_top_logprobs = sp.logprobs or 0  # alternatives per token (logprobs > 0)
        # logits processors (logits_processors.py): checked once here, read every step
        self.has_penalties = (sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0
                              or sp.repetition_penalty != 1.0)
        self.logit_bias_ids: list[int] | None = list(sp.logit_bias) if sp.logit_bias else None
        self.logit_bias_values: list[float] = list(sp.logit_bias.values()) if sp.logit_bias else []
        self.bad_words_token_ids: list[list[int]] = [list(w) for w in req.bad_words_token_ids if w]
        # prompt_logprobs (vLLM's extra): alternatives per prompt token, None when not asked. Such a request
        # computes its whole prompt (no prefix-cache hits, as in vLLM) and collects, for prompt tokens 1..L-1 in
        # order, (token id, logprob, rank, top alternatives) here (prompt_logprobs.py); the first output reports them.
        self.num_prompt_logprobs: int | None = sp.prompt_logprobs
        self.prompt_logprobs: list[tuple[int, float, int, list[tuple[int, float]]]] = []

        # Multimodal rows: the request's tensor, moved (and cast) to the model's device the first time a chunk
        # needs rows (`place_mm_embeds` says where); a prompt whose media rows the prefix cache serves never moves
        # them. `mm_positions`: (N,) int64 prompt index of each row, on the host.
        self.mm_embeds: torch.Tensor | None = req.mm_embeds
        self._mm_place: tuple[Any, Any] | None = None
        self.mm_positions: np.ndarray | None = None
        self._mm_sorted = True  # rows in ascending position order: a chunk's rows are one slice of them
        # Media items in prompt order, as (start, length, key): what a block key holds for the rows in it.
        self.mm_spans: list[tuple[int, int, str]] = []
        self.hash_limit = _NO_LIMIT  # generated tokens are keyed too
        if req.mm_embeds is not None:
            pos = host_array(req.mm_positions, np.int64).reshape(-1)
            self.mm_positions = pos
            self._mm_sorted = bool(pos.size < 2 or (pos[1:] > pos[:-1]).all())
            spans: list[MMSpan] = sorted(req.mm_spans, key=lambda m: m.offset)
            if not spans and pos.size:  # unnamed rows: nothing from the first one on is shareable
                self.hash_limit = int(pos.min())
            for span in spans:
                if span.key is None:
                    self.hash_limit = min(self.hash_limit, span.offset)
                else:
                    self.mm_spans.append((span.offset, span.length, span.key))
        # M-RoPE: (3, L) int32 prompt positions (what the step buffers and the block keys take). A token at index
        # i >= L sits at i + deltas[r] on row r, where each row continues from the prompt's LAST position on that
        # row (transformers' generate advances every row by one per step from there; a prompt ending in image rows
        # has unequal rows).
        self.mrope_positions: np.ndarray | None = None
        delta = int(req.mrope_delta or 0)
        self.mrope_deltas: tuple[int, int, int] = (delta, delta, delta)
        if req.mrope_positions is not None:
            rows = np.ascontiguousarray(host_array(req.mrope_positions, "<i4").reshape(3, -1))
            self.mrope_positions = rows
            if rows.shape[1]:
                self.mrope_deltas = tuple((rows[:, -1].astype(np.int64) + 1 - rows.shape[1]).tolist())  # type: ignore[assignment]
        self._key_bytes: tuple[int, bool, bytes] | None = None  # _prompt_records, built on first use
        # Bidirectional multimodal runs (model_spec.py): [start, end) of each run of contiguous mm positions,
        # and per prompt index the last key position it may attend to during prefill.
        self.mm_runs: list[tuple[int, int]] = []
        self._limits: np.ndarray | None = None
        if bidirectional_mm and self.mm_positions is not None and self.mm_positions.size:
            self.mm_runs = mm_runs(self.mm_positions)
            lim = np.arange(self.num_prompt_tokens, dtype=np.int32)
            for a, b in self.mm_runs:
                lim[a:b] = b - 1
            self._limits = lim

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ---- model inputs for tokens [start, end) --------------------------------------------------------------
    def input_ids(self, start: int, end: int) -> np.ndarray | list[int]:
        """Token ids [start, end): a view of the int32 prompt when the range is inside it, else a list."""
        return self._prompt_i32[start:end] if end <= self.num_prompt_tokens else self.token_ids[start:end]

    def position_ids(self, start: int, end: int, mrope: bool) -> np.ndarray:
        """(end-start,) positions, or (3, end-start) for an M-RoPE model (int32 views of the prompt's rows where
        they can be)."""
        if not mrope:
            return np.arange(start, end, dtype=np.int64)
        L = self.num_prompt_tokens
        if end <= L and self.mrope_positions is not None:
            return self.mrope_positions[:, start:end]
        parts = []
        if start < L:
            if self.mrope_positions is not None:
                parts.append(self.mrope_positions[:, start:min(end, L)])
            else:  # text-only prompt on an M-RoPE model: all three rows are the 1-D positions
                parts.append(np.broadcast_to(np.arange(start, min(end, L), dtype=np.int64), (3, min(end, L) - start)))
        if end > L:
            tail = np.arange(max(start, L), end, dtype=np.int64)
            parts.append(tail[None, :] + np.asarray(self.mrope_deltas, dtype=np.int64)[:, None])
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def attn_limits(self, start: int, end: int) -> np.ndarray:
        """(end-start,) int32: the last key position each token of [start, end) may attend to in prefill."""
        own = np.arange(start, end, dtype=np.int32)
        if self._limits is None or start >= self.num_prompt_tokens:
            return own
        e = min(end, self.num_prompt_tokens)
        own[:e - start] = self._limits[start:e]
        return own

    def fit_chunk(self, n: int) -> int:
        """The longest prefill chunk of at most `n` tokens from `num_computed_tokens` that ends outside every
        bidirectional run (a run's rows need each other's keys, so a run is computed in one chunk); 0 when the
        run at the start does not fit in `n`."""
        start = self.num_computed_tokens
        end = start + n
        for a, b in self.mm_runs:
            if a < end < b:
                return max(0, a - start)
        return n

    def decode_positions(self, index: int, mrope: bool) -> tuple[int, ...]:
        """Positions of a post-prompt token at `index`: one per M-RoPE row, or a 1-tuple."""
        return tuple(index + d for d in self.mrope_deltas) if mrope else (index,)

    def place_mm_embeds(self, device: Any, dtype: Any) -> None:
        """Where the model reads the multimodal rows: they are moved (and cast) there once, when a chunk first
        needs some (the caller's tensor is left alone)."""
        self._mm_place = (device, dtype)

    def mm_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offsets within [start, end), embedding rows) of the multimodal rows that fall in the chunk."""
        pos = self.mm_positions
        if pos is None or start >= self.num_prompt_tokens:
            return None
        if self._mm_sorted:  # the chunk's rows are one slice
            i, j = np.searchsorted(pos, (start, end)).tolist()
            if i == j:
                return None
            return torch.from_numpy(pos[i:j] - start), self._mm_source()[i:j]
        idx = np.flatnonzero((pos >= start) & (pos < end))
        if not idx.size:
            return None
        return torch.from_numpy(pos[idx] - start), self._mm_source()[torch.from_numpy(idx)]

    def _mm_source(self) -> torch.Tensor:
        if self._mm_place is not None:
            device, dtype = self._mm_place
            self.mm_embeds = self.mm_embeds.to(device=device, dtype=dtype)  # type: ignore[union-attr]
            self._mm_place = None
        return self.mm_embeds  # type: ignore[return-value]

    # ---- prefix-cache keys -----------------------------------------------------------------------------------
    def block_key(self, parent: bytes, index: int, block_size: int, mrope: bool) -> bytes:
        """Key of full block `index` (tokens [index * block_size, (index + 1) * block_size)) after `parent`."""
        a, b = index * block_size, (index + 1) * block_size
        positions = self._position_bytes(a, b) if mrope else b""
        return block_key(parent, self.token_ids[a:b], positions, block_media(self.mm_spans, a, b))

    def extend_block_keys(self, n: int, root: bytes, block_size: int, mrope: bool) -> list[bytes]:
        """`block_hashes` grown to the keys of the first `n` full blocks (chained from `root`). The prompt's
        blocks are keyed from one record per block (its ids and positions serialised once, `_prompt_records`);
        the keys are `block_key`'s (tests/test_block_keys.py)."""
        keys = self.block_hashes
        full = min(n, self.num_prompt_tokens // block_size)
        if len(keys) < full:
            records = self._prompt_records(block_size, mrope)
            media = {i: media_bytes(block_media(self.mm_spans, i * block_size, (i + 1) * block_size))
                     for off, length, _ in self.mm_spans
                     for i in range(off // block_size, (off + length - 1) // block_size + 1)}  # blocks with rows
            keys.extend(chain_keys(keys[-1] if keys else root, records, (16 if mrope else 4) * block_size,
                                   len(keys), full, media))
        while len(keys) < n:  # blocks that hold generated tokens
            keys.append(self.block_key(keys[-1] if keys else root, len(keys), block_size, mrope))
        return keys

    def _prompt_records(self, block_size: int, mrope: bool) -> bytes:
        """The prompt's full blocks serialised as `block_key` takes them, block after block: its ids as
        little-endian int32, then (M-RoPE) its (3, block_size) int32 positions, row-major (what
        `_position_bytes` gives one block)."""
        if self._key_bytes is None or self._key_bytes[:2] != (block_size, mrope):
            nb = self.num_prompt_tokens // block_size
            ids = self._prompt_i32[:nb * block_size].reshape(nb, block_size)
            if mrope and nb:
                rows = self._mrope_rows()[:, :nb * block_size].reshape(3, nb, block_size).transpose(1, 0, 2)
                rec = np.concatenate([ids, rows.reshape(nb, 3 * block_size)], axis=1)
            else:
                rec = ids
            self._key_bytes = (block_size, mrope, np.ascontiguousarray(rec, dtype="<i4").tobytes())
        return self._key_bytes[2]

    def _mrope_rows(self) -> np.ndarray:
        """(3, L) int32 prompt positions (the 1-D positions on every row for a text-only prompt)."""
        if self.mrope_positions is None:
            return np.broadcast_to(np.arange(self.num_prompt_tokens, dtype="<i4"), (3, self.num_prompt_tokens))
        return self.mrope_positions

    def _position_bytes(self, a: int, b: int) -> bytes:
        L = self.num_prompt_tokens
        rows = self._mrope_rows()
        if b <= L:
            return np.ascontiguousarray(rows[:, a:b], dtype="<i4").tobytes()
        tail = np.arange(max(a, L), b, dtype="<i4")[None, :] + np.asarray(self.mrope_deltas, dtype="<i4")[:, None]
        return np.concatenate([rows[:, a:L], tail], axis=1).astype("<i4").tobytes() if a < L \
            else tail.astype("<i4").tobytes()
