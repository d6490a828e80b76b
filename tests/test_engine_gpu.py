"""CUDA path of the engine: Triton kernels against the torch reference, and the whole engine (Triton
backend + CUDA graphs) against the HF modules' own forward, greedy, in fp32. Skipped without a GPU.

Models are built from configs (no tokenizer / processor), so these run with whatever transformers the GPU
machine has."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from mmpipe.shared.types import EngineRequest, SamplingParams  # noqa: E402


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 2, 128), (4, 2, 16), (8, 8, 64)])
def test_paged_decode_matches_reference(dtype, tol, heads, kv_heads, head_dim):
    from mmpipe.shared.engine.attention.torch_ref import attend_one, gather_kv
    from mmpipe.shared.engine.kernels.triton_attention import paged_decode

    torch.manual_seed(0)
    page, nb = 16, 400
    kc = torch.randn(nb, page, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    lens = [1, 15, 16, 17, 300, 0, 1100, 64]
    perm = torch.randperm(nb).tolist()
    width = 72
    tables = [perm[(i * 37) % 300:(i * 37) % 300 + width] for i in range(len(lens))]
    tables = [t + [0] * (width - len(t)) for t in tables]
    bt = torch.tensor(tables, dtype=torch.int32, device="cuda")
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), heads, head_dim, device="cuda", dtype=dtype)
    for splits in (1, 4, 32):
        out = torch.full_like(q, float("nan"))
        paged_decode(q, kc, vc, bt, sl, head_dim ** -0.5, splits, out=out)
        for i, n in enumerate(lens):
            if n == 0:
                assert torch.all(out[i] == 0)
                continue
            ref = attend_one(q[i:i + 1].float(), gather_kv(kc, tables[i], n).float(),
                             gather_kv(vc, tables[i], n).float(), head_dim ** -0.5)[0]
            assert _rel(out[i], ref) < tol, (splits, i, n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(16, 2, 128, 16), (4, 2, 16, 4), (8, 8, 64, 16)])
def test_prefill_with_prefix_matches_reference(dtype, tol, heads, kv_heads, head_dim, page):
    """A mixed step (decodes, then prefill chunks with and without a cached prefix) through the triton backend
    (Triton prefill kernel) against the torch reference backend (gather + SDPA), computed in fp32."""
    from mmpipe.shared.engine.attention import AttentionMetadata, create_backend
    from mmpipe.shared.engine.attention.torch_ref import write_kv_torch

    torch.manual_seed(0)
    nb = 900
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=page, scale=head_dim ** -0.5)
    tri, ref = create_backend("triton", **kw), create_backend("torch", **kw)
    assert tri.prefill_impl == "triton"
    # (new tokens, cached prefix): 3 decodes, then chunks: whole prompts, chunks after a prefix, a 1-token chunk
    rows = [(1, 40), (1, 1), (1, 300), (1000, 0), (137, 863), (1, 17), (64, 0), (300, 33), (5, 0)]
    kc = torch.randn(nb, page, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    T = sum(n for n, _ in rows)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, head_dim)
    perm = torch.randperm(nb).tolist()
    qsl, lens, tables, slots, used = [0], [], [], [], 0
    for n, pre in rows:
        ctx = n + pre
        t = perm[used:used + -(-ctx // page)]
        used += len(t)
        tables.append(t)
        slots += [t[i // page] * page + i % page for i in range(pre, ctx)]
        qsl.append(qsl[-1] + n)
        lens.append(ctx)
    slot_mapping = torch.tensor(slots, device="cuda")
    write_kv_torch(k, v, kc, vc, slot_mapping)  # as rope_and_cache does before attention
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(slot_mapping=slot_mapping, seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
                             block_tables=bt, num_decodes=3, query_start_loc_host=qsl, seq_lens_host=lens,
                             block_tables_host=tables)
    got = tri.forward(q, k, v, kc, vc, meta)
    f = lambda x: x.float()  # noqa: E731
    want = ref.forward(f(q), f(k), f(v), f(kc), f(vc), meta)
    for i, (n, pre) in enumerate(rows):
        s, e = qsl[i], qsl[i + 1]
        assert _rel(got[s:e], want[s:e]) < tol, (i, n, pre, _rel(got[s:e], want[s:e]))
    for splits in (2, 4, 8):  # each query block's keys split over programs and merged agree too
        tri.prefill_splits = lambda *_, n=splits: n
        got = tri.forward(q, k, v, kc, vc, meta)
        for i, (n, pre) in enumerate(rows):
            s, e = qsl[i], qsl[i + 1]
            assert _rel(got[s:e], want[s:e]) < tol, (splits, i, n, pre, _rel(got[s:e], want[s:e]))
    del tri.prefill_splits
    tri.prefill_impl = "sdpa"  # the previous path stays available for A/B runs and agrees too
    old = tri.forward(q, k, v, kc, vc, meta)
    assert _rel(old[3:], want[3:]) < tol


def test_fused_ops_match_hf_modules():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    from mmpipe.shared.engine.attention.torch_ref import write_kv_torch
    from mmpipe.shared.engine.kernels.triton_fused import add_rmsnorm, rope_and_cache, silu_mul

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = torch.randn(37, 2048, device="cuda", dtype=dtype)
        r = torch.randn_like(x)
        norm = Qwen2RMSNorm(2048).to("cuda", dtype)
        norm.weight.data.normal_()
        want = norm(r + x)
        got, res = add_rmsnorm(x, r.clone(), norm.weight, norm.variance_epsilon)
        assert _rel(got, want) < tol and _rel(res, r + x) < tol
        g, u = torch.randn(37, 11008, device="cuda", dtype=dtype), torch.randn(37, 11008, device="cuda", dtype=dtype)
        assert _rel(silu_mul(g, u), torch.nn.functional.silu(g) * u) < tol
        T, H, KVH, D = 37, 16, 2, 128
        q, k, v = (torch.randn(T, n, D, device="cuda", dtype=dtype) for n in (H, KVH, KVH))
        cos, sin = torch.randn(T, D, device="cuda", dtype=dtype), torch.randn(T, D, device="cuda", dtype=dtype)
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        kc = torch.zeros(8, 16, KVH, D, device="cuda", dtype=dtype)
        vc, kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(kc), torch.zeros_like(kc)
        slots = torch.randperm(128, device="cuda")[:T]
        slots[3] = -1
        q2, k2 = rope_and_cache(q.clone(), k.clone(), v, cos, sin, kc, vc, slots)
        write_kv_torch(kr, v, kc2, vc2, slots)
        assert _rel(q2, qr) < tol and _rel(k2, kr) < tol and _rel(kc, kc2) < tol and torch.equal(vc, vc2)


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**text)).eval()
    qwen = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2), image_token_id=299)).eval()
    return {"llama": llama, "qwen2_vl": qwen}


def _prompts(mrope: bool, n: int = 4):
    """Random prompts with an 'image' (random rows) and synthetic M-RoPE positions for a 4x6 grid."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        pre, post, rows = 5 + 3 * i, 7 + 11 * i, 24
        L = pre + rows + post
        ids = torch.randint(0, 290, (L,), generator=g)
        ids[pre:pre + rows] = 299
        emb = torch.randn(rows, 64, generator=g)
        mpos, delta = None, 0
        if mrope:
            t = torch.arange(pre)
            grid_h = torch.arange(4).repeat_interleave(6)
            grid_w = torch.arange(6).repeat(4)
            img = torch.stack([torch.zeros(rows, dtype=torch.long), grid_h, grid_w]) + pre
            nxt = pre + 6
            tail = torch.arange(post) + nxt
            mpos = torch.cat([t.expand(3, -1), img, tail.expand(3, -1)], dim=1)
            delta = int(mpos.max()) + 1 - L
        out.append((ids, emb, torch.arange(pre, pre + rows), mpos, delta))
    return out


