"""PagedDecoder: our own forward of an HF text decoder (Llama / Qwen2 / Qwen2-VL / Gemma 3 family) over a
flat, variable-length batch, reusing the HF modules' weights in place (nothing is copied).

It reads `model.model.language_model` (embed_tokens, layers, norm, rotary_emb) and `model.lm_head`. Rotary
cos/sin come from the model's own `rotary_emb` (so M-RoPE sections, interleaved or not, are exact, and Gemma's
per-layer-type tables too); positions are (T,) or, for M-RoPE models, (3, T). Attention goes through the paged
KV cache via an attention backend, with each layer's window (model_spec.py: sliding layers, soft-caps, Gemma's
layout). Idefics3 / SmolVLM name the decoder `model.model.text_model`.

Qwen3-style attention RMS-normalises q and k per head before RoPE (`q_norm` / `k_norm`, used when the layer
has them). DeepStack (Qwen3-VL): a multimodal row is `hidden * (1 + num_deepstack)` wide, the base embedding
then one feature per deepstack layer (vLLM's layout); feature j is added to the hidden states at the row's
position after decoder layer j, as transformers' `_deepstack_process` does. Sparse-MoE layers (Qwen3-VL-MoE)
run the router and the experts of moe.py (`feed_forward`), on either op set.

Tensor parallelism (`tp`, tp/): the modules hold one rank's shard (tp/sharding.py), so the same forward runs
on each rank over its heads and MLP columns; only four things are added: the vocab-parallel embedding's
all-reduce, one all-reduce after o_proj and one after the MLP (row-parallel), and the gather of the logits to
rank 0 (None on the other ranks). With `tp` None (size 1) none of it runs.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from mmpipe.shared.errors import UnsupportedError

from .attention.base import AttentionBackend, AttentionMetadata
from .model_spec import DecoderSpec, read_spec


def _find_text_decoder(hf_model: nn.Module) -> nn.Module:
    inner = getattr(hf_model, "model", hf_model)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        lm = getattr(inner, "text_model", None)  # Idefics3 / SmolVLM
    if lm is None and hasattr(inner, "layers"):
        lm = inner  # a plain *ForCausalLM
    if lm is None or not hasattr(lm, "layers"):
        raise UnsupportedError(f"cannot find the text decoder of {type(hf_model).__name__}")
    return lm


class PagedDecoder:
    def __init__(self, hf_model: nn.Module, tp: Any = None):
        lm = _find_text_decoder(hf_model)
        self.lm = lm
        self.embed_tokens: nn.Embedding = lm.embed_tokens
        self.layers = list(lm.layers)
        self.norm = lm.norm
        self.rotary_emb = lm.rotary_emb
        self.lm_head = hf_model.lm_head if hasattr(hf_model, "lm_head") else hf_model.get_output_embeddings()
        cfg = lm.config
        attn0 = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(attn0.head_dim)
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.hidden_size = int(cfg.hidden_size)
        vision = getattr(getattr(hf_model, "config", None), "vision_config", None)
        self.num_deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        if self.num_deepstack > len(self.layers):
            raise UnsupportedError(f"{self.num_deepstack} deepstack features for {len(self.layers)} decoder layers")
        # the width of one multimodal row: the base embedding and each deepstack feature
        self.mm_width = self.hidden_size * (1 + self.num_deepstack)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.tp = tp  # tp/group.TPShard, or None
        if tp is not None:  # this rank's heads; the vocabulary stays the whole model's
            self.num_heads, self.num_kv_heads = tp.layout.heads, tp.layout.kv_heads
            self.vocab_size = tp.layout.vocab_size
        self.max_position_embeddings = int(getattr(cfg, "max_position_embeddings", 4096))
        self.spec: DecoderSpec = read_spec(hf_model, lm)
        self.hidden_act = self.spec.hidden_act
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        section = getattr(self.rotary_emb, "mrope_section", None) or rope.get("mrope_section")
        self.mrope_section: list[int] | None = list(section) if section else None
        module = sys.modules[type(attn0).__module__]
        self.apply_rotary = getattr(module, "apply_rotary_pos_emb")
        p = next(lm.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def is_mrope(self) -> bool:
        return self.mrope_section is not None

    # ---- pieces ----------------------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, like: torch.Tensor, layer_type: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim) for positions (T,) or (3, T); `layer_type` picks Gemma's table."""
        T = positions.shape[-1]
        pid = positions.reshape(3, 1, T) if self.is_mrope else positions.reshape(1, T)
        cos, sin = self.rotary_emb(like, pid) if layer_type is None else self.rotary_emb(like, pid, layer_type)
        if cos.dim() == 4:  # older transformers return per-row tables: pick the M-RoPE sections ourselves
            sec = self.mrope_section * 2
            cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sec, dim=-1))], dim=-1)
            sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sec, dim=-1))], dim=-1)
        return cos.reshape(T, -1), sin.reshape(T, -1)

    def embed(self, input_ids: torch.Tensor, mm_index: torch.Tensor | None, mm_rows: torch.Tensor | None):
        if self.tp is None:
            h = self.embed_tokens(input_ids)
        else:
            h = self.tp.group.embed(self.embed_tokens, input_ids, self.tp.layout)
        if mm_index is not None:
            # the multimodal rows replace the placeholder embeddings (their deepstack columns come later)
            h[mm_index] = mm_rows[:, :self.hidden_size].to(h.dtype)
        return h

    def deepstack(self, mm_rows: torch.Tensor | None) -> torch.Tensor | None:
        """(N, num_deepstack, hidden) features of the multimodal rows, or None (no rows, no DeepStack)."""
        if mm_rows is None or not self.num_deepstack:
            return None
        return mm_rows[:, self.hidden_size:].reshape(mm_rows.shape[0], self.num_deepstack, self.hidden_size)

    def feed_forward(self, i: int, x: torch.Tensor, mlp: nn.Module, ops: Any) -> torch.Tensor:
        """Layer i's MLP: dense, or the sparse-MoE block (router + experts, moe.py) where the spec says so."""
        moe = self.spec.moe
        if moe is not None and moe.layers[i]:
            return ops.moe(x, mlp, moe)
        return ops.mlp(i, x, mlp)

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.tp is None else self.tp.group.all_reduce(h)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, attn: AttentionBackend, ops: Any,
                mm_index: torch.Tensor | None = None, mm_rows: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, vocab) at `logits_index` rows (all rows when None); kv_cache (2, layers, blocks, bs, KVH, D).

        `inputs_embeds` (T, hidden), when given, replaces the embedding of `input_ids` (and the mm rows).
        `logits_out` (R, vocab), when given, receives the logits: CUDA graphs of every size share one buffer
        instead of each keeping its own in the graph pool."""
        h = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, mm_index, mm_rows)
        ds = self.deepstack(mm_rows)
        if ds is not None and inputs_embeds is not None:
            raise UnsupportedError("DeepStack rows need the eager forward (the multimodal rows, not inputs_embeds)")
        spec, tp = self.spec, self.tp
        tables = {kind: self.rotary(positions, h, kind) for kind in spec.rope_kinds}
        T = h.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = ops.add_norm(h, residual, layer.input_layernorm)
            a = layer.self_attn
            q, k, v = ops.qkv(i, a, x)
            q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
            if spec.qk_norm:  # Qwen3 / Gemma 3: RMSNorm over each head's q and k, before RoPE
                q, k = ops.norm(q, a.q_norm), ops.norm(k, a.k_norm)
            kc, vc = kv_cache[0, i], kv_cache[1, i]
            cos, sin = tables[spec.layer_rope[i]]
            q, k = ops.rope_and_cache(q, k, v, cos, sin, kc, vc, meta.slot_mapping)
            o = attn.forward(q, k, v, kc, vc, meta, window=spec.layer_windows[i])
            h = a.o_proj(o.reshape(T, H * D))
            if tp is not None:  # row-parallel: each rank holds a partial sum
                tp.group.all_reduce(h)
            if spec.sandwich_norms:  # Gemma: norm the branch output, then add; norm again before the MLP
                x, residual = ops.add_norm(ops.norm(h, layer.post_attention_layernorm), residual,
                                           layer.pre_feedforward_layernorm)
                h = ops.norm(self._reduce(self.feed_forward(i, x, layer.mlp, ops)),
                             layer.post_feedforward_layernorm)
            else:
                x, residual = ops.add_norm(h, residual, layer.post_attention_layernorm)
                h = self._reduce(self.feed_forward(i, x, layer.mlp, ops))
            if ds is not None and i < self.num_deepstack:
                # transformers adds the feature to the layer's output (residual + mlp) at the image rows; summing
                # here, in that order, keeps its numerics, and the next add_norm starts from the sum
                h = residual + h
                h[mm_index] += ds[:, i].to(h.dtype)
                residual = None
        if residual is None:  # the last layer was a deepstack layer: h holds the whole stream
            h, residual = torch.zeros_like(h), h
        if logits_index is not None:
            h, residual = h.index_select(0, logits_index), residual.index_select(0, logits_index)
        x, _ = ops.add_norm(h, residual, self.norm)
        if logits_out is None or self.lm_head.bias is not None:
            logits = self.lm_head(x)
        else:
            logits = torch.mm(x, self.lm_head.weight.t(), out=logits_out)
        if tp is not None:
            logits = tp.group.gather_logits(logits, tp.layout)
            if logits is None:  # not rank 0: it does not sample
                return None
        if spec.final_softcap is not None:  # in place, so a CUDA graph's shared logits buffer holds the result
            c = spec.final_softcap
            logits.div_(c).tanh_().mul_(c)
        return logits
