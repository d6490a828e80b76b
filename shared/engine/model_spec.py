"""DecoderSpec: what the engine must know about an HF text decoder beyond its tensor shapes, read once from
its config and modules (the one place that interprets `layer_types`, `sliding_window`, the soft-caps and the
Gemma-specific layout). The decoder, the attention backends, the scheduler and the block manager read this
object; none of them looks at the HF config for these rules again.

- per layer: its attention window (None = global; a config without `layer_types` but with a `sliding_window`,
  Mistral's, windows every layer) and its rotary table key (Gemma 3 keeps one table per layer
  type: `rope_local_base_freq` for sliding layers, the scaled global rope for the others);
- Gemma's layout: four norms per layer ("sandwich": post-attention and post-feed-forward norms on the branch
  outputs), RMSNorm scaled by (1 + weight), q/k norms, sqrt(hidden) embedding scale (done by the HF embedding
  module itself, `Gemma3TextScaledWordEmbedding`, so the engine calls it as it is);
- soft-caps: `attn_logit_softcapping` (tanh cap on q.k * scale) and `final_logit_softcapping` (on the logits),
  applied whenever the config sets them (vLLM's rule; Gemma 2 sets both, Gemma 3 neither);
- `mm_bidirectional`: during prefill, the rows of one multimodal run (contiguous multimodal positions, i.e.
  transformers' `token_type_ids == 1` blocks) attend to each other both ways, as Gemma 3 does for images;
- `moe`: which layers hold a sparse-MoE block (Qwen3-VL-MoE: every `decoder_sparse_step`-th layer not in
  `mlp_only_layers`, read from the modules transformers built), the experts, top-k and `norm_topk_prob` (moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mmpipe.shared.errors import UnsupportedError

from .moe import MoESpec

# HF model types whose multimodal runs attend bidirectionally during prefill (transformers' token_type_ids mask)
_BIDIRECTIONAL_MM = {"gemma3"}
_GLOBAL, _SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class DecoderSpec:
    layer_windows: tuple[int | None, ...]   # per layer: keys within this many positions back, or None (global)
    layer_rope: tuple[str | None, ...]      # per layer: the `layer_type` argument of rotary_emb, or None
    sandwich_norms: bool                    # Gemma: post_attention / pre_ / post_feedforward_layernorm
    qk_norm: bool                           # self_attn.q_norm / k_norm over head_dim, before RoPE
    norm_unit_offset: bool                  # RMSNorm output * (1 + weight) (Gemma)
    attn_softcap: float | None
    final_softcap: float | None
    mm_bidirectional: bool
    hidden_act: str
    moe: MoESpec | None = None              # the sparse-MoE layers, or None for a dense decoder

    @property
    def has_sliding(self) -> bool:
        return any(w is not None for w in self.layer_windows)

    @property
    def all_sliding(self) -> bool:
        """Every layer is windowed: only then may KV blocks behind every window be given back (window.py, the
        block manager does it). Gemma 3 has global layers, which read every block, so its blocks always stay."""
        return self.has_sliding and all(w is not None for w in self.layer_windows)

    @property
    def kv_free_window(self) -> int | None:
        """The window behind which a sequence's KV blocks are given back mid-sequence: the largest layer window
        when every layer is windowed (a block is free only once it is behind every layer's window), else None."""
        return max(w for w in self.layer_windows if w is not None) if self.all_sliding else None

    @property
    def rope_kinds(self) -> tuple[str | None, ...]:
        return tuple(dict.fromkeys(self.layer_rope))


def has_bidirectional_mm(hf_model: nn.Module) -> bool:
    """Whether the model's multimodal runs attend bidirectionally in prefill (transformers: `token_type_ids`)."""
    return getattr(getattr(hf_model, "config", None), "model_type", None) in _BIDIRECTIONAL_MM


def read_spec(hf_model: nn.Module, lm: nn.Module) -> DecoderSpec:
    cfg: Any = lm.config
    n = len(lm.layers)
    layer_types = list(getattr(cfg, "layer_types", None) or [_default_layer_type(cfg)] * n)
    unknown = sorted(set(layer_types) - {_GLOBAL, _SLIDING})
    if unknown:
        raise UnsupportedError(f"attention layer types {unknown} are not supported by the engine")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedError("bidirectional text attention (use_bidirectional_attention) is not a decoder")
    window = getattr(cfg, "sliding_window", None)
    if _SLIDING in layer_types and not window:
        raise UnsupportedError("sliding_attention layers without a sliding_window size")
    windows = tuple(int(window) if t == _SLIDING else None for t in layer_types)
    rope_per_type = isinstance(getattr(cfg, "rope_parameters", None), dict) and \
        set(layer_types) <= set(cfg.rope_parameters)
    layer0 = lm.layers[0]
    norm_name = type(layer0.input_layernorm).__name__
    return DecoderSpec(
        layer_windows=windows,
        layer_rope=tuple(layer_types) if rope_per_type else (None,) * n,
        sandwich_norms=hasattr(layer0, "pre_feedforward_layernorm"),
        qk_norm=hasattr(layer0.self_attn, "q_norm") and hasattr(layer0.self_attn, "k_norm"),
        norm_unit_offset=norm_name.startswith("Gemma"),
        attn_softcap=_positive(getattr(cfg, "attn_logit_softcapping", None)),
        final_softcap=_positive(getattr(cfg, "final_logit_softcapping", None)),
        mm_bidirectional=has_bidirectional_mm(hf_model),
        hidden_act=str(getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"),
        moe=_read_moe(cfg, lm.layers),
    )


def _is_moe_block(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def _read_moe(cfg: Any, layers) -> MoESpec | None:
    """The MoE layout, from the modules transformers built. `norm_topk_prob` as the config says; a config without
    it (transformers 5's Qwen3-VL-MoE config drops the field, and its router always renormalises) renormalises."""
    flags = tuple(_is_moe_block(layer.mlp) for layer in layers)
    if not any(flags):
        return None
    block = next(layer.mlp for layer, f in zip(layers, flags) if f)
    e = block.experts
    if hasattr(block, "shared_expert") or hasattr(block, "shared_experts"):
        raise UnsupportedError("MoE blocks with shared experts are not supported by the engine")
    if getattr(e, "has_bias", False) or getattr(e, "is_transposed", False) or not getattr(e, "is_concatenated", True) \
            or getattr(e, "gate_up_proj", None) is None or e.gate_up_proj.dim() != 3:
        raise UnsupportedError(f"{type(e).__name__}: the engine runs fused (E, 2I, hidden) gate/up experts only")
    return MoESpec(layers=flags, num_experts=int(e.gate_up_proj.shape[0]), top_k=int(block.gate.top_k),
                   norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", True)))


def _default_layer_type(cfg: Any) -> str:
    """Every layer's type when the config lists none: windowed when it sets a `sliding_window` (Mistral's rule:
    transformers' MistralModel then windows every layer), unless it switches windows off (`use_sliding_window`)."""
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return _SLIDING
    return _GLOBAL


def _positive(v: Any) -> float | None:
    return float(v) if v else None
