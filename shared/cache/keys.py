"""Cache key layout: one keyspace per (model, processor settings), keys per media item.

    mmpipe:v1:<model_fp>:<settings>:<modality>:uuid:<tenant or "-">:<uuid>
    mmpipe:v1:<model_fp>:<settings>:<modality>:hash:<content_hash>

Why each part is there:
  * `v1` is the key-layout version: bump it when the layout or the payload format changes incompatibly,
    so old entries become unreachable instead of misread.
  * `model_fp` (weights id + config) and `settings` (every processor setting that changes the embedding:
    resize limits, fps, sampling rate, dtype, ...) keep two deployments from sharing an entry that only
    one of them could have produced. The form pixels take between ingest and the towers (uint8 normalised
    on the encoder, or float; shared/models/pixel_wire.py) is deliberately NOT part of it: it does not change
    the embedding (the finished uint8 form equals the processor's float output bit for bit, and the encoder
    refuses float pixels narrower than its dtype), so both forms name and share the same entry.
  * UUID keys are per tenant: a UUID is a name chosen by a client, and two tenants may choose the same
    one for different media. Content-hash keys are shared across tenants on purpose (same bytes, same
    embedding), which also means one tenant can learn, by timing, that some content is cached.
  * UUIDs and tenants are percent-escaped, so a value containing ':' (or '%') cannot forge a key in
    another part of the keyspace; content hashes must be full-length lowercase hex and are never truncated.
"""
from __future__ import annotations

import enum
import json
import re
from typing import Any

import blake3

from ..errors import InvalidInputError

__all__ = ["KEY_LAYOUT_VERSION", "CacheKeyspace", "model_fingerprint", "settings_digest", "canonical_json",
           "escape_component"]

KEY_LAYOUT_VERSION = "v1"

_HEX = re.compile(r"[0-9a-f]+")
# blake3 / sha256 hex digests are 64 chars; shorter is a truncated hash and invites collisions.
_MIN_HASH_HEX = 64
_MAX_HASH_HEX = 128
_MODALITY = re.compile(r"[a-z][a-z0-9_]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")
# Characters left as-is in escaped components: RFC 3986 unreserved. Everything else, ':' and '%' included,
# becomes %XX of its UTF-8 bytes, which makes the escaping injective.
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_MAX_UUID_LEN = 512


def escape_component(s: str) -> str:
    """Percent-escape `s` so that it contains no ':' and maps injectively back to `s`."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in s.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only.

    Values JSON can't express (torch.dtype in a config, Path) are written as `str(value)`, which is stable
    across processes (objects whose str() is an address are refused); sets are sorted so their iteration
    order can't change the digest.
    """

    def default(o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        if hasattr(o, "to_dict"):  # e.g. nested transformers configs
            return o.to_dict()
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, enum.Enum):
            return o.value
        text = str(o)
        if " at 0x" in text:  # a default repr embeds an address: a different digest in every process
            raise InvalidInputError(f"cannot fingerprint a value of type {type(o).__name__}: {text}")
        return text

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=default)


def model_fingerprint(model_path_or_id: str, config_dict: dict[str, Any]) -> str:
    """Full blake3 hex digest identifying a model: its path or hub id plus its whole config.

    The path/id is used verbatim, so every replica must load the model under the same name (a random
    temp-dir path would give each replica its own keyspace and no cross-replica sharing).
    """
    payload = canonical_json({"model": str(model_path_or_id), "config": config_dict})
    return blake3.blake3(payload.encode("ascii")).hexdigest()


def settings_digest(d: dict[str, Any]) -> str:
    """Full blake3 hex digest of every processor/encoder setting that changes the embedding."""
    return blake3.blake3(canonical_json(d).encode("ascii")).hexdigest()


def _check_digest(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or not _HEX.fullmatch(value):
        raise InvalidInputError(f"{name} must be a lowercase hex digest, got {value!r}", param=name)
    return value


class CacheKeyspace:
    """Builds cache keys for one model + settings combination. Immutable and thread-safe."""

    __slots__ = ("model_fingerprint", "settings_digest", "namespace", "prefix")

    def __init__(self, model_fingerprint: str, settings_digest: str, namespace: str = "mmpipe"):
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise InvalidInputError(f"cache namespace must match [A-Za-z0-9_.-]+, got {namespace!r}",
                                    param="namespace")
        self.model_fingerprint = _check_digest("model_fingerprint", model_fingerprint)
        self.settings_digest = _check_digest("settings_digest", settings_digest)
        self.namespace = namespace
        self.prefix = f"{namespace}:{KEY_LAYOUT_VERSION}:{model_fingerprint}:{settings_digest}:"

    def __repr__(self) -> str:
        return f"CacheKeyspace({self.prefix!r})"

    def key(self, modality: str, *, uuid: str | None = None, content_hash: str | None = None,
            tenant: str | None = None) -> str:
        """The key of one item, by client UUID (preferred when given) or by content hash.

        Exactly one of `uuid` / `content_hash` must be given. `tenant` separates UUID keys only.
        """
        if not isinstance(modality, str) or not _MODALITY.fullmatch(modality):
            raise InvalidInputError(f"invalid modality {modality!r} for a cache key", param="modality")
        if (uuid is None) == (content_hash is None):
            raise InvalidInputError("a cache key needs exactly one of uuid or content_hash", param="uuid")
        if uuid is not None:
            if not isinstance(uuid, str) or not uuid:
                raise InvalidInputError("media uuid must be a non-empty string", param="uuid")
            if len(uuid) > _MAX_UUID_LEN:
                raise InvalidInputError(f"media uuid longer than {_MAX_UUID_LEN} characters", param="uuid")
            if tenant is None:
                t = "-"
            else:
                if not isinstance(tenant, str):
                    raise InvalidInputError("tenant must be a string", param="tenant")
                t = escape_component(tenant)
                if t == "-":  # keep the literal tenant "-" apart from "no tenant"
                    t = "%2D"
            return f"{self.prefix}{modality}:uuid:{t}:{escape_component(uuid)}"
        h = content_hash
        if not isinstance(h, str) or not _HEX.fullmatch(h.lower()):
            raise InvalidInputError(f"content_hash must be a hex digest, got {h!r}", param="content_hash")
        if not _MIN_HASH_HEX <= len(h) <= _MAX_HASH_HEX:
            raise InvalidInputError(
                f"content_hash must be a full-length hex digest ({_MIN_HASH_HEX}-{_MAX_HASH_HEX} hex chars), "
                f"got {len(h)} chars", param="content_hash")
        return f"{self.prefix}{modality}:hash:{h.lower()}"

    def uuid_key(self, modality: str, uuid: str, tenant: str | None = None) -> str:
        return self.key(modality, uuid=uuid, tenant=tenant)

    def hash_key(self, modality: str, content_hash: str) -> str:
        return self.key(modality, content_hash=content_hash)
