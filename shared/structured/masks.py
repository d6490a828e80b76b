"""The engine side of structured outputs: one llguidance matcher per constrained request, the per-step token
bitmask of a batch, and applying it to the logits.

Where the host time goes, and why the work is split this way: on a GPU the decode step of a 3B model at batch
64 is host-bound (the forward takes less time than scheduling, staging and output handling), so grammar work
done between two steps adds to every step even when it runs "beside" the forward. So:

- each constrained request owns a row (`slot`) of one pinned bitmask table for its life;
- `advance(pairs)` feeds a step's sampled tokens to the matchers (one call each, a few microseconds: llguidance's
  parallel `consume_token_par` measured slower, its thread hand-off costs more than the work) and returns the
  requests whose grammar is complete (they stop with "stop");
- `prefetch(seqs)` then starts computing those requests' NEXT masks on a background thread (llguidance's
  `LLExecutor`, GIL released) while the engine hands outputs back, schedules and stages the next step;
- `fill(seqs)` at the next step waits for that, computes only the masks that are missing (a request's first
  token, one that the prefetch did not cover) and returns a GrammarMask naming each row's slot;
- the sampler uploads the table rows once and masks the constrained rows of the logits; rows without a
  grammar see their logits untouched, so constrained and free requests share a batch.

A slot's mask is used only if it was computed after the request's last consumed token (`_ready[slot]` holds
the request and its token count), so preemption, aborts and slot reuse can never apply a stale mask. The
tokenizer is loaded on the first constrained request (`tokenizer` may be a path or a tokenizer object).
"""
from __future__ import annotations

