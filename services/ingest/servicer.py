"""Ingest gRPC servicer: protobuf <-> domain only; the work is in core.IngestCore."""
from __future__ import annotations

from mmpipe.services.common.convert import MediaSource
from mmpipe.services.common.pb import ingest_pb2, ingest_pb2_grpc


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, core_ref):
        self._core_ref = core_ref

    async def Ingest(self, request, context):
        refs = await self._core_ref().ingest([MediaSource.from_pb(i) for i in request.items], tenant=request.tenant,
                                             kw_json=request.media_io_kwargs_json,
                                             mm_json=request.mm_processor_kwargs_json,
                                             request_id=request.request_id or None,
                                             timeout_s=context.time_remaining())
        return ingest_pb2.IngestResponse(items=[r.to_pb() for r in refs])
