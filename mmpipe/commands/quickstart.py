"""`mmpipe quickstart`: what `make run` does — start the whole stack, ask it one question, keep serving.

Builds (once) a tiny random Qwen2.5-Omni thinker unless --model is given, starts `mmpipe serve` (embedded
Redis + ingest, encoder, generator, gateway as supervised processes), waits for /health, sends one chat
request with an image, a video and an audio clip through the official `openai` client, prints the answer
and the curl command to try next, and keeps serving until Ctrl-C.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmpipe.commands.demo import DEFAULT_FAMILY, _image_data_url, _video_file, _wav_b64
from mmpipe.services.common.cli_args import add_log_format_arg, env_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quickstart", help="start the stack on a tiny model, send one request, keep serving",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model dir or hub id (default: a tiny random model)")
    p.add_argument("--family", default=DEFAULT_FAMILY, help="tiny model family used when --model is not given")
    p.add_argument("--port", type=int, default=env_int("PORT", 8000))
    p.add_argument("--grpc-port", type=int, default=env_int("GRPC_PORT", 50050))
    p.add_argument("--once", action="store_true", help="stop after the first answer (for scripts and tests)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    add_log_format_arg(p)  # passed on to `mmpipe serve`
    return p


def _wait_health(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mmpipe serve exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the stack was not healthy at {url} after {timeout_s:.0f}s")


def _ask(base_url: str, model: str, media_dir: Path, modalities: tuple[str, ...]) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    parts: list[dict] = []
    if "image" in modalities:
        parts.append({"type": "image_url", "image_url": {"url": _image_data_url()}})
    if "video" in modalities:
        parts.append({"type": "video_url", "video_url": {"url": f"file://{_video_file(media_dir)}"}})
    if "audio" in modalities:
        parts.append({"type": "input_audio", "input_audio": {"data": _wav_b64(), "format": "wav"}})
    parts.append({"type": "text", "text": "Describe what you see and hear."})
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                          max_tokens=16, temperature=0.0)
    return resp.choices[0].message.content or ""


def run(args: argparse.Namespace) -> int:
    from mmpipe.shared.models.registry import adapter_class_for
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = args.model
    if model is None:
        print(f">> no MODEL given: building/using a tiny random {args.family} model (answers are random words)",
              flush=True)
        model = str(ensure_tiny_model(args.family))
    from transformers import AutoConfig

    modalities = adapter_class_for(AutoConfig.from_pretrained(model).model_type).modalities
    media_dir = Path(tempfile.mkdtemp(prefix="mmpipe-quickstart-"))
    cmd = [sys.executable, "-m", "mmpipe.cli", "serve", model, "--port", str(args.port), "--grpc-port",
           str(args.grpc_port), "--allowed-local-media-path", str(media_dir),
           *(["--log-format", args.log_format] if args.log_format else [])]
    print(">> starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{args.port}"
    try:
        _wait_health(f"{base}/health", proc, args.startup_timeout_s)
        t0 = time.perf_counter()
        answer = _ask(f"{base}/v1", model, media_dir, modalities)
        print(f"\n>> answer ({(time.perf_counter() - t0) * 1000:.0f} ms, {', '.join(modalities)} in one request): "
              f"{answer!r}\n", flush=True)
        print(f">> the stack keeps serving on {base}/v1 (OpenAI API) and 127.0.0.1:{args.grpc_port} (gRPC). Try:\n"
              f"   curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
              f"\"max_tokens\": 8}}'\n>> Ctrl-C stops everything.", flush=True)
        if args.once:
            return 0
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


