"""Served-stack benchmark: the whole `mmpipe serve` stack on one machine, driven through the official `openai`
client, beside the offline `mmpipe.LLM`, transformers' `generate` and the vision tower alone, in one run.

    python bench/serve_bench.py --out bench/results/serve_bench                     # GPU: builds the 3B model
    python bench/serve_bench.py --out /tmp/sb --model DIR --device cpu --levels 2 --requests 4   # CPU smoke

Sections (each can be turned off; results are written after each one, so a time-out loses nothing):
  served   `mmpipe serve MODEL` (embedded redis-server; encoder, generator, ingest and gateway as processes,
           every GPU stage on the one GPU) on 127.0.0.1 free ports. After warm-up requests (not counted), for
           each workload and each concurrency in --levels: a closed loop of `concurrency` clients, each sending
           its next streaming chat request (AsyncOpenAI, `stream=True`, `ignore_eos` and `return_token_ids`
           through extra_body, greedy, --output-tokens tokens) when its last one ends, until the level's
           requests (--requests, default max(64, 4 x concurrency)) are sent or --level-time-s has passed.
           Workloads: "unique" (every request a fresh random --image-size JPEG as a data URL) and "repeat80"
           (80% of requests draw from a pool of --pool-size images, sent once during warm-up, 20% fresh).
           Per level: req/s, output tokens/s, TTFT and TPOT p50/p99, errors; from each stage's /metrics
           (scraped before and after the level) the count/sum/mean and bucket-estimated p50/p99 of every
           histogram that moved (every `*_seconds` histogram, batch sizes, ...) and the counters that moved;
           CPU seconds per request of every process (from /proc; the metric process_cpu_seconds_total where a
           stage exports it); RSS; GPU memory per process (nvidia-smi --query-compute-apps, mapped by pid).
  offline  `mmpipe.LLM` on the same requests as the largest unique level (data URLs through `LLM.chat`), then
           the same requests again (every image now a cache hit).
  hf       transformers `model.generate(**processor(...))` on one left-padded batch of up to --hf-batch of those
           requests (greedy, min_new_tokens = max_new_tokens = --output-tokens).
  tower    the vision tower alone through the project's `adapter.encode` on preprocessed items at batch sizes
           --tower-batches: img/s and, for Qwen2.5-VL, % of --peak-tflops (analytic FLOPs of the ViT).

Bounded: every loop has a count and a time limit, every request a timeout, --budget-s skips what would not fit,
and the only target is 127.0.0.1. Outputs in --out: serve_bench.json, serve_bench.md, serve_bench.png (when
matplotlib is installed) and serve.log (the stack's output).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mmpipe.bench.client import ClientConfig, pct, rnd, run_requests, summarize  # noqa: E402
from mmpipe.bench.dataset import DEFAULT_PROMPT as QUESTION  # noqa: E402
from mmpipe.bench.dataset import RandomMultimodalDataset, chat_messages  # noqa: E402

T0 = time.monotonic()
WORKLOADS = ("unique", "repeat80")
REUSE = {"unique": 0.0, "repeat80": 0.8}  # workload -> fraction of requests whose image comes from the pool
DEFAULT_3B_DIR = "/tmp/mmpipe-bench/qwen2_5_vl_3b_random"


def log(msg: str) -> None:
    print(f"[serve_bench {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# the client side: the packaged `mmpipe bench serve` client (mmpipe/bench/), a closed loop per level
# ------------------------------------------------------------------------------------------------------------
def client_config(args, base_url: str, model: str) -> ClientConfig:
    return ClientConfig(base_url=base_url, model=model, api_key=args.api_key, output_tokens=args.output_tokens,
                        request_timeout_s=args.request_timeout_s)


def closed_loop(cfg: ClientConfig, jpegs: list[bytes], concurrency: int,
                time_limit_s: float) -> tuple[list[dict], int, float]:
    """Returns (records, requests not sent because the time limit passed, wall seconds)."""
    return asyncio.run(run_requests(cfg, [(j,) for j in jpegs], max_concurrency=concurrency,
                                    time_limit_s=time_limit_s))


def _closed_loop_proc(job: tuple) -> tuple[list[dict], int, float]:
    return closed_loop(*job)


def run_level(cfg: ClientConfig, jpegs: list[bytes], concurrency: int, time_limit_s: float,
              args) -> tuple[list[dict], int, float]:
    """One closed-loop level, its clients spread over --client-procs processes (one asyncio loop of the
    openai client saturates a core near 40 streams/s of 64 tokens; the client must not be what is measured).
    Timestamps are CLOCK_MONOTONIC (perf_counter) in every process, so records from all of them compare."""
    procs = max(1, min(args.client_procs, concurrency, len(jpegs)))
    if procs == 1:
        return closed_loop(cfg, jpegs, concurrency, time_limit_s)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    jobs = [(cfg, jpegs[i::procs], len(range(i, concurrency, procs)), time_limit_s) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as ex:
        parts = list(ex.map(_closed_loop_proc, jobs))
    recs = [r for part in parts for r in part[0]]
    wall = (max(r["end"] for r in recs) - t0) if recs else 0.0
    return recs, sum(p[1] for p in parts), wall


# ------------------------------------------------------------------------------------------------------------
# the stack's processes: pids, CPU, RSS, metrics, GPU memory
# ------------------------------------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) of every process we can read."""
    out: dict[int, tuple[int, list[str]]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            argv = (d / "cmdline").read_bytes().split(b"\0")
            out[int(d.name)] = (ppid, [a.decode(errors="replace") for a in argv if a])
        except (OSError, ValueError):
            continue
    return out


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def stack_processes(serve_pid: int) -> dict[str, dict]:
    """The children of `mmpipe serve` by role, each with every descendant pid and its metrics URL."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)

    def descendants(pid: int) -> list[int]:
        out, stack = [], [pid]
        while stack and len(out) < 10_000:
            p = stack.pop()
            out.append(p)
            stack.extend(kids.get(p, []))
        return out

    procs: dict[str, dict] = {"serve": {"pid": serve_pid, "pids": [serve_pid], "metrics": None}}
    for pid in kids.get(serve_pid, []):
        argv = table[pid][1]
        if argv and "redis-server" in Path(argv[0]).name:
            name, metrics = "redis", None
        elif "mmpipe.cli" in argv and argv.index("mmpipe.cli") + 1 < len(argv):
            name = argv[argv.index("mmpipe.cli") + 1]
            if name == "gateway":
                metrics = f"http://127.0.0.1:{_arg(argv, '--port')}/metrics"
            else:
                port = _arg(argv, "--metrics-port")
                metrics = f"http://127.0.0.1:{port}/metrics" if port and port != "0" else None
        else:
            name, metrics = f"child-{pid}", None
        procs[name] = {"pid": pid, "pids": descendants(pid), "metrics": metrics}
    return procs


def cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        return (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def scrape(url: str) -> dict | None:
    """{family: {"type", "samples": {(sample name, labels): value}}} of a /metrics page, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value for x in fam.samples}
        out[fam.name] = {"type": fam.type, "samples": s}
    return out


