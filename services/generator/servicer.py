"""Generator gRPC servicer: protobuf <-> domain only; the work is in core.GeneratorCore.

The core yields one TokenChunk per engine output (several steps' tokens at once when this stream fell behind:
shared/engine/streams.py); `--stream-interval` groups them into messages here (stream_interval.py), next to the
wire whose message count it sets. A cancelled call (client gone, deadline) cancels this coroutine; closing the
core's stream then aborts the request in the engine.
"""
from __future__ import annotations

from mmpipe.services.common.convert import EmbeddingRef, sampling_from_pb
from mmpipe.services.common.pb import generator_pb2_grpc
from mmpipe.services.generator.stream_interval import StreamInterval


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, core_ref):
        self._core_ref = core_ref

    async def Generate(self, request, context):
        sampling = sampling_from_pb(request.sampling)
        refs = [EmbeddingRef.from_pb(e) for e in request.embeddings]
        core = self._core_ref()
        stream = core.generate(request.request_id, list(request.prompt_token_ids), refs, sampling,
                               request.return_text)
        intervals: dict[int, StreamInterval] = {}  # per sample (n > 1)
        try:
            async for chunk in stream:
                interval = intervals.get(chunk.index)
                if interval is None:
                    interval = intervals[chunk.index] = StreamInterval(core.cfg.stream_interval)
                if (message := interval.push(chunk)) is not None:
                    yield message.to_pb()
        finally:
            await stream.aclose()
