"""ModelRunner: owns the KV cache, stages a scheduled batch as flat model inputs (staging.py, shared with the
CUDA graphs), runs the decoder (through a captured CUDA graph: a decode graph for pure-decode steps, a
prefill-only graph for short steps without decodes, a mixed graph for other steps with prefill chunks;
eagerly when no graph fits) and samples.

KV cache: one tensor (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim) for all layers; a token
at index i of a sequence lives in slot block_table[i // block_size] * block_size + i % block_size.

Tensor parallelism (`tp`, tp/): every rank has a runner over its shard, with a KV cache of its KV heads and the
same number of blocks (the minimum over the ranks). Rank 0 stages each step into a `StepPlan`, sends it to the
workers (`workers`, tp/workers.py) and runs `run_plan` like them; only rank 0 gets logits and samples. CUDA
graphs are not captured with tp (the collectives are not captured yet), so every step is eager.
"""
from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .attention import AttentionMetadata, create_backend
from .block_manager import cdiv
from .config import EngineConfig
from .decoder import PagedDecoder
from mmpipe.shared.structured.masks import StructuredOutputs

from .prompt_logprobs import prompt_logprob_rows, record_prompt_logprobs
from .sampler import Sampler, SamplerOutput
from .scheduler import ScheduledSeq, SchedulerOutput
from .staging import BlockTableRows, StepBuffers, stage_step
from .window import peak_blocks

log = logging.getLogger(__name__)


class StepPlan(NamedTuple):
    """One eager step's staged inputs, identical on every rank (views of the staging buffers on rank 0; what
    rank 0 sends each tensor-parallel worker). The multimodal rows themselves are not in it: with tp they are
    broadcast over the group inside the step (`mm_shape` tells the workers their shape)."""

    ids: np.ndarray            # (T,)
    pos: np.ndarray            # (T,) or (3, T)
    slot: np.ndarray           # (T,)
    lens: np.ndarray           # (S,)
    qsl: np.ndarray            # (S + 1,)
    bt: np.ndarray             # (S, W)
    lim: np.ndarray | None     # (T,) or None
    logits: np.ndarray         # rows whose logits are wanted
    num_decodes: int
    tables: list[list[int]]    # block tables, host lists (the torch attention backend reads them)
    mm_index: np.ndarray | None
    mm_shape: tuple[int, int] | None


