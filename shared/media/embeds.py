"""Client-supplied embedding tensors (`image_embeds` / `audio_embeds` ...): base64 -> validated torch tensor.

Owns: the ONLY deserialisation of user-supplied tensors. `torch.save` payloads are loaded with
`weights_only=True` (a restricted unpickler: pickled code such as `os.system` via `__reduce__` cannot
run) after the zip archive itself was checked (plain records only, total size capped: no zip bombs, no
legacy format), safetensors payloads with the safetensors parser; the result must be one dense float tensor of
sane size with no NaN/Inf.
Must not: call `torch.load` without `weights_only=True`, use `pickle` directly, or move tensors off the CPU.
This is the one module in shared/media that imports torch at import time.
"""
from __future__ import annotations

import base64
import io
import json

import torch

from ..errors import InvalidInputError, LimitExceededError
from .fetch import b64decode_strict

ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Small integer metadata sent beside embeddings (Qwen-VL's image_grid_thw, LLaVA-OneVision's image_sizes).
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def _looks_like_safetensors(data: bytes) -> bool:
    # Layout: 8-byte little-endian header length N, then N bytes of JSON starting with '{'.
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _load_safetensors(data: bytes, param: str) -> torch.Tensor:
    from safetensors.torch import load as st_load

    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        tensors = st_load(data)
    except Exception as e:
        raise InvalidInputError(f"{param}: invalid safetensors payload ({type(e).__name__}: {e})",
                                param=param) from None
    names = [k for k in header if k != "__metadata__"]
    if len(tensors) != 1:
        raise InvalidInputError(f"{param}: safetensors payload must hold exactly one tensor, found "
                                f"{len(tensors)} ({names[:5]})", param=param)
    return next(iter(tensors.values()))


# torch.save archives hold data.pkl, a handful of small records and one record per storage.
_MAX_ARCHIVE_ENTRIES = 64


def _check_torch_archive(data: bytes, param: str, max_bytes: int) -> None:
    """Refuse anything but a plain torch.save zip archive whose records add up to at most `max_bytes` (+ slack).

    torch.save writes uncompressed (STORED) records, but torch.load also inflates DEFLATE records: a 200 KB
    archive would otherwise expand into gigabytes before any size check on the tensor could run (zip bomb).
    The pre-zip legacy format is refused too: it declares storage sizes in a header that torch allocates
    before reading them.
    """
    import zipfile

    if not data.startswith(b"PK\x03\x04"):
        raise InvalidInputError(f"{param}: not a loadable torch.save archive (zip) or safetensors payload; the "
                                f"legacy (pre-1.6) torch.save format and raw pickles are not accepted", param=param)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
        raise InvalidInputError(f"{param}: corrupt torch.save archive ({type(e).__name__}: {e})", param=param) from None
    if len(infos) > _MAX_ARCHIVE_ENTRIES:
        raise InvalidInputError(f"{param}: torch.save archive has {len(infos)} entries (at most "
                                f"{_MAX_ARCHIVE_ENTRIES}); send one tensor", param=param)
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise InvalidInputError(f"{param}: torch.save archive entry {info.filename[:60]!r} is compressed; "
                                    f"torch.save never compresses, so this is refused (zip bomb guard)",
                                    param=param)
        if info.file_size != info.compress_size:
            raise InvalidInputError(f"{param}: torch.save archive entry {info.filename[:60]!r} declares "
                                    f"inconsistent sizes", param=param)
        total += info.file_size
    if total > max_bytes + 64 * 1024:
        raise InvalidInputError(f"{param}: torch.save archive holds {total} bytes, more than the limit of "
                                f"{max_bytes} bytes", param=param)


def _load_torch(data: bytes, param: str, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    _check_torch_archive(data, param, max_bytes)
    try:
        # weights_only=True is the security boundary: only tensors, primitive containers and a short
        # allow-list of torch types can be unpickled; any other global (os.system, eval, ...) is refused.
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise InvalidInputError(
            f"{param}: not a loadable torch.save tensor or safetensors payload ({type(e).__name__}: {msg}); "
            f"send base64 of torch.save(tensor) or of safetensors bytes", param=param) from None
    if not isinstance(obj, torch.Tensor):
        raise InvalidInputError(f"{param}: payload must be a single tensor, got {type(obj).__name__}",
                                param=param)
    return obj


def decode_tensor_b64(s: str, *, param: str, max_bytes: int = DEFAULT_MAX_BYTES,
                      dtypes: tuple[torch.dtype, ...] = ALLOWED_DTYPES, max_rows: int | None = None) -> torch.Tensor:
    """Base64 of `torch.save(tensor)` or safetensors bytes -> a validated, dense (finite, for floats) CPU tensor
    of one of `dtypes` (floats by default; `INT_DTYPES` for grid metadata).

    `max_rows`: at most this many rows (elements / last dimension; a prompt can use no more embedding rows than
    max_model_len allows). Sizes are checked on the view and on its storage BEFORE anything is materialised: a
    stride-0 (expanded) tensor of a few KB can describe hundreds of MB.
    Every failure is an InvalidInputError with `param` set (e.g. "image_embeds").
    """
    if not isinstance(s, str) or not s.strip():
        raise InvalidInputError(f"{param} must be a non-empty base64 string", param=param)
    if len(s) * 3 // 4 > max_bytes:  # before decoding: do not allocate an oversized payload at all
        raise InvalidInputError(f"{param}: payload of about {len(s) * 3 // 4} bytes is larger than the limit "
                                f"of {max_bytes} bytes", param=param)
    data = b64decode_strict(s, what=param, param=param)
    t = _load_safetensors(data, param) if _looks_like_safetensors(data) else _load_torch(data, param, max_bytes)
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)  # nn.Parameter and other subclasses: plain tensor semantics only
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise InvalidInputError(f"{param}: tensor must be dense (got layout {t.layout}"
                                f"{', quantized' if t.is_quantized else ''})", param=param)
    if t.dtype not in dtypes:
        raise InvalidInputError(f"{param}: tensor dtype {t.dtype} is not allowed; use one of "
                                f"{[str(d) for d in dtypes]}", param=param)
    if t.ndim == 0 or t.numel() == 0:
        raise InvalidInputError(f"{param}: tensor must be non-empty with at least one dimension, got shape "
                                f"{tuple(t.shape)}", param=param)
    materialised, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if materialised > max_bytes or stored > max_bytes:
        raise InvalidInputError(f"{param}: tensor of {materialised} bytes (storage {stored} bytes) exceeds the "
                                f"limit of {max_bytes} bytes", param=param)
    rows = t.numel() // t.shape[-1] if t.ndim >= 2 else 1
    if max_rows is not None and rows > max_rows:
        raise LimitExceededError(f"{param}: tensor of shape {tuple(t.shape)} has {rows} rows, more than the "
                                 f"{max(max_rows, 0)} embedding rows this prompt has room for (max_model_len)",
                                 param=param)
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"{param}: tensor contains NaN or Inf values", param=param)
    # A view may keep a much larger pickled storage alive; own exactly our elements, with no grad.
    return t.detach().contiguous().clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() \
        else t.detach().contiguous()


def encode_tensor_b64(t: torch.Tensor) -> str:
    """Inverse of `decode_tensor_b64` (torch.save format), for clients and tests."""
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"expected a torch.Tensor, got {type(t).__name__}")
    buf = io.BytesIO()
    # clone(): torch.save writes a view's whole storage; send only this tensor's elements.
    torch.save(t.detach().cpu().contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")
