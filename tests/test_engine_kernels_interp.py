"""The engine's Triton kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), against torch
references on tiny shapes, in fp32 and a 16-bit dtype: the short-step GEMM (1-128 rows; split over K or not;
bias; gate/up with SiLU-mul in the epilogue, which the engine runs from one row), paged decode with the split
merge fused in (and the two-kernel path), the skinny GEMM and the fused elementwise kernels (and the grammar bitmask); ("masked") decode
and prefill (one program per query block, and split over programs) under a sliding window, bidirectional
image limits and a soft-cap, with Gemma's (1 + weight) norm; and
("behind_window") that no windowed read, Triton or torch, touches a block behind the window (window.py).

TRITON_INTERPRET must be set before triton is imported, so each test runs this file as a script in a fresh
interpreter process (all started in the background when collection ends: tests/background_runs.py); the script's
checks assert and print their largest errors. The interpreter runs the programs of a grid one after another, so it
checks the math and the counter bookkeeping of the fused merge, not its memory ordering between concurrent
programs on a GPU (tests/test_engine_gpu.py covers that).

The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits (triton-lang/triton#11584, not
supported yet), so the kernels built on tl.dot are checked in float16 as their 16-bit case (which also checks
the rounding steps exactly: float16 casts round to nearest even there); the others in bfloat16, whose casts
from float32 the interpreter truncates, so bfloat16 results are checked to a tolerance, not bit for bit."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from background_runs import BackgroundRuns, failure

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("short_gemm", "paged_decode", "elementwise", "masked", "behind_window")


RUNS = BackgroundRuns("check", lambda check: [sys.executable, str(Path(__file__).resolve()), check],
                      env={"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                      cwd=ROOT, timeout_s=300, needs="triton")


@pytest.mark.parametrize("check", CHECKS)
def test_kernel_in_triton_interpreter(check):
    r = RUNS.result(check)
    assert r.returncode == 0, failure(check, r)
    assert f"{check}: ok" in r.stdout, failure(check, r, "no ok line")


# ---- the checks, run in the subprocess --------------------------------------------------------------------------


def _maxerr(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _round_silu_mul(g, u):
    """silu(g) * u with the unfused path's rounding: g, u in the model dtype, silu(g) rounded, then the product."""
    import torch

    a = torch.nn.functional.silu(g.float()).to(g.dtype)
    return (a.float() * u.float()).to(g.dtype)


def check_short_gemm():
    import torch

    from mmpipe.shared.engine.kernels.triton_gemm import GemmTile, short_gate_up_silu, short_linear

    torch.manual_seed(0)
    worst: dict[str, float] = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        for n, K in ((96, 256), (80, 200)):  # N a multiple of block_n or not, K a multiple of block_k or not
            w = (torch.randn(n, K) * K ** -0.5).to(dtype)
            wg = (torch.randn(2 * n, K) * K ** -0.5).to(dtype)
            b = torch.randn(n).to(dtype)
            for M in (1, 2, 8, 9, 17, 64, 100, 128):
                x = torch.randn(M, K).to(dtype)
                exact = x.double() @ w.double().T
                gu = (x.double() @ wg.double().T).to(dtype)  # exact sums, rounded once as a GEMM output is
                want_g = _round_silu_mul(gu[:, :n], gu[:, n:])
                for split in (1, 3):  # 3 ranges of K: one of them shorter (K = 200) or empty of a full tile
                    tile = GemmTile(block_n=32, block_k=64, split_k=split)
                    for bias in (None, b):
                        want = (exact + (0 if bias is None else bias.double())).to(dtype)
                        got = short_linear(x, w, bias, tile)
                        assert got.shape == (M, n) and got.dtype == dtype
                        err = _maxerr(got, want) / want.float().abs().max().item()
                        assert err < tol, (dtype, n, K, M, split, bias is not None, err)
                        worst[f"{dtype} linear"] = max(worst.get(f"{dtype} linear", 0.0), err)
                    got = short_gate_up_silu(x, wg, tile)
                    assert got.shape == (M, n) and got.dtype == dtype
                    err = _maxerr(got, want_g) / want_g.float().abs().max().item()
                    assert err < tol, (dtype, n, K, M, split, "gate_up", err)
                    worst[f"{dtype} gate_up"] = max(worst.get(f"{dtype} gate_up", 0.0), err)
        assert short_linear(torch.randn(0, K).to(dtype), w).shape == (0, n)
        assert short_gate_up_silu(torch.randn(0, K).to(dtype), wg).shape == (0, n)
    print("short_gemm max errors:", {k: f"{v:.2e}" for k, v in worst.items()})


