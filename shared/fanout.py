"""n > 1: one request's samples as n engine requests (vLLM v1's ParentRequest), and back.

Sample i is an EngineRequest of its own, `{i}_{request_id}`, with SamplingParams.child(i) (n = 1, seed + i when
seeded). The children are handed to the engine together, so the first one's admission registers the prompt's
full KV blocks in the prefix cache in the step that computes them and the others take those blocks (ref-counted)
instead of computing them again: the prompt is prefilled once, except the last, partial block, which each sample
writes its own tokens into. With n == 1 the request is passed on unchanged (same id).

Used by the offline LLM and the generator service; the engine itself only ever sees n == 1.
"""
from __future__ import annotations

import dataclasses

from mmpipe.shared.types import EngineRequest


def child_requests(req: EngineRequest) -> list[EngineRequest]:
    n = req.sampling.n
    if n == 1:
        return [req]
    return [dataclasses.replace(req, request_id=child_id(req.request_id, i), sampling=req.sampling.child(i))
            for i in range(n)]


def child_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"
