"""mmpipe: a multimodal LLM serving pipeline. The offline API: `from mmpipe import LLM, SamplingParams`."""
from __future__ import annotations

from mmpipe.shared.structured import StructuredOutputsParams
from mmpipe.shared.types import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers; keep `import mmpipe` light for the gateway and the CLI.
    if name == "LLM":
        from mmpipe.llm import LLM

        return LLM
    raise AttributeError(name)
