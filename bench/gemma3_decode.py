"""The Gemma-3-sized sliding-window decode row of bench/engine_bench.py (`--gemma3`): mmpipe's engine on a
Gemma 3 4B-sized text model (random bf16 weights), decode ms/step against its roofline.

Gemma 3 4B's text config: hidden 2560, 34 layers (5 sliding : 1 global, window 1024), 8 query / 4 KV heads of
256, intermediate 10240, vocab 262208, query_pre_attn_scalar 256, local rope base 10k, global 1M with linear
scaling 8. The roofline of a decode step reads every weight once plus, per sequence, the K/V of min(ctx, 1024)
tokens in each sliding layer and of ctx tokens in each global layer: with a 4,000-token context the window cuts
the KV bytes per step by ~3.1x against an all-global model of the same shape, which is what the engine's
windowed decode kernel must turn into time.

Not run in CI (no GPU); `python bench/engine_bench.py --gemma3 --out results/gemma3_h200 --prompt-len 4000`.
"""
from __future__ import annotations

import torch

GEMMA3_4B_TEXT = dict(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, intermediate_size=10240, vocab_size=262208, max_position_embeddings=32768,
                      query_pre_attn_scalar=256, sliding_window=1024, hidden_activation="gelu_pytorch_tanh",
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                          "rope_theta": 1_000_000.0}},
                      layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                   for i in range(34)])
IMAGE_TOKEN_ID = 262144


def build_gemma3(device: str = "cuda", dtype=torch.bfloat16, tiny: bool = False):
    """A Gemma3ForConditionalGeneration with a 4B-sized text model and a one-layer vision tower (unused)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(GEMMA3_4B_TEXT)
    if tiny:  # CPU dry runs
        text.update(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, sliding_window=16, layer_types=text["layer_types"][:6])
    cfg = Gemma3Config(text_config=text, vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                                                            intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=56, patch_size=14),
                       mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(cfg).to(dtype).eval()
    return model


def kv_bytes_per_step(model, ctx: float) -> float:
    """K/V bytes one sequence's decode step reads at context `ctx`: sliding layers read their window only."""
    t = model.config.text_config
    per_token_layer = 2 * t.num_key_value_heads * t.head_dim * 2
    return sum(per_token_layer * (min(ctx, t.sliding_window) if lt == "sliding_attention" else ctx)
               for lt in t.layer_types)


def make_prompts(n: int, prompt_len: int, image_tokens: int, hidden: int, seed: int = 0) -> list[dict]:
    """Random token ids with one image's rows (`image_tokens` contiguous positions, bidirectional in prefill)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pre = 20 + (i % 7)
        ids = torch.randint(0, 260000, (prompt_len,), generator=g)
        ids[pre:pre + image_tokens] = IMAGE_TOKEN_ID
        emb = (torch.randn(image_tokens, hidden, generator=g) * 0.02).to(torch.bfloat16)
        out.append(dict(ids=ids, emb=emb, mm_pos=torch.arange(pre, pre + image_tokens), mpos=None, delta=0))
    return out


def run(args, bench_engine, weight_bytes, bw: float, log) -> dict:
    """The row: engine ms/step and tok/s per concurrency, beside the windowed roofline (and an all-global one)."""
    concs = [int(x) for x in args.concurrency.split(",")]
    model = build_gemma3()
    # the decoder and lm_head (tied to the embedding: counted once), not the tower
    wbytes = weight_bytes(torch.nn.ModuleList([model.model.language_model, model.lm_head]))
    prompts = make_prompts(max(concs), args.prompt_len, args.image_tokens, GEMMA3_4B_TEXT["hidden_size"])
    max_model_len = args.prompt_len + args.new_tokens + 16
    blocks = max(concs) * -(-max_model_len // 16) + 64
    ctx = args.prompt_len + args.new_tokens / 2
    t = model.config.text_config
    all_global = 2 * t.num_key_value_heads * t.head_dim * 2 * len(t.layer_types) * ctx
    row: dict = {"weight_bytes": wbytes, "roofline": {}, "roofline_all_global": {}}
    for c in concs:
        step = wbytes + c * kv_bytes_per_step(model, ctx)
        row["roofline"][c] = dict(ms_per_step=1e3 * step / bw, tok_s=c / (step / bw))
        row["roofline_all_global"][c] = dict(ms_per_step=1e3 * (wbytes + c * all_global) / bw)
    row["engine"], row["engine_kv_info"] = bench_engine(model, prompts, concs, args.new_tokens, max_model_len, blocks,
                                                        tag="gemma3 engine")
    for c in concs:
        e, r = row["engine"][c], row["roofline"][c]
        log(f"[gemma3] c={c}: {e['ms_per_step']:.2f} ms/step vs roofline {r['ms_per_step']:.2f} "
            f"({100 * r['ms_per_step'] / e['ms_per_step']:.0f}%), all-global roofline "
            f"{row['roofline_all_global'][c]['ms_per_step']:.2f}")
    return row