@torch.no_grad()
def _hf_greedy(model, ids, emb, mm_pos, mpos, delta, n):
    """Greedy tokens from the HF decoder modules, recomputing the whole sequence each step (no cache)."""
    inner = model.model
    lm = getattr(inner, "language_model", inner)
    e = lm.embed_tokens(ids.cuda())
    e[mm_pos.cuda()] = emb.cuda()
    toks = []
    for _ in range(n):
        L = e.shape[0]
        if mpos is not None:
            extra = torch.arange(mpos.shape[1], L) + delta
            p = torch.cat([mpos, extra.expand(3, -1)], dim=1)[:, None, :].cuda()
        else:
            p = torch.arange(L, device="cuda")[None]
        h = lm(inputs_embeds=e[None], position_ids=p).last_hidden_state[0, -1]
        t = int(model.lm_head(h).argmax())
        toks.append(t)
        e = torch.cat([e, lm.embed_tokens(torch.tensor([t], device="cuda"))])
    return toks


@pytest.mark.parametrize("name", ["llama", "qwen2_vl"])
def test_engine_triton_graphs_match_hf(name):
    from mmpipe.shared.engine import EngineConfig, LLMEngine

    model = _models()[name].cuda()
    mrope = name == "qwen2_vl"
    prompts = _prompts(mrope)
    N = 12
    refs = [_hf_greedy(model, *p, N) for p in prompts]
    for cfg in (EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=16,
                             num_kv_blocks=256),
                EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=4,
                             max_num_batched_tokens=20, num_kv_blocks=64),
                EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, num_kv_blocks=256,
                             mixed_graph_max_prefills=0),
                EngineConfig(device="cuda", attention_backend="torch", max_num_seqs=8, num_kv_blocks=256)):
        engine = LLMEngine(model, cfg)
        got = {str(i): [] for i in range(len(prompts))}
        reqs = [EngineRequest(str(i), ids.tolist(), SamplingParams(max_tokens=N, temperature=0.0), mm_embeds=emb,
                              mm_positions=pos, mrope_positions=mp, mrope_delta=d, eos_token_ids=[])
                for i, (ids, emb, pos, mp, d) in enumerate(prompts)]
        step = 0
        while step < 2 or engine.has_unfinished_requests():
            if step < len(reqs):
                engine.add_request(reqs[step])  # one arrival per step: mixed prefill/decode batches
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
            step += 1
        for i, ref in enumerate(refs):
            assert got[str(i)] == ref, (cfg, i)
        if cfg.attention_backend == "triton":
            assert engine.stats["graph_steps"] > 0
            assert (engine.stats["mixed_graph_steps"] > 0) == (cfg.mixed_graph_max_prefills > 0), engine.stats
        info = engine.kv_cache_info()
        assert info["free_blocks"] == info["num_blocks"]
        del engine
        _free_gpu()


