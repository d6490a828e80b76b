"""Step 1 of every request: check it and turn it into prompt token ids plus an ordered list of media items.

Everything here is CPU-only and touches no stage and no media bytes: chat parsing (shared/chat), the chat
template, tokenisation, vLLM's limits and placeholder rules (shared/inputs/parse.py) and the cheap part of
the media policy (URL scheme, host allow-list, local folder), so that a bad request fails with a 4xx
before any stage does any work. Tokenisation matches the offline `LLM` exactly: chat prompts without added
special tokens, completion prompts with them. Each part is a step of mmpipe_gateway_step_duration_seconds
(parse, template, tokenize; services/common/steps.py), and a span when tracing.
"""
from __future__ import annotations

import os
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property

from mmpipe.services.common.steps import StepTimer
from mmpipe.shared.chat.messages import parse_messages
from mmpipe.shared.chat.template_options import ChatTemplateOptions
from mmpipe.shared.chat.templates import apply_template
from mmpipe.shared.errors import InvalidInputError, LimitExceededError, MediaPolicyError
from mmpipe.shared.inputs.chat_items import chat_item_refs
from mmpipe.shared.inputs.media_settings import resolve_settings
from mmpipe.shared.inputs.parse import ItemRef, ParseOptions, check_placeholders
from mmpipe.shared.inputs.tokenize import PromptTokenizer
from mmpipe.shared.media.netguard import check_address, parse_ip_host
from mmpipe.shared.media.policy import MediaPolicy, normalize_host
from mmpipe.shared.structured.grammar import GrammarCompiler
from mmpipe.shared.tools.plan import ToolPlan, ToolSettings
from mmpipe.shared.tools.request import ToolRequest
from mmpipe.shared.types import SamplingParams

from .config import GatewayConfig
from .metrics import STEP_DURATION
from .model_info import ModelInfo
from .types import ChatInput, CompletionInput, MediaKwargs, TokenizeInput


@dataclass(frozen=True)
class PreparedPrompt:
    """A checked request: the prompt's token ids (one placeholder per item), its media items as the shared
    chat rules made them (`ItemRef`: modality, per-modality index, source = URL / raw `image_embeds` value /
    None for UUID-only, uuid, is_embeds; the one shape from here to the stage protos), the sampling (with the
    grammar of a forced tool choice) and the request's tool plan (how its answer is read; None: no tools)."""

    prompt_token_ids: list[int]
    media: list[ItemRef]
    sampling: SamplingParams
    tools: ToolPlan | None = None
    # what the stages get: the request's own mm_processor_kwargs (checked) and its effective media_io_kwargs
    media_kwargs: MediaKwargs = field(default_factory=MediaKwargs)


