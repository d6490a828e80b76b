"""Build a Qwen2.5-VL-3B-sized full model (vision tower + text decoder) with random weights, for benchmarks.

    python bench/build_3b_model.py /tmp/qwen2_5_vl_3b_random            # GPU: bf16, ~7.5 GB, ~10 s
    python bench/build_3b_model.py /tmp/qwen2_5_vl_small --small        # CPU: a small model of the same shape

No weights can be downloaded, so the model starts from the tiny qwen2_5_vl model of `mmpipe tiny-model`
(its locally trained tokenizer, chat template, processor and token ids) and takes Qwen2.5-VL-3B's sizes:

  text    hidden 2048, 36 layers, 16 q / 2 kv heads (head_dim 128), intermediate 11008, M-RoPE sections
          [16, 24, 24], rope_theta 1e6, rms_norm_eps 1e-6, tied embeddings, initializer_range 0.02,
          vocab_size 151936 (the real model's: the LM head costs what it costs there; the tiny tokenizer's
          480 ids all lie inside it, and ids it does not know decode to nothing)
  vision  depth 32, hidden 1280, intermediate 3420, 16 heads, out_hidden_size 2048, window_size 112,
          fullatt_block_indexes [7, 15, 23, 31]
  images  the image (and video) processor's size is Qwen2.5-VL's: shortest_edge 3136, longest_edge 12845056,
          so a 448x448 image becomes 32x32 patches = 256 LM tokens (checked after the build)

The weights are drawn with `from_config` under `torch.device(device)` (on the GPU in seconds) in bf16 on
CUDA (float32 on the CPU), then `save_pretrained`. `--small` keeps every shape rule (M-RoPE sections that sum
to head_dim / 2, windowed and full-attention vision blocks, the 3B vocab, the real image sizes) at sizes a
CPU runs in a smoke test.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB_SIZE = 151936
IMAGE_SIZE = {"shortest_edge": 3136, "longest_edge": 12845056}

TEXT_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, mrope_section=[16, 24, 24])
VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
# --small: head_dim 128 / 4 = 32 -> 16 rotary frequencies = 4 + 6 + 6
TEXT_SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, mrope_section=[4, 6, 6])
VISION_SMALL = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                    window_size=112, fullatt_block_indexes=[1, 3])

INFO_FILE = "mmpipe_bench_model.json"


def log(*a) -> None:
    print(*a, flush=True)


def make_config(src: str | Path, small: bool = False):
    """The tiny qwen2_5_vl model's config in `src` with the 3B (or --small) sizes."""
    from transformers import AutoConfig

    text, vision = (TEXT_SMALL, VISION_SMALL) if small else (TEXT_3B, VISION_3B)
    cfg = AutoConfig.from_pretrained(src)
    tc, vc = cfg.text_config, cfg.vision_config
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size"):
        setattr(tc, k, text[k])
    tc.vocab_size = VOCAB_SIZE
    tc.initializer_range = 0.02
    tc.max_position_embeddings = 32768
    tc.rms_norm_eps = 1e-6
    tc.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0,
                          "mrope_section": list(text["mrope_section"])}
    tc.layer_types = ["full_attention"] * text["num_hidden_layers"]
    tc.tie_word_embeddings = True
    cfg.tie_word_embeddings = True
    if hasattr(tc, "max_window_layers"):
        tc.max_window_layers = text["num_hidden_layers"]
    for k, v in vision.items():
        setattr(vc, k, list(v) if isinstance(v, list) else v)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["mrope_section"]) * 2 == head_dim, "M-RoPE sections must sum to head_dim / 2"
    return cfg


def build_model(out_dir: str | Path, *, small: bool = False, device: str | None = None,
                seed: int = 0) -> Path:
    """Write the model to `out_dir` (replaced if it exists) and return its path."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils.logging import disable_progress_bar

    from mmpipe.shared.models.tiny import build_tiny_model

    disable_progress_bar()
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() and not small else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    text, vision = (TEXT_SMALL, VISION_SMALL) if small else (TEXT_3B, VISION_3B)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="mmpipe-tiny-src-") as tmp:
        src = build_tiny_model("qwen2_5_vl", Path(tmp) / "tiny")
        assert len(AutoProcessor.from_pretrained(src).tokenizer) <= VOCAB_SIZE
        cfg = make_config(src, small)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
        model.eval()
        gen_cfg = json.loads((src / "generation_config.json").read_text())
        for k in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if k in gen_cfg:
                setattr(model.generation_config, k, gen_cfg[k])
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        t1 = time.perf_counter()
        model.save_pretrained(out)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        t2 = time.perf_counter()
        processor = AutoProcessor.from_pretrained(src)
        for name in ("image_processor", "video_processor"):
            sub = getattr(processor, name, None)
            if sub is not None:
                sub.size = dict(IMAGE_SIZE)
        processor.save_pretrained(out)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / f).exists() and not (out / f).exists():
                shutil.copy(src / f, out / f)
    tokens = image_tokens(out, 448, 448)
    if tokens != 256:
        raise RuntimeError(f"a 448x448 image gives {tokens} tokens with the saved processor, not 256")
    info = {"what": "Qwen2.5-VL-3B-sized random model" if not small else "small Qwen2.5-VL-shaped random model",
            "params": n_params, "dtype": str(dtype).removeprefix("torch."), "built_on": device,
            "text": text, "vision": vision, "vocab_size": VOCAB_SIZE, "image_size": IMAGE_SIZE,
            "tokens_448px": tokens}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"built {info['what']} ({n_params / 1e9:.2f} B params, {info['dtype']}) in {out}: {size / 1e9:.2f} GB; "
        f"init {t1 - t0:.1f} s, save {t2 - t1:.1f} s, total {time.perf_counter() - t0:.1f} s; "
        f"448x448 image -> {tokens} tokens")
    return out


def image_tokens(model_dir: str | Path, h: int, w: int) -> int:
    """Placeholder tokens the saved processor gives one h x w image."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    img = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = proc(text="<|vision_start|><|image_pad|><|vision_end|>", images=[img], return_tensors="pt")["input_ids"]
    return int((ids == pad).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--small", action="store_true", help="a small model of the same shape (CPU smoke tests)")
    p.add_argument("--device", default=None, help="where to draw the weights (default: cuda if present, "
                                                  "cpu with --small)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build_model(a.out_dir, small=a.small, device=a.device, seed=a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
