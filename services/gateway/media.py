"""Step 2 of a request: resolve its media items to cache keys, doing as little stage work as possible.

Per item, in this order (the services' version of shared/inputs/resolve.py):
  * a part with a uuid: one encoder Lookup for all of them, under the one UUID rule of the stages
    (services/common/uuids.py): a hit skips ingest and the encoder entirely (nothing is fetched); a UUID-only
    part (null payload) that misses is a 400 naming the uuid; a miss with a payload goes on to ingest together
    with the key the look-up named, so ingest does not look it up again;
  * `image_embeds` parts: the encoder's PutEmbeddings validates (shape, hidden size) and stores them;
  * every other part: one Ingest call, which fetches, hashes, checks the cache by hash and only on a miss
    preprocesses and encodes.
Ingest and PutEmbeddings run concurrently. The items are the `ItemRef`s the shared chat rules made; the result
is one MediaRef per item, in prompt order.
"""
from __future__ import annotations

import asyncio

from mmpipe.services.common.convert import MediaSource
from mmpipe.services.common.uuids import UuidItem, apply_uuid_lookup
from mmpipe.shared.inputs.parse import ItemRef

from .embeds import decode_user_embeds
from .metrics import MM_CACHE_HITS, MM_CACHE_MISSES
from .stages import StageClients
from .types import MediaKwargs, MediaRef, RequestContext


async def resolve_media(stages: StageClients, media: list[ItemRef], ctx: RequestContext, *, timeout: float,
                        model: str, kw: MediaKwargs | None = None,
                        max_embed_rows: int | None = None) -> list[MediaRef]:
    """`kw`: the request's checked media settings (prepare.py); every stage call carries them (they select the
    cache keyspace, and ingest calls the processor with them). `max_embed_rows`: the embedding rows the prompt
    has room for under max_model_len; `image_embeds` parts holding more are refused (400) before their tensors
    are materialised or stored."""
    if not media:
        return []
    refs: list[MediaRef | None] = [None] * len(media)
    miss_keys: dict[int, str] = {}
    with_uuid = [i for i, m in enumerate(media) if m.uuid is not None]
    if with_uuid:
        items = [UuidItem(media[i].modality, media[i].uuid or "", media[i].source is not None) for i in with_uuid]
        found = await stages.lookup_uuids([(it.modality, it.uuid) for it in items], ctx, timeout, kw)
        for i, o in zip(with_uuid, apply_uuid_lookup(items, found)):
            if o.ref is not None:
                refs[i] = MediaRef.of(o.ref, "uuid")
            else:
                miss_keys[i] = o.key
    todo_ingest = [i for i, m in enumerate(media) if refs[i] is None and not m.is_embeds]
    todo_embeds = [i for i, m in enumerate(media) if refs[i] is None and m.is_embeds]
    # Decoding the user's tensors is CPU work: keep it off the event loop.
    packed = await asyncio.to_thread(_decode_embeds, [media[i] for i in todo_embeds], max_embed_rows) \
        if todo_embeds else []
    ingested, stored = await _both(
        stages.ingest([MediaSource(media[i].modality, url=media[i].source, uuid=media[i].uuid,
                                   key=miss_keys.get(i)) for i in todo_ingest], ctx, timeout, kw),
        stages.put_embeddings([(media[i].modality, p, media[i].uuid) for i, p in zip(todo_embeds, packed)],
                              ctx, timeout, kw))
    for i, ref in zip(todo_ingest, ingested):
        refs[i] = ref
    for i, ref in zip(todo_embeds, stored):
        refs[i] = ref
    out = [r for r in refs if r is not None]
    assert len(out) == len(media), "every media item resolves to a ref or raises"
    for r in out:
        if r.how in ("uuid", "hash"):
            MM_CACHE_HITS.labels(model, r.modality, r.how).inc()
        elif r.how == "miss":
            MM_CACHE_MISSES.labels(model, r.modality).inc()
    return out


def _decode_embeds(items: list[ItemRef], max_rows: int | None) -> list:
    out = []
    for item in items:
        tensors, rows = decode_user_embeds(item, max_rows)
        out.append(tensors)
        if max_rows is not None:
            max_rows -= rows
    return out


async def _both(a, b):
    """Await two stage calls concurrently; when one fails, cancel the other and raise the first error."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        return await asyncio.gather(ta, tb)
    except BaseException:
        for t in (ta, tb):
            t.cancel()
        raise