def snapshot(serve_pid: int) -> dict:
    procs = stack_processes(serve_pid)
    snap: dict[str, Any] = {"t": time.perf_counter(), "procs": {}, "client_cpu_s": _self_cpu()}
    for name, p in procs.items():
        cpu = [cpu_seconds(x) for x in p["pids"]]
        rss = [rss_mb(x) for x in p["pids"]]
        snap["procs"][name] = {"pid": p["pid"], "pids": p["pids"], "cpu_s": sum(c for c in cpu if c is not None),
                               "rss_mb": sum(r for r in rss if r is not None),
                               "metrics": scrape(p["metrics"]) if p["metrics"] else None}
    return snap


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _label_str(labels: tuple) -> str:
    parts = [f"{k}={v}" for k, v in labels if k not in ("model", "le")]
    return "{" + ",".join(parts) + "}" if parts else ""


def _hist_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus histogram_quantile over (upper bound, cumulative count delta) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in buckets:
        if c >= rank:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_b, prev_c = b, c
    return prev_b


def metric_deltas(before: dict | None, after: dict | None) -> dict:
    """Histograms (count, sum, mean, p50, p99 of what moved) and counters (delta) between two scrapes."""
    if not after:
        return {}
    before = before or {}
    hists: dict[str, dict] = {}
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for fam, m in after.items():
        b = before.get(fam, {"samples": {}})["samples"]
        if m["type"] == "histogram":
            series: dict[tuple, dict] = {}
            for (sname, labels), v in m["samples"].items():
                d = v - b.get((sname, labels), 0.0)
                key = tuple(x for x in labels if x[0] != "le")
                s = series.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": []})
                if sname.endswith("_count"):
                    s["count"] = d
                elif sname.endswith("_sum"):
                    s["sum"] = d
                elif sname.endswith("_bucket"):
                    le = dict(labels).get("le")
                    s["buckets"].append((float(le), d))
            for key, s in series.items():
                if s["count"] <= 0:
                    continue
                hists[fam + _label_str(key)] = {
                    "count": int(round(s["count"])), "sum": round(s["sum"], 6),
                    "mean": round(s["sum"] / s["count"], 6),
                    "p50": rnd(_hist_quantile(s["buckets"], 0.5), 6), "p99": rnd(_hist_quantile(s["buckets"], 0.99), 6),
                    "seconds": fam.endswith("_seconds")}
        elif m["type"] == "counter":
            for (sname, labels), v in m["samples"].items():
                if sname.endswith("_created"):
                    continue
                d = v - b.get((sname, labels), 0.0)
                if d:
                    counters[sname + _label_str(labels)] = round(d, 6)
        elif m["type"] == "gauge":
            for (sname, labels), v in m["samples"].items():
                if not sname.endswith("_created"):
                    gauges[sname + _label_str(labels)] = v
    return {"histograms": hists, "counters": counters, "gauges": gauges}


