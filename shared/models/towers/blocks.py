"""The token-wise halves of a tower block, as plain functions over the HF modules' own weights.

A pre-norm transformer block is `x + proj(attn(rope(qkv(norm1(x)))))`, then `x + mlp(norm2(x))`. Everything
but the attention itself works row by row, so a block splits into

    q, k, v = pre_attention(x, cos, sin, w)      # norm1, q/k/v projections, rotary (skipped without cos)
    o = varlen_sdpa(q, k, v, plan, scale)        # see varlen.py
    x = post_attention(x, o, w)                  # proj + residual, norm2, MLP + residual

`BlockWeights` holds references to one HF block's parameters (nothing is copied or converted); `BlockSpec` the
few static facts that tell the families apart: RMSNorm or LayerNorm, one fused qkv projection or three, a
gated (SwiGLU) or plain MLP. The functions repeat transformers' operations one for one (RMSNorm and rotary in
float32, cast back as HF does), so run eagerly they give HF's numbers; `TokenOps` can run them through
`torch.compile` (one graph per function for every layer, the token dimension dynamic), which fuses the
elementwise work between the matmuls.

Owns: the block arithmetic outside attention. Must not: plan attention or know about grids and windows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class BlockWeights(NamedTuple):
    """One block's parameters, by reference. Unused slots are None (e.g. q/k/v when qkv is fused)."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor | None
    qkv_w: torch.Tensor | None
    qkv_b: torch.Tensor | None
    q_w: torch.Tensor | None
    q_b: torch.Tensor | None
    k_w: torch.Tensor | None
    k_b: torch.Tensor | None
    v_w: torch.Tensor | None
    v_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor | None
    fc1_w: torch.Tensor  # gate_proj for a gated MLP
    fc1_b: torch.Tensor | None
    up_w: torch.Tensor | None  # gated MLPs only
    up_b: torch.Tensor | None
    fc2_w: torch.Tensor  # down_proj for a gated MLP
    fc2_b: torch.Tensor | None


@dataclass(frozen=True)
class BlockSpec:
    rms_norm: bool  # RMSNorm (Qwen2.5-VL / Omni vision) or LayerNorm (Qwen2-VL vision, Whisper-style audio)
    eps: float
    fused_qkv: bool
    gated_mlp: bool
    num_heads: int
    head_dim: int


