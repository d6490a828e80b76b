"""Load a model family's adapter for PREPROCESSING only: processor + config, weights on the meta device.

The ingest service runs `adapter.preprocess` (the HF processor, CPU) and nothing else, so it must not pay
for the weights (a 7B model would cost 15-30 GB of RAM in every ingest replica). The model object is built
from its config under `torch.device("meta")`: no memory, no file reads beyond config and processor files.
`encode`, `mrope_positions` and anything else that touches weights must not be called on it.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from mmpipe.shared.models.base import ModelAdapter
from mmpipe.shared.models.registry import load_processor, resolve_model

logger = logging.getLogger(__name__)


def load_preprocess_adapter(model: str, *, mm_processor_kwargs: dict | None = None,
                            trust_remote_code: bool = False) -> ModelAdapter:
    """The family adapter of `model` (local dir or hub id) with a weightless (meta-device) model."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM

    t0 = time.perf_counter()
    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    cls = resolved.cls
    auto = AutoModelForMultimodalLM if cls.auto_class == "multimodal_lm" else AutoModelForImageTextToText
    with torch.device("meta"):
        hf_model = auto.from_config(resolved.config, trust_remote_code=trust_remote_code).eval()
    processor = load_processor(model, cls, trust_remote_code=trust_remote_code)
    adapter = cls(hf_model, processor, mm_processor_kwargs=mm_processor_kwargs)
    logger.info("loaded %s processor (%s, no weights) in %.2f s", model, cls.family, time.perf_counter() - t0)
    return adapter
