"""LLMEngine: the synchronous engine loop. add_request / abort_request between steps, step() runs one batch.

    engine = LLMEngine(hf_model, EngineConfig(device="cuda", dtype=torch.bfloat16))
    engine.add_request(EngineRequest(...))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

Not thread-safe: one thread drives it (see async_engine.AsyncLLMEngine for the asyncio front).

With `EngineConfig.tensor_parallel_size` N > 1 this process is rank 0: it starts ranks 1..N-1 (tp/workers.py),
every rank loads its own shard of the LM from the checkpoint, the scheduler runs here once, and each step's
plan goes to every rank; `hf_model` then only names the checkpoint (and its generation config) unless it is
already rank 0's shard. `shutdown()` stops the workers (an exit hook does too).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from mmpipe.shared.errors import InvalidInputError, LimitExceededError
from mmpipe.shared.types import EngineRequest, FinishReason

from .block_manager import BlockManager
from .config import EngineConfig
from .model_runner import ModelRunner
from .outputs import StepOutput
from .scheduler import Scheduler
from .sequence import Sequence, host_array, mm_runs, prompt_ids_array
from .window import peak_blocks

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, hf_model: nn.Module, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        t0 = time.perf_counter()
        self.tp_workers = None
        if self.config.tensor_parallel_size > 1:
            from .tp.workers import start_rank0

            self.tp_workers, shard, tp = start_rank0(hf_model, self.config)
            try:
                self.runner = ModelRunner(shard, self.config, tp=tp, workers=self.tp_workers)
                self.tp_workers.wait_ready()
            except RuntimeError as e:  # a start-up collective failed: most often a worker that could not load
                err = self.tp_workers.failure(e)
                self.tp_workers.stop()
                raise err from e
            except BaseException:
                self.tp_workers.stop()
                raise
        else:
            self.runner = ModelRunner(hf_model, self.config)
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          enable_prefix_caching=self.config.enable_prefix_caching,
                                          namespace=self.config.prefix_cache_namespace, mrope=self.runner.mrope,
                                          window=self.runner.decoder.spec.kv_free_window)
        cap = self.config.max_prefills_per_step
        if cap is None:
            cap = self.config.mixed_graph_max_prefills if self.runner.mixed_graphs is not None else 0
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens,
                                   max_prefills=cap or None)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []  # finishes decided between steps (aborts)
        gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        self._default_eos = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        # cumulative counters, plus the prefix cache's: prompt tokens looked up and found (first admissions),
        # blocks evicted, and blocks holding a key now (a gauge); and blocks given back behind the window
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "graph_steps": 0, "mixed_graph_steps": 0,
                      "prefill_graph_steps": 0,
                      "prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_evictions": 0,
                      "prefix_cache_cached_blocks": 0, "window_freed_blocks": 0}
        info = self.kv_cache_info()
        log.info("engine ready in %.1fs: KV cache %d blocks x %d tokens (%.1f MiB, %s), max_model_len %d, "
                 "backend %s, cuda graphs %s", time.perf_counter() - t0, info["num_blocks"], info["block_size"],
                 info["bytes"] / 2**20, info["dtype"], info["max_model_len"], info["attention_backend"],
                 info["cuda_graph_batch_sizes"] or "off")

    # ---- requests --------------------------------------------------------------------------------------------
    def validate_request(self, req: EngineRequest) -> np.ndarray:
        """Raise if `req` can never run (thread-safe: reads only immutable settings). Returns the prompt's ids
        as `prompt_ids_array` packs them (checked here; the Sequence keeps them instead of packing again)."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise InvalidInputError("the prompt is empty", param="prompt")
        if n > self.max_model_len:
            raise LimitExceededError(f"the prompt has {n} tokens; this engine takes at most {self.max_model_len}",
                                     param="prompt")
        if peak_blocks(n, self.config.block_size, self.block_manager.window) > self.runner.num_blocks:
            raise LimitExceededError(f"the prompt ({n} tokens) does not fit in the KV cache", param="prompt")
        vocab = self.runner.decoder.vocab_size
        try:
            ids = prompt_ids_array(req.prompt_token_ids)
        except ValueError:
            ids = None
        if ids is None or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InvalidInputError("prompt token id out of the vocabulary", param="prompt_token_ids")
        pos = None
        if req.mm_embeds is not None:
            emb = req.mm_embeds
            if req.mm_positions is None or emb.dim() != 2 or emb.shape[1] != self.runner.decoder.mm_width:
                raise InvalidInputError(f"mm_embeds must be (N, {self.runner.decoder.mm_width}) with "
                                        "mm_positions", param="mm_embeds")
            pos = host_array(req.mm_positions, np.int64).reshape(-1)
            if pos.size != emb.shape[0] or (pos.size and (int(pos.min()) < 0 or int(pos.max()) >= n)):
                raise InvalidInputError("mm_positions must give one prompt index per mm_embeds row",
                                        param="mm_positions")
            if self.runner.bidirectional_mm and pos.size:
                longest = max(b - a for a, b in mm_runs(pos))
                if longest > self.config.max_num_batched_tokens:  # a run is prefilled in one chunk
                    raise LimitExceededError(
                        f"a multimodal item of {longest} tokens attends bidirectionally and must be prefilled in "
                        f"one step, but max_num_batched_tokens is {self.config.max_num_batched_tokens}",
                        param="max_num_batched_tokens")
        mp = req.mrope_positions
        if mp is not None and tuple(mp.shape if hasattr(mp, "shape") else np.shape(mp)) != (3, n):
            raise InvalidInputError(f"mrope_positions must be (3, {n})", param="mrope_positions")
        if req.mm_spans:
            self._validate_spans(req, pos)
        bias = req.sampling.logit_bias or {}
        bad = [t for t in bias if t >= vocab]
        if bad:
            raise InvalidInputError(f"logit_bias token id(s) {bad[:5]} are outside the vocabulary (size {vocab})",
                                    param="logit_bias")
        if any(t < 0 or t >= vocab for w in req.bad_words_token_ids for t in w):
            raise InvalidInputError("bad_words tokenize to ids outside the model's vocabulary", param="bad_words")
        if req.sampling.n != 1:
            raise InvalidInputError("the engine runs one sample per request: fan n > 1 out with "
                                    "shared.fanout.child_requests", param="n")
        return ids

    @staticmethod
    def _validate_spans(req: EngineRequest, pos: np.ndarray | None) -> None:
        """The spans must describe exactly the rows and positions given: a span's key names those rows in the
        prefix cache, so a span that pointed elsewhere could hand one prompt's K/V to another."""
        if req.mm_embeds is None:
            raise InvalidInputError("mm_spans without mm_embeds", param="mm_spans")
        end = 0
        for sp in req.mm_spans:
            if sp.length < 1 or sp.offset < end:
                raise InvalidInputError("mm_spans must be non-empty, in prompt order and disjoint", param="mm_spans")
            end = sp.offset + sp.length
        if end > len(req.prompt_token_ids):
            raise InvalidInputError("mm_spans run past the prompt", param="mm_spans")
        # `pos`: the rows' positions (validate_request's); disjoint spans in order cover them iff they are equal
        want = np.concatenate([np.arange(sp.offset, sp.offset + sp.length) for sp in req.mm_spans])
        if pos is None or pos.shape != want.shape or not np.array_equal(pos, want):
            raise InvalidInputError("mm_spans must cover exactly the mm_positions, in row order", param="mm_spans")

    def add_request(self, req: EngineRequest) -> None:
        if req.request_id in self._seqs:
            raise InvalidInputError(f"duplicate request id {req.request_id!r}", param="request_id")
        ids = self.validate_request(req)
        gen = None
        if req.sampling.seed is not None:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(int(req.sampling.seed))
        seq = Sequence(req, max_model_len=self.max_model_len,
                       eos_token_ids=list(req.eos_token_ids) or self._default_eos, generator=gen,
                       bidirectional_mm=self.runner.bidirectional_mm, prompt_ids=ids)
        if seq.mm_embeds is not None:
            # One upload (and cast), when a chunk first needs rows, not one per chunk; none when the prefix cache
            # serves every row; the caller's tensor is left alone.
            seq.place_mm_embeds(self.runner.device, self.runner.dtype)
        self.runner.structured.add(seq)  # compiles its grammar, if any (InvalidInputError: refused)
        self._seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str, reason: str | FinishReason = FinishReason.ABORT) -> bool:
        """Finish a request now and free its blocks; the next step() reports it (finished, `reason`).

        Also how a caller ends a request on a stop string (reason "stop"). False if it is unknown or done."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        reason = reason.value if isinstance(reason, FinishReason) else str(reason)
        self.scheduler.finish(seq, reason)
        self._pending.append(StepOutput(request_id, [], [] if seq.want_logprobs else None, True, reason,
                                        seq.num_prompt_tokens, seq.num_cached_tokens,
                                        [] if seq.num_top_logprobs else None))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def num_waiting_requests(self) -> int:
        return len(self.scheduler.waiting)

    def num_running_requests(self) -> int:
        return len(self.scheduler.running)

    # ---- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        sampled, result = self.runner.execute(sched)
        self.stats["steps"] += 1
        st, bm = self.stats, self.block_manager
        st["graph_steps"] = self.runner.stats_graph_steps
        st["mixed_graph_steps"] = self.runner.stats_mixed_graph_steps  # the prefill-only set's steps included
        st["prefill_graph_steps"] = self.runner.stats_prefill_graph_steps
        st["prefix_cache_queries"] = bm.num_queried_tokens
        st["prefix_cache_hits"] = bm.num_hit_tokens
        st["prefix_cache_evictions"] = bm.num_evicted_blocks
        st["prefix_cache_cached_blocks"] = bm.num_cached_blocks
        st["window_freed_blocks"] = bm.num_window_freed_blocks
        for sc in sched.scheduled:
            if sc.seq.num_computed_tokens < sc.seq.num_prompt_tokens:
                self.stats["prefill_tokens"] += sc.num_new_tokens
            else:
                self.stats["decode_tokens"] += sc.num_new_tokens
            sc.seq.num_computed_tokens += sc.num_new_tokens
        if result is None:
            return outputs
        tops = result.top_logprobs or [None] * len(sampled)
        structured = self.runner.structured
        constrained = [(sc.seq, tok) for sc, tok in zip(sampled, result.token_ids) if sc.seq.grammar is not None]
        complete = structured.advance(constrained) if constrained else set()  # the grammars fed at once
        for sc, tok, lp, top in zip(sampled, result.token_ids, result.logprobs, tops):
            seq = sc.seq
            seq.token_ids.append(tok)
            reason = self._check_stop(seq, tok)
            if reason is None and id(seq) in complete:
                reason = FinishReason.STOP.value  # the grammar is complete
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
            prompt_lps = None
            if seq.num_prompt_logprobs is not None and seq.num_output_tokens == 1:
                prompt_lps = [None, *seq.prompt_logprobs]
            outputs.append(StepOutput(seq.request_id, [tok], [lp] if seq.want_logprobs else None,
                                      reason is not None, reason, seq.num_prompt_tokens, seq.num_cached_tokens,
                                      [top] if top is not None else None, prompt_lps))
        if constrained:  # their next masks are computed while the caller handles these outputs
            structured.prefetch([seq for seq, _ in constrained])
        return outputs

    @staticmethod
    def _check_stop(seq: Sequence, tok: int) -> str | None:
        n_out = seq.num_output_tokens
        if n_out >= seq.sampling.min_tokens and (tok in seq.eos_token_ids or tok in seq.stop_token_ids):
            return FinishReason.STOP.value
        if n_out >= seq.max_tokens or seq.num_tokens >= seq.max_model_len:
            return FinishReason.LENGTH.value
        return None

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (idempotent; nothing to do at size 1). The engine cannot step after."""
        if self.tp_workers is not None:
            self.tp_workers.stop()

    def kv_cache_info(self) -> dict:
        info = self.runner.kv_cache_info()
        info["free_blocks"] = self.block_manager.num_free_blocks
        info["num_preemptions"] = self.scheduler.num_preemptions
        info["prefix_caching"] = self.block_manager.enable_prefix_caching
        info["cached_blocks"] = self.block_manager.num_cached_blocks
        return info
