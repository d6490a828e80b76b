"""Megatron-style sharding of the text decoder for tensor parallelism: which slice of which weight a rank holds,
and building a rank's shard straight from the safetensors checkpoint.

Per decoder layer: q/k/v and gate/up are column-parallel (each rank holds its heads' / its intermediate
columns' output rows, biases included), o_proj and down_proj row-parallel (their input columns; a bias only on
rank 0, so the all-reduce adds it once). The KV heads are split across ranks, or replicated (each rank one
whole KV head, shared by `size / num_kv_heads` ranks) when there are fewer KV heads than ranks. The embedding
and the LM head are vocab-parallel: each rank holds `ceil(vocab / size)` rows (the last shard zero-padded so
every rank's logits have one shape). Norms, q/k norms and rotary tables are replicated.

A shard is the HF modules themselves with smaller weights (`nn.Linear` with fewer rows or columns), so the
decoder and the ops layer run one code path for every size; only the collectives are added (tp/group.py).
Must not: start processes (tp/workers.py) or run collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.checkpoint import TensorSlice


@dataclass(frozen=True)
class TPLayout:
    """What one rank of `size` holds: its q heads, KV heads, intermediate columns and vocabulary rows."""

    rank: int
    size: int
    num_heads: int          # whole model
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        s = self.size
        if self.num_heads % s:
            raise UnsupportedError(f"tensor_parallel_size {s} must divide the {self.num_heads} attention heads",
                                   param="tensor_parallel_size")
        if self.num_kv_heads % s and s % self.num_kv_heads:
            raise UnsupportedError(f"tensor_parallel_size {s} and the {self.num_kv_heads} KV heads: one must divide "
                                   "the other", param="tensor_parallel_size")
        if self.intermediate_size % s:
            raise UnsupportedError(f"tensor_parallel_size {s} must divide the MLP's intermediate size "
                                   f"{self.intermediate_size}", param="tensor_parallel_size")

    @property
    def heads(self) -> int:
        return self.num_heads // self.size

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        if self.num_kv_heads >= self.size:
            return self.rank * self.kv_heads
        return self.rank // (self.size // self.num_kv_heads)  # replicated: ranks share a KV head

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return min(self.rank * self.vocab_per_rank, self.vocab_size)

    @property
    def vocab_stop(self) -> int:
        return min(self.vocab_start + self.vocab_per_rank, self.vocab_size)


def _find_lm(hf_model: nn.Module) -> tuple[str, nn.Module, str]:
    """(text decoder's module path, the module, the LM head's path) inside `hf_model`."""
    from mmpipe.shared.engine.decoder import _find_text_decoder

    lm = _find_text_decoder(hf_model)
    head = hf_model.lm_head if hasattr(hf_model, "lm_head") else hf_model.get_output_embeddings()
    names = {id(m): n for n, m in hf_model.named_modules()}
    return names[id(lm)], lm, names[id(head)]


def layout_of(hf_model: nn.Module, rank: int, size: int) -> TPLayout:
    _, lm, head_name = _find_lm(hf_model)
    cfg = lm.config
    layer0 = lm.layers[0]
    vocab = int(hf_model.get_submodule(head_name).weight.shape[0])
    return TPLayout(rank, size, int(cfg.num_attention_heads),
                    int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                    int(layer0.self_attn.head_dim), int(layer0.mlp.gate_proj.out_features), vocab)


def shard_plan(hf_model: nn.Module, layout: TPLayout) -> tuple[dict[str, TensorSlice], set[str]]:
    """(parameter name -> the slice this rank holds, row-parallel biases this rank drops)."""
    lm_name, lm, head_name = _find_lm(hf_model)
    D, L = layout.head_dim, layout
    q = (L.rank * L.heads * D, (L.rank + 1) * L.heads * D)
    kv = (L.kv_head_start * D, (L.kv_head_start + L.kv_heads) * D)
    inter = L.intermediate_size // L.size
    ff = (L.rank * inter, (L.rank + 1) * inter)
    plan: dict[str, TensorSlice] = {}
    dropped: set[str] = set()

    def cut(module_path: str, module: nn.Module, dim: int, span: tuple[int, int], bias: str) -> None:
        """dim 0: column-parallel (bias sliced alike); dim 1: row-parallel (bias kept whole on rank 0)."""
        if not isinstance(module, nn.Linear):
            raise UnsupportedError(f"{module_path} is a {type(module).__name__}; tensor parallelism shards "
                                   "nn.Linear projections only")
        plan[f"{module_path}.weight"] = TensorSlice(dim, span[0], span[1], span[1] - span[0])
        if module.bias is not None:
            if bias == "slice":
                plan[f"{module_path}.bias"] = TensorSlice(0, span[0], span[1], span[1] - span[0])
            elif L.rank:
                dropped.add(f"{module_path}.bias")

    for i, layer in enumerate(lm.layers):
        p = f"{lm_name}.layers.{i}"
        a, m = layer.self_attn, layer.mlp
        missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(m, n)]
        if missing:
            raise UnsupportedError(f"{p}.mlp has no {', '.join(missing)}: tensor parallelism needs separate "
                                   "gate / up / down projections")
        cut(f"{p}.self_attn.q_proj", a.q_proj, 0, q, "slice")
        cut(f"{p}.self_attn.k_proj", a.k_proj, 0, kv, "slice")
        cut(f"{p}.self_attn.v_proj", a.v_proj, 0, kv, "slice")
        cut(f"{p}.self_attn.o_proj", a.o_proj, 1, q, "rank0")
        cut(f"{p}.mlp.gate_proj", m.gate_proj, 0, ff, "slice")
        cut(f"{p}.mlp.up_proj", m.up_proj, 0, ff, "slice")
        cut(f"{p}.mlp.down_proj", m.down_proj, 1, ff, "rank0")
    vocab = TensorSlice(0, L.vocab_start, L.vocab_stop, L.vocab_per_rank)
    plan[f"{lm_name}.embed_tokens.weight"] = vocab
    plan[f"{head_name}.weight"] = vocab
    if getattr(hf_model.get_submodule(head_name), "bias", None) is not None:
        plan[f"{head_name}.bias"] = vocab
    return plan, dropped


def reshape_skeleton(skeleton: nn.Module, plan: dict[str, TensorSlice], dropped: set[str]) -> None:
    """Give the meta skeleton's sharded parameters their shard's shape (tied ones stay one parameter), drop the
    row-parallel biases this rank does not hold, and update the modules' size attributes."""
    memo: dict[int, nn.Parameter] = {}
    for name, sl in plan.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = skeleton.get_submodule(mod_name)
        old = mod._parameters[leaf]
        new = memo.get(id(old))
        if new is None:
            shape = list(old.shape)
            shape[sl.dim] = sl.size
            new = memo[id(old)] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                               requires_grad=False)
        mod._parameters[leaf] = new
        if isinstance(mod, nn.Linear) and leaf == "weight":
            mod.out_features, mod.in_features = new.shape
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings = new.shape[0]
            mod.padding_idx = None  # an index of the whole vocabulary; it only matters for gradients
    for name in dropped:
        mod_name, _, leaf = name.rpartition(".")
        setattr(skeleton.get_submodule(mod_name), leaf, None)


