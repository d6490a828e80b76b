"""A small Python client of the gateway's public gRPC API (proto/mmpipe/v1/gateway.proto).

    from mmpipe.client import MMPipeClient

    with MMPipeClient("127.0.0.1:50050") as client:
        out = client.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://.../cat.jpg"}, "uuid": "cat-1"},
            {"type": "text", "text": "What is in the image?"}]}], max_tokens=32, temperature=0)
        print(out.text, out.finish_reason, out.usage)
        for chunk in client.chat(messages, stream=True, max_tokens=32):
            print(chunk.text, end="", flush=True)

Messages are the OpenAI dicts the HTTP API takes (text, image_url, video_url, audio_url, input_audio,
image_embeds and audio_embeds parts, each with an optional `uuid` and a payload that may be None; an assistant
message's `tool_calls` and a tool message's `tool_call_id`). Tools as in the chat API:

        out = client.chat(messages, tools=[{"type": "function", "function": {"name": "get_weather",
                          "parameters": {...}}}], tool_choice="required", max_tokens=128)
        out.tool_calls[0].name, json.loads(out.tool_calls[0].arguments), out.finish_reason  # "tool_calls"

The chat template's inputs as in vLLM's chat API: `chat_template_kwargs={"enable_thinking": False}`,
`documents=[{"title": ..., "text": ...}]`, and `continue_final_message=True, add_generation_prompt=False` to continue
a final assistant message.

Failures raise the mmpipe error the gateway raised (shared/errors.py: InvalidInputError, ServiceUnavailableError,
...). Light: grpcio, the generated stubs and the pure-Python shared/tools types, no torch.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from mmpipe.shared import errors as _errors
from mmpipe.shared.errors import InvalidInputError, MMPipeError, error_from_grpc_code
from mmpipe.shared.tools.parsers import DeltaToolCall, ToolCall

__all__ = ["MMPipeClient", "Chunk", "DeltaToolCall", "Result", "ToolCall", "Tokenized"]

_ERROR_CLASS_HEADER = "mmpipe-error-class"
_ERROR_PARAM_HEADER = "mmpipe-error-param"
_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed", "stop", "stop_token_ids",
             "ignore_eos", "logprobs", "skip_special_tokens", "n", "top_logprobs", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "bad_words", "prompt_logprobs")
_URL_PARTS = ("image_url", "video_url", "audio_url")


@dataclass
class Chunk:
    """One streamed step of sample `index`: new text and token ids; `finish_reason` on the sample's last one,
    `usage` (of every sample) on the stream's last one."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    request_id: str = ""
    index: int = 0
    # per token: its top (token id, logprob) alternatives (with top_logprobs > 0)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # with prompt_logprobs, on the first chunk: per prompt token (id, logprob, rank, alternatives), None first
    prompt_logprobs: list | None = None
    # chat with tools: tool-call pieces parsed from this step (a call's first piece has its id and name)
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass
class Tokenized:
    """Gateway.Tokenize's answer, as vLLM's /tokenize response."""

    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


