"""Gateway CPU per request: how much CPU the gateway process(es) spend on one streamed image chat.

    python bench/gateway_cpu_bench.py                               # tiny qwen2_vl on the CPU, 50 requests
    python bench/gateway_cpu_bench.py --requests 100 --concurrency 4 --api-server-count 2
    python bench/gateway_cpu_bench.py --stream-interval 4             # the generator sends 4 tokens a message
    python bench/gateway_cpu_bench.py --profile /tmp/gw-prof         # also py-spy the gateway (pip install py-spy)

Starts the real stack with `mmpipe serve` (an embedded redis-server, then encoder, generator, ingest and the
gateway as real processes on free 127.0.0.1 ports, `--device cpu`), then for each --max-tokens value sends
--requests streaming chat completions through the official `openai` client, each with one --image-size px JPEG
as a data URL and a short text, `ignore_eos` (so exactly max_tokens tokens stream). The gateway's
`process_cpu_seconds_total` is read from its /metrics before and after each phase (summed over its worker
processes with --api-server-count > 1): CPU ms per request is the difference over the requests sent. With two
--max-tokens values, a straight line through the two gives the fixed cost and the cost per streamed token.

Each phase ends after --requests requests or --time-limit-s seconds, whichever comes first, and is run
--repeats times (the median run is reported: on a shared machine other processes slow some runs down, which
shows in CPU time too, through caches and clocks); a few warm-up requests run before the first phase (first-request imports and caches are not what this measures). CPU time,
unlike wall time, is not inflated by other processes sharing the machine, but the generator and the client run
on the same cores, so wall times are only indicative.

With --profile DIR, one more phase runs (not counted in the numbers) under `py-spy record --gil --nonblocking` (samples
of the thread holding the GIL: Python's CPU time; or `--native`, all threads) on every gateway process, and the functions with the most samples (own and cumulative) are printed and written to DIR.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape_sum(url: str, metric: str) -> float:
    """Sum of every sample named `metric` on a Prometheus text page (all label sets)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == metric:
            total += float(m.group(3))
    return total


def jpeg_data_url(size: int, seed: int = 0) -> str:
    """A photo-like JPEG (smooth gradients plus mild noise, quality 90) as a data: URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 255], axis=-1)
    rgb += rng.normal(0, 12, rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --- the stack -----------------------------------------------------------------------------------------------
@dataclass
class Stack:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gateway_pids(self) -> list[int]:
        """The gateway's processes: the `mmpipe gateway` child of `mmpipe serve` and its worker children."""
        kids = _children()
        out = []
        for pid in kids.get(self.proc.pid, []):
            if b"gateway" in _cmdline(pid):
                out += [pid, *kids.get(pid, [])]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids[ppid].append(int(d))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def start_stack(model: str, api_server_count: int, log_dir: Path, startup_timeout_s: float,
                stream_interval: int = 1) -> Stack:
    from mmpipe.shared.cache.embedded_redis import free_port

    port, grpc_port = free_port(), free_port()
    log = log_dir / "serve.log"
    argv = [sys.executable, "-m", "mmpipe.cli", "serve", model, "--device", "cpu", "--port", str(port),
            "--grpc-port", str(grpc_port), "--shutdown-grace-s", "5", "--log-level", "warning"]
    if api_server_count != 1:
        argv += ["--api-server-count", str(api_server_count)]
    argv += ["--stream-interval", str(stream_interval)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    stack = Stack(proc, port, log)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mmpipe serve exited ({proc.returncode}); log tail:\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"{stack.url}/health", timeout=2).status == 200:
                return stack
        except OSError:
            pass
        time.sleep(0.5)
    stack.stop()
    raise RuntimeError(f"the stack was not healthy within {startup_timeout_s:.0f} s; log tail:\n"
                       f"{log.read_text()[-3000:]}")


# --- the load ------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    max_tokens: int
    requests: int
    wall_s: float
    gateway_cpu_s: float
    cpu_ms_per_request: float
    user_ms_per_request: float
    sys_ms_per_request: float
    content_chunks_per_request: float
    requests_per_s: float


def one_chat(client, model: str, url: str, max_tokens: int) -> int:
    """One streamed image chat; returns the number of chunks that carried content."""
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=max_tokens, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "Describe this image."}]}],
        extra_body={"ignore_eos": True})
    n = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


def run_phase(stack: Stack, client, model: str, url: str, max_tokens: int, n: int, concurrency: int,
              time_limit_s: float) -> tuple[int, float, list[int]]:
    deadline = time.monotonic() + time_limit_s
    lock = threading.Lock()
    sent = [0]
    chunks: list[int] = []

    def worker() -> None:
        while True:
            with lock:
                if sent[0] >= n or time.monotonic() > deadline:
                    return
                sent[0] += 1
            c = one_chat(client, model, url, max_tokens)
            with lock:
                chunks.append(c)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return len(chunks), time.perf_counter() - t0, chunks


def measure(stack: Stack, client, model: str, url: str, max_tokens: int, args) -> Phase:
    metrics = f"{stack.url}/metrics"
    pids = stack.gateway_pids()
    cpu0, t0 = scrape_sum(metrics, "process_cpu_seconds_total"), _user_sys(pids)
    done, wall, chunks = run_phase(stack, client, model, url, max_tokens, args.requests, args.concurrency,
                                   args.time_limit_s)
    cpu1, t1 = scrape_sum(metrics, "process_cpu_seconds_total"), _user_sys(pids)
    cpu = cpu1 - cpu0
    per = 1000 / max(done, 1)
    return Phase(max_tokens, done, round(wall, 3), round(cpu, 4), round(cpu * per, 2),
                 round((t1[0] - t0[0]) * per, 2), round((t1[1] - t0[1]) * per, 2),
                 round(sum(chunks) / max(done, 1), 1), round(done / wall, 2))