@pytest.mark.parametrize("name", ["llama", "qwen2_vl"])
def test_engine_prefix_cache_on_cuda(name):
    """Prefix-cache hits through the CUDA path: each prompt again in the same step as itself (the prefill
    kernel reads blocks written in that step) and once more later (decode and mixed graphs over shared blocks);
    a copy with other image rows under another key stops before the image. Greedy, fp32, against HF."""
    from mmpipe.shared.engine import EngineConfig, LLMEngine
    from mmpipe.shared.types import MMSpan

    model = _models()[name].cuda()
    prompts = _prompts(name == "qwen2_vl")
    N = 12
    refs = [_hf_greedy(model, *p, N) for p in prompts]
    ids0, emb0, pos0, mp0, d0 = prompts[0]
    other = (ids0, emb0.flip(0), pos0, mp0, d0)
    ref_other = _hf_greedy(model, *other, N)
    bs = 4
    # (config, whether every block is still cached when the later copies come: not under the tight budget)
    for cfg, roomy in ((EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=bs,
                                     num_kv_blocks=256), True),
                       (EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=bs,
                                     max_num_batched_tokens=20, num_kv_blocks=96), False)):
        engine = LLMEngine(model, cfg)

        def request(rid, p, key):
            ids, emb, pos, mp, d = p
            return EngineRequest(rid, ids.tolist(), SamplingParams(max_tokens=N, temperature=0.0), mm_embeds=emb,
                                 mm_positions=pos, mrope_positions=mp, mrope_delta=d, eos_token_ids=[],
                                 mm_spans=[MMSpan(int(pos[0]), len(pos), key)])

        arrivals = {0: [request(f"{i}{c}", p, f"img{i}") for i, p in enumerate(prompts) for c in "ab"],
                    6: [request(f"{i}c", p, f"img{i}") for i, p in enumerate(prompts)] + [
                        request("other", other, "img-other")]}
        got, cached = {}, {}
        step = 0
        while step <= 6 or engine.has_unfinished_requests():
            for r in arrivals.get(step, []):
                engine.add_request(r)
                got[r.request_id] = []
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
                cached[o.request_id] = o.num_cached_tokens
            step += 1
        for i, (ids, _, pos, _, _) in enumerate(prompts):
            for c in "abc":
                assert got[f"{i}{c}"] == refs[i], (cfg, i, c)
            assert not roomy or cached[f"{i}c"] == (len(ids) - 1) // bs * bs, (cfg, i, cached)
        assert got["other"] == ref_other, cfg
        assert not roomy or cached["other"] == int(pos0[0]) // bs * bs, cached
        assert engine.stats["prefix_cache_hits"] > 0, engine.stats
        assert engine.stats["graph_steps"] > 0 and engine.stats["mixed_graph_steps"] > 0, engine.stats
        info = engine.kv_cache_info()
        assert info["free_blocks"] == info["num_blocks"]
        del engine
        _free_gpu()