class Preparer:
    def __init__(self, cfg: GatewayConfig, info: ModelInfo):
        self.cfg = cfg
        self.info = info
        # Only what the gateway was configured with is pre-checked; ingest applies its own full policy
        # (redirect hops, realpath of local files, byte caps) when it fetches.
        self.policy = MediaPolicy.from_env(allowed_media_domains=cfg.allowed_media_domains,
                                           allowed_local_media_path=cfg.allowed_local_media_path,
                                           **({"allow_private_networks": True} if cfg.allow_private_media_urls else {}))
        self.steps = StepTimer(STEP_DURATION, cfg.served_model_name)
        self.tool_settings = ToolSettings(cfg.enable_auto_tool_choice, cfg.tool_call_parser)

    @cached_property
    def prompt_tokens(self) -> PromptTokenizer:
        """Chat prompts' tokenisation, the pieces between added tokens memoised (a chat re-sends its history)."""
        return PromptTokenizer(self.info.tokenizer)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs: every grammar is compiled against the tokenizer here, once per spec (cached), in
        a worker process (a spec that crashes the native engine is a 400, not this process's end), so an invalid
        or unsupported one is a 400 before any stage works; the generator compiles it again. Built on the first
        request that has one."""
        return GrammarCompiler(self.info.tokenizer, self.info.vocab_size, isolate=True)

    @property
    def parse_options(self) -> ParseOptions:
        # the offline API's rules; no embeds validator here: the encoder validates image_embeds
        return ParseOptions(modalities=tuple(self.info.modalities), limit_mm_per_prompt=self.cfg.limit_mm_per_prompt,
                            enable_mm_embeds=self.cfg.enable_mm_embeds, cache_enabled=True)

    # ---- chat ----------------------------------------------------------------------------------------
    def chat(self, inp: ChatInput) -> PreparedPrompt:
        self._check_template_allowed(inp.chat_template)  # before any other work (a template is a DoS vector)
        tools = ToolPlan.make(inp.tools, self.tool_settings)
        sampling = inp.sampling if tools is None else tools.sampling(inp.sampling, self.grammars)
        self._check_grammar(sampling)
        media_kwargs = self.media_kwargs(inp.media_kwargs)
        ids, media = self.render_chat(inp.messages, chat_template=inp.chat_template, template=inp.template,
                                      add_special_tokens=inp.add_special_tokens, tools=inp.tools)
        self._check_prompt(ids, media, sampling)
        return PreparedPrompt(ids, media, sampling, tools, media_kwargs)

    def tokenize_chat(self, inp: TokenizeInput) -> list[int]:
        """POST /tokenize with messages: the ids `chat` would send the generator for the same messages, tools and
        settings (the same `render_chat`); the server's tool flags are not applied, since nothing is generated."""
        self.media_kwargs(inp.media_kwargs)  # no effect on these ids (media stay one placeholder), still a 400
        special = False if inp.add_special_tokens is None else inp.add_special_tokens  # chat's default
        ids, _ = self.render_chat(inp.messages or [], chat_template=inp.chat_template, template=inp.template,
                                  add_special_tokens=special, tools=inp.tools)
        return ids

    def render_chat(self, messages: list[dict], *, chat_template: str | None = None,
                    template: ChatTemplateOptions | None = None, add_special_tokens: bool = False,
                    tools: ToolRequest | None = None) -> tuple[list[int], list[ItemRef]]:
        """Messages -> prompt token ids (one placeholder per media item) and the items: the chat rules of every
        chat request and of POST /tokenize (parse, limits, the media policy pre-check, the template with the
        request's template inputs and tools: all of them, whatever the tool choice)."""
        self._check_template_allowed(chat_template)
        t = time.perf_counter()
        chat = parse_messages(messages)
        media = chat_item_refs(chat.parts, self.parse_options)  # the offline API's rules: modalities, limits, embeds
        for p, ref in zip(chat.parts, media):
            if p.kind == "object":  # image_pil: only meaningful in-process
                raise InvalidInputError("image_pil parts are only accepted by the offline API; send image_url",
                                        param="messages")
            if p.kind == "url" and ref.source is not None:
                self.precheck_url(ref.source, p.modality)
        t = self._step("parse", t)
        text = apply_template(self.info.processor, self.info.template(chat_template), chat.conversation,
                              options=template, tools=tools.template_tools() if tools is not None else None)
        t = self._step("template", t)
        ids = self.prompt_tokens.encode(text, add_special_tokens=add_special_tokens)
        self._step("tokenize", t)
        return ids, media

    # ---- completions -----------------------------------------------------------------------------------
    def completion(self, inp: CompletionInput) -> PreparedPrompt:
        if (inp.prompt is None) == (inp.prompt_token_ids is None):
            raise InvalidInputError("give exactly one of prompt (text) or prompt token ids", param="prompt")
        self._check_grammar(inp.sampling)
        self.media_kwargs(inp.media_kwargs)  # no media in a completion, but a bad setting is still a 400
        if inp.prompt is not None:
            ids = self.tokenize_prompt(inp.prompt, add_special_tokens=inp.add_special_tokens)
        else:
            ids = self.check_token_ids(list(inp.prompt_token_ids or []), param="prompt")
        if not ids:
            raise InvalidInputError("the prompt is empty", param="prompt")
        self._check_prompt(ids, [], inp.sampling)
        return PreparedPrompt(ids, [], inp.sampling)

    def tokenize_prompt(self, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
        """A text prompt's token ids, as completions and POST /tokenize make them."""
        t = time.perf_counter()
        ids = self.info.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        self._step("tokenize", t)
        return ids

    def check_token_ids(self, ids: list, *, param: str) -> list[int]:
        """Token ids from a client: ints of this tokenizer's vocabulary, or a 400 naming `param`."""
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidInputError(f"token ids must be in [0, {self.info.vocab_size}); got {bad[:5]}", param=param)
        return ids

    # ---- shared checks -----------------------------------------------------------------------------------
    def media_kwargs(self, kw: MediaKwargs) -> MediaKwargs:
        """The request's media settings checked with the stages' own rule (shared/inputs/media_settings.py), so a
        bad key is a 400 before any stage works; the stages apply the same check to what they are sent."""
        if not kw.mm_processor_kwargs and not kw.media_io_kwargs:
            return MediaKwargs(media_io_kwargs=self.cfg.media_io_kwargs or None)
        s, own_mm = resolve_settings(self.info.adapter_class, self.info.processor, self.cfg.mm_processor_kwargs,
                                     self.cfg.media_io_kwargs, kw.mm_processor_kwargs, kw.media_io_kwargs,
                                     self.policy)
        return MediaKwargs(mm_processor_kwargs=own_mm or None, media_io_kwargs=s.media_io_kwargs or None)

    def _check_template_allowed(self, chat_template: str | None) -> None:
        if chat_template is not None and not self.cfg.trust_request_chat_template:
            raise InvalidInputError("chat_template in the request is refused: this server only applies its own "
                                    "template (start it with --trust-request-chat-template to accept "
                                    "client-supplied templates)", param="chat_template")

    def _step(self, step: str, t0: float) -> float:
        """Record a step that began at `t0` and return now, when the next one begins."""
        self.steps.since(step, t0)
        return time.perf_counter()

    def _check_grammar(self, sampling: SamplingParams) -> None:
        if sampling.structured_outputs is not None:
            self.grammars.compile(sampling.structured_outputs)

    def _check_prompt(self, ids: list[int], media: list[ItemRef], sampling: SamplingParams) -> None:
        check_placeholders(ids, media, self.info.placeholder_ids, self.info.placeholder_tokens)
        limit = self.info.max_model_len
        if limit is not None:
            # Media placeholders only grow when expanded: an unexpanded prompt that is already too long
            # can be refused here; the generator checks the expanded length.
            need = len(ids) + (sampling.max_tokens or 1)
            if len(ids) >= limit or need > limit:
                raise LimitExceededError(
                    f"the prompt has {len(ids)} tokens before media expansion; with max_tokens="
                    f"{sampling.max_tokens} it needs at least {need} > max_model_len={limit}", param="max_tokens")

    def precheck_url(self, url: str, modality: str) -> None:
        if not isinstance(url, str) or not url.strip():
            raise InvalidInputError(f"{modality} URL must be a non-empty string", param=f"{modality}_url")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
        except ValueError as e:  # "http://[" -> "Invalid IPv6 URL": a 400, not a 500
            raise InvalidInputError(f"malformed {modality} URL {url[:80]!r}: {e}", param=f"{modality}_url") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            host = normalize_host(parts.hostname or "")
            if not host:
                raise InvalidInputError(f"{modality} URL has no host", param=f"{modality}_url")
            if self.cfg.allowed_media_domains is not None and not self.policy.host_allowed(host):
                raise MediaPolicyError(
                    f"media URL host {host!r} is not in the allowed media domains "
                    f"{list(self.policy.allowed_media_domains or ())} (--allowed-media-domains)",
                    param=f"{modality}_url")
            ip = parse_ip_host(host)
            if ip is not None:  # IP literals only: no DNS on the event loop; ingest checks resolved names
                try:
                    check_address(ip, allow_private=self.policy.allow_private_networks, host=host)
                except MediaPolicyError as e:
                    raise MediaPolicyError(e.message, param=f"{modality}_url") from None
        elif scheme in ("file", ""):
            root = self.cfg.allowed_local_media_path
            if root is None:
                return  # ingest decides with its own --allowed-local-media-path
            path = urllib.parse.unquote(parts.path) if scheme == "file" else url
            full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
            root_n = os.path.normpath(root)
            if full != root_n and not full.startswith(root_n.rstrip(os.sep) + os.sep):
                raise MediaPolicyError(f"local media path {path[:200]!r} is outside the allowed folder "
                                       f"(--allowed-local-media-path)", param=f"{modality}_url")
        elif scheme != "data":
            raise MediaPolicyError(f"unsupported media URL scheme {scheme!r}: use http(s)://, data: or file://",
                                   param=f"{modality}_url")
