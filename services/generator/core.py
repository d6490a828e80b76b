"""The generator's work, free of gRPC: embedding keys + prompt ids -> a stream of TokenChunks.

Embeddings are read from Redis (one MGET round trip for all keys, zero-copy views), the prompt is expanded
and the EngineRequest built exactly as offline (build_engine_request), and AsyncLLMEngine runs it. Stop
strings are applied here with the same IncrementalDetokenizer as the offline loop. Leaving the stream early
(client cancelled) aborts the request in the engine, which frees its KV blocks at the next step. Steps of a
request are timed into mmpipe_generator_step_duration_seconds{step} (services/common/steps.py): fetch, build, and
from the engine's own clock (shared/engine/timing.py) queue and prefill.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mmpipe.services.common.convert import EmbeddingRef, TokenChunk
from mmpipe.shared.detokenizer import IncrementalDetokenizer
from mmpipe.shared.errors import InvalidInputError, MMPipeError, NotFoundError
from mmpipe.shared.fanout import child_requests, merge_streams
from mmpipe.shared.inputs.assemble import build_engine_request
from mmpipe.shared.types import EngineRequest, SamplingParams

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def eos_token_ids(adapter) -> list[int]:
    """The same EOS ids the offline LLM uses: generation_config's, else the tokenizer's."""
    eos = getattr(getattr(adapter.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = adapter.tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class GeneratorCore:
    def __init__(self, cfg, adapter, aengine, cache, metrics):
        self.cfg = cfg
        self.adapter = adapter
        self.engine = aengine
        self.cache = cache
        self.tokenizer = adapter.tokenizer
        self.max_model_len = cfg.max_model_len or getattr(adapter.text_config, "max_position_embeddings", None)
        self.eos = eos_token_ids(adapter)
        self.placeholders = adapter.placeholder_ids()
        self.io = ThreadPoolExecutor(4, thread_name_prefix="redis-io")
        m, self.ml = metrics, metrics.model
        self.m_running = m.gauge("running_requests", "Generate streams open")
        inner = aengine.engine
        m.gauge("engine_running_requests", "sequences running in the engine").labels(self.ml).set_function(
            inner.num_running_requests)
        m.gauge("engine_waiting_requests", "sequences waiting in the engine").labels(self.ml).set_function(
            inner.num_waiting_requests)
        bm = inner.block_manager
        m.gauge("engine_kv_cache_usage_ratio", "share of the KV cache blocks in use").labels(self.ml).set_function(
            lambda: 1.0 - bm.num_free_blocks / max(1, bm.num_blocks))
        m.registry.register(_EngineCounters(inner, self.ml))
        self.m_prompt = m.counter("prompt_tokens", "prompt tokens after placeholder expansion")
        self.m_gen = m.counter("generation_tokens", "tokens generated")
        self.m_finish = m.counter("finished_requests", "requests by finish reason", ("reason",))
        self.m_ttft = m.histogram("time_to_first_token_seconds", "from request to first token", _TTFT_BUCKETS)
        self.m_cache = m.counter("cache_reads", "embedding keys read from the cache", ("result",))
        self.m_bytes = m.counter("cache_read_bytes", "embedding bytes read from the cache")
        self.steps = m.steps()

    def _mismatch(self, ref: EmbeddingRef, emb) -> str | None:
        """Why a stored embedding must not be used for `ref`, or None when it matches.

        The serde checksum already proved the bytes are what was written; this proves they are what this
        request expects: the key's modality, the ref's modality and num_tokens (what the gateway and ingest
        were told), the payload's own meta, and the adapter's row width. A mismatch is served as a miss
        (the gateway re-resolves once, then answers 503), never as a wrong embedding."""
        parts = ref.key.split(":")
        key_modality = parts[4] if len(parts) > 5 and parts[5] in ("uuid", "hash") else None
        t = emb.tensor
        rows = int(t.shape[0]) if t.dim() >= 1 else -1
        meta_n = emb.meta.get("num_tokens")
        if key_modality is not None and emb.modality != key_modality:
            return f"stored modality {emb.modality!r} under a {key_modality!r} key"
        if ref.modality and emb.modality != ref.modality:
            return f"stored modality {emb.modality!r}, expected {ref.modality!r}"
        if t.dim() != 2 or t.shape[1] != self.adapter.embed_width:
            return f"stored shape {tuple(t.shape)}, expected (N, {self.adapter.embed_width})"
        if ref.num_tokens and rows != ref.num_tokens:
            return f"stored {rows} tokens, expected {ref.num_tokens}"
        if isinstance(meta_n, int) and meta_n != rows:
            return f"stored meta says {meta_n} tokens, the tensor has {rows}"
        grid = emb.meta.get("grid_thw")
        grid_tokens = getattr(self.adapter, "_grid_tokens", None)  # M-RoPE families: rows follow the grid
        if grid is not None and grid_tokens is not None:
            try:
                want = grid_tokens(list(grid))
            except (TypeError, ValueError):
                return f"stored grid_thw {grid!r} is not (t, h, w)"
            if want != rows:
                return f"stored grid_thw {list(grid)} means {want} tokens, the tensor has {rows}"
        return None

    def _drop(self, keys: list[str]) -> None:
        for k in keys:
            try:
                self.cache.delete(k)
            except MMPipeError as e:  # best effort: the entry is not served either way
                log.warning("could not drop mismatched embedding %s: %s", k, e.message)

    async def _fetch(self, refs: list[EmbeddingRef]):
        if not refs:
            return []
        embs = await self.steps.timed("fetch", asyncio.get_running_loop().run_in_executor(
            self.io, self.cache.get_many, [r.key for r in refs]))
        missing = [r for r, e in zip(refs, embs) if e is None]
        bad = [(r, why) for r, e in zip(refs, embs) if e is not None and (why := self._mismatch(r, e))]
        if bad:
            self.m_cache.labels(self.ml, "mismatch").inc(len(bad))
            for r, why in bad:
                log.warning("embedding %s does not match its request (%s): dropped, served as a miss", r.key, why)
            missing += [r for r, _ in bad]
            # Dropped so the gateway's one re-resolve re-encodes it (a hash key) or reports it missing (a UUID):
            # left in place, every Lookup would keep calling it a hit.
            await asyncio.get_running_loop().run_in_executor(self.io, self._drop, [r.key for r, _ in bad])
        self.m_cache.labels(self.ml, "hit").inc(len(refs) - len(missing))
        if missing:
            self.m_cache.labels(self.ml, "miss").inc(len(missing))
            names = ", ".join(f"{r.modality} {r.uuid or r.key}" for r in missing[:4])
            raise NotFoundError(f"{len(missing)} embedding(s) not in the cache (evicted or never stored): {names}; "
                                f"ingest the media again")
        self.m_bytes.labels(self.ml).inc(sum(e.tensor.numel() * e.tensor.element_size() for e in embs))
        return embs

    def _check_placeholders(self, ids: list[int], refs: list[EmbeddingRef]) -> None:
        want = Tally(r.modality for r in refs)
        have = Tally()
        for m, pid in self.placeholders.items():
            have[m] = sum(1 for t in ids if t == pid)
        for m in set(want) | set(have):
            if m not in self.placeholders:
                raise InvalidInputError(f"this model takes no {m} input", param="embeddings")
            if want[m] != have[m]:
                raise InvalidInputError(f"the prompt has {have[m]} {m} placeholder(s) but {want[m]} {m} "
                                        f"embedding(s) were given", param="embeddings")

    async def generate(self, request_id: str, token_ids: list[int], refs: list[EmbeddingRef],
                       sampling: SamplingParams, return_text: bool = False) -> AsyncIterator[TokenChunk]:
        t0 = time.perf_counter()
        if not request_id:
            raise InvalidInputError("request_id is required", param="request_id")
        if not token_ids:
            raise InvalidInputError("the prompt is empty", param="prompt_token_ids")
        self._check_placeholders(token_ids, refs)
        embs = await self._fetch(refs)
        t_build = time.perf_counter()
        req: EngineRequest = build_engine_request(self.adapter, request_id, list(token_ids), list(embs), sampling,
                                                  max_model_len=self.max_model_len, eos_token_ids=self.eos,
                                                  mm_keys=[r.key for r in refs])
        self.steps.since("build", t_build)
        n_prompt = len(req.prompt_token_ids)
        self.m_prompt.labels(self.ml).inc(n_prompt)
        kids = child_requests(req)  # n > 1: one engine request per sample, sharing the prompt's KV blocks
        self.m_running.labels(self.ml).inc()
        samples = [self._sample(kid, i, t0, n_prompt, return_text) for i, kid in enumerate(kids)]
        chunks = samples[0] if len(samples) == 1 else merge_streams(samples)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # merged: cancels the samples' tasks, which close their engine streams
            self.m_running.labels(self.ml).dec()

    async def _sample(self, req: EngineRequest, index: int, t0: float, n_prompt: int,
                      return_text: bool) -> AsyncIterator[TokenChunk]:
        """The TokenChunks of one sample: engine outputs, detokenised and cut at a stop string."""
        sampling = req.sampling
        detok = IncrementalDetokenizer(self.tokenizer, sampling) if (return_text or sampling.stop) else None
        sent = 0
        first = True
        reason = "abort"
        submitted = time.monotonic()  # the engine's clock (timing.py)
        stream = self.engine.generate(req)
        try:
            async for out in stream:
                new = list(out.new_token_ids)
                lps = list(out.logprobs) if out.logprobs else None
                tops = list(out.top_logprobs) if out.top_logprobs else None
                finished, finish_reason = out.finished, out.finish_reason
                if detok is not None and detok.add_tokens(new):
                    keep = detok.stop_token_count - sent  # tokens after the one completing the stop string go
                    new, lps, tops = new[:keep], (lps[:keep] if lps else lps), (tops[:keep] if tops else tops)
                    finished, finish_reason = True, "stop"
                sent += len(new)
                text = detok.take_new_text(finished) if (detok is not None and return_text) else ""
                if first and new:
                    self._first_token(req.request_id, t0, submitted)
                    first = False
                self.m_gen.labels(self.ml).inc(len(new))
                if finished:
                    reason = finish_reason or "stop"
                yield TokenChunk(new, lps, text, finished, finish_reason if finished else None, n_prompt,
                                 out.num_cached_tokens, index, tops, out.prompt_logprobs)
                if finished:
                    return  # leaving the engine's stream early aborts the request (stop string case)
        finally:
            await stream.aclose()  # aborts the engine request if it is still running (cancel, stop string)
            self.m_finish.labels(self.ml, reason).inc()

    def _first_token(self, request_id: str, t0: float, submitted: float) -> None:
        """Time to first token, and the engine's part of it as its stepper clocked it: queue (handed to the
        engine until first scheduled) and prefill (until the step that sampled the first token ended)."""
        self.m_ttft.labels(self.ml).observe(time.perf_counter() - t0)
        times = self.engine.first_token_timing(request_id)
        if times is not None:
            scheduled, sampled = times
            self.steps.record("queue", submitted, scheduled, clock=time.monotonic)
            self.steps.record("prefill", scheduled, sampled, clock=time.monotonic)

    async def warmup(self) -> None:
        ids = self.tokenizer("hello", add_special_tokens=False).input_ids or [0]
        req = build_engine_request(self.adapter, "warmup", ids, [], SamplingParams(max_tokens=2, temperature=0.0),
                                   max_model_len=self.max_model_len, eos_token_ids=self.eos)
        async for _ in self.engine.generate(req):
            pass

    async def close(self) -> None:
        await self.engine.shutdown_async(timeout=30)
        self.io.shutdown(wait=True)
        self.cache.close()


class _EngineCounters:
    """Cumulative engine counters read at scrape time (the engine itself knows nothing of Prometheus):
    steps by how they ran (decode_graph: a CUDA graph of decodes; mixed_graph: prefill chunks in a CUDA graph;
    eager), preemptions, the prefix cache's queries, hits and cached blocks, and the KV blocks given back behind
    the sliding window (from `engine.stats`)."""

    def __init__(self, engine, model: str):
        self.engine, self.model = engine, model

    def collect(self):
        st = self.engine.stats
        steps = CounterMetricFamily("mmpipe_generator_engine_steps", "engine steps by how they ran",
                                    labels=["model", "kind"])
        steps.add_metric([self.model, "decode_graph"], st["graph_steps"])
        steps.add_metric([self.model, "prefill_graph"], st["prefill_graph_steps"])
        steps.add_metric([self.model, "mixed_graph"], st["mixed_graph_steps"] - st["prefill_graph_steps"])
        steps.add_metric([self.model, "eager"], st["steps"] - st["graph_steps"] - st["mixed_graph_steps"])
        yield steps
        pre = CounterMetricFamily("mmpipe_generator_engine_preemptions",
                                  "sequences preempted to free KV blocks (recomputed later)", labels=["model"])
        pre.add_metric([self.model], self.engine.scheduler.num_preemptions)
        yield pre
        freed = CounterMetricFamily("mmpipe_generator_engine_window_freed_blocks",
                                    "KV blocks given back mid-sequence, behind every layer's sliding window "
                                    "(models whose every layer is windowed)", labels=["model"])
        freed.add_metric([self.model], st["window_freed_blocks"])
        yield freed
        # prefix cache: hit rate = hits / queries (prompt tokens at admission), and blocks holding a key now
        for name, key, doc in (("mmpipe_generator_prefix_cache_queries_tokens", "prefix_cache_queries",
                                "prompt tokens looked up (admissions)"),
                               ("mmpipe_generator_prefix_cache_hits_tokens", "prefix_cache_hits",
                                "prompt tokens served from the prefix cache")):
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([self.model], st[key])
            yield c
        blocks = GaugeMetricFamily("mmpipe_generator_prefix_cache_cached_blocks",
                                   "KV blocks holding a reusable prefix (in use or evictable)", labels=["model"])
        blocks.add_metric([self.model], st["prefix_cache_cached_blocks"])
        yield blocks