def _user_sys(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes (/proc/PID/stat), to split the metric's total."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sys_ = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, sys_ = user + int(f[11]) / tick, sys_ + int(f[12]) / tick
    return user, sys_


# --- profiling -----------------------------------------------------------------------------------------------
def profile(stack: Stack, client, model: str, url: str, max_tokens: int, args, out_dir: Path) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = []
    for pid in stack.gateway_pids():
        path = out_dir / f"gateway-{pid}.txt"
        recorders.append((path, subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(path),
             *(["--native"] if args.profile_native else ["--nonblocking", "--gil"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)
    run_phase(stack, client, model, url, max_tokens, args.requests, args.concurrency, args.time_limit_s)
    for _, p in recorders:
        p.send_signal(signal.SIGINT)
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for path, p in recorders:
        p.wait(60)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack_s, _, count = line.rpartition(" ")
            if not stack_s or not count.isdigit():
                continue
            frames = [_short(f) for f in stack_s.split(";")]
            c = int(count)
            total += c
            own[frames[-1]] += c
            for f in set(frames):
                cum[f] += c
    report = {"samples": total,
              "own": [(f, round(100 * c / max(total, 1), 1)) for f, c in own.most_common(args.profile_top)],
              "cumulative": [(f, round(100 * c / max(total, 1), 1)) for f, c in cum.most_common(args.profile_top)]}
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    return report


def _short(frame: str) -> str:
    """`fn (path/to/mod.py:12)` -> `fn (mod.py)`: one entry per function, not per line."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    fn, path = m.groups()
    parts = Path(path).parts
    return f"{fn} ({'/'.join(parts[-2:])})"


# --- main ----------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the tiny qwen2_vl model)")
    ap.add_argument("--requests", type=int, default=50, help="requests per phase")
    ap.add_argument("--time-limit-s", type=float, default=300.0, help="a phase ends after this many seconds")
    ap.add_argument("--max-tokens", default="1,64", help="one phase per value; two values give fixed + per token")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    ap.add_argument("--repeats", type=int, default=3, help="runs per phase; the median run is reported")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=3, help="requests before the first phase")
    ap.add_argument("--api-server-count", type=int, default=1, help="gateway processes (mmpipe serve flag)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="tokens per Generate message (mmpipe serve / generator flag)")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the gateway in one extra phase; output here")
    ap.add_argument("--profile-max-tokens", type=int, default=64)
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames too (pauses the process per sample)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    import openai

    if args.model is None:
        from mmpipe.shared.models.tiny import ensure_tiny_model

        args.model = str(ensure_tiny_model("qwen2_vl"))
    max_tokens = [int(x) for x in args.max_tokens.split(",") if x.strip()]
    url = jpeg_data_url(args.image_size)
    log_dir = Path(tempfile.mkdtemp(prefix="mmpipe-gwcpu-"))
    print(f"image: {args.image_size}x{args.image_size} JPEG, data URL {len(url) / 1024:.1f} KiB; logs in {log_dir}",
          flush=True)
    t0 = time.perf_counter()
    stack = start_stack(args.model, args.api_server_count, log_dir, args.startup_timeout_s, args.stream_interval)
    print(f"stack healthy in {time.perf_counter() - t0:.1f} s; gateway pids {stack.gateway_pids()}", flush=True)
    try:
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for mt in max_tokens:
            for _ in range(args.warmup):
                one_chat(client, model, url, mt)
        phases = []
        for mt in max_tokens:
            runs = sorted((measure(stack, client, model, url, mt, args) for _ in range(args.repeats)),
                          key=lambda p: p.cpu_ms_per_request)
            ph = runs[len(runs) // 2]  # the median run: other processes on a shared machine inflate some runs
            if args.repeats > 1:
                print(f"max_tokens={mt:3d}: CPU ms per request over {args.repeats} runs: "
                      f"{[r.cpu_ms_per_request for r in runs]}", flush=True)
            phases.append(ph)
            print(f"max_tokens={mt:3d}: {ph.requests} requests in {ph.wall_s:.1f} s ({ph.requests_per_s} req/s), "
                  f"{ph.content_chunks_per_request} content chunks each; gateway CPU {ph.gateway_cpu_s:.3f} s = "
                  f"{ph.cpu_ms_per_request:.2f} ms per request (user {ph.user_ms_per_request:.2f}, "
                  f"system {ph.sys_ms_per_request:.2f})", flush=True)
        result: dict = {"machine": f"{os.cpu_count()} CPUs", "model": args.model, "image_size": args.image_size,
                        "data_url_bytes": len(url), "concurrency": args.concurrency,
                        "api_server_count": args.api_server_count, "stream_interval": args.stream_interval,
                        "phases": [asdict(p) for p in phases]}
        if len(phases) >= 2:
            a, b = phases[0], phases[-1]
            per_token = (b.cpu_ms_per_request - a.cpu_ms_per_request) / (b.max_tokens - a.max_tokens)
            fixed = a.cpu_ms_per_request - per_token * a.max_tokens
            result["fixed_ms"] = round(fixed, 2)
            result["per_token_ms"] = round(per_token, 3)
            print(f"fit: {fixed:.2f} ms fixed + {per_token:.3f} ms per streamed token", flush=True)
        if args.profile is not None:
            report = profile(stack, client, model, url, args.profile_max_tokens, args, args.profile)
            result["profile"] = report
            print(f"profile: {report['samples']} samples over {len(stack.gateway_pids())} gateway process(es)")
            for title in ("own", "cumulative"):
                print(f"  top by {title} samples:")
                for f, pct in report[title]:
                    print(f"    {pct:5.1f}%  {f}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
