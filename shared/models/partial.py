"""Build a model that holds only one stage's weights: the encoder's towers or the generator's LM.

The model is built from its config on the meta device (no memory), then only the parameters under the
adapter's modules for the part (`ModelAdapter.part_modules`) are read from the safetensors checkpoint
(shared/models/checkpoint.py) and placed on the target device; everything else stays on meta, zero bytes.

What `from_pretrained` does after reading tensors is redone here for the part only, with transformers' own
pieces: tied parameters are tied through the model's `all_tied_weights_keys` (so `lm_head.weight` comes
from `embed_tokens.weight` when the checkpoint stores one copy), and buffers the checkpoint does not hold
(non-persistent ones: rotary `inv_freq`, CLIP `position_ids`, sinusoid tables) are created on the device and
filled by the model's own `initialize_weights` (its `_init_weights`), with every loaded tensor and every module
outside the part flagged as initialised, so nothing else is touched. A buffer that init leaves untouched is
an error, never garbage. A parameter of the part missing from the checkpoint is an error.

Must not: pick the parts (the adapters declare them) or load the whole model (registry.load_adapter does,
for the offline LLM).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mmpipe.shared.errors import ModelLoadError
from mmpipe.shared.models.checkpoint import Checkpoint, TensorSlice

logger = logging.getLogger(__name__)

STAGE_PARTS = ("towers", "lm")


@dataclass(frozen=True)
class HeldWeights:
    """What a loaded model holds off the meta device: bytes (tied tensors once), which part, which modules."""

    bytes: int
    part: str
    modules: tuple[str, ...]

    def __str__(self) -> str:
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 10**8 else f"{self.bytes / 1e6:.2f} MB"
        return f"holds {size} of weights: {self.part} ({', '.join(self.modules) or 'everything'})"


def held_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that are not on the meta device, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def under(name: str, modules: tuple[str, ...]) -> bool:
    """Whether the parameter / buffer `name` belongs to one of the module paths."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_part(model: str, skeleton: nn.Module, modules: tuple[str, ...], all_modules: dict[str, tuple[str, ...]],
              device: torch.device, prefix: str = "", slices: Mapping[str, TensorSlice] | None = None) -> nn.Module:
    """Materialise the parameters and buffers of `skeleton` (a meta-device model of `model`) under `modules`.

    `all_modules` maps every part to its modules: each parameter must belong to exactly one part, so a family
    whose model grew a module no stage declares fails here instead of serving without it. `prefix`: where the
    checkpoint keeps `skeleton`'s tensors (`thinker.` in a full Qwen2.5-Omni checkpoint; see Checkpoint).
    `slices`: parameters read as one range of the stored tensor (a tensor-parallel shard; the skeleton's meta
    parameter already has the shard's shape), never whole."""
    _check_parts_cover(skeleton, all_modules)
    ckpt = Checkpoint(model, skeleton, prefix)
    params = {n: p for n, p in skeleton.named_parameters(remove_duplicate=False) if under(n, modules)}
    tied = _tied_pairs(skeleton)
    to_read = [n for n in params if n in ckpt]
    tied_missing = {n: tied[n] for n in params if n not in ckpt and n in tied and tied[n] in ckpt}
    ckpt.check_readable(n for n in params if n not in ckpt and n not in tied_missing)
    persistent = {n for n in skeleton.state_dict() if under(n, modules)} - set(params)
    buffers_read = [n for n in persistent if n in ckpt]
    loaded: set[str] = set()
    for name, tensor in ckpt.read([*to_read, *{s for s in tied_missing.values() if s not in params},
                                   *buffers_read], device="cpu", slices=slices):
        _place(skeleton, name, tensor, device)
        loaded.add(name)
    for target, source in tied_missing.items():
        _tie(skeleton, target, source)
    _init_buffers(skeleton, modules, loaded, device)
    return skeleton


def _check_parts_cover(skeleton: nn.Module, all_modules: dict[str, tuple[str, ...]]) -> None:
    orphans, doubles = [], []
    for name, _ in skeleton.named_parameters():
        owners = [part for part, mods in all_modules.items() if under(name, mods)]
        if not owners:
            orphans.append(name)
        elif len(owners) > 1:
            doubles.append(name)
    if orphans or doubles:
        raise ModelLoadError(
            f"{type(skeleton).__name__}: the adapter's stage modules ({all_modules}) leave "
            f"{', '.join(orphans[:5]) or 'no parameter'} to no stage and give {', '.join(doubles[:5]) or 'none'} "
            "to two; fix the family adapter's tower_modules / lm_modules")


def _tied_pairs(skeleton: nn.Module) -> dict[str, str]:
    """Tied parameters both ways (target -> source and source -> target): either copy may be the stored one."""
    pairs = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    return {**{s: t for t, s in pairs.items()}, **pairs}


def _place(skeleton: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Put a checkpoint tensor in place of the meta one, in the skeleton's dtype (what from_pretrained keeps)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = skeleton.get_submodule(mod_name)
    old = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
    if old is None:
        raise ModelLoadError(f"{name} is neither a parameter nor a buffer of {type(skeleton).__name__}")
    if tuple(tensor.shape) != tuple(old.shape):
        raise ModelLoadError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the config builds "
                             f"{tuple(old.shape)}")
    value = tensor.to(device=device, dtype=old.dtype)
    if leaf in mod._parameters:
        param = nn.Parameter(value, requires_grad=old.requires_grad)
        param._is_hf_initialized = True
        mod._parameters[leaf] = param
    else:
        value._is_hf_initialized = True
        mod._buffers[leaf] = value


def _tie(skeleton: nn.Module, target: str, source: str) -> None:
    mod_name, _, leaf = target.rpartition(".")
    setattr(skeleton.get_submodule(mod_name), leaf, skeleton.get_parameter(source))


@torch.no_grad()
def _init_buffers(skeleton: nn.Module, modules: tuple[str, ...], loaded: set[str], device: torch.device) -> None:
    """Create the part's buffers the checkpoint did not give, and fill them with the model's own init."""
    fresh: dict[str, torch.Tensor] = {}
    for name, buf in skeleton.named_buffers():
        if not under(name, modules) or name in loaded:
            continue
        mod_name, _, leaf = name.rpartition(".")
        value = _sentinel_like(buf, device)
        skeleton.get_submodule(mod_name)._buffers[leaf] = value
        fresh[name] = value
    if not fresh:
        return
    owners = {n.rpartition(".")[0] for n in fresh}
    for mod_name, mod in skeleton.named_modules():
        # from_config flagged every module as initialised; only the owners of fresh buffers run their init again
        mod._is_hf_initialized = mod_name not in owners
    skeleton.initialize_weights()
    untouched = [n for n, t in fresh.items() if _is_sentinel(skeleton.get_buffer(n))]
    if untouched:
        raise ModelLoadError(f"{type(skeleton).__name__}: the model's init does not set the buffers "
                             f"{', '.join(untouched)}, so a stage cannot rebuild them; load the whole model")


def _sentinel_like(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    if buf.is_floating_point():
        return torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device)
    if buf.dtype == torch.bool:
        return torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    return torch.full(buf.shape, torch.iinfo(buf.dtype).min, dtype=buf.dtype, device=device)


def _is_sentinel(t: torch.Tensor) -> bool:
    if t.numel() == 0 or t.dtype == torch.bool:
        return False
    if t.is_floating_point():
        return bool(torch.isnan(t).all())
    return bool((t == torch.iinfo(t.dtype).min).all())