def _free_gpu():
    import gc

    gc.collect()  # engines hold their KV cache and graph pool through a runner <-> graphs cycle
    torch.cuda.empty_cache()


def test_auto_kv_sizing_and_seeded_sampling_on_cuda():
    from mmpipe.shared.engine import EngineConfig, LLMEngine

    _free_gpu()
    model = _models()["llama"].cuda()
    engine = LLMEngine(model, EngineConfig(device="cuda", gpu_memory_utilization=0.3, max_num_seqs=4))
    info = engine.kv_cache_info()
    print("auto-sized KV cache:", info, torch.cuda.mem_get_info())
    assert info["num_blocks"] > 1000 and info["cuda_graphs"]
    ids = list(range(1, 30))
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    outs = []
    for mates in (0, 3):
        for j in range(mates):
            engine.add_request(EngineRequest(f"m{mates}{j}", ids[j:], SamplingParams(max_tokens=10, seed=j)))
        engine.add_request(EngineRequest(f"x{mates}", ids, sp))
        toks = []
        while engine.has_unfinished_requests():
            toks += [t for o in engine.step() if o.request_id == f"x{mates}" for t in o.new_token_ids]
        outs.append(toks)
    assert outs[0] == outs[1] and len(outs[0]) == 10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_short_gemm_matches_cublas(dtype, tol):
    """The short-step GEMM (1-128 rows) at the engine's tile and split over K, against cuBLAS (F.linear, then
    the engine's silu_mul for gate/up) and a float64 reference; bf16 gate/up equal but for rare last-bit flips."""
    from mmpipe.shared.engine.kernels.triton_fused import silu_mul
    from mmpipe.shared.engine.kernels.triton_gemm import GemmTile, short_gate_up_silu, short_linear
    from mmpipe.shared.engine.kernels.triton_ops import short_gate_up_tile

    torch.manual_seed(0)
    for n, K in ((11008, 2048), (1000, 200)):
        wg = (torch.randn(2 * n, K, device="cuda") * K ** -0.5).to(dtype)
        w, b = wg[:n].contiguous(), torch.randn(n, device="cuda").to(dtype)
        for M in (1, 2, 3, 8, 9, 17, 64, 104, 128):
            x = torch.randn(M, K, device="cuda").to(dtype)
            got = short_gate_up_silu(x, wg, short_gate_up_tile(M))
            gu = (x.double() @ wg.double().T).to(dtype)
            want = (torch.nn.functional.silu(gu[:, :n].float()).to(dtype).float() * gu[:, n:].float()).to(dtype)
            assert _rel(got, want) < tol, (n, K, M, _rel(got, want))
            gu_c = torch.nn.functional.linear(x, wg)
            old = silu_mul(gu_c[:, :n], gu_c[:, n:])
            assert _rel(got, old) < tol, (n, K, M)
            if dtype == torch.bfloat16:
                assert (got != old).float().mean().item() <= 0.02, (n, K, M)
            for split in (1, 4):
                lin = short_linear(x, w, b, GemmTile(block_n=64, block_k=64, split_k=split))
                want_l = (x.double() @ w.double().T + b.double()).to(dtype)
                assert _rel(lin, want_l) < tol, (n, K, M, split, _rel(lin, want_l))


