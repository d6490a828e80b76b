"""POST /tokenize and /detokenize: pydantic requests -> GatewayCore.tokenize / .detokenize -> vLLM's responses.

Chat messages (and their tools) go through the same `Preparer.render_chat` as a chat request (parse, limits,
media policy pre-check, template with the tools, tokenisation), so /tokenize returns exactly the ids
/v1/chat/completions sends the generator: each media item is ONE placeholder token there, since expanding it to its
embedding rows needs the decoded media, which /tokenize never fetches. No stage is called.
"""
from __future__ import annotations

from ...core import GatewayCore
from ...types import TokenizeInput
from .protocol import (
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
)


class OpenAIServingTokenization:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        if isinstance(req, TokenizeChatRequest):
            inp = TokenizeInput(messages=req.messages, model=req.model, add_special_tokens=req.add_special_tokens,
                                template=req.template_options(), chat_template=req.chat_template,
                                return_token_strs=bool(req.return_token_strs), tools=req.tool_request(),
                                media_kwargs=req.media_kwargs())
        else:
            inp = TokenizeInput(prompt=req.prompt, model=req.model, add_special_tokens=req.add_special_tokens,
                                return_token_strs=bool(req.return_token_strs))
        out = await self.core.tokenize(inp)
        return TokenizeResponse(count=out.count, max_model_len=out.max_model_len, tokens=out.tokens,
                                token_strs=out.token_strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        return DetokenizeResponse(prompt=self.core.detokenize(req.model, req.tokens))
