"""Structured outputs on CUDA: a grammar's packed token bitmask applied to its rows of the logits in one launch
(the torch route unpacks the bits into a (rows, vocab) bool tensor first: ~8 launches and a 32x larger
temporary). Columns past the mask (logits wider than the tokenizer) count as disallowed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bits_ptr, rows_ptr, n_cols, n_words, stride_l, stride_b,
                          BLOCK: tl.constexpr):
    k = tl.program_id(0)
    row = tl.load(rows_ptr + k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    word = cols // 32
    w = tl.load(bits_ptr + k.to(tl.int64) * stride_b + word, mask=in_row & (word < n_words), other=0)
    allowed = ((w >> (cols % 32)) & 1) != 0
    ptrs = logits_ptr + row * stride_l + cols
    tl.store(ptrs, tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty),
             mask=in_row & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bits: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits row `rows[k]` keeps only the tokens set in `bits[k]` ((len(rows), words) int32)."""
    n_cols = logits.shape[1]
    block = 1024
    _apply_bitmask_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
        logits, bits, rows, n_cols, bits.shape[1], logits.stride(0), bits.stride(0), BLOCK=block, num_warps=4)
