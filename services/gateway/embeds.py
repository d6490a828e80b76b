"""`image_embeds` parts -> the tensors the encoder's PutEmbeddings takes (it validates shape and hidden size).

The encoder's PutEmbeddings takes tensors in mmpipe's own tensor format (serde.pack_tensors, never
pickle), so the base64 payload of a part is turned into tensors here, with the one safe deserialiser
(shared/media/embeds.py: `torch.load(weights_only=True)` or safetensors, size-capped, finite floats).
Model-specific checks (hidden size, rows per grid) stay in the encoder, which owns the adapter.
torch is imported only when a request carries embeddings.
"""
from __future__ import annotations

from typing import Any

from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.inputs.parse import ItemRef


def decode_user_embeds(item: ItemRef) -> Any:
    """A part's payload (base64 tensor, or a dict of base64 tensors / nested lists) as tensor(s)."""
    from mmpipe.shared.media.embeds import decode_tensor_b64

    param = f"{item.modality}_embeds"
    payload = item.source
    if isinstance(payload, str):
        return decode_tensor_b64(payload, param=param)
    if isinstance(payload, dict):
        if not payload:
            raise InvalidInputError(f"{param} dict is empty", param=param)
        return {str(k): _field(v, f"{param}.{k}") for k, v in payload.items()}
    raise InvalidInputError(f"{param} must be a base64 tensor or a dict of them (e.g. {{'{param}': ..., "
                            f"'{item.modality}_grid_thw': ...}}), got {type(payload).__name__}", param=param)


def _field(value: Any, param: str) -> Any:
    import torch

    from mmpipe.shared.media.embeds import decode_tensor_b64

    if isinstance(value, str):
        return decode_tensor_b64(value, param=param)
    if isinstance(value, (list, int)) and not isinstance(value, bool):
        # small integer metadata (grid sizes, image sizes) may come as plain JSON numbers
        try:
            t = torch.tensor(value)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{param} must be a base64 tensor or a list of numbers ({e})",
                                    param=param) from None
        if t.dtype not in (torch.int64, torch.int32, torch.float32, torch.float64):
            raise InvalidInputError(f"{param}: numbers only", param=param)
        return t
    raise InvalidInputError(f"{param} must be a base64 tensor or a list of numbers, got {type(value).__name__}",
                            param=param)
