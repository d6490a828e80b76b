"""A small Python client of the gateway's public gRPC API (proto/mmpipe/v1/gateway.proto).

    from mmpipe.client import MMPipeClient

    with MMPipeClient("127.0.0.1:50050") as client:
        out = client.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://.../cat.jpg"}, "uuid": "cat-1"},
            {"type": "text", "text": "What is in the image?"}]}], max_tokens=32, temperature=0)
        print(out.text, out.finish_reason, out.usage)
        for chunk in client.chat(messages, stream=True, max_tokens=32):
            print(chunk.text, end="", flush=True)

Messages are the OpenAI dicts the HTTP API takes (text, image_url, video_url, audio_url, input_audio and
image_embeds parts, each with an optional `uuid` and a payload that may be None). Failures raise the
mmpipe error the gateway raised (shared/errors.py: InvalidInputError, ServiceUnavailableError, ...).
Light: grpcio and the generated stubs only, no torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from mmpipe.shared import errors as _errors
from mmpipe.shared.errors import InvalidInputError, MMPipeError, error_from_grpc_code

__all__ = ["MMPipeClient", "Chunk", "Result"]

_ERROR_CLASS_HEADER = "mmpipe-error-class"
_ERROR_PARAM_HEADER = "mmpipe-error-param"
_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "seed", "stop", "stop_token_ids",
             "ignore_eos", "logprobs", "skip_special_tokens", "n", "top_logprobs", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "bad_words")
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
             mm_processor_kwargs: dict[str, Any] | None = None, media_io_kwargs: dict[str, Any] | None = None,
             **sampling: Any) -> Result | Iterator[Chunk]:
        """Chat completion. `sampling`: temperature, top_p, top_k, max_tokens, min_tokens, seed, stop,
        stop_token_ids, ignore_eos, logprobs (bool), skip_special_tokens, and vLLM's n, top_logprobs,
        presence_penalty, frequency_penalty, repetition_penalty, min_p, logit_bias, bad_words. `mm_processor_kwargs`
        (e.g. {"max_pixels": 200704}) / `media_io_kwargs`: this request's media settings, as vLLM's body fields."""
        pb2 = _pb()[0]
        req = pb2.ChatRequest(model=model, messages=[_message(m, i) for i, m in enumerate(messages)],
                              sampling=_sampling(sampling), chat_template=chat_template or "",
                              add_generation_prompt=add_generation_prompt,
                              media_settings=_media_settings(mm_processor_kwargs, media_io_kwargs))
        chunks = self._call(self._stub.Chat, req, request_id)
        return chunks if stream else _collect(chunks)

    def generate(self, prompt: str | list[int], *, model: str = "", stream: bool = False,
                 request_id: str | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
                 media_io_kwargs: dict[str, Any] | None = None, **sampling: Any) -> Result | Iterator[Chunk]:
        """Completion of a text prompt or of prompt token ids."""
        pb2 = _pb()[0]
        req = pb2.CompletionRequest(model=model, sampling=_sampling(sampling),
                                    media_settings=_media_settings(mm_processor_kwargs, media_io_kwargs))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(int(t) for t in prompt)
        chunks = self._call(self._stub.Generate, req, request_id)
        return chunks if stream else _collect(chunks)

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _call(self, method: Any, req: Any, request_id: str | None) -> Iterator[Chunk]:
        md = []
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        if request_id:
            md.append(("x-request-id", request_id))
        if self.tenant:
            md.append(("x-mmpipe-tenant", self.tenant))
        call = method(req, metadata=md, timeout=self.timeout)
        return _chunks(call)


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
                        top_logprobs=[list(zip(t.token_ids, t.logprobs)) for t in m.top_logprobs])
    except grpc.RpcError as e:
        raise _error(e) from None
    finally:
        call.cancel()  # no-op when finished; frees the gateway (and generator) when the caller stops early


def _collect(chunks: Iterator[Chunk]) -> Result:
    by_index: dict[int, Result] = {}
    usage: dict[str, int] = {}
    request_id = ""
    for c in chunks:
        out = by_index.setdefault(c.index, Result(text="", index=c.index))
        out.text += c.text
        out.token_ids += c.token_ids
        out.logprobs += c.logprobs
        out.top_logprobs += c.top_logprobs
        request_id = c.request_id
        if c.finish_reason is not None:
            out.finish_reason = c.finish_reason
        if c.usage is not None:
            usage = c.usage
    choices = [by_index[i] for i in sorted(by_index)] or [Result(text="")]
    for r in choices:
        r.request_id, r.usage = request_id, usage
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
    import json

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


def _message(m: dict[str, Any], i: int) -> Any:
    pb2 = _pb()[0]
    if not isinstance(m, dict) or "role" not in m:
        raise InvalidInputError(f"messages[{i}] needs a role", param=f"messages[{i}]")
    content = m.get("content")
    parts = [{"type": "text", "text": content or ""}] if content is None or isinstance(content, str) else content
    return pb2.ChatMessage(role=m["role"], content=[_part(p, f"messages[{i}].content[{j}]")
                                                    for j, p in enumerate(parts)])


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
