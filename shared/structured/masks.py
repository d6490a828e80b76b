"""The engine side of structured outputs: one llguidance matcher per constrained request, the per-step token
bitmask of a batch, and applying it to the logits.

Per step (ModelRunner.execute): the forward is launched first; while the GPU runs it, `fill` computes the
masks of the constrained rows on the host (llguidance's thread pool, GIL released) into a pinned buffer; the
sampler then copies that buffer to the logits' device and masks those rows only, so unconstrained rows of the
same batch see their logits untouched. After sampling, `advance` feeds each constrained request its token;
a grammar that is complete (no token but EOS can follow) finishes the request with "stop".

The tokenizer is loaded on the first constrained request (`tokenizer` may be a path or a tokenizer object).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .grammar import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class GrammarMask:
    """Allowed tokens of some rows of a batch: `rows` index the logits, `bits` is (len(rows), words) int32,
    bit j of word w set = token 32 * w + j allowed."""

    rows: list[int]
    bits: torch.Tensor


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer_source = tokenizer
        self.vocab_size = vocab_size  # the logits' width
        self._compiler: GrammarCompiler | None = None
        self._executor: Any = None
        self._buf: torch.Tensor | None = None

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

    # ---- requests ------------------------------------------------------------------------------------------
    def add(self, seq: Any) -> None:
        """Give `seq` its matcher (InvalidInputError if its spec does not compile)."""
        so = seq.sampling.structured_outputs
        if so is not None:
            seq.grammar = self.compiler.matcher(so)

    def advance(self, seq: Any, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (the request should stop)."""
        m = seq.grammar
        if token in seq.eos_token_ids:
            return True
        if not m.consume_token(token):
            log.error("request %s: grammar refused sampled token %d (%s)", seq.request_id, token, m.get_error())
            return True
        return m.is_stopped()

    # ---- one step ------------------------------------------------------------------------------------------
    def fill(self, seqs: list[Any]) -> GrammarMask | None:
        """The masks of the rows of `seqs` that have a grammar, or None when none has."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        words = (self.compiler.vocab_size + 31) // 32
        if self._buf is None or self._buf.shape[0] < len(rows) or self._buf.shape[1] != words:
            self._buf = torch.empty((max(len(rows), 8), words), dtype=torch.int32,
                                    pin_memory=torch.cuda.is_available())
        bits = self._buf[:len(rows)]
        ptr, stride = bits.data_ptr(), words * 4
        if len(rows) == 1:
            seqs[rows[0]].grammar.unsafe_compute_mask_ptr(ptr, stride)
        else:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(seqs[r].grammar, k) for k, r in enumerate(rows)], ptr,
                                                   stride, len(rows))
        # the request's own EOS ids may differ from the tokenizer's: allow them wherever the grammar may end
        view = bits.numpy().view(np.uint32)
        for k, r in enumerate(rows):
            s = seqs[r]
            if s.grammar.is_accepting():
                for t in s.eos_token_ids:
                    if t < words * 32:
                        view[k, t >> 5] |= np.uint32(1 << (t & 31))
        return GrammarMask(rows, bits)


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """A copy of `logits` with the disallowed tokens of the masked rows at -inf (the other rows unchanged).
    Columns past the mask (logits padded wider than the tokenizer) count as disallowed."""
    dev, (n, width) = logits.device, logits.shape
    bits = mask.bits.to(dev, non_blocking=True)
    shifts = torch.arange(32, device=dev, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(len(mask.rows), -1).bool()
    if allowed.shape[1] >= width:
        allowed = allowed[:, :width]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
    out = logits.clone()
    if len(mask.rows) == n:
        return out.masked_fill_(~allowed, float("-inf"))
    idx = torch.tensor(mask.rows, device=dev)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out
