"""A model's safetensors checkpoint, addressed by the model's own parameter names, read one tensor at a time.

Owns two things:
  - finding the checkpoint of a local directory or hub id: the shard index's weight map when there is one
    (then only the shards holding wanted tensors are opened, or downloaded), else the single file, whose
    header alone lists its keys;
  - naming every checkpoint key by the parameter it loads into (after a sub-model prefix such as `thinker.`), with transformers' own conversion mapping
    (`get_model_conversion_mapping` + `rename_source_key`, what `from_pretrained` applies), so checkpoints
    written by older versions (`visual.*`, `model.layers.*`, `language_model.model.*`) and by transformers 5
    (`model.visual.*`, `model.language_model.*`) both resolve.
`read` fetches only the tensors asked for (`safe_open(...).get_tensor(key)`): no other tensor's bytes are read; a
tensor given a `TensorSlice` is read through `get_slice`, so only that range's bytes are (a tensor-parallel rank's
shard: shared/engine/tp/sharding.py).
A conversion that maps one stored tensor to one parameter by transposes only (Qwen3-VL-MoE's experts, stored
(E, hidden, 2I) and loaded as (E, 2I, hidden)) is applied on read, as transformers' `Transpose` op does; a
conversion that fuses or splits several tensors is not (`check_readable` names the parameter).
Must not: build models or decide which parameters a stage needs (shared/models/partial.py does).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpipe.shared.errors import ModelLoadError, UnsupportedError

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """Where one parameter's tensor lives: the shard's file name and the key inside it."""

    shard: str
    key: str
    # one-to-one conversions done on read: (dim0, dim1) transposes, in order, each only while the tensor's shape
    # is not `shape` (transformers' `Transpose(check_dims=True)`; without the check it always transposes)
    transposes: tuple[tuple[int, int, bool], ...] = ()
    shape: tuple[int, ...] = ()

    def convert(self, t: torch.Tensor) -> torch.Tensor:
        for d0, d1, check in self.transposes:
            if not (check and tuple(t.shape) == self.shape):
                t = t.transpose(d0, d1).contiguous()
        return t


@dataclass(frozen=True)
class TensorSlice:
    """Rows [start, stop) of dimension `dim` of a stored tensor, zero-padded to `size` along it (the last
    vocabulary shard of a tensor-parallel rank when the vocabulary does not divide evenly)."""

    dim: int
    start: int
    stop: int
    size: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The same range of an in-memory tensor (a copy: the full tensor can be freed)."""
        return self._pad(t.narrow(self.dim, self.start, self.stop - self.start).clone())

    def read(self, stored: Any) -> torch.Tensor:
        """The range of a safetensors `get_slice` handle: only its bytes are read."""
        index = (slice(None),) * self.dim + (slice(self.start, self.stop),)
        return self._pad(stored[index])

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        missing = self.size - (self.stop - self.start)
        if missing <= 0:
            return t.contiguous()
        shape = list(t.shape)
        shape[self.dim] = missing
        return torch.cat([t, t.new_zeros(shape)], dim=self.dim)


