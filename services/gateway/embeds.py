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


# Fields of an embeddings dict that hold integer metadata (sizes, grids), not embeddings: integer dtypes only.
_INT_FIELD_SUFFIXES = ("_grid_thw", "image_sizes")


def decode_user_embeds(item: ItemRef, max_rows: int | None = None) -> tuple[Any, int]:
    """A part's payload (base64 tensor, or a dict of base64 tensors / nested lists) as tensor(s), and the
    embedding rows it holds. `max_rows`: the rows the prompt still has room for (max_model_len), checked before
    any tensor is materialised (shared/media/embeds.py)."""
    from mmpipe.shared.media.embeds import decode_tensor_b64

    param = f"{item.modality}_embeds"
    payload = item.source
    if isinstance(payload, str):
        t = decode_tensor_b64(payload, param=param, max_rows=max_rows)
        return t, _rows(t)
    if isinstance(payload, dict):
        if not payload:
            raise InvalidInputError(f"{param} dict is empty", param=param)
        out, rows = {}, 0
        for k, v in payload.items():
            name = str(k)
            is_int = name.endswith(_INT_FIELD_SUFFIXES)
            out[name] = _field(v, f"{param}.{name}", is_int, None if is_int or max_rows is None else max_rows - rows)
            rows += 0 if is_int else _rows(out[name])
        return out, rows
    raise InvalidInputError(f"{param} must be a base64 tensor or a dict of them (e.g. {{'{param}': ..., "
                            f"'{item.modality}_grid_thw': ...}}), got {type(payload).__name__}", param=param)


def _rows(t: Any) -> int:
    return t.numel() // t.shape[-1] if t.ndim >= 2 else 1


def _field(value: Any, param: str, is_int: bool, max_rows: int | None) -> Any:
    import torch

    from mmpipe.shared.media.embeds import ALLOWED_DTYPES, INT_DTYPES, decode_tensor_b64

    if isinstance(value, str):
        return decode_tensor_b64(value, param=param, dtypes=INT_DTYPES if is_int else ALLOWED_DTYPES,
                                 max_rows=max_rows)
    if isinstance(value, (list, int)) and not isinstance(value, bool):
        # small metadata (grid sizes, image sizes) may come as plain JSON numbers
        try:
            t = torch.tensor(value)
        except (TypeError, ValueError, OverflowError, RuntimeError) as e:
            raise InvalidInputError(f"{param} must be a base64 tensor or a list of numbers ({e})",
                                    param=param) from None
        allowed = (torch.int64,) if is_int else (torch.int64, torch.int32, torch.float32, torch.float64)
        if t.dtype not in allowed or t.numel() > 4096:
            raise InvalidInputError(f"{param}: at most 4096 {'integers' if is_int else 'numbers'} (got "
                                    f"{t.dtype}, {t.numel()} values)", param=param)
        return t
    raise InvalidInputError(f"{param} must be a base64 tensor or a list of numbers, got {type(value).__name__}",
                            param=param)
