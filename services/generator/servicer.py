"""Generator gRPC servicer: protobuf <-> domain only; the work is in core.GeneratorCore.

A cancelled call (client gone, deadline) cancels this coroutine; closing the core's stream then aborts the
request in the engine.
"""
from __future__ import annotations

from mmpipe.services.common.convert import EmbeddingRef, sampling_from_pb
from mmpipe.services.common.pb import generator_pb2_grpc


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, core_ref):
        self._core_ref = core_ref

    async def Generate(self, request, context):
        sampling = sampling_from_pb(request.sampling)
        refs = [EmbeddingRef.from_pb(e) for e in request.embeddings]
        stream = self._core_ref().generate(request.request_id, list(request.prompt_token_ids), refs, sampling,
                                           request.return_text)
        try:
            async for chunk in stream:
                yield chunk.to_pb()
        finally:
            await stream.aclose()