@dataclass
class Result:
    """A whole completion: sample 0's fields, and every sample (n > 1) in `choices`, in index order."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    request_id: str = ""
    index: int = 0
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    choices: list["Result"] = field(default_factory=list)
    prompt_logprobs: list | None = None
    # chat with tools: the calls parsed from the answer (`text` is then the rest, usually ""), in order
    tool_calls: list[ToolCall] = field(default_factory=list)


def _pb():
    from mmpipe.services.common.pb import gateway_pb2, gateway_pb2_grpc

    return gateway_pb2, gateway_pb2_grpc


class MMPipeClient:
    def __init__(self, target: str, *, api_key: str | None = None, timeout: float | None = None,
                 max_message_mb: int = 256, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, tls_server_name: str | None = None,
                 tenant: str | None = None):
        """tls_*: connect over TLS (verifying the gateway with `tls_ca_file`, or the system roots), presenting a
        client certificate for mTLS; tenant: sent as x-mmpipe-tenant (honoured only by a gateway started with
        --trust-tenant-header)."""
        n = max_message_mb * 1024 * 1024
        opts: list[tuple[str, Any]] = [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]
        if tls_ca_file or tls_cert_file:
            from mmpipe.services.common.tls import ClientTLS

            tls = ClientTLS(tls_ca_file, tls_cert_file, tls_key_file, tls_server_name)
            self._channel = grpc.secure_channel(target, tls.credentials(), options=opts + tls.channel_options())
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self.tenant = tenant
        self._stub = _pb()[1].GatewayStub(self._channel)
        self.api_key = api_key
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MMPipeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- public API ------------------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, Any]], *, model: str = "", stream: bool = False,
             chat_template: str | None = None, add_generation_prompt: bool = True, request_id: str | None = None,
             add_special_tokens: bool | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
             media_io_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool | None = None,
             continue_final_message: bool | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             documents: list[dict[str, str]] | None = None, **sampling: Any) -> Result | Iterator[Chunk]:
        """Chat completion. `sampling`: temperature, top_p, top_k, max_tokens, min_tokens, seed, stop,
        stop_token_ids, ignore_eos, logprobs (bool), skip_special_tokens, and vLLM's n, top_logprobs,
        presence_penalty, frequency_penalty, repetition_penalty, min_p, logit_bias, bad_words, prompt_logprobs.
        `mm_processor_kwargs` (e.g. {"max_pixels": 200704}) / `media_io_kwargs`: this request's media settings, as
        vLLM's body fields. `tools` (OpenAI function tools), `tool_choice` ("none", "auto", "required" or
        {"type": "function", "function": {"name": ...}}) and `parallel_tool_calls`: as the chat API's; the gateway
        validates them. `continue_final_message` (with add_generation_prompt=False), `chat_template_kwargs` (e.g.
        {"enable_thinking": False}) and `documents` (a list of {"title": ..., "text": ...}): the chat template's
        inputs, as vLLM's chat API fields."""
        pb2 = _pb()[0]
        req = pb2.ChatRequest(model=model, messages=[_message(m, i) for i, m in enumerate(messages)],
                              sampling=_sampling(sampling), chat_template=chat_template or "",
                              add_generation_prompt=add_generation_prompt,
                              media_settings=_media_settings(mm_processor_kwargs, media_io_kwargs))
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        _set_tools(req, tools, tool_choice, parallel_tool_calls)
        _set_template_inputs(req, continue_final_message, chat_template_kwargs, documents)
        chunks = self._call(self._stub.Chat, req, request_id)
        return chunks if stream else _collect(chunks)

    def generate(self, prompt: str | list[int], *, model: str = "", stream: bool = False,
                 request_id: str | None = None, echo: bool = False, add_special_tokens: bool | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None, media_io_kwargs: dict[str, Any] | None = None,
                 **sampling: Any) -> Result | Iterator[Chunk]:
        """Completion of a text prompt or of prompt token ids; `echo`: the text starts with the prompt's."""
        pb2 = _pb()[0]
        req = pb2.CompletionRequest(model=model, sampling=_sampling(sampling), echo=echo,
                                    media_settings=_media_settings(mm_processor_kwargs, media_io_kwargs))
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(int(t) for t in prompt)
        chunks = self._call(self._stub.Generate, req, request_id)
        return chunks if stream else _collect(chunks)

    def tokenize(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None, model: str = "",
                 add_special_tokens: bool | None = None, add_generation_prompt: bool = True,
                 chat_template: str | None = None, return_token_strs: bool = False,
                 request_id: str | None = None, continue_final_message: bool | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 documents: list[dict[str, str]] | None = None, tools: list[dict[str, Any]] | None = None,
                 tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None,
                 media_io_kwargs: dict[str, Any] | None = None) -> Tokenized:
        """Token ids of a prompt, or of chat messages through the chat template (POST /tokenize); the template's
        inputs, the tools it renders and the media settings as in `chat` (messages only)."""
        pb2 = _pb()[0]
        req = pb2.TokenizeRequest(model=model, add_generation_prompt=add_generation_prompt,
                                  chat_template=chat_template or "", return_token_strs=return_token_strs)
        if mm_processor_kwargs or media_io_kwargs:
            req.media_settings.CopyFrom(_media_settings(mm_processor_kwargs, media_io_kwargs))
        _set_tools(req, tools, tool_choice, parallel_tool_calls)
        if (prompt is None) == (messages is None):
            raise InvalidInputError("give exactly one of prompt or messages", param="prompt")
        if prompt is not None:
            req.prompt = prompt
        else:
            req.messages.messages.extend(_message(m, i) for i, m in enumerate(messages or []))
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        _set_template_inputs(req, continue_final_message, chat_template_kwargs, documents)
        r = self._unary(self._stub.Tokenize, req, request_id)
        return Tokenized(count=r.count, max_model_len=r.max_model_len or None, tokens=list(r.tokens),
                         token_strs=list(r.token_strs) if return_token_strs else None)

    def detokenize(self, tokens: list[int], *, model: str = "", request_id: str | None = None) -> str:
        """The text of token ids (POST /detokenize)."""
        req = _pb()[0].DetokenizeRequest(model=model, tokens=[int(t) for t in tokens])
        return self._unary(self._stub.Detokenize, req, request_id).prompt

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _unary(self, method: Any, req: Any, request_id: str | None) -> Any:
        try:
            return method(req, metadata=self._metadata(request_id), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def _call(self, method: Any, req: Any, request_id: str | None) -> Iterator[Chunk]:
        call = method(req, metadata=self._metadata(request_id), timeout=self.timeout)
        return _chunks(call)

    def _metadata(self, request_id: str | None) -> list[tuple[str, str]]:
        md = []
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        if request_id:
            md.append(("x-request-id", request_id))
        if self.tenant:
            md.append(("x-mmpipe-tenant", self.tenant))
        return md


def _chunks(call: Any) -> Iterator[Chunk]:
    try:
        for m in call:
            usage = None
            if m.HasField("usage"):
                usage = {"prompt_tokens": m.usage.prompt_tokens, "completion_tokens": m.usage.completion_tokens,
                         "total_tokens": m.usage.total_tokens}
            yield Chunk(text=m.text, token_ids=list(m.token_ids), logprobs=list(m.logprobs),
                        finish_reason=m.finish_reason if m.HasField("finish_reason") else None, usage=usage,
                        request_id=m.request_id, index=m.index,
                        top_logprobs=[list(zip(t.token_ids, t.logprobs)) for t in m.top_logprobs],
                        prompt_logprobs=[None, *((p.token_id, p.logprob, p.rank, list(zip(p.top.token_ids,
                                                                                          p.top.logprobs)))
                                                 for p in m.prompt_logprobs)] if m.prompt_logprobs else None,
                        tool_calls=[DeltaToolCall(c.index, c.id if c.HasField("id") else None,
                                                  c.name if c.HasField("name") else None, c.arguments)
                                    for c in m.tool_calls])
    except grpc.RpcError as e:
        raise _error(e) from None
    finally:
        call.cancel()  # no-op when finished; frees the gateway (and generator) when the caller stops early


def _collect(chunks: Iterator[Chunk]) -> Result:
    by_index: dict[int, Result] = {}
    calls: dict[int, dict[int, list[str]]] = {}  # sample -> call index -> [id, name, arguments]
    usage: dict[str, int] = {}
    request_id = ""
    prompt_logprobs = None
    for c in chunks:
        if c.prompt_logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = c.prompt_logprobs
        out = by_index.setdefault(c.index, Result(text="", index=c.index))
        out.text += c.text
        out.token_ids += c.token_ids
        out.logprobs += c.logprobs
        out.top_logprobs += c.top_logprobs
        for d in c.tool_calls:
            call = calls.setdefault(c.index, {}).setdefault(d.index, [d.id or "", d.name or "", ""])
            call[2] += d.arguments or ""
        request_id = c.request_id
        if c.finish_reason is not None:
            out.finish_reason = c.finish_reason
        if c.usage is not None:
            usage = c.usage
    choices = [by_index[i] for i in sorted(by_index)] or [Result(text="")]
    for r in choices:
        r.request_id, r.usage, r.prompt_logprobs = request_id, usage, prompt_logprobs
        r.tool_calls = [ToolCall(*v) for _, v in sorted(calls.get(r.index, {}).items())]
    first = choices[0]
    first.choices = choices
    return first


def _error(e: grpc.RpcError) -> MMPipeError:
    code = e.code()
    cls_name = param = None
    for k, v in (e.trailing_metadata() or ()):
        if k == _ERROR_CLASS_HEADER:
            cls_name = v
        elif k == _ERROR_PARAM_HEADER:
            param = v
    cls = getattr(_errors, cls_name, None) if cls_name else None
    details = e.details() or code.name
    if isinstance(cls, type) and issubclass(cls, MMPipeError):
        return cls(details, param=param)
    err = error_from_grpc_code(code.name, details)
    err.param = param
    return err


def _media_settings(mm: dict[str, Any] | None, io: dict[str, Any] | None) -> Any:
    return _pb()[0].MediaSettings(mm_processor_kwargs_json=json.dumps(mm) if mm else "",
                                  media_io_kwargs_json=json.dumps(io) if io else "")


def _sampling(kw: dict[str, Any]) -> Any:
    unknown = set(kw) - set(_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {sorted(unknown)}; known: {', '.join(_SAMPLING)}")
    pb2 = _pb()[0]
    s = pb2.SamplingOptions()
    for k, v in kw.items():
        if v is None:
            continue
        if k == "stop":
            s.stop.extend([v] if isinstance(v, str) else list(v))
        elif k == "stop_token_ids":
            s.stop_token_ids.extend(int(t) for t in v)
        elif k == "logit_bias":
            s.logit_bias.update({int(t): float(b) for t, b in v.items()})
        elif k == "bad_words":
            s.bad_words.extend([v] if isinstance(v, str) else list(v))
        else:
            setattr(s, k, v)
    return s


def _set_tools(req: Any, tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None,
               parallel: bool | None) -> None:
    """The chat API's tool fields on a ChatRequest (a tool's shape is checked by the gateway; here only what
    the typed message cannot hold)."""
    pb2 = _pb()[0]
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise InvalidInputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                                    param=f"tools[{i}]")
        tool = pb2.FunctionTool(name=str(fn.get("name") or ""))
        if fn.get("description") is not None:
            tool.description = str(fn["description"])
        if fn.get("parameters") is not None:
            tool.parameters_json = json.dumps(fn["parameters"])
        if fn.get("strict") is not None:
            tool.strict = bool(fn["strict"])
        req.tools.append(tool)
    if isinstance(choice, str):
        req.tool_choice_mode = choice
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise InvalidInputError('tool_choice must be {"type": "function", "function": {"name": ...}}',
                                    param="tool_choice.function.name")
        req.tool_choice_function = name
    elif choice is not None:
        raise InvalidInputError("tool_choice must be a string or a named function", param="tool_choice")
    if parallel is not None:
        req.parallel_tool_calls = parallel


def _set_template_inputs(req: Any, continue_final: bool | None, kwargs: dict[str, Any] | None,
                         documents: list[dict[str, str]] | None) -> None:
    """The chat template's inputs on a ChatRequest or TokenizeRequest (their values are checked by the gateway;
    here only what the typed message cannot hold)."""
    pb2 = _pb()[0]
    if continue_final is not None:
        req.continue_final_message = bool(continue_final)
    if kwargs is not None:
        try:
            req.chat_template_kwargs_json = json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"chat_template_kwargs must be JSON: {e}", param="chat_template_kwargs") from None
    for i, d in enumerate(documents or []):
        if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
            raise InvalidInputError(f"documents[{i}] must be an object of string values", param=f"documents[{i}]")
        req.documents.append(pb2.Document(fields=[pb2.DocumentField(key=k, value=v) for k, v in d.items()]))


