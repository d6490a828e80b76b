"""Which adapter serves which HF `model_type`, and how a model directory or hub id is loaded.

`load_adapter` is the one place that loads weights: all of them with `from_pretrained` (the offline LLM), or one
stage's through shared/models/partial.py. A local path works offline, a hub id works wherever the hub is
reachable.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.gemma3 import Gemma3Adapter
from mmpipe.shared.models.idefics3 import Idefics3Adapter
from mmpipe.shared.models.internvl import InternVLAdapter
from mmpipe.shared.models.llava import LlavaAdapter
from mmpipe.shared.models.llava_next import LlavaNextAdapter
from mmpipe.shared.models.llava_onevision import LlavaOnevisionAdapter
from mmpipe.shared.models.mistral3 import Mistral3Adapter
from mmpipe.shared.models.partial import STAGE_PARTS, HeldWeights, held_bytes, load_part
from mmpipe.shared.models.qwen2_5_omni import Qwen25OmniThinkerAdapter
from mmpipe.shared.models.qwen2_audio import Qwen2AudioAdapter
from mmpipe.shared.models.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter
from mmpipe.shared.models.qwen_vl import Qwen25VLAdapter, Qwen2VLAdapter
from mmpipe.shared.models.smolvlm import SmolVLMAdapter
from mmpipe.shared.models.voxtral import VoxtralAdapter

logger = logging.getLogger(__name__)

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Qwen2AudioAdapter, LlavaOnevisionAdapter,
    Qwen25OmniThinkerAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter, Gemma3Adapter, Idefics3Adapter, SmolVLMAdapter,
    LlavaNextAdapter, InternVLAdapter, Mistral3Adapter, VoxtralAdapter,
)
_BY_MODEL_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}
FAMILIES = tuple(cls.family for cls in ADAPTERS)


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_BY_MODEL_TYPE))}") from None


@dataclass(frozen=True)
class ResolvedModel:
    """What `model`'s config names: the adapter class, the config of the model mmpipe serves, and where the
    checkpoint keeps that model's tensors ("" at the top; `thinker.` for a full Qwen2.5-Omni checkpoint, whose
    talker and token2wav mmpipe never builds or reads)."""

    cls: type[ModelAdapter]
    config: Any
    prefix: str = ""


def resolve_model(model: str, *, trust_remote_code: bool = False) -> ResolvedModel:
    """The one place a model directory's (or hub id's) config is mapped to its family."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    cls = adapter_class_for(config.model_type)
    sub = cls.served_submodel.get(config.model_type)
    if sub is None:
        return ResolvedModel(cls, config)
    return ResolvedModel(cls, getattr(config, f"{sub}_config"), f"{sub}.")


def load_processor(model: str, cls: type[ModelAdapter], *, trust_remote_code: bool = False) -> Any:
    """The HF processor of `model`, as every stage and the gateway load it (with the family's own keywords)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, **cls.processor_kwargs)


def resolve_dtype(dtype: Any, device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16}
    if dtype not in names:
        raise UnsupportedError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_adapter(model: str, *, dtype: Any = "auto", device: str | None = "auto",
                 mm_processor_kwargs: dict | None = None, trust_remote_code: bool = False,
                 part: str = "all") -> ModelAdapter:
    """Load processor + model for `model` (local dir or hub id) and wrap them in the family's adapter.

    `part`: "all" (the offline LLM: every weight, through `from_pretrained`), or one stage's weights only —
    "towers" (the encoder) or "lm" (the generator) — read from the safetensors checkpoint into a model whose
    other modules stay on the meta device (shared/models/partial.py)."""
    t0 = time.perf_counter()
    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    cls = resolved.cls
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    auto = _auto_class(cls)
    if part == "all" and not resolved.prefix:
        hf_model = auto.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(dev).eval()
    elif part == "all":  # a sub-model of the checkpoint: both parts of it, and none of the rest, are read
        hf_model = _load_stage_model(model, resolved, STAGE_PARTS, torch_dtype, dev, trust_remote_code)
    elif part in STAGE_PARTS:
        hf_model = _load_stage_model(model, resolved, (part,), torch_dtype, dev, trust_remote_code)
    else:
        raise UnsupportedError(f"unknown model part {part!r}; use all, {', '.join(STAGE_PARTS)}", param="part")
    processor = load_processor(model, cls, trust_remote_code=trust_remote_code)
    adapter = cls(hf_model, processor, mm_processor_kwargs=mm_processor_kwargs, device=_concrete(dev), part=part)
    logger.info("loaded %s (%s, %s on %s) in %.2f s; %s", model, cls.family, torch_dtype, dev,
                time.perf_counter() - t0, held_weights(adapter))
    return adapter


def held_weights(adapter: ModelAdapter) -> HeldWeights:
    """What `adapter`'s model holds: bytes off the meta device, its part and that part's modules."""
    modules = adapter.part_modules(adapter.part) if adapter.part in STAGE_PARTS else ()
    return HeldWeights(held_bytes(adapter.model), adapter.part, modules)


def _concrete(device: str):
    """`cuda` as the device tensors moved there land on (`cuda:N`), so the recorded device equals theirs."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _auto_class(cls: type[ModelAdapter]):
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    return AutoModelForMultimodalLM if cls.auto_class == "multimodal_lm" else AutoModelForImageTextToText


def _load_stage_model(model: str, resolved: ResolvedModel, parts: tuple[str, ...], dtype: Any, device: str,
                      trust_remote_code: bool):
    """A meta-device skeleton of the served model with only `parts`' weights read and placed on `device`."""
    import torch
    from transformers import GenerationConfig

    cls = resolved.cls
    with torch.device("meta"):
        skeleton = _auto_class(cls).from_config(resolved.config, dtype=dtype, trust_remote_code=trust_remote_code)
    modules = tuple(m for p in parts for m in cls.part_modules(p))
    hf_model = load_part(model, skeleton, modules, {p: cls.part_modules(p) for p in STAGE_PARTS},
                         _concrete(device), resolved.prefix).eval()
    # from_pretrained reads generation_config.json (the EOS ids the engine stops on); from_config cannot
    try:
        hf_model.generation_config = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json: keep the one derived from the model config, as from_pretrained
        pass
    return hf_model
