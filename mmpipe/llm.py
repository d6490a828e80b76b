"""The offline Python API: `LLM(model).generate(...)` and `.chat(...)`, as on vLLM's multimodal inputs page.

A facade only: it wires the shared cores together in one process (media loader -> resolver with the
embedding cache -> adapter towers -> engine) and turns engine tokens into RequestOutputs. The services run
the same cores, one stage per process.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any

from mmpipe.shared.chat.messages import parse_messages
from mmpipe.shared.chat.template_options import ChatTemplateOptions
from mmpipe.shared.chat.templates import apply_template, load_template_arg, resolve_template
from mmpipe.shared.errors import InvalidInputError, UnsupportedError
from mmpipe.shared.inputs.assemble import build_engine_request
from mmpipe.shared.inputs.chat_items import chat_item_refs
from mmpipe.shared.inputs.media_settings import MediaSettings
from mmpipe.shared.inputs.parse import ItemRef, ParseOptions, check_placeholders, parse_items
from mmpipe.shared.inputs.resolve import EmbeddingResolver
from mmpipe.shared.inputs.tokenize import PromptTokenizer
from mmpipe.shared.tools.plan import ToolPlan, ToolSettings
from mmpipe.shared.tools.request import parse_tool_request
from mmpipe.shared.types import CompletionOutput, EngineRequest, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """An offline multimodal LLM.

    Args mirror vLLM's `LLM` where the meaning is the same. `mm_cache` chooses the embedding cache: "memory"
    (an in-process LRU of `mm_cache_gb`), a "redis://..." URL (shared between processes), or None/"off".
    `engine` is "mmpipe" (the paged continuous-batching engine) or "hf" (transformers' generate, the reference).
    `enable_prefix_caching` (mmpipe engine): reuse the KV of prompt prefixes seen before, media included (keyed
    by each item's embedding cache key); `RequestOutput.num_cached_tokens` says how many prompt tokens it served.
    `video_backend` decodes video bytes: "pyav" (the default) or "decord" (`pip install 'mmpipe[decord]'`, x86-64).
    `tensor_parallel_size` N > 1 (mmpipe engine): the LM is sharded over N ranks, this process and N - 1 worker
    processes; every rank reads only its shard of the LM from the safetensors checkpoint, and this process loads
    the towers and no LM weight of its own beyond rank 0's shard.
    """

    def __init__(self, model: str, *, limit_mm_per_prompt: dict[str, int] | None = None,
                 media_io_kwargs: dict[str, dict] | None = None, enable_mm_embeds: bool = False,
                 max_model_len: int | None = None, dtype: Any = "auto", device: str | None = "auto",
                 allowed_local_media_path: str | None = None, allowed_media_domains: list[str] | None = None,
                 chat_template: str | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
                 mm_cache: str | None = "memory", mm_cache_gb: float = 2.0, engine: str = "mmpipe",
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, kv_cache_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, block_size: int = 16, enforce_eager: bool = False,
                 trust_remote_code: bool = False, allow_private_media_urls: bool | None = None,
                 enable_prefix_caching: bool = True, decode_workers: int = 0,
                 video_backend: str | None = None, tensor_parallel_size: int = 1):
        from mmpipe.shared.cache.factory import make_cache
        from mmpipe.shared.inputs.media_settings import SettingsSpace
        from mmpipe.shared.media.policy import MediaPolicy
        from mmpipe.shared.models.registry import load_adapter

        if tensor_parallel_size < 1 or (tensor_parallel_size > 1 and engine != "mmpipe"):
            raise InvalidInputError("tensor_parallel_size must be >= 1, and above 1 only with engine='mmpipe'",
                                    param="tensor_parallel_size")
        self.tensor_parallel_size = tensor_parallel_size
        # tensor parallel: the LM stays on the meta device here; each rank, this one included, reads its shard
        self.adapter = load_adapter(model, dtype=dtype, device=device, mm_processor_kwargs=mm_processor_kwargs,
                                    trust_remote_code=trust_remote_code,
                                    part="towers" if tensor_parallel_size > 1 else "all")
        self.tokenizer = self.adapter.tokenizer
        # chat prompts re-send their history: the pieces between added tokens are tokenized once
        self.prompt_tokens = PromptTokenizer(self.tokenizer)
        self.model_name = model
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt or {})
        self.enable_mm_embeds = enable_mm_embeds
        self.max_model_len = max_model_len or _model_max_len(self.adapter)
        self.chat_template = load_template_arg(chat_template)
        policy = MediaPolicy.from_env(
            allowed_media_domains=tuple(allowed_media_domains) if allowed_media_domains else None,
            allowed_local_media_path=allowed_local_media_path,
            # None: MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS decides (off unless set); http(s) media may then not
            # reach loopback / private / link-local addresses (SSRF).
            **({} if allow_private_media_urls is None else {"allow_private_networks": bool(allow_private_media_urls)}))
        # the server-wide settings; a prompt's own mm_processor_kwargs (and a chat's media_io_kwargs) overlay them
        # decode_workers > 0: media bytes are decoded in that many worker processes (shared/media/decode_pool.py), so
        # a crash or hang in a native decoder costs one item, not this process
        self.decode_pool = None
        if decode_workers:
            from mmpipe.shared.media.decode_pool import DecodePool, DecodePoolConfig

            self.decode_pool = DecodePool(DecodePoolConfig(workers=int(decode_workers)))
        # video_backend: "pyav" (None: the default) or "decord" (pip install 'mmpipe[decord]'); MMPIPE_VIDEO_BACKEND
        # is the services' default (--video-backend), not read here: the offline API takes its settings as arguments
        self.settings = SettingsSpace(self.adapter, model, media_io_kwargs=media_io_kwargs, policy=policy,
                                      pool=self.decode_pool, video_backend=video_backend)
        cache = make_cache("off" if mm_cache is None else mm_cache,
                           max_bytes=int(mm_cache_gb * (1 << 30)))
        self.resolver = EmbeddingResolver(self.adapter, self.settings, cache)
        keyspace = self.resolver.keyspace
        self.eos_token_ids = _eos_ids(self.adapter)
        self.engine = self._make_engine(engine, max_num_seqs=max_num_seqs,
                                        max_num_batched_tokens=max_num_batched_tokens, kv_cache_blocks=kv_cache_blocks,
                                        gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                                        enforce_eager=enforce_eager, enable_prefix_caching=enable_prefix_caching,
                                        prefix_cache_namespace=keyspace.prefix)
        self._ids = itertools.count()

    # ---- engine -----------------------------------------------------------------------------------
    def _make_engine(self, kind: str, **kw: Any):
        if kind == "hf":
            from mmpipe.shared.hf_generate import HFGenerateEngine

            return HFGenerateEngine(self.adapter.model)
        if kind != "mmpipe":
            raise InvalidInputError(f"unknown engine {kind!r}; use 'mmpipe' or 'hf'", param="engine")
        from mmpipe.shared.engine import EngineConfig, LLMEngine

        model = self.adapter.model
        cfg = EngineConfig(block_size=kw["block_size"], num_kv_blocks=kw["kv_cache_blocks"],
                           gpu_memory_utilization=kw["gpu_memory_utilization"], max_num_seqs=kw["max_num_seqs"],
                           max_num_batched_tokens=kw["max_num_batched_tokens"], max_model_len=self.max_model_len,
                           device=str(self.adapter.device), dtype=model.dtype,
                           enable_cuda_graphs=not kw["enforce_eager"],
                           enable_prefix_caching=kw["enable_prefix_caching"],
                           prefix_cache_namespace=kw["prefix_cache_namespace"], tokenizer=self.tokenizer,
                           tensor_parallel_size=self.tensor_parallel_size, model=self.model_name)
        return LLMEngine(model, cfg)

    @property
    def stats(self) -> dict[str, int]:
        """Work counters: media loaded, items preprocessed/encoded, cache hits and misses."""
        return self.resolver.stats.snapshot()

    def _parse_options(self) -> ParseOptions:
        return ParseOptions(modalities=self.adapter.modalities, limit_mm_per_prompt=self.limit_mm_per_prompt,
                            enable_mm_embeds=self.enable_mm_embeds, cache_enabled=self.resolver.cache is not None,
                            embeds_validator=self.adapter.embeds_from_user)

    # ---- generate ---------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        batch = prompts if isinstance(prompts, list) else [prompts]
        parsed = [self._parse_prompt(p) for p in batch]
        return self._run(parsed, sampling_params, use_tqdm)

    def _parse_prompt(self, prompt: Any) -> tuple[str | None, list[int], list[ItemRef], MediaSettings]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise InvalidInputError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'",
                                    param="prompt")
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "multi_modal_uuids",
                                 "mm_processor_kwargs"}
        if unknown:
            raise InvalidInputError(f"unknown prompt keys: {sorted(unknown)}", param="prompt")
        settings = self.settings.resolve(prompt.get("mm_processor_kwargs"))  # checked before any media work
        refs = parse_items(prompt.get("multi_modal_data"), prompt.get("multi_modal_uuids"), self._parse_options())
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            if not all(isinstance(t, int) and 0 <= t < len(self.tokenizer) for t in ids):
                raise InvalidInputError("prompt_token_ids must be token ids of this model", param="prompt_token_ids")
        elif isinstance(text, str):
            ids = self.tokenizer(text).input_ids
        else:
            raise InvalidInputError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'", param="prompt")
        return text, ids, refs, settings

    def _grammars(self):
        structured = getattr(getattr(self.engine, "runner", None), "structured", None)
        if structured is None:
            raise UnsupportedError("structured outputs need engine='mmpipe'", param="structured_outputs")
        return structured.compiler

    def _check(self, ids: list[int], refs: list[ItemRef]) -> None:
        pids = {m: self.adapter.placeholder_id(m) for m in self.adapter.modalities}
        check_placeholders(ids, refs, pids, {m: self.adapter.placeholder_token(m) for m in pids})

    def _run(self, parsed: list[tuple[str | None, list[int], list[ItemRef], MediaSettings]],
             sampling_params: SamplingParams | list[SamplingParams] | None, use_tqdm: bool) -> list[RequestOutput]:
        sps = _per_prompt(sampling_params, len(parsed))
        for _, ids, refs, _ in parsed:  # every prompt is checked before any media is loaded or encoded
            self._check(ids, refs)
        for sp in sps:  # grammars too: compiled once here, into the cache the engine compiles from
            if sp.structured_outputs is not None:
                self._grammars().compile(sp.structured_outputs)
        resolved = self.resolver.resolve_keyed([p[2] for p in parsed], settings=[p[3] for p in parsed])
        reqs: list[EngineRequest] = []
        for (text, ids, _, _), items, sp in zip(parsed, resolved, sps):
            rid = str(next(self._ids))
            reqs.append(build_engine_request(self.adapter, rid, ids, [e for e, _ in items], sp,
                                             max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                                             mm_keys=[k for _, k in items]))
        from mmpipe.shared.fanout import child_requests
        from mmpipe.shared.runner import run_to_completion

        children = [child_requests(r) for r in reqs]
        results = run_to_completion(self.engine, [c for cs in children for c in cs], self.tokenizer,
                                    use_tqdm=use_tqdm)
        outputs = []
        for (text, ids, _, _), req, cs in zip(parsed, reqs, children):
            rs = [results[c.request_id] for c in cs]
            outputs.append(RequestOutput(request_id=req.request_id, prompt=text, prompt_token_ids=req.prompt_token_ids,
                                         outputs=[CompletionOutput(i, r.text, r.token_ids, r.finish_reason,
                                                                   r.logprobs, r.top_logprobs)
                                                  for i, r in enumerate(rs)],
                                         num_cached_tokens=rs[0].num_cached_tokens,
                                         prompt_logprobs=rs[0].prompt_logprobs))
        return outputs

    # ---- chat -------------------------------------------------------------------------------------
    def chat(self, messages: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
             parallel_tool_calls: bool | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
             media_io_kwargs: dict[str, Any] | None = None, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             documents: list[dict[str, str]] | None = None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`. `tools` (OpenAI's function tools) are rendered by the chat template, as in vLLM; the
        answer is text (parse it with `mmpipe.shared.tools.get_tool_parser("hermes")().extract(text)`).
        `tool_choice` "required" or `{"type": "function", "function": {"name": ...}}` (mmpipe's addition, the
        server's semantics) makes the answer such a call, in the hermes format, with arguments valid for the
        schema. `continue_final_message` (with add_generation_prompt=False) leaves the final assistant message open
        so the model continues it; `chat_template_kwargs` are extra template variables (e.g. {"enable_thinking":
        False}); `documents` (mmpipe's addition, the chat API's field) go to RAG templates as `documents=` (the
        server's rules for all three: shared/chat/template_options.py). `mm_processor_kwargs` / `media_io_kwargs`:
        this call's own media settings over the LLM's (the family's allow-list and the LLM's ceilings apply:
        shared/models/mm_kwargs.py)."""
        options = ChatTemplateOptions.of(add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message,
                                         chat_template_kwargs=chat_template_kwargs, documents=documents)
        settings = self.settings.resolve(mm_processor_kwargs, media_io_kwargs)
        conversations = messages if (isinstance(messages, list) and messages and isinstance(messages[0], list)) \
            else [messages]
        template = resolve_template(self.adapter.family, self.adapter.processor,
                                    load_template_arg(chat_template) or self.chat_template)
        plan = ToolPlan.make(parse_tool_request(tools, tool_choice, parallel_tool_calls), ToolSettings(),
                             offline=True)
        parsed = []
        for conv in conversations:
            chat = parse_messages(conv)
            text = apply_template(self.adapter.processor, template, chat.conversation, options=options,
                                  tools=plan.template_tools() if plan is not None else None)
            refs = chat_item_refs(chat.parts, self._parse_options())
            ids = self.prompt_tokens.encode(text, add_special_tokens=False)
            parsed.append((text, ids, refs, settings))
        if plan is not None and plan.request.forced:
            sampling_params = [plan.sampling(sp, self._grammars()) for sp in _per_prompt(sampling_params, len(parsed))]
        return self._run(parsed, sampling_params, use_tqdm)


def _per_prompt(sp: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sp, list):
        if len(sp) != n:
            raise InvalidInputError(f"{len(sp)} sampling params for {n} prompts", param="sampling_params")
        return sp
    return [sp] * n


def _eos_ids(adapter) -> list[int]:
    gc = getattr(adapter.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = adapter.tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _model_max_len(adapter) -> int | None:
    return getattr(adapter.text_config, "max_position_embeddings", None)