def check_paged_decode():
    import torch

    from mmpipe.shared.engine.attention.torch_ref import attend_one, gather_kv
    from mmpipe.shared.engine.kernels import triton_attention as ta

    torch.manual_seed(0)
    page, nb, width = 4, 64, 16
    worst: dict[str, float] = {}
    cpu = torch.device("cpu")
    counters = ta.split_counters(cpu, 1)  # every fused call below must reuse this buffer and leave it zeroed
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        for heads, kv_heads, head_dim in ((2, 2, 16), (4, 2, 32), (16, 2, 16)):  # GROUP 1, 2, 8
            kc = torch.randn(nb, page, kv_heads, head_dim).to(dtype)
            vc = torch.randn_like(kc)
            perm = torch.randperm(nb).tolist()
            tables = [perm[i * 13 % 48:i * 13 % 48 + width] for i in range(4)]
            bt = torch.tensor(tables, dtype=torch.int32)
            q = torch.randn(len(tables), heads, head_dim).to(dtype)
            sl = torch.zeros(len(tables), dtype=torch.int32)
            # two rounds of lengths through the same buffers, as a replayed CUDA graph sees them; 0 = padding
            for lens in ([0, 1, 17, 63], [33, 0, 64, 5]):
                sl.copy_(torch.tensor(lens, dtype=torch.int32))
                refs = [attend_one(q[i:i + 1].double(), gather_kv(kc, tables[i], n).double(),
                                   gather_kv(vc, tables[i], n).double(), head_dim ** -0.5)[0] if n else None
                        for i, n in enumerate(lens)]
                for splits, fused in ((1, True), (2, True), (3, True), (4, True), (8, True), (2, False), (8, False)):
                    out = torch.full_like(q, float("nan"))
                    ta.paged_decode(q, kc, vc, bt, sl, head_dim ** -0.5, splits, out=out, block_n=16,
                                    fused_merge=fused)
                    for i, n in enumerate(lens):
                        if n == 0:
                            assert torch.all(out[i] == 0), (splits, fused, i)
                            continue
                        err = _maxerr(out[i], refs[i]) / refs[i].abs().max().item()
                        assert err < tol, (dtype, heads, kv_heads, splits, fused, i, n, err)
                        key = f"{dtype} G{heads // kv_heads} {'fused' if fused else 'two-kernel'}"
                        worst[key] = max(worst.get(key, 0.0), err)
                    assert ta.split_counters(cpu, 1) is counters and torch.all(counters == 0), counters
    assert counters.numel() == 1024
    big = ta.split_counters(cpu, 5000)  # grown to the next power of two; the old buffer stays alive
    assert big.numel() == 8192 and torch.all(big == 0) and ta.split_counters(cpu, 7) is big
    assert [id(t) for t in ta._counters[cpu]] == [id(counters), id(big)]
    print("paged_decode max rel errors:", {k: f"{v:.2e}" for k, v in worst.items()})


