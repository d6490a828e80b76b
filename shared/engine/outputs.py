"""StepOutput: what `LLMEngine.step()` reports for one request after one step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepOutput:
    """New tokens of one request in one step.

    `new_token_ids` is empty for a request that finished without a new token (aborted). `logprobs` holds the
    log-probability of each new token under the raw logits, when the request asked for logprobs.
    `finish_reason` is "stop", "length" or "abort" once `finished`. `num_cached_tokens`: prompt tokens whose
    K/V came from the prefix cache when the request was admitted (0 until then). `top_logprobs`: per new
    token, its top (token id, logprob) alternatives, when the request asked for logprobs > 0.
    """

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # with sampling.prompt_logprobs, on the request's first output: per prompt token, (its id, logprob, rank, its
    # top alternatives), None for the first one (nothing predicts it)
    prompt_logprobs: list[tuple[int, float, int, list[tuple[int, float]]] | None] | None = None
