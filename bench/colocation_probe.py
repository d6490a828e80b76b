"""Does the encoder lose its speed to the generator when both share one GPU, and does one CUDA context help?

    python bench/colocation_probe.py --model DIR --out bench/results/colocation_probe     # GPU, ~3-4 min

The served stack runs the towers (encoder process) and the LM decode loop (generator's engine-core process)
on one GPU. In the served benchmark the tower took ~4x its standalone time per batch. This probe measures,
on the same model and the same batches of 448 px images, the tower's time per batch of `--tower-batch`
images (the encoder's path: `adapter.finish` then `adapter.encode`, then a device sync) and the LM's decode
rate (`--decode-batch` text prompts, greedy, ignore_eos, in chunks of `--chunk-tokens` tokens):

  alone      the tower alone, then the decode alone;
  process    the decode in another process (what `mmpipe serve` does today: two CUDA contexts);
  thread     the decode in a thread of this process (one CUDA context; the tower on its own CUDA stream);
  thread_hi  the same with the tower's stream at high priority.

Writes <out>.json and <out>.md. Random-weight models are fine: only times are compared.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(*a: Any) -> None:
    print(f"[probe {time.strftime('%H:%M:%S')}]", *a, flush=True)


def jpeg(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class Decoder:
    """The LM decode loop: `LLM.generate` on text prompts, chunk after chunk, recording (t0, t1, tokens)."""

    def __init__(self, model: str, batch: int, chunk_tokens: int, gpu_mem: float):
        from mmpipe import LLM, SamplingParams

        self.llm = LLM(model, gpu_memory_utilization=gpu_mem, max_num_seqs=max(64, batch))
        self.prompts = [f"Tell me a long story number {i} about the sea." for i in range(batch)]
        self.sp = SamplingParams(temperature=0.0, max_tokens=chunk_tokens, ignore_eos=True)
        self.chunks: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.llm.generate(self.prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)  # warm-up

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            outs = self.llm.generate(self.prompts, self.sp, use_tqdm=False)
            self.chunks.append((t0, time.perf_counter(), sum(len(o.outputs[0].token_ids) for o in outs)))

    def rate(self, t_from: float, t_to: float) -> float | None:
        sel = [c for c in self.chunks if c[0] >= t_from and c[1] <= t_to]
        if not sel:
            return None
        return sum(c[2] for c in sel) / sum(c[1] - c[0] for c in sel)


class Tower:
    def __init__(self, model: str, batch: int, n_batches: int):
        import torch
        from PIL import Image

        from mmpipe.shared.models.registry import load_adapter
        from mmpipe.shared.types import MediaItem

        self.torch = torch
        self.adapter = load_adapter(model, part="towers", device="cuda", dtype="bfloat16")
        self.batches = []
        for b in range(n_batches):
            items = [self.adapter.preprocess(MediaItem(modality="image", data=Image.open(io.BytesIO(jpeg(
                1000 * b + i, 448))).convert("RGB"), content_hash=f"p{b}-{i}")) for i in range(batch)]
            self.batches.append(items)
        for _ in range(3):  # compile and capture the graphs of this layout
            self.one(self.batches[0])

    def one(self, items) -> float:
        t = time.perf_counter()
        self.adapter.encode("image", self.adapter.finish("image", items))
        self.torch.cuda.synchronize()
        return time.perf_counter() - t

    def measure(self, seconds: float, stream=None) -> dict:
        times: list[float] = []
        ctx = self.torch.cuda.stream(stream) if stream is not None else None
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        if ctx is not None:
            ctx.__enter__()
        try:
            i = 0
            while time.perf_counter() < t_end:
                times.append(self.one(self.batches[i % len(self.batches)]))
                i += 1
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        n = len(self.batches[0])
        med = statistics.median(times)
        return {"t0": t0, "t1": time.perf_counter(), "batches": len(times), "ms_per_batch_p50": round(med * 1e3, 2),
                "ms_per_batch_p90": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, 2),
                "img_per_s": round(n * len(times) / sum(times), 1)}


def background_main(args) -> int:
    dec = Decoder(args.model, args.decode_batch, args.chunk_tokens, args.gpu_mem)
    Path(args.ready_file).write_text("ready")
    th = threading.Thread(target=dec.run, daemon=True)
    th.start()
    while not Path(args.stop_file).exists():
        time.sleep(0.05)
    dec.stop.set()
    th.join()
    Path(args.result_file).write_text(json.dumps(dec.chunks))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="bench/results/colocation_probe")
    ap.add_argument("--tower-batch", type=int, default=11)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=12.0, help="per measurement")
    ap.add_argument("--gpu-mem", type=float, default=0.4)
    ap.add_argument("--modes", default="alone,process,thread,thread_hi")
    ap.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ready-file", default="")
    ap.add_argument("--stop-file", default="")
    ap.add_argument("--result-file", default="")
    args = ap.parse_args(argv)
    if args.background:
        return background_main(args)
    import torch

    modes = args.modes.split(",")
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
                           "modes": {}}
    log("loading the tower")
    tower = Tower(args.model, args.tower_batch, 4)
    res["modes"]["tower_alone"] = tower.measure(args.seconds)
    log("tower alone", res["modes"]["tower_alone"])
    if "process" in modes:
        tmp = Path(f"/tmp/colocation_probe_{os.getpid()}")
        tmp.mkdir(exist_ok=True)
        files = {k: str(tmp / k) for k in ("ready", "stop", "result")}
        bg = subprocess.Popen([sys.executable, __file__, "--background", "--model", args.model,
                               "--decode-batch", str(args.decode_batch), "--chunk-tokens", str(args.chunk_tokens),
                               "--gpu-mem", str(args.gpu_mem), "--ready-file", files["ready"],
                               "--stop-file", files["stop"], "--result-file", files["result"]])
        while not Path(files["ready"]).exists():
            if bg.poll() is not None:
                raise SystemExit("the background decoder died")
            time.sleep(0.2)
        t_alone0 = time.perf_counter()
        time.sleep(args.seconds)
        t_alone1 = time.perf_counter()
        m = tower.measure(args.seconds)
        Path(files["stop"]).write_text("stop")
        bg.wait(120)
        chunks = json.loads(Path(files["result"]).read_text())

        # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes of one machine
        def rate(a: float, b: float) -> float | None:
            sel = [c for c in chunks if c[0] >= a and c[1] <= b]
            return round(sum(c[2] for c in sel) / sum(c[1] - c[0] for c in sel), 1) if sel else None
        m["decode_tok_s_alone"] = rate(t_alone0, t_alone1)
        m["decode_tok_s_during"] = rate(m["t0"], m["t1"])
        res["modes"]["process"] = m
        log("process", m)
    if "thread" in modes or "thread_hi" in modes:
        dec = Decoder(args.model, args.decode_batch, args.chunk_tokens, args.gpu_mem)
        th = threading.Thread(target=dec.run, daemon=True)
        th.start()
        t_alone0 = time.perf_counter()
        time.sleep(args.seconds)
        res["decode_tok_s_alone_thread"] = round(dec.rate(t_alone0, time.perf_counter()) or 0, 1)
        for mode, prio in (("thread", 0), ("thread_hi", -1)):
            if mode not in modes:
                continue
            s = torch.cuda.Stream(priority=prio)
            m = tower.measure(args.seconds, stream=s)
            m["decode_tok_s_during"] = round(dec.rate(m["t0"], m["t1"]) or 0, 1)
            res["modes"][mode] = m
            log(mode, m)
        dec.stop.set()
        th.join()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [f"# Tower and decode on one GPU ({res['gpu']})", "",
             f"Tower batch {args.tower_batch} x 448 px; decode batch {args.decode_batch} in chunks of "
             f"{args.chunk_tokens} tokens.", "",
             "| mode | tower ms/batch p50 | p90 | img/s | decode tok/s alone | decode tok/s during |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, m in res["modes"].items():
        alone = m.get("decode_tok_s_alone", res.get("decode_tok_s_alone_thread", "") if "thread" in k else "")
        lines.append(f"| {k} | {m['ms_per_batch_p50']} | {m['ms_per_batch_p90']} | {m['img_per_s']} | {alone} | "
                     f"{m.get('decode_tok_s_during', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
