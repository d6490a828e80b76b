"""SmolVLM (SmolVLM / SmolVLM2): Idefics3's architecture and image prompt layout (shared/models/idefics3.py), a
Llama decoder, images only.

transformers' SmolVLM processor also takes video, but writes it as free text around the frames: an intro with
the frame count in words and the clip's duration, a "Frame from MM:SS:" line before each frame and a closing
"\\n\\n". That text is tokenized together with the prompt text around the placeholder (byte-level BPE merges
across the boundary: "\\n\\n" before a word is two tokens, alone it may be one), so the expansion, done here
on token ids for every item (cached items carry no pixels and no text), would not be token-identical to the
processor's. Video needs the placeholder expanded as text before tokenization; until then it is refused.
"""
from __future__ import annotations

from mmpipe.shared.models.idefics3 import Idefics3Adapter


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    modalities = ("image",)