class ModelRunner:
    def __init__(self, hf_model: nn.Module, config: EngineConfig, tp: Any = None, workers: Any = None):
        """`tp`: this rank's tp/group.TPShard (None: no tensor parallelism); `workers`: rank 0's
        tp/workers.TPWorkers, to which each step's plan is sent."""
        self.config = config
        self.tp, self.workers = tp, workers
        self.device = config.torch_device if tp is None else tp.group.device
        self.decoder = PagedDecoder(hf_model, tp)
        d = self.decoder
        if d.device.type != self.device.type or (self.device.index is not None and d.device != self.device):
            raise ValueError(f"the model is on {d.device} but EngineConfig.device is {config.device}; "
                             "load it there first (the engine never copies weights)")
        if d.dtype != config.dtype:
            raise ValueError(f"the model weights are {d.dtype} but EngineConfig.dtype is {config.dtype}")
        self.dtype = config.dtype
        self.block_size = config.block_size
        self.mrope = d.is_mrope
        self.bidirectional_mm = d.spec.mm_bidirectional  # prefill rows carry attention limits (staging.py)

        backend = config.resolved_backend()
        if backend == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                             "which runs the kernels in Triton's interpreter, slowly)")
        self.backend_name = backend
        self.attn = create_backend(backend, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                                   head_dim=d.head_dim, block_size=config.block_size, scale=d.scale,
                                   softcap=d.spec.attn_softcap)
        if backend == "triton":
            from .kernels.triton_ops import TritonOps

            self.ops = TritonOps(d, pack=config.pack_weights)
        else:
            from .ops import TorchOps

            self.ops = TorchOps(d.apply_rotary)
        self.sampler = Sampler()
        # grammars of structured-outputs requests; the tokenizer loads on the first one
        self.structured = StructuredOutputs(config.tokenizer or getattr(hf_model, "name_or_path", None) or None,
                                            d.vocab_size)

        num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        if tp is not None:  # every rank must hold every block: the smallest cache of them all
            num_blocks = tp.group.min_int(num_blocks)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache")
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros(2, d.num_layers, num_blocks, config.block_size, d.num_kv_heads, d.head_dim,
                                    dtype=self.dtype, device=self.device)
        mml = config.max_model_len or d.max_position_embeddings
        # Cap by the cache, so that one sequence alone can always run to its end (preemption never loops); a
        # model whose every layer is windowed gives blocks back behind the window, so one sequence needs only
        # the blocks of its window (window.py) and no cap applies when those fit.
        fits = peak_blocks(mml, config.block_size, d.spec.kv_free_window) <= num_blocks
        self.max_model_len = mml if fits else min(mml, num_blocks * config.block_size)
        self.max_blocks_per_seq = cdiv(self.max_model_len, config.block_size) + 1
        # host staging of eager steps (pageable: each upload has consumed its source when it returns)
        T, S, rows = config.max_num_batched_tokens, config.max_num_seqs, 3 if self.mrope else 1
        i32 = np.int32
        self.eager_buffers = StepBuffers(
            ids=np.zeros(T, i32), pos=np.zeros((rows, T), i32), slot=np.zeros(T, i32), lens=np.zeros(S, i32),
            qsl=np.zeros(S + 1, i32), logits=np.zeros(S, i32), bt=np.zeros((S, self.max_blocks_per_seq), i32),
            lim=np.zeros(T, i32) if self.bidirectional_mm else None)
        self.eager_tables = BlockTableRows(S)

        self.graphs = self.mixed_graphs = self.prefill_graphs = None
        self.stats_graph_steps = self.stats_mixed_graph_steps = self.stats_prefill_graph_steps = 0
        if backend == "triton" and config.enable_cuda_graphs and tp is None and self._moe_capturable():
            from .cuda_graphs import DecodeGraphs

            pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
            if config.mixed_graph_max_prefills and self.attn.prefill_impl == "triton":
                from .mixed_graphs import MixedGraphs

                self.mixed_graphs = MixedGraphs(self, config.mixed_graph_max_prefills, pool)
                self.mixed_graphs.capture()  # the largest activations first, then the others share them
                self.prefill_graphs = MixedGraphs(self, config.mixed_graph_max_prefills, pool, decodes=False)
                self.prefill_graphs.capture()
            self.graphs = DecodeGraphs(self, pool)
            self.graphs.capture()

    def _moe_capturable(self) -> bool:
        """Whether a CUDA graph can hold this decoder's sparse-MoE layers (moe.py): torch's grouped GEMM reads the
        expert offsets on the device in bf16; in fp16 / fp32 on CUDA it copies them to the host on every call
        (seen on an H200, torch 2.11), which a graph cannot capture, so such a model runs its steps eagerly."""
        if self.decoder.spec.moe is None or self.device.type != "cuda" or self.dtype == torch.bfloat16:
            return True
        log.warning("CUDA graphs off: the sparse-MoE layers' grouped GEMM syncs with the host in %s (bf16 does "
                    "not); every step runs eagerly", self.dtype)
        return False

    # ---- sizing ----------------------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        d = self.decoder
        return 2 * d.num_layers * self.block_size * d.num_kv_heads * d.head_dim * torch.empty(
            0, dtype=self.dtype).element_size()

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        mml = cfg.max_model_len or self.decoder.max_position_embeddings
        if self.device.type != "cuda":
            want = cfg.max_num_seqs * cdiv(mml, cfg.block_size)
            return max(cdiv(mml, cfg.block_size), min(want, cfg.cpu_kv_cache_bytes // self.block_bytes()))
        # CUDA: profile one full-budget prefill, then give what is left under the utilisation cap to the cache.
        # gpu_memory_utilization caps this process plus everything else on the GPU (vLLM's meaning).
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        self._profile_run()
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - base
        if self.backend_name == "triton" and cfg.enable_cuda_graphs and cfg.mixed_graph_max_prefills:
            activations *= 2  # the mixed graphs' pool holds one full-budget step, an eager fallback step another
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        if not 0 < free <= total:  # some virtualised GPUs report nonsense; trust torch's own accounting then
            free = total - torch.cuda.memory_reserved(dev)
        # sampler temporaries at full batch (fp32 logits, softmax, sort, noise) and the CUDA-graph pool
        reserve = 6 * cfg.max_num_seqs * self.decoder.vocab_size * 4 + 256 * 1024 * 1024
        avail = int(total * cfg.gpu_memory_utilization) - (total - free) - activations - reserve
        log.info("KV sizing: total %.1f GiB, in use %.1f GiB, activations %.2f GiB, reserve %.2f GiB -> %.1f GiB",
                 total / 2**30, (total - free) / 2**30, activations / 2**30, reserve / 2**30, avail / 2**30)
        if avail < self.block_bytes():
            raise ValueError(
                f"no memory left for the KV cache: {total / 2**30:.1f} GiB total, {(total - free) / 2**30:.1f} GiB "
                f"in use, {activations / 2**30:.2f} GiB for activations, gpu_memory_utilization="
                f"{cfg.gpu_memory_utilization}")
        return avail // self.block_bytes()

    @torch.inference_mode()
    def _profile_run(self) -> None:
        n = min(self.config.max_num_batched_tokens, self.decoder.max_position_embeddings)
        dummy_cache = torch.zeros(2, self.decoder.num_layers, 1, self.block_size, self.decoder.num_kv_heads,
                                  self.decoder.head_dim, dtype=self.dtype, device=self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        if self.mrope:
            pos = pos.expand(3, -1).contiguous()
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
            num_decodes=0, query_start_loc_host=[0, n], seq_lens_host=[n], block_tables_host=[[0]])
        self.decoder.forward(ids, pos, meta, dummy_cache, self.attn, self.ops,
                             logits_index=torch.arange(min(n, self.config.max_num_seqs), device=self.device))
        del dummy_cache

    # ---- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[ScheduledSeq], SamplerOutput | None]:
        """Run one step; returns the entries that sampled a token, with their tokens (in the same order)."""
        sampling = [sc for sc in sched.scheduled if sc.samples]
        prompt_rows, prompt_spans = prompt_logprob_rows(sched)
        if prompt_spans:  # logits at prompt positions too: the eager path, sampled rows first
            logits = self._run_eager(sched, prompt_rows)
            n = len(sampling)
            record_prompt_logprobs(logits[n:], prompt_spans)
            logits = logits[:n]
        elif self.graphs is not None and self.graphs.can_run(sched):
            logits = self.graphs.run(sched)
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(sched):
            logits = self.prefill_graphs.run(sched)
        elif self.mixed_graphs is not None and self.mixed_graphs.can_run(sched):
            logits = self.mixed_graphs.run(sched)
        else:
            logits = self._run_eager(sched)
        if not sampling:
            return [], None
        seqs = [sc.seq for sc in sampling]
        # the forward is in flight on a GPU: the grammar masks are computed on the host meanwhile
        return sampling, self.sampler(logits, seqs, self.structured.fill(seqs))

    def _run_eager(self, sched: SchedulerOutput, extra_rows: list[int] | None = None) -> torch.Tensor | None:
        """`extra_rows`: token rows whose logits are wanted too (prompt_logprobs), after the sampled ones."""
        buf = self.eager_buffers
        st = stage_step(sched, buf, self.eager_tables, block_size=self.block_size, chunk_row=sched.num_decodes)
        T, S = st.num_tokens, st.num_rows
        tables = [sc.seq.block_table for sc in sched.scheduled]
        width = max(len(t) for t in tables)
        mm_rows = torch.cat(st.mm_rows).to(self.device) if st.mm_rows else None
        plan = StepPlan(
            ids=buf.ids[:T], pos=buf.pos[:, :T] if self.mrope else buf.pos[0, :T], slot=buf.slot[:T],
            lens=buf.lens[:S], qsl=buf.qsl[:S + 1], bt=np.ascontiguousarray(buf.bt[:S, :width]),
            lim=buf.lim[:T] if buf.lim is not None else None,
            logits=np.concatenate([buf.logits[:st.num_logits], np.asarray(extra_rows, dtype=buf.logits.dtype)])
            if extra_rows else buf.logits[:st.num_logits],
            num_decodes=sched.num_decodes, tables=tables,
            mm_index=torch.cat(st.mm_index).numpy() if st.mm_index else None,
            mm_shape=tuple(mm_rows.shape) if mm_rows is not None else None)
        if self.workers is None:
            return self.run_plan(plan, mm_rows)
        self.workers.send_step(plan)
        try:
            return self.run_plan(plan, mm_rows)
        except RuntimeError as e:  # a collective failed: a worker's death, named, or the error itself
            raise self.workers.failure(e) from e

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan, mm_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward of one staged step (every rank); logits on rank 0, None on the tensor-parallel workers."""
        dev = self.device

        def up(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        if self.tp is not None and plan.mm_shape is not None:
            if mm_rows is None:  # a worker: rank 0's rows arrive here
                mm_rows = torch.empty(plan.mm_shape, dtype=self.dtype, device=dev)
            self.tp.group.broadcast(mm_rows)
        meta = AttentionMetadata(
            slot_mapping=up(plan.slot), seq_lens=up(plan.lens), block_tables=up(plan.bt),
            num_decodes=plan.num_decodes, query_start_loc_host=plan.qsl.tolist(), seq_lens_host=plan.lens.tolist(),
            block_tables_host=plan.tables, attn_limit=up(plan.lim) if plan.lim is not None else None)
        return self.decoder.forward(
            up(plan.ids), up(plan.pos), meta, self.kv_cache, self.attn, self.ops,
            mm_index=torch.from_numpy(plan.mm_index).to(dev) if plan.mm_index is not None else None,
            mm_rows=mm_rows, logits_index=up(plan.logits))

    def kv_cache_info(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "bytes": self.kv_cache.numel() * self.kv_cache.element_size(),
                "block_bytes": self.block_bytes(), "max_model_len": self.max_model_len,
                "dtype": str(self.dtype).replace("torch.", ""), "attention_backend": self.backend_name,
                "cuda_graphs": self.graphs is not None,
                "cuda_graph_batch_sizes": list(self.graphs.sizes) if self.graphs is not None else [],
                "cuda_graph_token_sizes": list(self.mixed_graphs.sizes) if self.mixed_graphs is not None else [],
                "cuda_graph_prefill_token_sizes": (list(self.prefill_graphs.sizes) if self.prefill_graphs is not None
                                                   else []),
                "max_tokens_in_cache": self.num_blocks * self.block_size,
                "tensor_parallel_size": 1 if self.tp is None else self.tp.layout.size}