def _message(m: dict[str, Any], i: int) -> Any:
    pb2 = _pb()[0]
    if not isinstance(m, dict) or "role" not in m:
        raise InvalidInputError(f"messages[{i}] needs a role", param=f"messages[{i}]")
    content = m.get("content")
    # no content (an assistant message of tool calls): no parts, which templates render as "" (an empty text part
    # is not: Qwen's template writes its newline)
    if content is None or isinstance(content, str):
        parts = [{"type": "text", "text": content}] if content else []
    else:
        parts = content
    out = pb2.ChatMessage(role=m["role"], content=[_part(p, f"messages[{i}].content[{j}]")
                                                   for j, p in enumerate(parts)])
    if m.get("tool_call_id") is not None:
        out.tool_call_id = str(m["tool_call_id"])
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise InvalidInputError(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', "
                                    f"'function': {{'name', 'arguments'}}}}", param=f"messages[{i}].tool_calls[{j}]")
        args = fn.get("arguments", "")
        out.tool_calls.append(pb2.ToolCall(id=call.get("id") or "", name=fn.get("name") or "",
                                           arguments=args if isinstance(args, str) else json.dumps(args)))
    return out


def _part(p: Any, where: str) -> Any:
    pb2 = _pb()[0]
    if isinstance(p, str):
        return pb2.ContentPart(text=p)
    t = p.get("type") if isinstance(p, dict) else None
    out = pb2.ContentPart()
    if isinstance(p, dict) and p.get("uuid") is not None:
        out.uuid = p["uuid"]
    if t == "text":
        out.text = p.get("text", "")
    elif t in _URL_PARTS:
        v = p.get(t)
        url = v.get("url") if isinstance(v, dict) else v
        getattr(out, t).SetInParent()  # an empty URL still selects the part: a UUID-only item
        getattr(out, t).url = url or ""
    elif t == "input_audio":
        v = p.get(t) or {}
        out.input_audio.SetInParent()
        out.input_audio.data = v.get("data") or ""
        out.input_audio.format = v.get("format") or ""
    elif t == "audio_embeds":
        out.audio_embeds.SetInParent()
        out.audio_embeds.data = p.get(t) or ""
    elif t == "image_embeds":
        v = p.get(t)
        out.image_embeds.SetInParent()
        if isinstance(v, dict):
            out.image_embeds.data = v.get("image_embeds") or ""
            out.image_embeds.image_grid_thw = v.get("image_grid_thw") or ""
            out.image_embeds.image_sizes = v.get("image_sizes") or ""
        else:
            out.image_embeds.data = v or ""
    else:
        raise InvalidInputError(f"{where} has unsupported part type {t!r}", param=where)
    return out