class Checkpoint:
    """The safetensors checkpoint of `model` (local dir or hub id), keyed by `hf_model`'s parameter names.

    `hf_model` may be a weightless meta-device skeleton: only its names and its conversion mapping are used.
    """

    def __init__(self, model: str, hf_model: nn.Module, prefix: str = ""):
        """`prefix`: the checkpoint holds `hf_model` under it (a full Qwen2.5-Omni checkpoint keeps its thinker
        under `thinker.`); keys outside it belong to other sub-models (talker, token2wav) and are never read."""
        self.model = model
        self._paths: dict[str, str] = {}
        self.stored, self._converted = _by_parameter_name(hf_model, self._list_keys(), prefix)

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def check_readable(self, names: Iterable[str]) -> None:
        """Raise ModelLoadError naming every one of `names` that cannot be read from this checkpoint."""
        missing = [n for n in names if n not in self.stored]
        converted = [f"{n} (from {self._converted[n]})" for n in missing if n in self._converted]
        if converted:
            raise ModelLoadError(
                f"{self.model}: {', '.join(converted)} need transformers' weight conversions (fused or split "
                "tensors); a stage cannot load them alone (the offline LLM, which loads everything, can)")
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ModelLoadError(f"{self.model}: the checkpoint has no tensor for {shown}")

    def read(self, names: Iterable[str], device: torch.device | str = "cpu",
             slices: Mapping[str, TensorSlice] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, tensor) for each of `names`, each shard opened once; nothing else is read.

        `slices`: names read as one contiguous range of one dimension (zero-padded to its `size`)."""
        slices = slices or {}
        names = list(names)
        self.check_readable(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self.stored[name].shard].append(name)
        from safetensors import safe_open

        for shard, shard_names in sorted(by_shard.items()):
            with safe_open(self._path(shard), framework="pt", device=str(device)) as f:
                for name in shard_names:
                    where, sl = self.stored[name], slices.get(name)
                    if sl is not None and where.transposes:
                        raise UnsupportedError(f"{name}: a converted (transposed) tensor cannot be read as a "
                                               "tensor-parallel slice")
                    yield name, (where.convert(f.get_tensor(where.key)) if sl is None
                                 else sl.read(f.get_slice(where.key)))

    # ---- files ----------------------------------------------------------------------------------------------
    def _list_keys(self) -> dict[str, list[str]]:
        """shard file name -> its keys, from the index when there is one (no shard is opened for it)."""
        index = self._find(_INDEX)
        if index is not None:
            with open(index, encoding="utf-8") as fh:
                weight_map: dict[str, str] = json.load(fh)["weight_map"]
            out: dict[str, list[str]] = defaultdict(list)
            for key, shard in weight_map.items():
                out[shard].append(key)
            return dict(out)
        single = self._find(_SINGLE)
        if single is None:
            raise ModelLoadError(f"{self.model} has no safetensors checkpoint ({_SINGLE} or {_INDEX}); loading only "
                                 "one stage's weights needs safetensors")
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:  # reads the header only
            return {_SINGLE: list(f.keys())}

    def _find(self, filename: str) -> str | None:
        if os.path.isdir(self.model):
            path = os.path.join(self.model, filename)
            return path if os.path.isfile(path) else None
        from transformers.utils import cached_file

        return cached_file(self.model, filename, _raise_exceptions_for_missing_entries=False)

    def _path(self, shard: str) -> str:
        if shard not in self._paths:
            path = self._find(shard)
            if path is None:
                raise ModelLoadError(f"{self.model}: the checkpoint index names the shard {shard!r}, which is missing")
            self._paths[shard] = path
        return self._paths[shard]


def _by_parameter_name(hf_model: nn.Module, shard_keys: dict[str, list[str]], prefix: str = ""
                       ) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(parameter or persistent buffer name -> where it is stored, name -> key that needs a conversion).

    Keys are renamed with transformers' own conversions. Keys that load into no parameter of this model
    (another sub-model's, a talker's) are left out. A key that transformers would fuse or split with others (a
    `WeightConverter`: merged experts, qkv) is not one parameter's tensor: it is kept apart, an error only for
    a stage that needs the parameter it would produce."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(hf_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = hf_model.state_dict()  # on a meta skeleton: names and shapes, no memory
    model_prefix = getattr(hf_model, "base_model_prefix", None)
    out: dict[str, StoredTensor] = {}
    converted_keys: dict[str, str] = {}
    for shard, keys in shard_keys.items():
        for stored_key in keys:
            if not stored_key.startswith(prefix):
                continue  # another sub-model's tensor
            key = stored_key[len(prefix):]
            name, converted = rename_source_key(key, renamings, converters, model_prefix, names)
            if name not in names and key in names:  # the same fallback as from_pretrained: the key is already a name
                name, converted = rename_source_key(key, [], [], model_prefix, names)
            if name not in names:
                continue
            if converted is None:
                out[name] = StoredTensor(shard, stored_key)
                continue
            conv = next(c for c in converters if converted in c.source_patterns)
            ops = getattr(conv, "operations", None) or []
            if len(conv.source_patterns) == len(conv.target_patterns) == 1 and ops \
                    and all(type(op) is Transpose for op in ops):
                out[name] = StoredTensor(shard, stored_key, tuple((op.dim0, op.dim1, op.check_dims) for op in ops),
                                         tuple(names[name].shape))
            else:
                converted_keys[name] = stored_key
    return out, converted_keys
