"""Byte format for embeddings and preprocessed tensors: a checksummed header plus the raw tensor bytes.

Layout of one payload (all integers little-endian):

    offset 0   4 bytes   magic b"MMPT"
    offset 4   4 bytes   u32 header length H
    offset 8   32 bytes  blake3 digest of the header bytes (so a flipped digit in the shape or the
                         metadata is caught, not only damage to the tensor bytes)
    offset 40  H bytes   header: compact JSON, UTF-8
    ...        padding   zero bytes up to the next multiple of 64
    ...        data      the tensors' raw bytes, each starting on a 64-byte boundary

The header carries the format version, the kind ("embedding" or "tensors"), the byte order, the free-form
`meta` dict, and per tensor its dtype, shape, offset, nbytes and a blake3 digest of its bytes (full hex).

Why this shape rather than pickle / torch.save / safetensors:
  * no code execution on load (a cache shared between replicas is an attack surface for pickle);
  * unpacking is zero-copy: `torch.frombuffer` views the payload. Offsets are 64-byte aligned relative to
    the payload start, so the views are as aligned as the buffer itself (16 bytes for a Python `bytes`),
    always enough for the element size;
  * `pack_*_parts` return the pieces without concatenating them, so the Redis writer can send a 4.7 MB
    embedding without copying it (see `redis_store.py`).

Every check that fails raises `CacheCorruptError`: a damaged entry is never turned into a tensor.
"""
from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from typing import Any, Mapping, Sequence

import blake3
import torch

from ..errors import MMPipeError, UnsupportedError
from ..types import MMEmbedding

__all__ = [
    "FORMAT_VERSION",
    "CacheCorruptError",
    "CacheVersionError",
    "EMBEDDING_DTYPES",
    "TENSOR_DTYPES",
    "pack_embedding",
    "pack_embedding_parts",
    "unpack_embedding",
    "pack_tensors",
    "pack_tensors_parts",
    "unpack_tensors",
    "payload_nbytes",
]

FORMAT_VERSION = 1
MAGIC = b"MMPT"
_PREFIX = struct.Struct("<4sI32s")  # magic, header length, blake3(header)
_ALIGN = 64
# A header is a few hundred bytes; the bound stops a corrupted length field from making us slice
# (or json-parse) megabytes of tensor data as if it were a header.
_MAX_HEADER = 1 << 20
_MAX_DIMS = 16

