"""Ingest -> encoder bytes and ingest CPU per item: the float processor output against the compact uint8 form.

    python bench/pixel_wire_bench.py                      # 448x448 image and an 8-frame 448x448 video
    python bench/pixel_wire_bench.py --image-size 1024 --repeats 50 --save .tmp/pixel_wire

The processor is Qwen2.5-VL's with its real sizes (image: shortest_edge 3136, longest_edge 12845056 pixels;
video: the Qwen2-VL video processor's defaults, cap_pixels_per_frame=True), on the tokenizer of the tiny
qwen2_5_vl model (built in a temp folder; the tokenizer does not change the pixels). The media is a smooth
synthetic picture (gradients and shapes, so its JPEG is photo-sized, not noise-sized), decoded from JPEG as
ingest would.

  before: the processor's full call, what `ModelAdapter.preprocess` ran until the compact form (fp32 pixels;
          also cast to bf16 as `--wire-dtype bfloat16` sends them);
  after:  `ModelAdapter.preprocess` now (uint8 pixels, Qwen images' temporal copies folded).
Bytes are the serialised `Encode` payload per item (shared/cache/serde.pack_tensors: tensors + header + meta).
CPU is the median (and min) of --repeats calls (process CPU time, so other load on the machine inflates it less
than wall time), for the processor alone and with the payload's serialisation (blake3 digest included), which is
ingest's whole `_preprocess`. `finish` is the encoder's remaining step timed on this CPU (on a GPU it is one
small kernel). Where CUDA is available, the encoder's host -> device step is timed too (fp32 copy and cast
against uint8 copy, finish and cast, from pageable memory as `unpack_tensors` gives it) and the finished tensor
compared with the CPU processor's bit for bit.

With --save DIR the compact and float tensors are written there (torch.save) for a check on another device.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmpipe.shared.cache.serde import pack_tensors
from mmpipe.shared.models.pixel_wire import PIXEL_KEYS, wire_tensors
from mmpipe.shared.models.registry import load_adapter
from mmpipe.shared.models.tiny import build_tiny_model
from mmpipe.shared.types import MediaItem

_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}


def picture(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, 2)
        d.ellipse([x0, y0, x0 + size // 6, y0 + size // 8], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cpu_ms(fn, repeats: int) -> str:
    """Median and min CPU ms of `fn` (process CPU time)."""
    fn()  # warm-up (first-call caches)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return f"{statistics.median(times):.2f} (min {min(times):.2f})"


def gpu_ms(fn, n: int = 50) -> float:
    """Mean CUDA-event ms of `fn` over n calls, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def float_call(adapter, modality: str, data) -> dict[str, torch.Tensor]:
    """The processor's full call, exactly what preprocess sent before the compact form."""
    arg = {"image": "images", "video": "videos"}[modality]
    out = adapter.processor(text=adapter.placeholder_token(modality), return_tensors="pt", **{arg: [data]})
    return {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}


def measure(adapter, modality: str, data, media_bytes: int, repeats: int, save: Path | None) -> None:
    key = PIXEL_KEYS[modality]
    item = MediaItem(modality=modality, data=data, content_hash="0" * 64)
    p = adapter.preprocess(item)
    floats = float_call(adapter, modality, data)
    meta = dict(p.meta)
    sizes = {"float32": len(pack_tensors(floats, meta)),
             "bf16 (--wire-dtype)": len(pack_tensors(wire_tensors(floats, torch.bfloat16), meta)),
             "uint8 (compact)": len(pack_tensors(p.tensors, meta))}
    form = adapter.pixel_wire.form(modality)
    before = cpu_ms(lambda: float_call(adapter, modality, data), repeats)
    after = cpu_ms(lambda: adapter.preprocess(item), repeats)
    before_wire = cpu_ms(lambda: pack_tensors(float_call(adapter, modality, data), meta), repeats)
    after_wire = cpu_ms(lambda: pack_tensors(adapter.preprocess(item).tensors, meta), repeats)
    finish = cpu_ms(lambda: form.finish([p.tensors[key]], "cpu", torch.float32), repeats)
    exact = torch.equal(form.finish([p.tensors[key]], "cpu", torch.float32), floats[key])
    print(f"{modality}: media {media_bytes / 1e3:.1f} KB, {key} float {tuple(floats[key].shape)} -> "
          f"uint8 {tuple(p.tensors[key].shape)}, {meta['num_tokens']} tokens, bit-identical after finish: {exact}")
    for name, n in sizes.items():
        print(f"  payload {name:<20} {n / 1e6:8.3f} MB  ({n / sizes['float32']:.3f} of float32)")
    print(f"  ingest CPU ms per item, processor: float {before}, compact {after}")
    print(f"  ingest CPU ms per item, processor + Encode payload: float {before_wire}, compact {after_wire}")
    print(f"  encoder finish (uint8 -> fp32) on this CPU: {finish} ms")
    if torch.cuda.is_available():
        f32, u8 = floats[key], p.tensors[key]
        same = torch.equal(form.finish([u8], "cuda", torch.float32).cpu(), f32)
        print(f"  encoder host -> device per item, {torch.cuda.get_device_name()}: fp32 copy + bf16 cast "
              f"{gpu_ms(lambda: f32.to('cuda').to(torch.bfloat16)):.3f} ms, uint8 copy + finish + bf16 "
              f"{gpu_ms(lambda: form.finish([u8], 'cuda', torch.bfloat16)):.3f} ms; bit-identical on CUDA: {same}")
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        p_ = form.processor
        torch.save({"compact": p.tensors[key].clone(), "float": floats[key].clone(), "layout": form.layout,
                    "patch": form.patch, "temporal": form.temporal, "rescale_factor": p_.rescale_factor,
                    "image_mean": list(p_.image_mean), "image_std": list(p_.image_std)}, save / f"{modality}.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--video-frames", type=int, default=8, help="0: no video")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: CPU time without OpenMP spinning; ingest runs items in parallel "
                         "on its worker threads instead)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model("qwen2_5_vl", Path(tmp) / "qwen2_5_vl")
        adapter = load_adapter(str(path), dtype="float32", device="cpu")
    proc = adapter.processor
    proc.image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    proc.video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
    adapter = type(adapter)(adapter.model, proc)
    print(f"torch threads {torch.get_num_threads()}; image {a.image_size}x{a.image_size}")
    data = jpeg(picture(a.image_size, 0))
    measure(adapter, "image", Image.open(io.BytesIO(data)).convert("RGB"), len(data), a.repeats, a.save)
    if a.video_frames:
        frames = [np.asarray(Image.open(io.BytesIO(jpeg(picture(a.image_size, s)))).convert("RGB"))
                  for s in range(a.video_frames)]
        measure(adapter, "video", np.stack(frames), sum(len(jpeg(picture(a.image_size, s)))
                                                        for s in range(a.video_frames)), a.repeats, a.save)


if __name__ == "__main__":
    main()