def check_elementwise():
    import torch

    from mmpipe.shared.engine.kernels.triton_fused import add_rmsnorm, rope_and_cache, silu_mul
    from mmpipe.shared.engine.kernels.triton_gemv import skinny_linear

    torch.manual_seed(0)
    worst: dict[str, float] = {}

    def note(name, dtype, got, want, tol):
        err = _maxerr(got, want) / max(want.float().abs().max().item(), 1e-12)
        assert err < tol, (name, dtype, err)
        worst[f"{name} {dtype}"] = max(worst.get(f"{name} {dtype}", 0.0), err)

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        gemm_dtype = torch.float16 if dtype == torch.bfloat16 else dtype  # tl.dot: see the module docstring
        x = torch.randn(5, 200).to(gemm_dtype)
        w = (torch.randn(48, 200) * 0.1).to(gemm_dtype)
        b = torch.randn(48).to(gemm_dtype)
        for bias in (None, b):
            want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            note("skinny_linear", gemm_dtype, skinny_linear(x, w, bias, block_n=16, block_k=64), want, tol)
        g, u = torch.randn(3, 300).to(dtype), torch.randn(3, 300).to(dtype)
        note("silu_mul", dtype, silu_mul(g, u), _round_silu_mul(g, u), tol)
        h, r = torch.randn(4, 96).to(dtype), torch.randn(4, 96).to(dtype)
        nw = torch.randn(96).to(dtype)
        for res in (None, r):
            s = h if res is None else (h.float() + res.float()).to(dtype)
            sf = s.float()
            want = nw.float() * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()
            got, new_res = add_rmsnorm(h, None if res is None else res.clone(), nw, 1e-6)
            note("add_rmsnorm", dtype, got, want, tol)
            note("add_rmsnorm residual", dtype, new_res, s, tol)
        T, H, KVH, D = 5, 4, 2, 16
        q, k, v = (torch.randn(T, n, D).to(dtype) for n in (H, KVH, KVH))
        cos, sin = torch.randn(T, D).to(dtype), torch.randn(T, D).to(dtype)

        def rot(t):
            t1, t2 = t.float()[..., :D // 2], t.float()[..., D // 2:]
            return t.float() * cos.float()[:, None] + torch.cat([-t2, t1], -1) * sin.float()[:, None]
        kc, vc = torch.zeros(4, 4, KVH, D).to(dtype), torch.zeros(4, 4, KVH, D).to(dtype)
        slots = torch.tensor([3, 9, -1, 0, 15])
        q2, k2 = rope_and_cache(q.clone(), k.clone(), v, cos, sin, kc, vc, slots)
        note("rope q", dtype, q2, rot(q), tol)
        note("rope k", dtype, k2, rot(k), tol)
        flat_k, flat_v = kc.flatten(0, 1), vc.flatten(0, 1)
        for t, slot in enumerate(slots.tolist()):
            if slot >= 0:
                assert torch.equal(flat_k[slot], k2[t]) and torch.equal(flat_v[slot], v[t])
        written = set(s for s in slots.tolist() if s >= 0)
        assert all(torch.all(flat_k[i] == 0) for i in range(16) if i not in written)
    # a grammar's packed bitmask on two of three rows, logits wider than the mask's tokens: one launch
    from mmpipe.shared.engine.kernels.triton_bitmask import apply_token_bitmask

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, 1100).to(dtype)
        bits = torch.randint(-2**31, 2**31 - 1, (2, 33), dtype=torch.int32)  # 1056 tokens: 44 columns of padding
        want = logits.clone()
        allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).reshape(2, -1).bool()
        for k, row in enumerate((2, 0)):
            want[row, :1056][~allowed[k]] = float("-inf")
            want[row, 1056:] = float("-inf")
        got = logits.clone()
        apply_token_bitmask(got, bits, torch.tensor([2, 0], dtype=torch.int32))
        assert torch.equal(got, want), dtype
    print("elementwise max rel errors:", {k: f"{v:.2e}" for k, v in worst.items()})