# The dtypes an embedding may have (what encoders emit) and the wider set for preprocessed inputs
# (pixel_values in fp32, grid_thw in int64, attention masks in bool/int, ...).
EMBEDDING_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
TENSOR_DTYPES: dict[str, torch.dtype] = {
    **EMBEDDING_DTYPES,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAME_OF = {v: k for k, v in TENSOR_DTYPES.items()}

# torch.frombuffer over an immutable `bytes` warns that the tensor is not writable. Views over read-only
# payloads are intended here (zero-copy reads). torch emits that warning only once per process
# (TORCH_WARN_ONCE), so trigger it here, at import time (single-threaded under the import lock), with
# the warning ignored: a module-level filters entry would not survive callers, such as pytest, that
# save and restore the warnings filters, and catch_warnings() around every call is not thread-safe.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


class CacheCorruptError(MMPipeError):
    """A cached or shipped payload failed validation (magic, version, lengths, shape or checksum).

    Raised instead of returning a tensor built from damaged bytes. Caches treat it as a miss (and drop
    the entry); anything else should treat it as an internal error.
    """


class CacheVersionError(CacheCorruptError):
    """A payload in a format version this build does not read (e.g. written by a newer replica).

    Read as a miss like any corrupt entry, but caches leave it in place: during a rolling upgrade it is
    valid for the replicas that wrote it.
    """


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _json_default(o: Any) -> Any:
    # Metadata often carries small tensors / numpy values (grid_thw, num_tokens); store them as plain
    # JSON lists and numbers. They come back as lists, never as tensors.
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):  # numpy arrays and numpy scalars
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON-serialisable")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU, contiguous copy-free (where possible) version of `t`."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()  # one device->host copy is unavoidable
    t = t.contiguous()
    # numpy has no bfloat16, so every dtype goes through a uint8 view of the same storage.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _build(kind: str, tensors: Sequence[tuple[str, torch.Tensor]], meta: Mapping[str, Any] | None,
           extra: Mapping[str, Any], allowed: Mapping[str, torch.dtype]) -> list[Any]:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise UnsupportedError("mmpipe payloads are little-endian; this host is big-endian")
    entries: list[dict[str, Any]] = []
    views: list[memoryview] = []
    offset = 0
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise UnsupportedError(f"{kind} item {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dname = _NAME_OF.get(t.dtype)
        if dname is None or dname not in allowed:
            raise UnsupportedError(
                f"cannot serialise {kind} tensor {name!r} of dtype {t.dtype}; "
                f"supported: {', '.join(allowed)}")
        mv = _tensor_bytes(t)
        entries.append({"name": name, "dtype": dname, "shape": list(t.shape), "offset": offset,
                        "nbytes": mv.nbytes,
                        # AUTO lets blake3 use several threads for multi-MB tensors (4.7 MB: 0.63 ->
                        # 0.54 ms cold, 0.47 -> 0.27 ms warm, on 2 cores); small inputs stay on one.
                        "blake3": blake3.blake3(mv, max_threads=blake3.blake3.AUTO).hexdigest()})
        views.append(mv)
        offset = _align(offset + mv.nbytes)
    header = {"v": FORMAT_VERSION, "kind": kind, "byteorder": "little", **extra,
              "meta": dict(meta or {}), "tensors": entries}
    try:
        hbytes = json.dumps(header, separators=(",", ":"), default=_json_default,
                            allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise UnsupportedError(f"cannot serialise {kind} metadata: {e}") from e
    if len(hbytes) > _MAX_HEADER:
        raise UnsupportedError(f"{kind} metadata too large ({len(hbytes)} bytes > {_MAX_HEADER})")
    prefix = _PREFIX.pack(MAGIC, len(hbytes), blake3.blake3(hbytes).digest())
    head_len = _PREFIX.size + len(hbytes)
    parts: list[Any] = [prefix + hbytes + bytes(_align(head_len) - head_len)]
    for i, mv in enumerate(views):
        parts.append(mv)
        if i + 1 < len(views):
            pad = _align(mv.nbytes) - mv.nbytes
            if pad:
                parts.append(bytes(pad))
    return parts


def payload_nbytes(parts: Sequence[Any]) -> int:
    """Total length of a list returned by `pack_*_parts`."""
    return sum(memoryview(p).nbytes for p in parts)


def _corrupt(what: str) -> CacheCorruptError:
    return CacheCorruptError(f"corrupt mmpipe payload: {what}")


def _parse(buf: Any, kind: str, allowed: Mapping[str, torch.dtype],
           verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    total = mv.nbytes
    if total < _PREFIX.size:
        raise _corrupt(f"{total} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen, hdigest = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _corrupt(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > total:
        raise _corrupt(f"header length {hlen} does not fit in a {total}-byte payload (truncated?)")
    hbytes = mv[_PREFIX.size:_PREFIX.size + hlen]
    if blake3.blake3(hbytes).digest() != hdigest:
        raise _corrupt("header checksum mismatch")
    try:
        header = json.loads(bytes(hbytes))
    except (ValueError, RecursionError) as e:
        # Only reachable with a deliberately crafted payload (blake3 is a checksum, not a MAC; shipped
        # tensors come from clients): keep it a clear domain error.
        raise _corrupt(f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt("header is not a JSON object")
    if header.get("v") != FORMAT_VERSION:
        raise CacheVersionError(f"mmpipe payload format version {header.get('v')!r} is not supported "
                                f"(this build reads v{FORMAT_VERSION})")
    if header.get("kind") != kind:
        raise _corrupt(f"payload holds {header.get('kind')!r}, expected {kind!r}")
    if header.get("byteorder") != "little":
        raise _corrupt(f"byte order {header.get('byteorder')!r} is not supported")
    data_start = _align(_PREFIX.size + hlen)
    entries = header.get("tensors")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _corrupt("header has no valid tensor table")

    # 1) Structure, from the header alone: dtypes, shapes against nbytes, byte ranges.
    plan: list[tuple[str, torch.dtype, list[int], int, int, int, Any]] = []
    for ent in entries:
        name, dname, shape = ent.get("name"), ent.get("dtype"), ent.get("shape")
        nbytes, off = ent.get("nbytes"), ent.get("offset")
        dtype = allowed.get(dname)
        if not isinstance(name, str) or dtype is None:
            raise _corrupt(f"tensor {name!r} has unsupported dtype {dname!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and 0 <= d < 1 << 48 for d in shape)
                or not isinstance(nbytes, int) or not isinstance(off, int) or off < 0 or off % _ALIGN):
            raise _corrupt(f"tensor {name!r} has a malformed shape/offset/nbytes entry")
        itemsize = torch.empty((), dtype=dtype).element_size()
        expect = math.prod(shape) * itemsize
        if expect != nbytes:
            raise _corrupt(f"tensor {name!r}: shape {shape} x {itemsize} bytes = {expect} != nbytes {nbytes}")
        plan.append((name, dtype, shape, itemsize, data_start + off, nbytes, ent.get("blake3")))

    # 2) Length: the writer puts nothing after the last tensor, so any other length means the value is
    #    not what we wrote (truncated, or two values glued together).
    expected_total = max((start + n for _, _, _, _, start, n, _ in plan), default=data_start)
    if total != expected_total:
        raise _corrupt(f"payload is {total} bytes but its header describes {expected_total} (truncated?)")

    # 3) Padding is covered by no checksum, so insist it is what the writer wrote (zeros): then every
    #    changed byte of a payload raises instead of being silently ignored. At most 63 bytes a gap.
    pos = _PREFIX.size + hlen  # end of the header
    for start, end in sorted((p[4], p[4] + p[5]) for p in plan) or [(data_start, data_start)]:
        if start < pos:
            raise _corrupt("tensor byte ranges overlap")
        if start - pos >= _ALIGN:
            raise _corrupt("gap between tensors is larger than alignment padding")
        if any(mv[pos:start]):
            raise _corrupt("non-zero padding bytes")
        pos = end

    # 4) Content: checksums, then zero-copy views.
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, itemsize, start, nbytes, digest in plan:
        view = mv[start:start + nbytes]
        if verify and blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest() != digest:
            raise _corrupt(f"tensor {name!r} checksum mismatch")
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)  # frombuffer refuses empty ranges
        else:
            # Zero-copy: the tensor shares memory with `buf` and keeps it alive.
            out[name] = torch.frombuffer(mv, dtype=dtype, count=nbytes // itemsize, offset=start).view(shape)
    return header, out


def pack_embedding_parts(emb: MMEmbedding) -> list[Any]:
    """The payload of `emb` as a list of buffers (bytes / memoryview over the tensor); no big copy.

    The memoryview shares memory with `emb.tensor` (or with its contiguous CPU copy), so do not mutate
    the tensor until the parts have been written out.
    """
    if not isinstance(emb, MMEmbedding):
        raise UnsupportedError(f"pack_embedding takes an MMEmbedding, got {type(emb).__name__}")
    return _build("embedding", [("tensor", emb.tensor)], emb.meta, {"modality": emb.modality},
                  EMBEDDING_DTYPES)


def pack_embedding(emb: MMEmbedding) -> bytes:
    """Serialise an embedding (bf16 / fp16 / fp32) with its modality and meta into one bytes object."""
    return b"".join(pack_embedding_parts(emb))


def unpack_embedding(b: bytes | bytearray | memoryview, *, verify: bool = True) -> MMEmbedding:
    """Rebuild an MMEmbedding; the tensor is a zero-copy view of `b`.

    Raises CacheCorruptError when anything (magic, version, header checksum, shape vs nbytes, length,
    tensor checksum) does not match. `verify=False` skips only the tensor checksum (about 0.3 ms per
    4.7 MB) and is meant for payloads that never left this process.
    Tensors over an immutable `bytes` are not writable in spirit: clone before modifying in place.
    """
    header, tensors = _parse(b, "embedding", EMBEDDING_DTYPES, verify)
    if set(tensors) != {"tensor"}:
        raise _corrupt(f"embedding payload holds tensors {sorted(tensors)}, expected ['tensor']")
    modality = header.get("modality")
    if not isinstance(modality, str):
        raise _corrupt("embedding payload has no modality")
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise _corrupt("embedding payload meta is not an object")
    return MMEmbedding(modality=modality, tensor=tensors["tensor"], meta=meta)


def pack_tensors_parts(tensors: Mapping[str, torch.Tensor],
                       meta: Mapping[str, Any] | None = None) -> list[Any]:
    """Like `pack_tensors` but returns the pieces without concatenating them."""
    for name in tensors:
        if not isinstance(name, str):
            raise UnsupportedError(f"tensor names must be strings, got {type(name).__name__}")
    return _build("tensors", list(tensors.items()), meta, {}, TENSOR_DTYPES)


def pack_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialise a dict of named tensors (any dtype in TENSOR_DTYPES) plus a JSON-able meta dict.

    Used to ship ProcessedItem tensors between stages (gRPC bytes fields).
    """
    return b"".join(pack_tensors_parts(tensors, meta))


def unpack_tensors(b: bytes | bytearray | memoryview, *, verify: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `pack_tensors`: (tensors keyed by name, in packing order; meta). Zero-copy views."""
    header, tensors = _parse(b, "tensors", TENSOR_DTYPES, verify)
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise _corrupt("tensors payload meta is not an object")
    return tensors, meta
