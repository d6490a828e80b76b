"""`from mmpipe.sampling_params import SamplingParams, StructuredOutputsParams`, where vLLM has them."""
from __future__ import annotations

from mmpipe.shared.structured import StructuredOutputsParams
from mmpipe.shared.types import SamplingParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]