def _decode_case(dtype, heads, kv_heads, head_dim, lens, page=16, nb=400, width=72, seed=0):
    torch.manual_seed(seed)
    kc = torch.randn(nb, page, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    perm = torch.randperm(nb).tolist()
    tables = [perm[(i * 37) % 300:(i * 37) % 300 + width] for i in range(len(lens))]
    bt = torch.tensor(tables, dtype=torch.int32, device="cuda")
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), heads, head_dim, device="cuda", dtype=dtype)
    return q, kc, vc, bt, sl, tables


def _check_decode(out, q, kc, vc, tables, lens, tol, what):
    from mmpipe.shared.engine.attention.torch_ref import attend_one, gather_kv

    D = q.shape[-1]
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[i] == 0), (what, i)
            continue
        ref = attend_one(q[i:i + 1].float(), gather_kv(kc, tables[i], n).float(), gather_kv(vc, tables[i], n).float(),
                         D ** -0.5)[0]
        assert _rel(out[i], ref) < tol, (what, i, n, _rel(out[i], ref))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 2, 128), (4, 2, 16), (8, 8, 64)])
def test_paged_decode_fused_merge_matches_two_kernel(dtype, tol, heads, kv_heads, head_dim):
    """The split merge inside the decode kernel (last split per (sequence, kv_head) merges, counter reset) against
    the two-kernel path and the reference, over many launches with fresh q (a stale partial would show), with
    length-0 rows, and the counters back at zero after every launch."""
    from mmpipe.shared.engine.kernels import triton_attention as ta

    lens = [1, 15, 16, 17, 300, 0, 1100, 64] * 8
    q, kc, vc, bt, sl, tables = _decode_case(dtype, heads, kv_heads, head_dim, lens)
    for splits in (2, 4, 8, 32):
        for it in range(10):
            q.normal_()
            out = torch.full_like(q, float("nan"))
            ta.paged_decode(q, kc, vc, bt, sl, head_dim ** -0.5, splits, out=out, fused_merge=True)
            old = ta.paged_decode(q, kc, vc, bt, sl, head_dim ** -0.5, splits, fused_merge=False)
            assert torch.all(ta.split_counters(q.device, 1) == 0), (splits, it)
            assert _rel(out, old) < tol, (splits, it, _rel(out, old))
            if it == 0:
                _check_decode(out, q, kc, vc, tables, lens, tol, splits)


