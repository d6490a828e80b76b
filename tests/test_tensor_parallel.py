"""Tensor parallelism (shared/engine/tp/) on the CPU: 2 gloo ranks, fp32, tiny models.

Greedy tokens identical between tensor_parallel_size 1 and 2, and equal to transformers' generate, for an M-RoPE
family with image embeddings (qwen2_5_vl) and a plain one (llava), through one schedule with chunked prefill
cutting an image's rows, preemption with a tiny KV budget and a cancelled request; the offline `LLM`; the
engine-core process (the served path), where a killed worker is an error named at once and shutdown leaves no
process. Each rank reads only its shard from the safetensors file. Bounded: three engine starts in all (each
spawns a worker: ~10 s on a 2-core box)."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from mmpipe.shared.engine import EngineConfig, EngineCoreClient, EngineCoreSpec, LLMEngine
from mmpipe.shared.engine.block_manager import cdiv
from mmpipe.shared.engine.tp.sharding import ShardSource, TPLayout, load_lm_shard
from mmpipe.shared.errors import ServiceUnavailableError, UnsupportedError
from mmpipe.shared.models.partial import held_bytes
from mmpipe.shared.types import SamplingParams

from engine_helpers import REF_TOKENS, first_mm_span, get_case, run_engine

pytestmark = pytest.mark.timeout(600)  # generous for a loaded shared box: the file takes ~30 s on an idle 2-core one


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _model_dir(family: str) -> str:
    return str(get_case(family).model.name_or_path)


# --- layout and shard loading (no process) ----------------------------------------------------------------------
def test_layout_splits_or_replicates_kv_heads():
    two = [TPLayout(r, 2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=479)
           for r in range(2)]
    assert [(t.heads, t.kv_heads, t.kv_head_start) for t in two] == [(2, 1, 0), (2, 1, 1)]
    # an odd vocabulary: ceil(479 / 2) rows each, the last shard one row short (zero-padded when read)
    assert [(t.vocab_start, t.vocab_stop, t.vocab_per_rank) for t in two] == [(0, 240, 240), (240, 479, 240)]
    four = [TPLayout(r, 4, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=480)
            for r in range(4)]
    # fewer KV heads than ranks: each rank holds one whole KV head, shared by the ranks of its q heads
    assert [(t.heads, t.kv_heads, t.kv_head_start) for t in four] == [(1, 1, 0), (1, 1, 0), (1, 1, 1), (1, 1, 1)]
    with pytest.raises(UnsupportedError, match="attention heads"):
        TPLayout(0, 8, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=480)
    with pytest.raises(UnsupportedError, match="KV heads"):
        TPLayout(0, 4, num_heads=12, num_kv_heads=3, head_dim=16, intermediate_size=128, vocab_size=480)


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_rank_loads_only_its_shard(family):
    full = get_case(family).model
    src = ShardSource(_model_dir(family), torch.float32, "cpu")
    shards = [load_lm_shard(src, r, 2) for r in range(2)]
    lm_full = sum(p.numel() * 4 for n, p in full.named_parameters() if n.startswith(("model.language_model", "lm_head")))
    for r, shard in enumerate(shards):
        assert held_bytes(shard) < 0.6 * lm_full  # about half (norms are replicated), towers not at all
        assert all(p.device.type == "meta" for n, p in shard.named_parameters() if "visual" in n or "vision" in n)
        a, fa = shard.model.language_model.layers[1].self_attn, full.model.language_model.layers[1].self_attn
        D = fa.head_dim
        assert torch.equal(a.q_proj.weight, fa.q_proj.weight[r * 2 * D:(r + 1) * 2 * D])
        assert torch.equal(a.k_proj.weight, fa.k_proj.weight[r * D:(r + 1) * D])
        assert torch.equal(a.o_proj.weight, fa.o_proj.weight[:, r * 2 * D:(r + 1) * 2 * D])
        if fa.q_proj.bias is not None:  # Qwen2: q/k/v biases sliced with their rows
            assert torch.equal(a.q_proj.bias, fa.q_proj.bias[r * 2 * D:(r + 1) * 2 * D])
        m, fm = shard.model.language_model.layers[0].mlp, full.model.language_model.layers[0].mlp
        assert torch.equal(m.down_proj.weight, fm.down_proj.weight[:, r * 64:(r + 1) * 64])
        assert torch.equal(shard.lm_head.weight, full.lm_head.weight[r * 240:(r + 1) * 240])


# --- the engine, in process: tp 1 and tp 2 through one schedule ----------------------------------------------------
def _hard_schedule(family: str):
    """A config and schedule with chunked prefill cutting the first image's rows, a KV budget small enough to
    preempt, and a request cancelled after its first tokens."""
    case = get_case(family)
    a, b, c = case.prompts
    start, n = first_mm_span(a)
    budget = max(start + max(1, n // 2), 16)
    assert start < budget < start + n < len(a.token_ids)
    bs = 4
    blocks = max(cdiv(len(a.token_ids), bs) + cdiv(len(b.token_ids), bs) + 1,
                 cdiv(max(len(p.token_ids) for p in case.prompts) + REF_TOKENS, bs))
    cfg = dict(block_size=bs, num_kv_blocks=blocks, max_num_batched_tokens=budget)
    # b is preempted by step 12 in both families (a grows into its blocks) with a few tokens out: cancelled there
    return case, cfg, {0: [a.request("a"), b.request("b"), c.request("c")]}, {12: ["b"]}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_tp2_matches_tp1_and_transformers(family):
    case, cfg, arrivals, aborts = _hard_schedule(family)
    if family == "qwen2_5_vl":
        assert case.prompts[0].mrope_positions is not None and case.prompts[0].mm_embeds is not None
    one = LLMEngine(case.model, EngineConfig(**cfg))
    want = run_engine(one, arrivals, aborts)
    two = LLMEngine(case.model, EngineConfig(tensor_parallel_size=2, **cfg))
    try:
        assert two.kv_cache_info()["tensor_parallel_size"] == 2
        got = run_engine(two, arrivals, aborts)
        info = two.kv_cache_info()
    finally:
        two.shutdown()
    assert got.tokens == want.tokens and got.finish == want.finish
    assert info["num_preemptions"] == one.kv_cache_info()["num_preemptions"] > 0
    assert info["free_blocks"] == info["num_blocks"]
    a, b, c = case.prompts
    assert got.tokens["a"] == a.ref and got.tokens["c"] == c.ref
    assert got.finish["b"] == "abort" and 0 < len(got.tokens["b"]) < REF_TOKENS
    assert got.tokens["b"] == b.ref[:len(got.tokens["b"])]
    assert all(not p.is_alive() for p in two.tp_workers.procs)


def test_offline_llm_tp2_matches_tp1():
    from mmpipe import LLM
    from offline_helpers import hf_generate, make_image

    path = _model_dir("qwen2_5_vl")
    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in this image?<|im_end|>\n"
              "<|im_start|>assistant\n")
    img = make_image()
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(path, device="cpu", tensor_parallel_size=2)
    try:
        assert all(p.device.type == "meta" for n, p in llm.adapter.model.named_parameters() if "layers.0.mlp" in n)
        got = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, sp, use_tqdm=False)[0]
    finally:
        llm.engine.shutdown()
    assert got.outputs[0].token_ids == hf_generate(path, prompt, images=[img], max_new_tokens=8,
                                                   add_special_tokens=False)


# --- the engine-core process (what the generator service runs) -----------------------------------------------------
def _children(pid: int) -> list[int]:
    return [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(") ", 1)[1].startswith("Z"):
            return True
        time.sleep(0.05)
    return False


def test_engine_core_tp2_serves_then_reports_a_dead_worker():
    from mmpipe.services.generator.engine_setup import load_lm

    case = get_case("qwen2_5_vl")
    a, b, _ = case.prompts
    spec = EngineCoreSpec(load=load_lm, engine_config=EngineConfig(tensor_parallel_size=2,
                                                                   max_num_batched_tokens=64),
                          load_kwargs={"model": _model_dir("qwen2_5_vl"), "dtype": torch.float32, "device": "cpu",
                                       "trust_remote_code": False, "tensor_parallel_size": 2})
    client = EngineCoreClient(spec, startup_timeout_s=600)
    core = client.pid
    workers = [k for k in _children(core) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    assert len(workers) == 1
    assert "rank 0 of 2" in str(client.load_info["weights"])

    async def collect(req):
        toks = []
        async for out in client.generate(req):
            toks += out.new_token_ids
        return toks

    async def main():
        assert await collect(a.request("a")) == a.ref
        stream = client.generate(b.request("b", SamplingParams(max_tokens=1000, temperature=0.0,
                                                                ignore_eos=True))).__aiter__()
        await stream.__anext__()  # running
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="tensor-parallel worker rank 1"):
            while True:
                await stream.__anext__()
        return time.monotonic() - t0

    try:
        waited = asyncio.run(asyncio.wait_for(main(), 60))
        assert waited < 10
        assert not client.is_alive()
    finally:
        client.shutdown(timeout=10)
    assert _gone(core) and _gone(workers[0])


def test_generator_flag_reaches_the_engine_and_serve_passes_it_on():
    from mmpipe.cli import build_parser
    from mmpipe.commands.serve import child_argvs
    from mmpipe.services.generator.config import GeneratorConfig
    from mmpipe.services.generator.engine_setup import engine_config

    serve = build_parser().parse_args(["serve", "/models/m", "--tensor-parallel-size", "2"])
    argv = child_argvs(serve, {"encoder": 51001, "generator": 51002, "ingest": 51003}, "redis://h:1/0")
    assert "--tensor-parallel-size" in argv["generator"]
    assert not any("--tensor-parallel-size" in argv[s] for s in ("encoder", "ingest", "gateway"))
    gen = GeneratorConfig.from_args(build_parser().parse_args(argv["generator"][3:]))
    assert gen.tensor_parallel_size == 2
    ecfg = engine_config(gen, device="cpu", dtype=torch.float32, max_model_len=None)
    assert ecfg.tensor_parallel_size == 2 and ecfg.model == "/models/m"
    assert GeneratorConfig.from_args(build_parser().parse_args(["generator", "--model", "m", "--redis-url", "redis://h:1/0"])).tensor_parallel_size == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generator", "--model", "m", "--redis-url", "redis://h:1/0", "-tp", "0"])
