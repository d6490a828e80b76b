"""Encoder gRPC servicer: protobuf <-> domain only; the work is in core.EncoderCore."""
from __future__ import annotations

from mmpipe.services.common.convert import LookupItem
from mmpipe.services.common.pb import encoder_pb2, encoder_pb2_grpc
from mmpipe.services.encoder.core import EmbedsItem, EncodeItem, EncoderCore


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, core_ref):
        self._core_ref = core_ref  # a callable returning the core once it is loaded

    @property
    def core(self) -> EncoderCore:
        return self._core_ref()

    async def Encode(self, request, context):
        items = [EncodeItem(key=i.key, modality=i.modality, tensors=i.tensors, content_hash=i.content_hash,
                            uuid=i.uuid) for i in request.items]
        refs = await self.core.encode(items)
        return encoder_pb2.EncodeResponse(items=[r.to_pb() for r in refs])

    async def PutEmbeddings(self, request, context):
        items = [EmbedsItem(modality=i.modality, tensors=i.tensors, uuid=i.uuid) for i in request.items]
        refs = await self.core.put_embeddings(items, request.tenant, request.media_io_kwargs_json,
                                              request.mm_processor_kwargs_json)
        return encoder_pb2.PutEmbeddingsResponse(items=[r.to_pb() for r in refs])

    async def Lookup(self, request, context):
        res = await self.core.lookup([LookupItem.from_pb(i) for i in request.items], request.tenant,
                                     request.media_io_kwargs_json, request.mm_processor_kwargs_json)
        return encoder_pb2.LookupResponse(items=[encoder_pb2.LookupResult(found=f, ref=r.to_pb()) for f, r in res])