import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .grammar import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class GrammarMask:
    """Allowed tokens of some rows of a batch: logits row `rows[k]` may take the tokens set in row `slots[k]`
    of `bits` ((n, words) int32 on the host; bit j of word w set = token 32 * w + j allowed). Without `slots`,
    row k of `bits` belongs to logits row `rows[k]`."""

    rows: list[int]
    bits: torch.Tensor
    slots: list[int] | None = None


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer_source = tokenizer
        self.vocab_size = vocab_size  # the logits' width
        self._compiler: GrammarCompiler | None = None
        self._executor: Any = None  # llguidance.LLExecutor (its own thread pool)
        self._table: torch.Tensor | None = None  # (slots, words) int32, pinned on a CUDA machine
        self._owner: list[Any] = []  # slot -> the Sequence holding it (None: free)
        self._ready: list[tuple[Any, int] | None] = []  # slot -> (seq, tokens consumed) its mask was made for
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            tok = self._tokenizer_source
            if tok is None:
                from mmpipe.shared.errors import UnsupportedError

                raise UnsupportedError("this engine has no tokenizer, so it cannot enforce structured outputs",
                                       param="structured_outputs")
            if isinstance(tok, str):
                from transformers import AutoTokenizer

                # the HF tokenizer files, as the stages read them (registry.load_processor: a Voxtral checkpoint's
                # tekken.json would give mistral-common's tokenizer, whose vocabulary llguidance cannot read)
                tok = AutoTokenizer.from_pretrained(tok, mistral_format=False)
            self._compiler = GrammarCompiler(tok, self.vocab_size)
        return self._compiler

    @property
    def words(self) -> int:
        return (self.compiler.vocab_size + 31) // 32

    # ---- requests ------------------------------------------------------------------------------------------
    def add(self, seq: Any) -> None:
        """Give `seq` its matcher (InvalidInputError if its spec does not compile) and a row of the table."""
        so = seq.sampling.structured_outputs
        if so is None:
            return
        seq.grammar = self.compiler.matcher(so)
        seq.grammar_tokens = 0
        seq.grammar_slot = self._claim_slot(seq)

    def advance(self, pairs: list[tuple[Any, int]]) -> set[int]:
        """Feed each constrained request its sampled token; the ids of those whose grammar is complete, refused
        the token, or got EOS (they should stop)."""
        self._wait()
        done: set[int] = set()
        for seq, tok in pairs:  # ~5 us each; llguidance's consume_token_par costs more than it saves here
            if tok in seq.eos_token_ids:
                done.add(id(seq))
                continue
            ok = seq.grammar.consume_token(tok)
            seq.grammar_tokens += 1
            if not ok:
                log.error("request %s: grammar refused sampled token %d (%s)", seq.request_id, tok,
                          seq.grammar.get_error())
                done.add(id(seq))
            elif seq.grammar.is_stopped():
                done.add(id(seq))
        return done

    def prefetch(self, seqs: list[Any]) -> None:
        """Start computing the next masks of `seqs` (constrained, still running) in the background."""
        self._wait()
        todo = [s for s in seqs if s.grammar is not None and not s.is_finished]
        if not todo:
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending = self._thread.submit(self._compute, todo)

    # ---- one step ------------------------------------------------------------------------------------------
    def fill(self, seqs: list[Any]) -> GrammarMask | None:
        """The masks of the rows of `seqs` that have a grammar, or None when none has."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        self._wait()
        missing = [seqs[r] for r in rows if self._ready[seqs[r].grammar_slot] != (seqs[r], seqs[r].grammar_tokens)]
        if missing:
            self._compute(missing)
        slots = [seqs[r].grammar_slot for r in rows]
        return GrammarMask(rows, self._table[:max(slots) + 1], slots)

    # ---- internals -----------------------------------------------------------------------------------------
    def _exec(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _claim_slot(self, seq: Any) -> int:
        self._wait()  # the background computation may be writing the table
        for i, owner in enumerate(self._owner):
            if owner is None or owner.is_finished:
                self._owner[i], self._ready[i] = seq, None
                return i
        n = len(self._owner)
        grown = torch.empty((max(8, 2 * n), self.words), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        if self._table is not None:
            grown[:n] = self._table
        self._table = grown
        self._owner += [None] * (grown.shape[0] - n)
        self._ready += [None] * (grown.shape[0] - n)
        self._owner[n] = seq
        return n

    def _compute(self, seqs: list[Any]) -> None:
        """The next masks of `seqs` into their slots (llguidance drops the GIL while it computes), plus the
        request's own EOS ids wherever its grammar may end (they may differ from the tokenizer's)."""
        table, words = self._table, self.words
        ptr, stride = table.data_ptr(), words * 4
        if len(seqs) == 1:
            s = seqs[0]
            s.grammar.unsafe_compute_mask_ptr(ptr + s.grammar_slot * stride, stride)
        else:
            self._exec().unsafe_compute_mask_ptr([(s.grammar, s.grammar_slot) for s in seqs], ptr, stride,
                                                 table.shape[0])
        view = table.numpy().view(np.uint32)
        for s in seqs:
            if s.eos_token_ids and s.grammar.is_accepting():
                for t in s.eos_token_ids:
                    if t < words * 32:
                        view[s.grammar_slot, t >> 5] |= np.uint32(1 << (t & 31))
            self._ready[s.grammar_slot] = (s, s.grammar_tokens)


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    """The one-launch CUDA route (shared/engine/kernels/triton_bitmask.py), or None without Triton."""
    try:
        from mmpipe.shared.engine.kernels.triton_bitmask import apply_token_bitmask
    except ImportError:
        return None
    return apply_token_bitmask


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """A copy of `logits` with the disallowed tokens of the masked rows at -inf (the other rows unchanged).
    Columns past the mask (logits padded wider than the tokenizer) count as disallowed."""
    dev, (n, width) = logits.device, logits.shape
    bits = mask.bits.to(dev, non_blocking=True)
    if mask.slots is not None:
        bits = bits[torch.tensor(mask.slots, dtype=torch.long).to(dev, non_blocking=True)]
    out = logits.clone()
    if dev.type == "cuda" and _triton_kernel() is not None:
        _triton_kernel()(out, bits, torch.tensor(mask.rows, dtype=torch.int32).to(dev, non_blocking=True))
        return out
    shifts = torch.arange(32, device=dev, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(len(mask.rows), -1).bool()
    if allowed.shape[1] >= width:
        allowed = allowed[:, :width]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
    if len(mask.rows) == n:
        return out.masked_fill_(~allowed, float("-inf"))
    idx = torch.tensor(mask.rows, device=dev)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out