def test_paged_decode_fused_merge_in_cuda_graph():
    """paged_decode (fused merge) captured once, replayed with new lengths and queries written in place, as the
    engine's decode graphs run it: padding rows (length 0) give zeros and the counters stay consistent."""
    from mmpipe.shared.engine.kernels import triton_attention as ta

    dtype, heads, kv_heads, head_dim, splits = torch.bfloat16, 16, 2, 128, 16
    rounds = [[1, 17, 300, 0, 1100, 64, 0, 0], [0, 0, 5, 16, 1, 700, 33, 0], [1100, 1, 0, 2, 64, 15, 999, 300]]
    q, kc, vc, bt, sl, tables = _decode_case(dtype, heads, kv_heads, head_dim, rounds[0])
    out = torch.empty_like(q)
    scale = head_dim ** -0.5
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # eager warm-up: compiles the kernel and allocates the counter buffer
        ta.paged_decode(q, kc, vc, bt, sl, scale, splits, out=out, fused_merge=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ta.paged_decode(q, kc, vc, bt, sl, scale, splits, out=out, fused_merge=True)
    for lens in rounds:
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        q.normal_()
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.all(ta.split_counters(q.device, 1) == 0)
        _check_decode(out, q, kc, vc, tables, lens, 2e-2, lens)


# --- Qwen3-VL: q/k norm and DeepStack rows through the Triton path and the CUDA graphs ------------------------------
def _qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision,
                                                         image_token_id=299)).eval()


def _deepstack_prompts(hidden: int, num_deepstack: int):
    """`_prompts(mrope=True)` with rows as wide as Qwen3-VL's: base embedding + one feature per deepstack layer."""
    g = torch.Generator().manual_seed(2)
    return [(ids, torch.cat([emb, torch.randn(emb.shape[0], hidden * num_deepstack, generator=g)], dim=1), pos, mp, d)
            for ids, emb, pos, mp, d in _prompts(True)]


@torch.no_grad()
def _hf_greedy_deepstack(model, ids, emb, mm_pos, mpos, delta, n, dev="cuda"):
    """Greedy tokens from transformers' Qwen3-VL text model, given the deepstack features and their positions,
    recomputing the whole sequence each step (no cache)."""
    lm = model.model.language_model
    H = lm.config.hidden_size
    deep = list(emb[:, H:].reshape(emb.shape[0], -1, H).to(dev).unbind(1))
    e = lm.embed_tokens(ids.to(dev))
    e[mm_pos.to(dev)] = emb[:, :H].to(dev)
    toks = []
    for _ in range(n):
        L = e.shape[0]
        extra = torch.arange(mpos.shape[1], L) + delta
        p = torch.cat([mpos, extra.expand(3, -1)], dim=1)[:, None, :].to(dev)
        mask = torch.zeros(1, L, dtype=torch.bool, device=dev)
        mask[0, mm_pos.to(dev)] = True
        h = lm(inputs_embeds=e[None], position_ids=p, visual_pos_masks=mask,
               deepstack_visual_embeds=deep).last_hidden_state[0, -1]
        t = int(model.lm_head(h).argmax())
        toks.append(t)
        e = torch.cat([e, lm.embed_tokens(torch.tensor([t], device=dev))])
    return toks


def _run_deepstack(model, configs, dev="cuda") -> list:
    from mmpipe.shared.engine import LLMEngine

    d = model.config.text_config
    prompts = _deepstack_prompts(d.hidden_size, len(model.config.vision_config.deepstack_visual_indexes))
    N = 12
    refs = [_hf_greedy_deepstack(model, *p, N, dev=dev) for p in prompts]
    engines = []
    for cfg in configs:
        engine = LLMEngine(model, cfg)
        got = {str(i): [] for i in range(len(prompts))}
        reqs = [EngineRequest(str(i), ids.tolist(), SamplingParams(max_tokens=N, temperature=0.0), mm_embeds=emb,
                              mm_positions=pos, mrope_positions=mp, mrope_delta=dl, eos_token_ids=[])
                for i, (ids, emb, pos, mp, dl) in enumerate(prompts)]
        step = 0
        while step < 2 or engine.has_unfinished_requests():
            if step < len(reqs):
                engine.add_request(reqs[step])  # one arrival per step: mixed prefill/decode batches
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
            step += 1
        for i, ref in enumerate(refs):
            assert got[str(i)] == ref, (cfg, i)
        engines.append(engine)
    return engines


