"""Pydantic models shared by the OpenAI endpoints: sampling fields, usage, errors, stream options.

Field names and defaults follow the OpenAI API and vLLM's extensions (top_k, min_p, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, return_token_ids, structured_outputs,
repetition_penalty, bad_words). Ranges are checked once, by SamplingParams (400 naming the field).
A field that would change what the answer means and is not implemented (`UNIMPLEMENTED`) is a 400 naming it,
never silently dropped; other unknown fields are ignored with a warning, as vLLM does, so newer clients keep
working.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmpipe.shared.chat.template_options import ChatTemplateOptions
from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.structured import StructuredOutputsParams
from mmpipe.shared.tools.request import ToolRequest, parse_tool_request
from mmpipe.shared.types import SamplingParams

from ..types import MediaKwargs

logger = logging.getLogger(__name__)


def _set(v: Any) -> bool:
    return v not in (None, False, 0, "", [], {})


# Fields of OpenAI's API or vLLM's that change the answer and that mmpipe does not implement: a request that
# sets one (to anything but its neutral value) is refused, naming the field.
UNIMPLEMENTED: dict[str, Any] = {
    "tools": _set, "functions": _set, "function_call": _set,
    "tool_choice": lambda v: _set(v) and v not in ("none", "auto"),
    "allowed_token_ids": _set, "logits_processors": _set, "use_beam_search": _set,
    "length_penalty": lambda v: v not in (None, 1, 1.0), "truncate_prompt_tokens": lambda v: v is not None,
    "prediction": _set, "audio": _set,
    "modalities": lambda v: _set(v) and v != ["text"],
    "guided_json": _set, "guided_regex": _set, "guided_choice": _set, "guided_grammar": _set,
    "guided_json_object": _set, "guided_decoding_backend": _set, "structural_tag": _set,
    "prompt_embeds": _set, "return_tokens_as_token_ids": _set, "spaces_between_special_tokens": lambda v: v is False,
    "vllm_xargs": _set, "web_search_options": _set,
}
_HINTS = {"guided_json": "use structured_outputs={'json': ...} or response_format",
          "guided_regex": "use structured_outputs={'regex': ...}", "guided_choice": "use structured_outputs={'choice': ...}",
          "guided_grammar": "use structured_outputs={'grammar': ...}",
          "guided_json_object": "use response_format={'type': 'json_object'}"}


def refuse_unimplemented(fields: dict[str, Any]) -> None:
    for name, is_set in UNIMPLEMENTED.items():
        if name in fields and is_set(fields[name]):
            hint = _HINTS.get(name)
            raise UnsupportedError(f"{name} is not supported by this server" + (f" ({hint})" if hint else ""),
                                   param=name)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra(self) -> "OpenAIBaseModel":
        if self.model_extra:
            ignored = sorted(set(self.model_extra) - set(UNIMPLEMENTED))
            if ignored:
                logger.warning("ignoring unknown request fields: %s", ignored)
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class MediaSettingsFields(OpenAIBaseModel):
    """vLLM's per-request media settings (both endpoints): checked by the gateway's Preparer against the model
    family's allow-list and the server's ceilings (shared/inputs/media_settings.py), then sent to the stages."""

    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None

    def media_kwargs(self) -> MediaKwargs:
        return MediaKwargs(mm_processor_kwargs=self.mm_processor_kwargs, media_io_kwargs=self.media_io_kwargs)


class ToolFields(OpenAIBaseModel):
    """OpenAI's tool fields (chat completions, and /tokenize with messages): kept as JSON here, validated once by
    shared/tools (`tool_request()`: the offline API's rules), so both endpoints accept and refuse the same."""

    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    def tool_request(self) -> ToolRequest | None:
        return parse_tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)


