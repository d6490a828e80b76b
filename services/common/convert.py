"""Protobuf <-> domain conversions for the stage protos (`mmpipe.v1` common / ingest / encoder / generator).

`shared/` never imports generated code, so the domain types that cross the wire are defined here as small
frozen dataclasses owning their `to_pb()` / `from_pb()`; shared types (SamplingParams) get free functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mmpipe.services.common.pb import common_pb2, encoder_pb2, generator_pb2, ingest_pb2
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.structured import StructuredOutputsParams
from mmpipe.shared.types import SamplingParams


@dataclass(frozen=True)
class EmbeddingRef:
    """Where one item's embedding lives in the shared cache, plus what the LM side needs to know about it."""

    key: str
    modality: str
    num_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    cache_hit: bool = False
    uuid: str = ""

    def to_pb(self) -> common_pb2.EmbeddingRef:
        return common_pb2.EmbeddingRef(key=self.key, modality=self.modality, num_tokens=self.num_tokens,
                                       meta_json=json.dumps(self.meta, separators=(",", ":"), default=_plain),
                                       content_hash=self.content_hash, cache_hit=self.cache_hit, uuid=self.uuid)

    @classmethod
    def from_pb(cls, pb: common_pb2.EmbeddingRef) -> "EmbeddingRef":
        try:
            meta = json.loads(pb.meta_json) if pb.meta_json else {}
        except ValueError:
            raise InvalidInputError("EmbeddingRef.meta_json is not valid JSON", param="meta_json") from None
        return cls(key=pb.key, modality=pb.modality, num_tokens=pb.num_tokens, meta=meta,
                   content_hash=pb.content_hash, cache_hit=pb.cache_hit, uuid=pb.uuid)


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


@dataclass(frozen=True)
class MediaSource:
    """One media item for ingest: exactly one of url / data / path, or none for a UUID-only item. `key`: the
    caller already looked `uuid` up and missed; store under this key (see MediaInput.key)."""

    modality: str
    url: str | None = None
    data: bytes | None = None
    path: str | None = None
    uuid: str | None = None
    key: str | None = None

    def to_pb(self) -> ingest_pb2.MediaInput:
        pb = ingest_pb2.MediaInput(modality=self.modality, uuid=self.uuid or "", key=self.key or "")
        if self.url is not None:
            pb.url = self.url
        elif self.data is not None:
            pb.data = bytes(self.data)
        elif self.path is not None:
            pb.path = self.path
        return pb

    @classmethod
    def from_pb(cls, pb: ingest_pb2.MediaInput) -> "MediaSource":
        which = pb.WhichOneof("source")
        return cls(modality=pb.modality, url=pb.url if which == "url" else None,
                   data=pb.data if which == "data" else None, path=pb.path if which == "path" else None,
                   uuid=pb.uuid or None, key=pb.key or None)

    @property
    def source(self) -> Any:
        """What MediaLoader.load takes: a URL / path string or raw bytes (None for UUID-only)."""
        return self.url if self.url is not None else (self.data if self.data is not None else self.path)


@dataclass(frozen=True)
class LookupItem:
    """An item to look up by full key, or by (modality, uuid) or (modality, content_hash)."""

    key: str = ""
    modality: str = ""
    uuid: str = ""
    content_hash: str = ""

    def to_pb(self) -> encoder_pb2.LookupItem:
        return encoder_pb2.LookupItem(key=self.key, modality=self.modality, uuid=self.uuid,
                                      content_hash=self.content_hash)

    @classmethod
    def from_pb(cls, pb: encoder_pb2.LookupItem) -> "LookupItem":
        return cls(key=pb.key, modality=pb.modality, uuid=pb.uuid, content_hash=pb.content_hash)


