"""`mmpipe demo`: send an image, a video and an audio clip through `LLM.chat` and print the answers.

With no --model it builds (once) and uses the tiny random Qwen2.5-Omni thinker, which takes all three
modalities: its answers are random words, but every stage runs for real. Media is synthesised locally
(a drawn image as a data: URL, an mp4 file in an allowed local folder, a WAV as input_audio).
"""
from __future__ import annotations

import argparse
import base64
import io
import logging
import tempfile
import time
from pathlib import Path

DEFAULT_FAMILY = "qwen2_5_omni"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the offline demo (image, video and audio through LLM.chat)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model dir or hub id (default: a tiny random model)")
    p.add_argument("--family", default=DEFAULT_FAMILY, help="tiny model family used when --model is not given")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p


def _image_data_url():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 84), (30, 60, 200))
    ImageDraw.Draw(img).rectangle([30, 20, 80, 60], fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _video_file(folder: Path) -> Path:
    import av
    import numpy as np

    path = folder / "moving_square.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=4)
        s.height, s.width, s.pix_fmt = 64, 96, "yuv420p"
        for t in range(8):
            f = np.full((64, 96, 3), (30, 60, 200), dtype=np.uint8)
            f[20:44, 8 + 8 * t:32 + 8 * t] = (220, 30, 30)
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _wav_b64() -> str:
    import numpy as np
    import soundfile as sf

    t = np.arange(16000) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmpipe import LLM, SamplingParams
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = args.model
    if model is None:
        print(f">> no MODEL given: using a tiny random {args.family} model (answers are random words)")
        model = str(ensure_tiny_model(args.family))
    with tempfile.TemporaryDirectory(prefix="mmpipe-demo-") as tmp:
        video = _video_file(Path(tmp))
        llm = LLM(model, device=args.device, allowed_local_media_path=tmp)
        questions = {
            "image": {"type": "image_url", "image_url": {"url": _image_data_url()}},
            "video": {"type": "video_url", "video_url": {"url": f"file://{video}"}},
            "audio": {"type": "input_audio", "input_audio": {"data": _wav_b64(), "format": "wav"}},
        }
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        for modality, part in questions.items():
            if modality not in llm.adapter.modalities:
                print(f"[{modality}] skipped: {llm.adapter.family} does not take {modality}")
                continue
            msgs = [{"role": "user", "content": [part, {"type": "text", "text": f"Describe this {modality}."}]}]
            t0 = time.perf_counter()
            out = llm.chat(msgs, sp, use_tqdm=False)[0]
            dt = time.perf_counter() - t0
            print(f"[{modality}] prompt tokens={out.num_prompt_tokens} answer ({dt * 1000:.0f} ms): "
                  f"{out.outputs[0].text!r}")
    return 0