class ChatTemplateFields(OpenAIBaseModel):
    """vLLM's chat-template inputs (chat completions, and /tokenize with messages): kept as sent here, validated once
    by shared/chat (`template_options()`: the offline API's rules), so both endpoints accept and refuse the same."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Any = None
    documents: Any = None

    def template_options(self) -> ChatTemplateOptions:
        return ChatTemplateOptions.of(add_generation_prompt=self.add_generation_prompt,
                                      continue_final_message=self.continue_final_message,
                                      chat_template_kwargs=self.chat_template_kwargs, documents=self.documents)


class SamplingFields(OpenAIBaseModel):
    """The sampling fields both endpoints accept."""

    # names of UNIMPLEMENTED that an endpoint does implement (chat: tools, tool_choice)
    IMPLEMENTED: ClassVar[frozenset[str]] = frozenset()

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1)  # the server's cap (--max-n) is checked by the gateway core
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    min_p: float | None = None
    # token id (a JSON string key) -> bias, clamped to [-100, 100] as OpenAI documents and vLLM does
    logit_bias: dict[str, float] | None = None
    bad_words: list[str] | None = None
    # vLLM's extra: logprobs of the prompt tokens with this many alternatives (0..20), not with stream=True
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extension: return prompt and completion token ids in the response
    return_token_ids: bool = False
    user: str | None = None
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs extra (json, regex, choice,
    # grammar, json_object); kept as plain JSON here and checked in structured_outputs_params()
    response_format: Any = None
    structured_outputs: Any = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and not isinstance(rf, dict):
            raise InvalidInputError("response_format must be an object", param="response_format")
        kind = (rf or {}).get("type", "text")
        if rf is not None and kind not in ("text", "json_object", "json_schema"):
            raise UnsupportedError(f"response_format type {kind!r} is not supported (use text, json_object or "
                                   "json_schema)", param="response_format.type")
        if so is not None and kind != "text":
            raise InvalidInputError("give response_format or structured_outputs, not both", param="structured_outputs")
        if so is not None:
            return StructuredOutputsParams.of(so)
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            js = rf.get("json_schema")  # type: ignore[union-attr]
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                raise InvalidInputError("response_format.json_schema must be an object with a JSON schema under "
                                        "'schema'", param="response_format.json_schema")
            return StructuredOutputsParams(json=js.get("schema", {}),
                                           source_param="response_format.json_schema.schema")
        return None

    def _sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        fields = {**(self.model_extra or {}), **{k: getattr(self, k) for k in UNIMPLEMENTED
                                                 if k in type(self).model_fields}}
        refuse_unimplemented({k: v for k, v in fields.items() if k not in self.IMPLEMENTED})
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidInputError("prompt_logprobs are not available with stream=true", param="prompt_logprobs")
        bias = None
        if self.logit_bias:
            bias = {}
            for k, v in self.logit_bias.items():
                if not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                    raise InvalidInputError(f"logit_bias[{k!r}] must be a finite number", param="logit_bias")
                bias[k] = min(100.0, max(-100.0, float(v)))
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
            min_tokens=self.min_tokens, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured_outputs_params(), n=self.n,
            presence_penalty=0.0 if self.presence_penalty is None else self.presence_penalty,
            frequency_penalty=0.0 if self.frequency_penalty is None else self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=0.0 if self.min_p is None else self.min_p, logit_bias=bias, bad_words=self.bad_words,
            prompt_logprobs=self.prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the generator's prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "mmpipe"
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text of each token, as OpenAI logprobs show it."""
    return [tokenizer.decode([t]) for t in ids]


def extra_fields(model: BaseModel) -> dict[str, Any]:
    return dict(model.model_extra or {})


def prompt_logprobs_json(tokenizer: Any, entries: list | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` shape: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} for the token itself and then its top alternatives."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        tid, lp, rank, alts = e
        d = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": tokenizer.decode([tid])}}
        for r, (a, v) in enumerate(alts, start=1):
            d.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": tokenizer.decode([a])})
        out.append(d)
    return out