def _bias(m: nn.Module) -> torch.Tensor | None:
    return getattr(m, "bias", None)


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def describe_block(block: nn.Module, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module,
                   proj: nn.Module, num_heads: int) -> tuple[BlockSpec, BlockWeights, Callable]:
    """Spec, weights and the MLP's activation module of one HF block (module names differ per family)."""
    fused = hasattr(attn, "qkv")
    gated = hasattr(mlp, "gate_proj")
    rms = not isinstance(norm1, nn.LayerNorm)
    dim = norm1.weight.shape[0]
    spec = BlockSpec(rms_norm=rms, eps=_norm_eps(norm1), fused_qkv=fused, gated_mlp=gated,
                     num_heads=num_heads, head_dim=dim // num_heads)
    if fused:
        qkv = (attn.qkv.weight, _bias(attn.qkv), None, None, None, None, None, None)
    else:
        q, k, v = (getattr(attn, n) for n in (("q", "k", "v") if hasattr(attn, "q") else ("q_proj", "k_proj", "v_proj")))
        qkv = (None, None, q.weight, _bias(q), k.weight, _bias(k), v.weight, _bias(v))
    if gated:
        fc1, up, fc2, act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        up_wb = (up.weight, _bias(up))
    else:
        fc1, fc2 = mlp.fc1, mlp.fc2
        act = getattr(mlp, "act", None) or getattr(block, "activation_fn")
        up_wb = (None, None)
    w = BlockWeights(norm1.weight, _bias(norm1) if not rms else None, *qkv, proj.weight, _bias(proj),
                     norm2.weight, _bias(norm2) if not rms else None, fc1.weight, _bias(fc1), *up_wb,
                     fc2.weight, _bias(fc2))
    return spec, w, act


# ---- the arithmetic (transformers' operations, one for one) ------------------------------------------------------
def norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rms: bool, eps: float) -> torch.Tensor:
    if not rms:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb_vision: (T, H, D) q, k and (T, D) float32 cos, sin; computed in float32."""
    dq, dk = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((q * cos) + (_rotate_half(q) * sin)).to(dq), ((k * cos) + (_rotate_half(k) * sin)).to(dk)


def pre_attention(spec: BlockSpec, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                  w: BlockWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = x.shape[0]
    H, D = spec.num_heads, spec.head_dim
    h = norm(x, w.norm1_w, w.norm1_b, spec.rms_norm, spec.eps)
    if spec.fused_qkv:
        q, k, v = F.linear(h, w.qkv_w, w.qkv_b).reshape(T, 3, H, D).permute(1, 0, 2, 3).unbind(0)
    else:
        q = F.linear(h, w.q_w, w.q_b).reshape(T, H, D)
        k = F.linear(h, w.k_w, w.k_b).reshape(T, H, D)
        v = F.linear(h, w.v_w, w.v_b).reshape(T, H, D)
    if cos is not None:
        q, k = rotary(q, k, cos, sin)
    return q, k, v


def post_attention(spec: BlockSpec, act: Callable, x: torch.Tensor, o: torch.Tensor, w: BlockWeights
                   ) -> torch.Tensor:
    x = x + F.linear(o, w.proj_w, w.proj_b)
    h = norm(x, w.norm2_w, w.norm2_b, spec.rms_norm, spec.eps)
    if spec.gated_mlp:
        h = act(F.linear(h, w.fc1_w, w.fc1_b)) * F.linear(h, w.up_w, w.up_b)
    else:
        h = act(F.linear(h, w.fc1_w, w.fc1_b))
    return x + F.linear(h, w.fc2_w, w.fc2_b)


# ---- eager or compiled -------------------------------------------------------------------------------------------
class TokenOps:
    """`pre` / `post` for every block of one tower, eager or through torch.compile.

    Compiled, each function is one graph shared by all layers (the weights are inputs, the spec and the
    activation module are constants) with the token dimension marked dynamic, so any batch size reuses it.
    If compiling or running a compiled graph fails, the tower logs it once and continues eagerly: compilation
    is a speed-up, never a requirement.
    """

    def __init__(self, spec: BlockSpec, act: Callable, *, compile: bool, backend: str = "inductor",
                 name: str = "tower"):
        self.spec = spec
        self.act = act
        self.name = name
        self.compiled = compile
        if compile:
            def _pre(x, cos, sin, *w):
                return pre_attention(spec, x, cos, sin, BlockWeights(*w))

            def _post(x, o, *w):
                return post_attention(spec, act, x, o, BlockWeights(*w))

            self._pre_c = torch.compile(_pre, backend=backend, dynamic=False, fullgraph=True)
            self._post_c = torch.compile(_post, backend=backend, dynamic=False, fullgraph=True)

    def _fallback(self, e: Exception) -> None:
        log.warning("%s: torch.compile failed (%s: %s); running the tower eagerly", self.name, type(e).__name__, e)
        self.compiled = False

    def pre(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, w: BlockWeights
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.compiled:
            _dynamic_rows(x, cos, sin)
            try:
                return self._pre_c(x, cos, sin, *w)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the eager path
                self._fallback(e)
        return pre_attention(self.spec, x, cos, sin, w)

    def post(self, x: torch.Tensor, o: torch.Tensor, w: BlockWeights) -> torch.Tensor:
        if self.compiled:
            _dynamic_rows(x, o)
            try:
                return self._post_c(x, o, *w)
            except Exception as e:  # noqa: BLE001
                self._fallback(e)
        return post_attention(self.spec, self.act, x, o, w)


def _dynamic_rows(*ts: Any) -> None:
    for t in ts:
        if isinstance(t, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(t, 0)
