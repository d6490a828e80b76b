"""POST /tokenize and /detokenize: the served model's tokenizer and chat template, nothing generated.

Chat messages go through the same `Preparer.render_chat` as a chat request (parse, limits, media policy
pre-check, template, tokenisation), so /tokenize counts exactly the ids /v1/chat/completions would send the
generator: each media item is ONE placeholder token there, since expanding it to its embedding rows needs
the decoded media, which /tokenize never fetches. No stage is called.
"""
from __future__ import annotations

import asyncio

from ...core import GatewayCore
from .protocol import (
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
)


class OpenAIServingTokenization:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.core.check_model(req.model)
        prep = self.core.preparer
        if isinstance(req, TokenizeChatRequest):
            # templates are CPU work: off the event loop, as for generation requests
            ids, _ = await asyncio.to_thread(prep.render_chat, req.messages, chat_template=req.chat_template,
                                             add_generation_prompt=req.add_generation_prompt,
                                             add_special_tokens=req.add_special_tokens)
        else:
            ids = await asyncio.to_thread(prep.tokenize_prompt, req.prompt,
                                          add_special_tokens=req.add_special_tokens)
        strs = self.core.info.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.core.info.max_model_len, tokens=ids,
                                token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.core.check_model(req.model)
        ids = self.core.preparer.check_token_ids(list(req.tokens), param="tokens")
        return DetokenizeResponse(prompt=self.core.info.tokenizer.decode(ids))
