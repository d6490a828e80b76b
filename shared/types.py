"""Domain types passed between the stages: small dataclasses that carry plain, serialisable data.

The three stage calls are
    media (MediaItem) -> preprocess (ProcessedItem) -> encode (MMEmbedding) -> generate (EngineRequest)
and each type here can be turned into bytes + JSON metadata (see `shared/cache/serde.py`), so a gRPC
servicer can wrap every stage without knowing about torch objects.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

from .structured.params import StructuredOutputsParams

MODALITIES = ("image", "video", "audio")
# vLLM's default --max-logprobs: the most alternatives a request may ask for per token
MAX_LOGPROBS = 20
# the most samples one request may ask for (the HTTP server may cap it lower: --max-n)
MAX_N = 128


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class SamplingParams:
    """Per-request sampling settings, named as in vLLM's SamplingParams.

    temperature == 0 means greedy. top_k <= 0, top_p == 1, min_p == 0, the penalties at 0 (presence,
    frequency) and 1 (repetition) disable those. `logprobs` / `prompt_logprobs`: how many top alternatives to
    return per token (0: the chosen token's only), at most MAX_LOGPROBS as vLLM's default `max_logprobs`.
    `n` samples per prompt share the prompt's KV blocks (engine prefix cache); with a seed, sample i uses
    seed + i (vLLM's rule), so the n samples differ and each is reproducible.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # constrain the output to a JSON schema / regex / choice / grammar (a dict is taken as its fields)
    structured_outputs: StructuredOutputsParams | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # token id -> bias added to its logit (JSON's string keys are accepted and turned into ints)
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    # words that are never generated (tokenized with and without a leading space, vLLM's rule)
    bad_words: list[str] | None = None

    def __post_init__(self) -> None:
        from .errors import InvalidInputError  # local: keeps this module import-light

        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.min_tokens < 0:
            raise InvalidInputError(f"min_tokens must be >= 0, got {self.min_tokens}", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidInputError("min_tokens must not exceed max_tokens", param="min_tokens")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidInputError("logprobs must be >= 0", param="logprobs")
        # Wire ranges (proto/mmpipe/v1/common.proto): out-of-range values must be a 400 here, not a protobuf
        # ValueError (a 500) when the request is handed to the generator.
        u32, i32, i64 = (0, 2**32 - 1), (-2**31, 2**31 - 1), (-2**63, 2**63 - 1)
        for name, (lo, hi) in (("max_tokens", u32), ("min_tokens", u32), ("logprobs", u32), ("top_k", i32),
                               ("seed", i64)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
                raise InvalidInputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", param=name)
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**32]
        if bad:
            raise InvalidInputError(f"stop_token_ids must be non-negative token ids, got {bad[:5]}",
                                    param="stop_token_ids")
        if self.temperature != self.temperature or self.temperature == float("inf"):
            raise InvalidInputError(f"temperature must be a finite number, got {self.temperature}",
                                    param="temperature")
        self._check_penalties_and_logprobs()

    def _check_penalties_and_logprobs(self) -> None:
        """vLLM's ranges (SamplingParams._verify_args); every value finite."""
        from .errors import InvalidInputError

        def num(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    not (lo < v if lo_open else lo <= v) or v > hi:
                raise InvalidInputError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], "
                                        f"got {v!r}", param=name)
            setattr(self, name, float(v))

        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        num("repetition_penalty", 0.0, 2.0**31, lo_open=True)
        num("min_p", 0.0, 1.0)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidInputError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}", param="n")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise InvalidInputError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}", param=name)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidInputError("logit_bias must map token ids to numbers", param="logit_bias")
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k) if not isinstance(k, bool) else -1
                except (TypeError, ValueError):
                    tid = -1
                if tid < 0 or tid >= 2**32 or str(k).strip() != str(tid):
                    raise InvalidInputError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InvalidInputError(f"logit_bias[{k}] must be a finite number, got {v!r}",
                                            param="logit_bias")
                bias[tid] = float(v)
            self.logit_bias = bias or None
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise InvalidInputError("bad_words must be a list of non-empty strings", param="bad_words")
            self.bad_words = list(self.bad_words) or None

    def child(self, index: int) -> "SamplingParams":
        """The settings of sample `index` of an n > 1 request: n = 1, and seed + index when seeded (vLLM's
        ParentRequest rule), so the samples differ and each is reproducible. prompt_logprobs are the prompt's,
        computed by sample 0 only, so the others may still share its KV blocks."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# one position's alternatives: (token id, logprob), best first (vLLM's Logprob dicts, as a list)
TopLogprobs = list[tuple[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    # per generated token, its top `logprobs` alternatives (when logprobs > 0)
    top_logprobs: list[TopLogprobs] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    # prompt tokens whose KV came from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens)
    num_cached_tokens: int = 0
    # with prompt_logprobs: per prompt token, (its id, logprob, rank, top alternatives); None for the first
    prompt_logprobs: list[tuple[int, float, int, TopLogprobs] | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class MediaItem:
    """One decoded media item, ready for the model's processor.

    data: image -> PIL.Image (RGB); video -> np.ndarray (T, H, W, 3) uint8; audio -> np.ndarray float32 mono
    at `meta["sampling_rate"]`. `content_hash` is a full-length blake3 hex digest of the decoded content.
    `decode`: set (and `data` None) when the loader knew the content hash of these encoded bytes already and
    left the decode until someone needs the pixels (`MediaLoader.load(defer_decode=True)`); `materialize()`
    runs it. A cached item is then never decoded.
    """

    modality: str
    data: Any
    content_hash: str
    uuid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    decode: Any = field(default=None, repr=False, compare=False)

    def materialize(self) -> MediaItem:
        """This item with its `data` decoded (a no-op unless the decode was deferred)."""
        if self.decode is not None:
            self.data, self.decode = self.decode(), None
        return self


@dataclass
class ProcessedItem:
    """The model-specific tensors for one item (pixel_values, grid sizes, mel features, ...).

    `tensors` holds torch tensors keyed by the HF processor's output names; `meta` holds plain values
    (num_tokens, grid_thw, second_per_grid_t, ...) that the encoder copies into the embedding's metadata.
    """

    modality: str
    key: str
    tensors: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MMEmbedding:
    """The LM-ready embedding of one media item: `tensor` is (num_tokens, hidden).

    `meta` carries what the LM side needs besides the features: `num_tokens` and, for M-RoPE models,
    `grid_thw` (and `second_per_grid_t` for video, `audio_seqlen` for audio).
    """

    modality: str
    tensor: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tensor.shape[0])


@dataclass(frozen=True)
class MMSpan:
    """One media item's place in an expanded prompt, for the engine's prefix cache.

    The item's `length` embedding rows sit at prompt positions [offset, offset + length), taken in order from
    `EngineRequest.mm_embeds`. `key` names the rows: the embedding's cache key (content-hash key, or the
    tenant-scoped UUID key; both include the model fingerprint and the settings digest), or None when the
    item has no identity (precomputed embeddings without a UUID): a KV block that holds its rows, and every
    block after it, is then never shared.
    """

    offset: int
    length: int
    key: str | None


@dataclass
class EngineRequest:
    """What the generator's engine needs for one sequence: no media, no strings.

    prompt_token_ids: placeholders already expanded (one id per embedding row).
    mm_embeds: (num_mm_tokens, hidden) rows written over the placeholder positions in order, or None.
    mm_positions: flat indices of those positions in the prompt (same order as mm_embeds rows).
    mrope_positions: (3, L) M-RoPE position ids for Qwen-VL style models, else None. Generated tokens
        continue each row from the prompt's last position on that row, one step per token (what
        transformers' generate does; vLLM instead continues all rows from max + 1).
    mrope_delta: the model's rope delta (max position + 1 - L), kept for clients; used for decode positions
        only when mrope_positions is not given.
    mm_spans: one MMSpan per media item in row order (their rows, concatenated, are exactly mm_embeds and
        their positions exactly mm_positions); empty means the items are unnamed, so prefix caching stops at
        the first multimodal row.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    mm_embeds: Any | None = None
    mm_positions: Any | None = None
    mrope_positions: Any | None = None
    mrope_delta: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    mm_spans: list[MMSpan] = field(default_factory=list)
    # sampling.bad_words as token id sequences (shared/inputs/assemble.bad_words_token_ids)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