@dataclass(frozen=True)
class ShardSource:
    """Where a rank reads its shard: the checkpoint (local dir or hub id), dtype, device."""

    model: str
    dtype: torch.dtype
    device: str
    trust_remote_code: bool = False


def load_lm_shard(source: ShardSource, rank: int, size: int) -> nn.Module:
    """The served model with only rank `rank`'s shard of the LM read (safetensors `get_slice`: never a whole
    sharded tensor) and placed on `source.device`; the towers stay on the meta device. The model records its
    layout as `mmpipe_tp_layout`."""
    from mmpipe.shared.models.partial import STAGE_PARTS, load_part
    from mmpipe.shared.models.registry import _auto_class, resolve_model

    resolved = resolve_model(source.model, trust_remote_code=source.trust_remote_code)
    cls = resolved.cls
    with torch.device("meta"):
        skeleton = _auto_class(cls).from_config(resolved.config, dtype=source.dtype,
                                                trust_remote_code=source.trust_remote_code)
    layout = layout_of(skeleton, rank, size)
    plan, dropped = shard_plan(skeleton, layout)
    reshape_skeleton(skeleton, plan, dropped)
    model = load_part(source.model, skeleton, cls.part_modules("lm"), {p: cls.part_modules(p) for p in STAGE_PARTS},
                      torch.device(source.device), resolved.prefix, slices=plan).eval()
    model.mmpipe_tp_layout = layout
    try:  # the EOS ids the engine stops on by default, as from_pretrained reads them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source.model)
    except OSError:
        pass
    return model


def shard_source_of(hf_model: nn.Module, config: Any) -> ShardSource:
    """The checkpoint every rank reads: `EngineConfig.model`, else the model's own `name_or_path`."""
    name = config.model or getattr(hf_model, "name_or_path", None) or getattr(
        getattr(hf_model, "config", None), "_name_or_path", None)
    if not name:
        raise UnsupportedError("tensor parallelism reads each rank's shard from the checkpoint: set "
                               "EngineConfig.model (the model was not loaded from a path)", param="model")
    return ShardSource(str(name), config.dtype, config.device)