@dataclass(frozen=True)
class TokenChunk:
    """One message of a Generate stream."""

    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the generator's prefix cache
    index: int = 0  # the sample (n > 1) this chunk belongs to
    # per token: its top (token id, logprob) alternatives, when sampling.logprobs > 0
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # with prompt_logprobs, on sample 0's first chunk: per prompt token (id, logprob, rank, alternatives), None
    # for the first one
    prompt_logprobs: list[tuple[int, float, int, list[tuple[int, float]]] | None] | None = None

    def to_pb(self) -> generator_pb2.GenerateTokensResponse:
        return generator_pb2.GenerateTokensResponse(
            token_ids=self.token_ids, logprobs=self.logprobs or [], text=self.text, finished=self.finished,
            finish_reason=self.finish_reason or "", num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens, index=self.index,
            top_logprobs=[generator_pb2.TopLogprobs(token_ids=[t for t, _ in alts], logprobs=[v for _, v in alts])
                          for alts in self.top_logprobs or ()],
            prompt_logprobs=[generator_pb2.PromptLogprob(
                token_id=tid, logprob=lp, rank=rank, top=generator_pb2.TopLogprobs(token_ids=[t for t, _ in alts],
                                                                                   logprobs=[v for _, v in alts]))
                for tid, lp, rank, alts in (self.prompt_logprobs or [None])[1:]])

    @classmethod
    def from_pb(cls, pb: generator_pb2.GenerateTokensResponse) -> "TokenChunk":
        return cls(token_ids=list(pb.token_ids), logprobs=list(pb.logprobs) or None, text=pb.text,
                   finished=pb.finished, finish_reason=pb.finish_reason or None,
                   num_prompt_tokens=pb.num_prompt_tokens, num_cached_tokens=pb.num_cached_tokens, index=pb.index,
                   top_logprobs=[list(zip(t.token_ids, t.logprobs)) for t in pb.top_logprobs] or None,
                   prompt_logprobs=[None, *((p.token_id, p.logprob, p.rank, list(zip(p.top.token_ids,
                                                                                   p.top.logprobs)))
                                            for p in pb.prompt_logprobs)] if pb.prompt_logprobs else None)


def sampling_to_pb(sp: SamplingParams) -> common_pb2.SamplingConfig:
    pb = common_pb2.SamplingConfig(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                   min_tokens=sp.min_tokens, stop=list(sp.stop or []),
                                   stop_token_ids=list(sp.stop_token_ids or []), ignore_eos=sp.ignore_eos,
                                   skip_special_tokens=sp.skip_special_tokens,
                                   include_stop_str_in_output=sp.include_stop_str_in_output)
    if sp.max_tokens is not None:
        pb.max_tokens = sp.max_tokens
    if sp.seed is not None:
        pb.seed = sp.seed
    if sp.logprobs is not None:
        pb.logprobs = sp.logprobs
    for name, neutral in _OPTIONS:
        if getattr(sp, name) != neutral:
            setattr(pb, name, getattr(sp, name))
    if sp.logit_bias:
        pb.logit_bias.update(sp.logit_bias)
    pb.bad_words.extend(sp.bad_words or [])
    so = sp.structured_outputs
    if so is not None:
        pb.structured_outputs.CopyFrom(common_pb2.StructuredOutputs(
            json=json.dumps(so.json, separators=(",", ":")) if so.json is not None else "", regex=so.regex or "",
            choice=list(so.choice or []), grammar=so.grammar or "", json_object=bool(so.json_object)))
    return pb


def sampling_from_pb(pb: common_pb2.SamplingConfig) -> SamplingParams:
    """Validates as SamplingParams does (InvalidInputError on bad values). An unset max_tokens stays None (what is
    left of the context), not the offline SamplingParams default."""
    kw: dict[str, Any] = {"max_tokens": None, "min_tokens": pb.min_tokens, "stop": list(pb.stop),
                          "stop_token_ids": list(pb.stop_token_ids), "ignore_eos": pb.ignore_eos,
                          "include_stop_str_in_output": pb.include_stop_str_in_output}
    if pb.HasField("structured_outputs"):
        so = pb.structured_outputs
        kw["structured_outputs"] = StructuredOutputsParams(
            json=so.json or None, regex=so.regex or None, choice=list(so.choice) or None, grammar=so.grammar or None,
            json_object=so.json_object or None)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "skip_special_tokens",
                 *(n for n, _ in _OPTIONS)):
        if pb.HasField(name):
            kw[name] = getattr(pb, name)
    if pb.logit_bias:
        kw["logit_bias"] = dict(pb.logit_bias)
    if pb.bad_words:
        kw["bad_words"] = list(pb.bad_words)
    return SamplingParams(**kw)


# SamplingConfig's optional scalar options and their neutral values (left unset on the wire)
_OPTIONS = (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
            ("min_p", 0.0), ("prompt_logprobs", None))