def check_masked():
    """Sliding window, per-row key limits (bidirectional image runs) and soft-cap, decode and prefill kernels
    against the torch reference (attention/torch_ref.py), plus Gemma's (1 + weight) RMSNorm, in fp32."""
    import torch

    from mmpipe.shared.engine.attention.torch_ref import attend_one, gather_kv
    from mmpipe.shared.engine.kernels.triton_attention import paged_decode
    from mmpipe.shared.engine.kernels.triton_fused import add_rmsnorm
    from mmpipe.shared.engine.kernels.triton_prefill import prefill_attention, prefill_work

    torch.manual_seed(0)
    H, KVH, D, page, nb = 4, 2, 16, 4, 40
    kc, vc = torch.randn(nb, page, KVH, D), torch.randn(nb, page, KVH, D)
    perm = torch.randperm(nb).tolist()
    tables = [perm[0:12], perm[12:24], perm[24:36]]
    bt = torch.tensor(tables, dtype=torch.int32)
    scale, worst = D ** -0.5, {}
    for window, softcap in ((None, None), (5, None), (5, 2.0)):
        # decode: one query at the end of each context
        lens = [3, 17, 40]
        q = torch.randn(3, H, D)
        for splits in (1, 4):
            out = paged_decode(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), scale, splits, block_n=16,
                               window=window, softcap=softcap)
            for i, n in enumerate(lens):
                want = attend_one(q[i:i + 1], gather_kv(kc, tables[i], n), gather_kv(vc, tables[i], n), scale,
                                  window=window, softcap=softcap)
                worst["decode"] = max(worst.get("decode", 0.0), _maxerr(out[i:i + 1], want))
        # prefill: chunks after a cached prefix; the second one holds an "image" run [3, 9) of its chunk
        chunk, prefix = [11, 13], [6, 20]
        T = sum(chunk)
        qsl = torch.tensor([0, chunk[0], T], dtype=torch.int32)
        ctx = torch.tensor([p + c for p, c in zip(prefix, chunk)], dtype=torch.int32)
        q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
        kcs, vcs = kc.clone(), vc.clone()
        for i in range(2):  # the chunk's own K/V are in the cache too, as the decoder's write leaves them
            for j in range(chunk[i]):
                pos = prefix[i] + j
                kcs[tables[i][pos // page], pos % page] = k[qsl[i] + j]
                vcs[tables[i][pos // page], pos % page] = v[qsl[i] + j]
        lim = torch.cat([torch.arange(prefix[0], ctx[0]), torch.arange(prefix[1], ctx[1])]).to(torch.int32)
        lim[chunk[0] + 3:chunk[0] + 9] = prefix[1] + 8
        # one program per query block, and each block's keys split over up to 3 programs of 16-key tiles:
        # pieces of at least 32 keys (the default, 2 tiles: the shorter sequence's block stays whole and writes
        # its output itself, the longer one's goes to 2 splits) or of 16 (3 splits, an empty one for the shorter
        # sequence, pieces that cross the prefix / chunk boundary), merged after
        t16 = (16, 16, 4, 2)
        for limits, tile, splits, min_keys in ((None, None, 1, None), (lim, None, 1, None), (None, t16, 3, None),
                                               (lim, t16, 3, None), (None, t16, 3, 16), (lim, t16, 3, 16)):
            seqs, blks = prefill_work(chunk, tile[0] if tile else 32)
            work = (torch.tensor(seqs, dtype=torch.int32), torch.tensor(blks, dtype=torch.int32))
            out = prefill_attention(q, k, v, kcs, vcs, bt[:2], ctx, qsl, work, scale, window=window,
                                    attn_limit=limits, softcap=softcap, tile=tile, num_splits=splits,
                                    split_min_keys=min_keys)
            for i in range(2):
                s, e, n = int(qsl[i]), int(qsl[i + 1]), int(ctx[i])
                want = attend_one(q[s:e], gather_kv(kcs, tables[i], n), gather_kv(vcs, tables[i], n), scale,
                                  window=window, softcap=softcap, limit=None if limits is None else lim[s:e])
                worst["prefill"] = max(worst.get("prefill", 0.0), _maxerr(out[s:e], want))
    assert worst["decode"] < 1e-5 and worst["prefill"] < 1e-5, worst
    # the window and the limits change the answer (the checks above are not vacuous)
    a = attend_one(q[:5], k[:5], v[:5], scale)
    assert _maxerr(attend_one(q[:5], k[:5], v[:5], scale, window=2), a) > 1e-3
    assert _maxerr(attend_one(q[:5], k[:5], v[:5], scale, limit=torch.tensor([4] * 5)), a) > 1e-3
    # Gemma's RMSNorm: normalised in fp32, times (1 + weight)
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    h, r = torch.randn(3, 48), torch.randn(3, 48)
    got, res = add_rmsnorm(h, r.clone(), norm.weight, norm.eps, unit_offset=True)
    worst["gemma norm"] = _maxerr(got, norm(h + r))
    assert worst["gemma norm"] < 1e-5 and torch.equal(res, h + r), worst
    print("masked max abs errors:", {k: f"{v:.2e}" for k, v in worst.items()})


def check_behind_window():
    """A windowed layer's decode and prefill read nothing behind the window: the blocks before each sequence's
    first visible block (window.py) are overwritten with NaN, and their table entries are pointed at a NaN block
    (Triton kernels) or set to FREED_BLOCK (the torch paths, whose index_select would raise on it); the results
    stay those of the clean cache (to fp32 rounding: fewer keys are summed) and finite."""
    import torch

    from mmpipe.shared.engine.attention.base import AttentionMetadata
    from mmpipe.shared.engine.attention.torch_ref import TorchRefBackend, attend_one, gather_kv
    from mmpipe.shared.engine.attention.triton_paged import TritonPagedBackend
    from mmpipe.shared.engine.kernels.triton_attention import paged_decode
    from mmpipe.shared.engine.kernels.triton_prefill import prefill_attention, prefill_work
    from mmpipe.shared.engine.window import FREED_BLOCK, first_visible_block

    torch.manual_seed(0)
    H, KVH, D, page, nb, window = 4, 2, 16, 4, 48, 6
    scale = D ** -0.5
    kc, vc = torch.randn(nb, page, KVH, D), torch.randn(nb, page, KVH, D)
    perm = torch.randperm(nb - 1).tolist()  # block nb - 1 is the garbage block
    tables = [perm[0:12], perm[12:24], perm[24:36]]

    def poisoned(starts: list[int], entry: int):
        """Caches with every block behind each sequence's window set to NaN, and tables whose entries for those
        blocks are `entry`."""
        k2, v2, bts = kc.clone(), vc.clone(), []
        k2[nb - 1] = v2[nb - 1] = float("nan")
        for t, start in zip(tables, starts):
            first = first_visible_block(start, window, page)
            assert first > 0, "each sequence must have blocks behind its window"
            k2[t[:first]] = v2[t[:first]] = float("nan")
            bts.append([entry] * first + t[first:])
        return k2, v2, bts

    worst: dict[str, float] = {}

    def same(name, got, want):
        assert torch.isfinite(got).all(), name
        err = _maxerr(got, want)
        assert err < 1e-5, (name, err)
        worst[name] = max(worst.get(name, 0.0), err)

    # decode: one query at the end of contexts of 13, 30 and 45 tokens
    lens = [13, 30, 45]
    q = torch.randn(3, H, D)
    refs = [attend_one(q[i:i + 1], gather_kv(kc, tables[i], n), gather_kv(vc, tables[i], n), scale, window=window)
            for i, n in enumerate(lens)]
    k2, v2, bts = poisoned([n - 1 for n in lens], nb - 1)
    for splits in (1, 4):
        out = paged_decode(q, k2, v2, torch.tensor(bts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                           scale, splits, block_n=16, window=window)
        for i in range(3):
            same("triton decode", out[i:i + 1], refs[i])
    # prefill: chunks of 9 and 14 tokens after cached prefixes of 16 and 26 (the chunks' K/V in the cache too)
    chunk, prefix = [9, 14], [16, 26]
    T = sum(chunk)
    qsl = [0, chunk[0], T]
    ctx = [p + c for p, c in zip(prefix, chunk)]
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    for i in range(2):
        for j in range(chunk[i]):
            pos = prefix[i] + j
            kc[tables[i][pos // page], pos % page] = k[qsl[i] + j]
            vc[tables[i][pos // page], pos % page] = v[qsl[i] + j]
    want = torch.cat([attend_one(q[qsl[i]:qsl[i + 1]], gather_kv(kc, tables[i], ctx[i]),
                                 gather_kv(vc, tables[i], ctx[i]), scale, window=window) for i in range(2)])
    k2, v2, bts = poisoned(prefix, nb - 1)
    i32 = dict(dtype=torch.int32)
    for tile, splits in ((None, 1), ((16, 16, 4, 2), 2)):
        seqs, blks = prefill_work(chunk, tile[0] if tile else 32)
        work = (torch.tensor(seqs, dtype=torch.int32), torch.tensor(blks, dtype=torch.int32))
        got = prefill_attention(q, k, v, k2, v2, torch.tensor(bts, **i32), torch.tensor(ctx, **i32),
                                torch.tensor(qsl, **i32), work, scale, window=window, tile=tile, num_splits=splits,
                                split_min_keys=16 if tile else None)
        same(f"triton prefill, {splits} split(s)", got, want)
    # the torch paths, through the backends' forward: a decode row (the third table) and the two chunks
    k2, v2, bts = poisoned(prefix + [lens[2] - 1], FREED_BLOCK)
    dq = torch.randn(1, H, D)
    q3, k3, v3 = torch.cat([dq, q]), torch.cat([k[:1], k]), torch.cat([v[:1], v])
    rows = [bts[2]] + bts[:2]  # the decode row first, as the batch orders them
    width = max(len(t) for t in rows)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(T + 1, dtype=torch.long), seq_lens=torch.tensor([lens[2]] + ctx, **i32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in rows], **i32),
        num_decodes=1, query_start_loc_host=[0, 1, 1 + chunk[0], 1 + T], seq_lens_host=[lens[2]] + ctx,
        block_tables_host=rows)
    kw = dict(num_heads=H, num_kv_heads=KVH, head_dim=D, block_size=page, scale=scale)
    want3 = torch.cat([attend_one(dq, gather_kv(kc, tables[2], lens[2]), gather_kv(vc, tables[2], lens[2]), scale,
                                  window=window), want])
    same("torch_ref", TorchRefBackend(**kw).forward(q3, k3, v3, k2, v2, meta, window=window), want3)
    sdpa = TritonPagedBackend(**kw)
    sdpa.prefill_impl = "sdpa"
    got = sdpa.forward(q3, k3, v3, k2, v2, meta, window=window)
    same("triton backend, sdpa prefill", got[1:], want)
    print("behind_window max abs errors:", {k: f"{v:.2e}" for k, v in worst.items()})


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (through pytest)"
    for name in sys.argv[1:] or CHECKS:
        globals()[f"check_{name}"]()
        print(f"{name}: ok", flush=True)
