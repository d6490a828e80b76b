"""`--stream-interval N`: how the TokenChunks of one Generate stream are grouped into messages.

vLLM's flag and meaning: the number of tokens buffered before a streaming response is sent. The first chunk with
tokens goes out at once (time to first token is never delayed), then a message goes out each time N tokens have
gathered since the last one, and the finished chunk goes out at once with whatever is held. Held chunks are
sent as one message: token ids, logprobs and text concatenated, the rest of the last. N = 1 (the default) sends
every chunk as it comes.

This only groups what the core already decided: detokenisation and stop strings run per engine output before
anything is held, so a stop string still ends the request in the step that completes it. Merging outputs that
are already waiting (a consumer that fell behind) is the engine streams' job (shared/engine/streams.py), not
this one's.
"""
from __future__ import annotations

from dataclasses import replace

from mmpipe.services.common.convert import TokenChunk


class StreamInterval:
    """One stream's held chunks (one per sample of an n > 1 request); `push` each chunk the core yields and send
    what it returns."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"stream interval must be >= 1, got {n}")
        self.n = n
        self._held: list[TokenChunk] = []
        self._held_tokens = 0
        self._sent_tokens = False

    def push(self, chunk: TokenChunk) -> TokenChunk | None:
        """The message to send now (`chunk` joined to what was held before it), or None while it is held."""
        if self.n == 1:
            return chunk
        self._held.append(chunk)
        self._held_tokens += len(chunk.token_ids)
        if not (chunk.finished or not self._sent_tokens or self._held_tokens >= self.n):
            return None
        held, self._held, self._held_tokens = self._held, [], 0
        self._sent_tokens = self._sent_tokens or any(c.token_ids for c in held)
        return held[0] if len(held) == 1 else _joined(held)


def _joined(chunks: list[TokenChunk]) -> TokenChunk:
    lps = None if all(c.logprobs is None for c in chunks) else [x for c in chunks for x in (c.logprobs or ())]
    tops = None if all(c.top_logprobs is None for c in chunks) else \
        [x for c in chunks for x in (c.top_logprobs or ())]
    return replace(chunks[-1], token_ids=[t for c in chunks for t in c.token_ids], logprobs=lps,
                   text="".join(c.text for c in chunks), top_logprobs=tops,
                   prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None))
