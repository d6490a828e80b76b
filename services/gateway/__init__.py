"""The gateway: the OpenAI-compatible HTTP API and the public gRPC API of mmpipe, in one process.

Owns: tokenising and chat templates, request checks (limits, placeholders, media policy pre-checks), the
per-request orchestration of the stages (embedding look-ups, ingest, user embeddings, generation) and
forwarding the generator's text deltas as SSE. Must not: load model weights, decode media or embeddings,
detokenise or apply stop strings (the generator does, with shared/detokenizer.py), or compute cache keys
itself (the stages own the keyspace; the gateway only passes keys on).

Layout (as vLLM's entrypoints): `core.py` is the one transport-free core; `openai/<endpoint>/` holds the
HTTP routes (`api_router.py`), the pydantic wire models (`protocol.py`) and the wire <-> domain conversion
(`serving.py`); `grpc_api/` is the public gRPC transport; `server.py` runs both in one event loop.
"""