def gpu_memory(procs: dict[str, dict]) -> dict:
    """MiB of GPU memory per stage (nvidia-smi compute apps mapped by pid) and the device's used/total."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"source": "torch.cuda.mem_get_info (no nvidia-smi: device-wide, no per-process view)",
                "per_process_mib": {}, "device_used_mib": (total - free) / 2**20, "device_total_mib": total / 2**20}
    out: dict[str, Any] = {"source": "nvidia-smi", "per_process_mib": {}, "unmapped_mib": {}}
    try:
        apps = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=15).stdout
        dev = subprocess.run([exe, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"source": f"nvidia-smi failed: {e}"}
    owner = {pid: name for name, p in procs.items() for pid in p["pids"]}
    owner[os.getpid()] = "client"  # this process, once it has a CUDA context
    for line in apps.strip().splitlines():
        try:
            pid_s, mem_s = [x.strip() for x in line.split(",")[:2]]
            pid, mem = int(pid_s), float(mem_s)
        except ValueError:
            continue
        if pid in owner:
            out["per_process_mib"][owner[pid]] = out["per_process_mib"].get(owner[pid], 0.0) + mem
        else:
            out["unmapped_mib"][str(pid)] = mem
    try:
        used, total = [float(x) for x in dev.strip().splitlines()[0].split(",")[:2]]
        out["device_used_mib"], out["device_total_mib"] = used, total
    except (ValueError, IndexError):
        pass
    if not out["per_process_mib"] and not out["unmapped_mib"]:
        out["source"] = "nvidia-smi (no compute apps listed: pid namespace?) + device total"
    return out


def memory_gauges(snap: dict) -> dict:
    """Memory gauges that the stages export themselves (`*bytes*` / `*memory*`: weights, KV cache, GPU memory
    where a stage reports it), the fallback when nvidia-smi maps no process."""
    out = {}
    for name, p in snap["procs"].items():
        for fam, m in (p["metrics"] or {}).items():
            if m["type"] == "gauge" and re.search(r"bytes|memory", fam) and not fam.startswith("process_"):
                for (sname, labels), v in m["samples"].items():
                    if not sname.endswith("_created"):
                        out[f"{name}: {sname}{_label_str(labels)}"] = v
    return out


def level_report(before: dict, after: dict, n_ok: int) -> dict:
    per_proc: dict[str, dict] = {}
    for name, a in after["procs"].items():
        b = before["procs"].get(name)
        restarted = b is None or b["pid"] != a["pid"]
        d_cpu = None if restarted else a["cpu_s"] - b["cpu_s"]
        metric_cpu = None
        if a["metrics"] and "process_cpu_seconds" in a["metrics"] and b and b["metrics"]:
            ka = a["metrics"]["process_cpu_seconds"]["samples"]
            kb = b["metrics"].get("process_cpu_seconds", {"samples": {}})["samples"]
            metric_cpu = sum(ka.values()) - sum(kb.values())
        per_proc[name] = {
            "pid": a["pid"], "restarted": restarted, "cpu_s": rnd(d_cpu, 3),
            "cpu_ms_per_req": rnd(d_cpu * 1e3 / n_ok, 2) if d_cpu is not None and n_ok else None,
            "metric_process_cpu_s": rnd(metric_cpu, 3), "rss_mb": rnd(a["rss_mb"], 1),
            "metrics": metric_deltas(b["metrics"] if b else None, a["metrics"])}
    d_client = after["client_cpu_s"] - before["client_cpu_s"]
    per_proc["client"] = {"cpu_s": rnd(d_client, 3), "cpu_ms_per_req": rnd(d_client * 1e3 / n_ok, 2) if n_ok else None}
    return per_proc


# ------------------------------------------------------------------------------------------------------------
# the stack
# ------------------------------------------------------------------------------------------------------------
class ServedStack:
    def __init__(self, model: str, args, out: Path):
        from mmpipe.shared.cache.embedded_redis import free_port

        self.port, self.grpc_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = out / "serve.log"
        cmd = [sys.executable, "-m", "mmpipe.cli", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--device", args.device, "--dtype", args.dtype,
               "--log-level", args.stack_log_level, "--shutdown-grace-s", "5",
               "--startup-timeout-s", str(args.startup_timeout_s), *args.serve_arg]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if args.device.startswith("cuda"):
            env.setdefault("MMPIPE_GPU_MEMORY_UTILIZATION", str(args.gpu_memory_utilization))
        else:
            env.setdefault("OMP_NUM_THREADS", str(args.cpu_threads))
        for kv in args.stage_env:
            k, _, v = kv.partition("=")
            env[k] = v
        self.cmd = cmd
        log(f"starting: {' '.join(cmd)}")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        self.t_start = time.monotonic()

    def wait_healthy(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmpipe serve exited with status {self.proc.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                if urllib.request.urlopen(f"{self.base}/health", timeout=2).status == 200:
                    return time.monotonic() - self.t_start
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the stack was not healthy after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def model_name(self, api_key: str | None) -> str:
        req = urllib.request.Request(f"{self.base}/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())["data"][0]["id"]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, wait_s: float = 45.0) -> None:
        """Ctrl-C to `mmpipe serve` (it stops the stages, then Redis); whatever is left after `wait_s` is killed,
        by pid, only processes of this stack whose command line is still the one recorded."""
        tree: dict[int, list[str]] = {}
        if self.proc.poll() is None:
            table = _proc_table()
            tree = {pid: table[pid][1] for p in stack_processes(self.proc.pid).values() for pid in p["pids"]
                    if pid in table}
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                log(f"mmpipe serve did not stop within {wait_s:.0f} s: killing it")
                self.proc.kill()
                self.proc.wait(10)
        if tree:
            table = _proc_table()
            for pid, argv in tree.items():
                if pid in table and table[pid][1] == argv:
                    log(f"killing leftover stack process {pid} ({' '.join(argv[:4])})")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        self._log.close()


def run_served(args, model: str, out: Path, res: dict, maker: RandomMultimodalDataset, save) -> list[bytes]:
    """The served section; returns the JPEGs of the largest unique level (the offline sections reuse them)."""
    stack = ServedStack(model, args, out)
    largest_unique: list[bytes] = []
    try:
        startup = stack.wait_healthy(args.startup_timeout_s)
        name = stack.model_name(args.api_key)
        log(f"stack healthy after {startup:.1f} s (model {name!r})")
        res["served"] = {"startup_s": round(startup, 1), "levels": [], "skipped": [],
                         "cmd": " ".join(stack.cmd)}
        procs = stack_processes(stack.proc.pid)
        res["served"]["processes"] = {k: {"pid": v["pid"], "metrics": v["metrics"]} for k, v in procs.items()}
        gpu0 = gpu_memory(procs) if args.device.startswith("cuda") else None
        res["served"]["gpu_memory_at_start"] = gpu0
        save()
        base = f"{stack.base}/v1"
        # warm-up (not counted): fresh images at the largest concurrency up to 16, then each pool image once
        warm_c = max(1, min(16, max(args.levels)))
        n_warm = args.warmup_requests if args.warmup_requests is not None else warm_c
        t = time.monotonic()
        pool = maker.pool if "repeat80" in args.workloads else []
        cfg = client_config(args, base, name)
        recs, _, _ = closed_loop(cfg, [maker.fresh() for _ in range(n_warm)] + pool, warm_c, args.level_time_s * 2)
        bad = [r["error"] for r in recs if r["error"]]
        log(f"warm-up: {len(recs)} requests in {time.monotonic() - t:.1f} s, {len(bad)} errors"
            + (f" (first: {bad[0]})" if bad else ""))
        res["served"]["warmup"] = {"requests": len(recs), "errors": len(bad), "error_messages": bad[:3]}
        for workload in args.workloads:
            for c in args.levels:
                left = args.budget_s - (time.monotonic() - T0)
                if left < args.level_time_s + args.reserve_s:
                    log(f"skip {workload} c={c}: {left:.0f} s of the budget left")
                    res["served"]["skipped"].append(f"{workload} c={c}")
                    continue
                n = args.requests or max(64, 4 * c)
                jpegs = maker.sample(n, REUSE[workload])
                if workload == "unique" and c == max(args.levels):
                    largest_unique = jpegs
                before = snapshot(stack.proc.pid)
                recs, not_sent, wall = run_level(cfg, jpegs, c, args.level_time_s, args)
                after = snapshot(stack.proc.pid)
                s = summarize(recs, not_sent, wall)
                lvl = {"workload": workload, "concurrency": c, "requests": n, **s,
                       "processes": level_report(before, after, s["ok"])}
                if args.device.startswith("cuda"):
                    lvl["gpu_memory"] = gpu_memory(stack_processes(stack.proc.pid))
                lvl["memory_gauges"] = memory_gauges(after)
                res["served"]["levels"].append(lvl)
                log(f"{workload:8s} c={c:3d}: {s['ok']}/{s['sent']} ok ({s['not_sent']} not sent), "
                    f"{s['req_per_s']} req/s, {s['out_tokens_per_s']} tok/s, TTFT p50 {s['ttft_ms']['p50']} ms "
                    f"p99 {s['ttft_ms']['p99']} ms, TPOT p50 {s['tpot_ms']['p50']} ms p99 {s['tpot_ms']['p99']} ms"
                    + (f"; errors: {s['error_messages']}" if s["errors"] else ""))
                save()
        if not largest_unique:
            largest_unique = maker.sample(args.requests or max(64, 4 * max(args.levels)))
    finally:
        log("stopping the stack")
        stack.stop()
        if "served" in res:
            res["served"]["stack_exit_status"] = stack.proc.returncode
            kv = re.findall(r"KV sizing:[^\n\"]*", stack.log_tail(2_000_000))
            if kv:
                res["served"]["generator_kv_sizing"] = kv[-1]
        save()
    return largest_unique


# ------------------------------------------------------------------------------------------------------------
# offline: mmpipe.LLM, transformers generate, the tower alone
# ------------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_offline(args, model: str, jpegs: list[bytes], maker: RandomMultimodalDataset) -> tuple[dict, Any]:
    from mmpipe import LLM, SamplingParams

    t = time.monotonic()
    llm = LLM(model, device=args.device, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    load_s = time.monotonic() - t
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    convs = [chat_messages((j,)) for j in jpegs]
    llm.chat([chat_messages((maker.fresh(),)) for _ in range(2)], sp, use_tqdm=False)  # warm-up
    out: dict[str, Any] = {"requests": len(convs), "load_s": round(load_s, 1)}
    for tag in ("unique", "cached"):
        s0 = dict(llm.stats)
        _sync(args.device)
        t = time.perf_counter()
        outs = llm.chat(convs, sp, use_tqdm=False)
        _sync(args.device)
        dt = time.perf_counter() - t
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        s1 = llm.stats
        out[tag] = {"wall_s": round(dt, 3), "req_per_s": round(len(convs) / dt, 2),
                    "out_tokens_per_s": round(ntok / dt, 1), "out_tokens": ntok,
                    "stats_delta": {k: s1[k] - s0.get(k, 0) for k in s1 if s1[k] - s0.get(k, 0)}}
        log(f"offline LLM {tag}: {len(convs)} requests in {dt:.2f} s = {len(convs) / dt:.2f} req/s, "
            f"{ntok / dt:.0f} tok/s ({out[tag]['stats_delta']})")
    return out, llm


def run_hf(args, model_obj, processor, jpegs: list[bytes]) -> dict:
    import torch
    from PIL import Image

    n = min(args.hf_batch, len(jpegs))
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs[:n]]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    processor.tokenizer.padding_side = "left"
    dev = next(model_obj.parameters()).device
    # warm-up (not timed): two requests, a few tokens
    w = processor(text=[text] * 2, images=images[:2], padding=True, return_tensors="pt").to(dev)
    with torch.inference_mode():
        model_obj.generate(**w, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    _sync(args.device)
    t = time.perf_counter()
    inputs = processor(text=[text] * n, images=images, padding=True, return_tensors="pt").to(dev)
    t_proc = time.perf_counter() - t
    _sync(args.device)
    t = time.perf_counter()
    with torch.inference_mode():
        gen = model_obj.generate(**inputs, max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens,
                                 do_sample=False)
    _sync(args.device)
    dt = time.perf_counter() - t
    new = int(gen.shape[1] - inputs["input_ids"].shape[1])
    out = {"batch": n, "new_tokens_per_request": new, "prompt_len_padded": int(inputs["input_ids"].shape[1]),
           "processor_s": round(t_proc, 3), "generate_s": round(dt, 3), "req_per_s": round(n / dt, 2),
           "out_tokens_per_s": round(n * new / dt, 1),
           "req_per_s_with_processor": round(n / (dt + t_proc), 2)}
    log(f"transformers generate: batch {n} x {new} tokens in {dt:.2f} s (+ processor {t_proc:.2f} s) = "
        f"{n / dt:.2f} req/s, {n * new / dt:.0f} tok/s")
    return out


def vit_flops(vcfg: Any, grid_thw: list[int]) -> float | None:
    """Analytic FLOPs (2 per multiply-add) of one image through a Qwen2.5-VL ViT; None for other towers."""
    if not hasattr(vcfg, "fullatt_block_indexes"):
        return None
    t, h, w = grid_thw
    n = t * h * w
    d, i, depth = vcfg.hidden_size, vcfg.intermediate_size, vcfg.depth
    merge = vcfg.spatial_merge_size
    win = (vcfg.window_size // (vcfg.patch_size * merge)) ** 2 * merge * merge  # patches per window
    full = set(vcfg.fullatt_block_indexes)
    f = 2.0 * n * (vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2) * d  # patch embed
    for b in range(depth):
        f += 2.0 * n * (4 * d * d + 3 * d * i)  # qkv + proj, gate + up + down
        f += 4.0 * n * (n if b in full else min(win, n)) * d  # QK^T and AV
    m = d * merge * merge
    f += 2.0 * (n / merge ** 2) * (m * m + m * vcfg.out_hidden_size)
    return f


def run_tower(args, adapter, maker: RandomMultimodalDataset) -> dict:
    from PIL import Image

    from mmpipe.shared.types import MediaItem

    biggest = max(args.tower_batches)
    items = []
    for i in range(biggest):
        img = Image.open(io.BytesIO(maker.fresh())).convert("RGB")
        items.append(adapter.preprocess(MediaItem(modality="image", data=img, content_hash=f"tower-{i}")))
    vcfg = getattr(adapter.model.config, "vision_config", None)
    flops = vit_flops(vcfg, items[0].meta["grid_thw"]) if vcfg is not None and "grid_thw" in items[0].meta else None
    out: dict[str, Any] = {"tokens_per_image": items[0].meta.get("num_tokens"), "gflop_per_image":
                           rnd(flops / 1e9, 1) if flops else None, "peak_tflops": args.peak_tflops, "batches": []}
    for b in args.tower_batches:
        batch = items[:b]
        for _ in range(2 if args.device.startswith("cuda") else 1):  # warm-up (a compiled tower compiles here)
            adapter.encode("image", batch)
        _sync(args.device)
        times: list[float] = []
        t_end = time.perf_counter() + args.tower_time_s
        while not times or (time.perf_counter() < t_end and len(times) < 50):
            t = time.perf_counter()
            adapter.encode("image", batch)
            _sync(args.device)
            times.append(time.perf_counter() - t)
        med = pct(times, 50)
        row = {"batch": b, "ms_per_batch": round(med * 1e3, 2), "img_per_s": round(b / med, 1), "reps": len(times)}
        if flops and args.device.startswith("cuda"):
            tf = flops * b / med / 1e12
            row["tflops"] = round(tf, 1)
            row["pct_of_peak"] = round(100 * tf / args.peak_tflops, 1)
        out["batches"].append(row)
        log(f"tower batch {b}: {row['img_per_s']} img/s ({row['ms_per_batch']} ms a batch"
            + (f", {row['tflops']} TFLOP/s = {row['pct_of_peak']}% of {args.peak_tflops:.0f})" if "tflops" in row
               else ")"))
    return out


# ------------------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------------------
def _f(x: Any) -> str:
    return "-" if x is None else str(x)


def to_markdown(res: dict) -> str:
    m = res.get("meta", {})
    L = [f"## serve_bench: {m.get('model_what', m.get('model'))} on {m.get('device_name', m.get('device'))}", "",
         f"Model `{m.get('model')}`; each request: one {m.get('image_size')}x{m.get('image_size')} JPEG data URL "
         f"({m.get('image_tokens')} image tokens) + a short question, {m.get('output_tokens')} output tokens "
         f"(ignore_eos, greedy), streamed through AsyncOpenAI. Closed loop per level.", ""]
    sv = res.get("served")
    if sv:
        warm = sv.get("warmup", {}).get("requests")
        L += [f"Stack start (spawn to healthy): {sv.get('startup_s')} s. Warm-up: {warm} requests (not counted).", "",
              "| workload | conc. | ok / sent | errors | not sent | wall s | req/s | out tok/s | TTFT p50 ms | "
              "TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |", "|---|" + "---:|" * 11]
        for lv in sv["levels"]:
            L.append(f"| {lv['workload']} | {lv['concurrency']} | {lv['ok']} / {lv['sent']} | {lv['errors']} | "
                     f"{lv['not_sent']} | {lv['wall_s']} | {_f(lv['req_per_s'])} | {_f(lv['out_tokens_per_s'])} | "
                     f"{_f(lv['ttft_ms']['p50'])} | {_f(lv['ttft_ms']['p99'])} | {_f(lv['tpot_ms']['p50'])} | "
                     f"{_f(lv['tpot_ms']['p99'])} |")
        if sv.get("error"):
            L += ["", f"Served section failed: {sv['error'][:600]}"]
        if sv.get("skipped"):
            L += ["", f"Skipped (budget): {', '.join(sv['skipped'])}"]
        errs = {k: v for lv in sv["levels"] for k, v in lv["error_messages"].items()}
        if errs:
            L += ["", f"Errors seen: {errs}"]
        order = ["gateway", "ingest", "encoder", "generator", "redis", "serve", "client"]
        names = sorted({n for lv in sv["levels"] for n in lv["processes"]},
                       key=lambda n: (order.index(n) if n in order else len(order), n))
        if sv["levels"]:
            L += ["", "CPU ms per request, by process (all its threads and child processes; from /proc):", "",
                  "| workload | conc. | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
            for lv in sv["levels"]:
                L.append(f"| {lv['workload']} | {lv['concurrency']} | " + " | ".join(
                    _f(lv["processes"].get(n, {}).get("cpu_ms_per_req")) for n in names) + " |")
            gm = [lv.get("gpu_memory") for lv in sv["levels"] if lv.get("gpu_memory")]
            if gm:
                per: dict[str, float] = {}
                for g in gm:
                    for k, v in g.get("per_process_mib", {}).items():
                        per[k] = max(per.get(k, 0.0), v)
                L += ["", f"GPU memory (nvidia-smi, MiB, max over levels): "
                      + (", ".join(f"{k} {v:.0f}" for k, v in sorted(per.items())) or "no process mapped")
                      + f"; device used {max(g.get('device_used_mib', 0) for g in gm):.0f} of "
                      f"{gm[-1].get('device_total_mib', 0):.0f}"
                      + (f"; unmapped pids {gm[-1]['unmapped_mib']}" if gm[-1].get("unmapped_mib") else "")]
            if sv.get("generator_kv_sizing"):
                L += ["", f"Generator: {sv['generator_kv_sizing']}"]
            mg = sv["levels"][-1].get("memory_gauges")
            if mg:
                L += ["", "Memory gauges the stages export (end of the last level): " + ", ".join(
                    f"{k} {v / 2**20:.0f} MiB" if "bytes" in k else f"{k} {v:.3g}" for k, v in mg.items())]
            rss = {n: max((lv["processes"].get(n, {}).get("rss_mb") or 0) for lv in sv["levels"]) for n in names
                   if n != "client"}
            L += ["", "RSS MB (max over levels): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())]
            L += ["", "Stage histograms, per level: mean (ms for `_seconds`) and count of what moved during the level "
                  "(p50/p99 in the JSON):", ""]
            cols = [f"{lv['workload']} c={lv['concurrency']}" for lv in sv["levels"]]
            series: dict[str, dict[int, dict]] = {}
            for i, lv in enumerate(sv["levels"]):
                for n in names:
                    for hname, h in lv["processes"].get(n, {}).get("metrics", {}).get("histograms", {}).items():
                        series.setdefault(f"{n}: {hname}", {})[i] = h
            if series:
                L += ["| histogram | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
                for key in sorted(series):
                    cells = []
                    for i in range(len(sv["levels"])):
                        h = series[key].get(i)
                        if h is None:
                            cells.append("-")
                        else:
                            mean = h["mean"] * 1e3 if h["seconds"] else h["mean"]
                            cells.append(f"{mean:.3g} ({h['count']})")
                    L.append(f"| {key} | " + " | ".join(cells) + " |")
            else:
                L += ["(no histograms moved)"]
    off = res.get("offline")
    hf = res.get("hf")
    if off or hf:
        L += ["", "Offline, in one process, the same requests (largest unique level):", "",
              "| system | requests | wall s | req/s | out tok/s | notes |", "|---|---:|---:|---:|---:|---|"]
        if off and "unique" in off:
            for tag in ("unique", "cached"):
                o = off[tag]
                L.append(f"| mmpipe.LLM ({tag} images) | {off['requests']} | {o['wall_s']} | {o['req_per_s']} | "
                         f"{o['out_tokens_per_s']} | {o['stats_delta']} |")
        if hf and "generate_s" in hf:
            L.append(f"| transformers generate, one padded batch | {hf['batch']} | {hf['generate_s']} | "
                     f"{hf['req_per_s']} | {hf['out_tokens_per_s']} | + processor {hf['processor_s']} s "
                     f"({hf['req_per_s_with_processor']} req/s with it); padded prompt {hf['prompt_len_padded']} |")
        for sec, d in (("offline", off), ("hf", hf)):
            if d and d.get("error"):
                L.append(f"| {sec} | - | - | - | - | failed: {d['error']} |")
    tw = res.get("tower")
    if tw and tw.get("batches"):
        L += ["", f"Vision tower alone (`adapter.encode` on preprocessed items, {tw.get('tokens_per_image')} tokens, "
              f"{_f(tw.get('gflop_per_image'))} GFLOP per image):", "",
              "| batch | img/s | ms per batch | TFLOP/s | % of peak |", "|---:|---:|---:|---:|---:|"]
        for r in tw["batches"]:
            L.append(f"| {r['batch']} | {r['img_per_s']} | {r['ms_per_batch']} | {_f(r.get('tflops'))} | "
                     f"{_f(r.get('pct_of_peak'))} |")
    elif tw and tw.get("error"):
        L += ["", f"Tower: failed: {tw['error']}"]
    if res.get("skipped_sections"):
        L += ["", f"Sections skipped: {res['skipped_sections']}"]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    lv = (res.get("served") or {}).get("levels") or []
    if not lv:
        return "no served levels: no plot"
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    levels = sorted({x["concurrency"] for x in lv})
    for wl, color in zip(WORKLOADS, ("tab:blue", "tab:orange")):
        rows = [x for x in lv if x["workload"] == wl and x["ok"]]
        if not rows:
            continue
        c = [x["concurrency"] for x in rows]
        ax[0, 0].plot(c, [x["req_per_s"] for x in rows], "o-", color=color, label=wl)
        ax[0, 1].plot(c, [x["out_tokens_per_s"] for x in rows], "o-", color=color, label=wl)
        for a, key in ((ax[1, 0], "ttft_ms"), (ax[1, 1], "tpot_ms")):
            a.plot(c, [x[key]["p50"] for x in rows], "o-", color=color, label=f"{wl} p50")
            a.plot(c, [x[key]["p99"] for x in rows], "s:", color=color, alpha=0.6, label=f"{wl} p99")
    off, hf = res.get("offline") or {}, res.get("hf") or {}
    for tag, ls in (("unique", ":"), ("cached", "-.")):
        if tag in off:
            ax[0, 0].axhline(off[tag]["req_per_s"], ls=ls, color="gray", label=f"offline LLM {tag}")
    if "req_per_s" in hf:
        ax[0, 0].axhline(hf["req_per_s"], ls="--", color="red", label=f"HF generate b={hf['batch']}")
    for a, t in zip(ax.flat, ("requests/s", "output tokens/s", "TTFT ms", "TPOT ms")):
        a.set_xscale("log", base=2)
        a.set_xticks(levels, [str(x) for x in levels])
        a.set_xlabel("concurrency (closed loop)")
        a.set_title(t)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"mmpipe serve: {res.get('meta', {}).get('model_what', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_bench")
    p.add_argument("--model", default=None, help=f"model dir (default: build the 3B-sized random model into "
                                                 f"{DEFAULT_3B_DIR} on CUDA, a --small one on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--levels", default="8,16,32,64", help="concurrency levels")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="unique, repeat80")
    p.add_argument("--requests", type=int, default=0, help="requests per level (0: max(64, 4 x concurrency))")
    p.add_argument("--level-time-s", type=float, default=20.0, help="no new request after this many s of a level")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="fresh-image warm-up requests (default: the largest level, at most 16); the pool's images "
                        "are sent once more")
    p.add_argument("--pool-size", type=int, default=8, help="images of the repeat80 pool")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="the generator's (and the offline LLM's) cap: the encoder shares the GPU")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes a level's concurrency is split over (default 1: one asyncio loop)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="CPU only: OMP_NUM_THREADS of each stage and torch threads of the offline sections")
    p.add_argument("--stack-log-level", default="INFO")
    p.add_argument("--api-key", default=None)
    p.add_argument("--serve-arg", action="append", default=[], help="one more argument for `mmpipe serve`")
    p.add_argument("--stage-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the stages (e.g. MMPIPE_MAX_BATCH_ITEMS=32)")
    p.add_argument("--no-served", action="store_true")
    p.add_argument("--no-offline", action="store_true", help="skip mmpipe.LLM")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    p.add_argument("--no-tower", action="store_true")
    p.add_argument("--offline-requests", type=int, default=0, help="cap (0: all of the largest unique level)")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--tower-batches", default="1,8,64")
    p.add_argument("--tower-time-s", type=float, default=2.0, help="timing per tower batch size")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak (H200/H100: ~790)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget of the whole run: what would not fit is skipped")
    p.add_argument("--reserve-s", type=float, default=120.0,
                   help="budget kept for the offline sections when deciding whether a level still fits")
    a = p.parse_args(argv)
    a.levels = [int(x) for x in str(a.levels).split(",") if x]
    a.workloads = [w for w in str(a.workloads).split(",") if w]
    bad = set(a.workloads) - set(WORKLOADS)
    if bad or not a.levels:
        p.error(f"unknown workloads {sorted(bad)}" if bad else "no levels")
    a.tower_batches = [int(x) for x in str(a.tower_batches).split(",") if x]
    return a


def _on_sigterm(*_: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")  # the finally blocks stop the stack and write the results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.cpu_threads)  # the offline sections get what each stage got
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if (out / "serve.log").exists():
        (out / "serve.log").unlink()
    signal.signal(signal.SIGTERM, _on_sigterm)

    model = args.model
    if model is None:
        from build_3b_model import INFO_FILE, TEXT_3B, TEXT_SMALL, build_model

        path = Path(DEFAULT_3B_DIR if cuda else "/tmp/mmpipe-bench/qwen2_5_vl_small")
        try:
            built = json.loads((path / INFO_FILE).read_text())
        except (OSError, ValueError):
            built = {}
        if built.get("text") == (TEXT_3B if cuda else TEXT_SMALL) and (path / "config.json").exists():
            log(f"using the model built earlier in {path}")
        else:
            build_model(path, small=not cuda)
        model = str(path)
    info_path = Path(model) / "mmpipe_bench_model.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    from build_3b_model import image_tokens

    res: dict[str, Any] = {"meta": {
        "model": model, "model_what": info.get("what", Path(model).name), "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "image_size": args.image_size, "image_tokens": image_tokens(model, args.image_size, args.image_size),
        "output_tokens": args.output_tokens, "levels": args.levels, "workloads": args.workloads,
        "argv": sys.argv[1:], "python": sys.version.split()[0], "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "skipped_sections": []}
    try:
        import transformers

        res["meta"]["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        (out / "serve_bench.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "serve_bench.md").write_text(to_markdown(res))

    maker = RandomMultimodalDataset(args.image_size, args.pool_size)
    status = 0
    try:
        jpegs: list[bytes] = []
        if not args.no_served:
            try:
                jpegs = run_served(args, model, out, res, maker, save)
            except Exception as e:  # noqa: BLE001 - the offline sections still run
                log(f"served section failed: {type(e).__name__}: {e}")
                res.setdefault("served", {"levels": []})["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
                status = 1
                save()
        if not jpegs:
            jpegs = maker.sample(args.requests or max(64, 4 * max(args.levels)))
        if args.offline_requests:
            jpegs = jpegs[:args.offline_requests]
        llm = adapter = None
        hf_model = processor = None

        def fits(section: str, need_s: float) -> bool:
            left = args.budget_s - (time.monotonic() - T0)
            if left < need_s:
                log(f"skip {section}: {left:.0f} s of the budget left, it needs about {need_s:.0f} s")
                res["skipped_sections"].append(section)
                return False
            return True

        if not args.no_offline and fits("offline", 60):
            try:
                res["offline"], llm = run_offline(args, model, jpegs, maker)
                adapter = llm.adapter
            except Exception as e:  # noqa: BLE001 - reported, and the other sections still run
                log(f"offline LLM failed: {type(e).__name__}: {e}")
                res["offline"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                status = 1
            save()
        if adapter is None and not (args.no_hf and args.no_tower):
            from mmpipe.shared.models.registry import load_adapter

            adapter = load_adapter(model, dtype=args.dtype, device=args.device)
        if adapter is not None:
            hf_model, processor = adapter.model, adapter.processor
        if llm is not None:
            del llm  # the engine's KV cache and graphs go; the HF model stays for the sections below
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if not args.no_hf and fits("hf", 30):
            try:
                res["hf"] = run_hf(args, hf_model, processor, jpegs)
            except Exception as e:  # noqa: BLE001
                log(f"transformers generate failed: {type(e).__name__}: {e}")
                res["hf"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                status = 1
            save()
        if not args.no_tower and fits("tower", 15):
            try:
                res["tower"] = run_tower(args, adapter, maker)
            except Exception as e:  # noqa: BLE001
                log(f"tower failed: {type(e).__name__}: {e}")
                res["tower"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                status = 1
            save()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}): writing what there is")
        res["interrupted"] = str(e) or "KeyboardInterrupt"
        status = 130
    except Exception as e:  # noqa: BLE001
        log(f"failed: {type(e).__name__}: {e}")
        res["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        status = 1
    res["meta"]["total_s"] = round(time.monotonic() - T0, 1)
    save()
    msg = plot(res, out / "serve_bench.png")
    if msg:
        log(msg)
    served = res.get("served") or {}
    if any(lv["errors"] for lv in served.get("levels", [])):
        status = status or 1
    print(to_markdown(res), flush=True)
    log(f"wrote {out}/serve_bench.json, .md{'' if msg else ', .png'} and serve.log in {res['meta']['total_s']} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