def test_qwen3_vl_qk_norm_and_deepstack_on_cuda():
    """fp32 token identity with transformers: the Triton kernels after q/k norm, DeepStack rows added inside the
    first layers (such steps run eagerly; the decode graphs and the mixed graphs take the rest), chunked
    prefill cutting through the rows."""
    from mmpipe.shared.engine import EngineConfig

    model = _qwen3_vl().cuda()
    cfgs = (EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=16, num_kv_blocks=256),
            EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=8, block_size=4,
                         max_num_batched_tokens=20, num_kv_blocks=64),
            EngineConfig(device="cuda", attention_backend="torch", max_num_seqs=8, num_kv_blocks=256))
    for cfg, engine in zip(cfgs, _run_deepstack(model, cfgs)):
        if cfg.attention_backend == "triton":
            assert engine.stats["graph_steps"] > 0
        info = engine.kv_cache_info()
        assert info["free_blocks"] == info["num_blocks"]
    _free_gpu()

def test_gemma3_sliding_window_and_bidirectional_images_on_cuda():
    """Gemma 3 (sliding layers, bidirectional image rows, Gemma norms) through the Triton backend and both kinds
    of CUDA graphs, fp32, token-identical to transformers' generate (run on the CPU by engine_helpers). Needs the
    tiny model's tokenizer and processor, so transformers 5.x with torchvision on the GPU machine."""
    import copy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_helpers import first_mm_span, get_case, run_engine

    from mmpipe.shared.engine import EngineConfig, LLMEngine

    case = get_case("gemma3")
    model = copy.deepcopy(case.model).cuda()
    a, b, c = case.prompts
    start, n = first_mm_span(a)
    for cfg in (EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=4, block_size=8),
                EngineConfig(device="cuda", attention_backend="triton", max_num_seqs=4, block_size=4,
                             max_num_batched_tokens=start + max(1, n // 2))):
        engine = LLMEngine(model, cfg)
        res = run_engine(engine, {0: [a.request("a")], 1: [b.request("b")], 3: [c.request("c")]})
        assert [res.tokens[r] for r in "abc"] == [p.ref for p in (a, b, c)], cfg
        assert engine.stats["graph_steps"] > 0 and engine.stats["mixed_graph_steps"] > 0, engine.stats
        del engine
        _free_gpu()


@pytest.mark.parametrize("kw", [dict(block_size=4, kv_cache_blocks=64),
                                dict(block_size=8, kv_cache_blocks=6, max_num_batched_tokens=8),
                                dict(block_size=4, kv_cache_blocks=10)], ids=["one-step", "chunked", "preemption"])
def test_window_blocks_freed_on_cuda(kw):
    """The all-sliding tiny Mistral 3 (window 24) in fp32 through the Triton kernels and both kinds of CUDA graphs
    while the blocks behind the window are given back (their table entries FREED_BLOCK, the blocks reused by
    other sequences): token-identical to transformers' generate on the CPU (test_window_kv.py's oracle)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from offline_helpers import chat_prompt, hf_generate
    from test_window_kv import OUT, TEXTS, GREEDY

    from mmpipe import LLM
    from mmpipe.shared.models.tiny import ensure_tiny_model

    path = str(ensure_tiny_model("mistral3"))
    prompts = [chat_prompt(path, [{"role": "user", "content": t}]) for t in TEXTS]
    refs = [hf_generate(path, p, max_new_tokens=OUT, add_special_tokens=False) for p in prompts]
    llm = LLM(path, device="cuda", dtype="float32", **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    eng = llm.engine
    assert eng.stats["window_freed_blocks"] > 0 and eng.stats["graph_steps"] > 0, eng.stats
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    del llm, eng
    _free_gpu()
