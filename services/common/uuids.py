"""The UUID rule of the stage path, in one place (vLLM's `multi_modal_uuids` over the services).

An item with a UUID is looked up by (modality, uuid, tenant) with one Encoder.Lookup, once per request and
by whoever sees it first: the gateway for its requests (a hit then needs no ingest call at all), ingest for
callers that did not look up (then a hit needs no fetch). A hit is the cached item's ref; a miss with a payload
is the key Lookup named for it, which is where the item will be stored (the gateway hands it to ingest in
`MediaInput.key`, so ingest does not ask again); a miss without a payload is the client's error, a 400 naming
the uuid. Both callers apply exactly this function to the Lookup result.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmpipe.services.common.convert import EmbeddingRef
from mmpipe.shared.errors import NotCachedError


@dataclass(frozen=True)
class UuidItem:
    """One item to look up by UUID: its modality, the uuid, and whether the request also carries its media."""

    modality: str
    uuid: str
    has_payload: bool


@dataclass(frozen=True)
class UuidOutcome:
    """What one UUID look-up decided: `ref` on a hit, else `key` (store the item under it)."""

    ref: EmbeddingRef | None = None
    key: str = ""


def apply_uuid_lookup(items: Sequence[UuidItem], found: Sequence[tuple[bool, EmbeddingRef]]) -> list[UuidOutcome]:
    """Per item, in order: the hit's ref or the miss's key; raises NotCachedError for a UUID-only miss."""
    out = []
    for it, (ok, ref) in zip(items, found, strict=True):
        if ok:
            out.append(UuidOutcome(ref=ref))
        elif not it.has_payload:
            raise NotCachedError(f"{it.modality} item with uuid {it.uuid!r} is not in the embedding cache; send the "
                                 f"media together with the uuid once", param=it.uuid)
        else:
            out.append(UuidOutcome(key=ref.key))
    return out
