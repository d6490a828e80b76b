"""Which adapter serves which HF `model_type`, and how a model directory or hub id is loaded.

`load_adapter` is the one place that calls `from_pretrained`: a local path works offline, a hub id works
wherever the hub is reachable.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.llava import LlavaAdapter
from mmpipe.shared.models.llava_onevision import LlavaOnevisionAdapter
from mmpipe.shared.models.qwen2_5_omni import Qwen25OmniThinkerAdapter
from mmpipe.shared.models.qwen2_audio import Qwen2AudioAdapter
from mmpipe.shared.models.qwen_vl import Qwen25VLAdapter, Qwen2VLAdapter

logger = logging.getLogger(__name__)

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Qwen2AudioAdapter, LlavaOnevisionAdapter,
    Qwen25OmniThinkerAdapter,
)
_BY_MODEL_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}
FAMILIES = tuple(cls.family for cls in ADAPTERS)


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_BY_MODEL_TYPE))}") from None


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
                 mm_processor_kwargs: dict | None = None, trust_remote_code: bool = False) -> ModelAdapter:
    """Load processor + model for `model` (local dir or hub id) and wrap them in the family's adapter."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    cls = adapter_class_for(config.model_type)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    auto = AutoModelForMultimodalLM if cls.auto_class == "multimodal_lm" else AutoModelForImageTextToText
    hf_model = auto.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(dev).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    adapter = cls(hf_model, processor, mm_processor_kwargs=mm_processor_kwargs)
    logger.info("loaded %s (%s, %s on %s) in %.2f s", model, cls.family, torch_dtype, dev, time.perf_counter() - t0)
    return adapter
