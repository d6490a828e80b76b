"""`mmpipe bench serve`: the dataset, the client and the report put together, against one endpoint.

Warm-up first (fresh images, then each pool image once when images are reused; not counted), then the measured
requests; the summary is printed as a table and, with --result-file, written as JSON with the configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .client import ClientConfig, run_requests, summarize
from .dataset import DEFAULT_PROMPT, RandomMultimodalDataset
from .report import format_table


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None
    api_key: str | None = None
    num_prompts: int = 100
    image_size: int = 448
    images_per_request: int = 1
    reuse_fraction: float = 0.0
    pool_size: int = 8
    output_len: int = 64
    prompt: str | None = None
    ignore_eos: bool = True
    seed: int = 0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    warmup_requests: int = 1
    time_limit_s: float = 300.0
    request_timeout_s: float = 120.0
    result_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("images_per_request", "warmup_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("time_limit_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.reuse_fraction > 0 and self.images_per_request == 0:
            raise ValueError("--reuse-fraction needs --images-per-request of at least 1")
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"--base-url must be an http(s) URL, got {self.base_url!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeBenchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @property
    def api_root(self) -> str:
        """The base URL as the openai client takes it: /v1 added to a URL without a path."""
        url = self.base_url.rstrip("/")
        return url + "/v1" if urlsplit(url).path in ("", "/") else url


def _first_model(cfg: ServeBenchConfig, api_key: str) -> str:
    from openai import OpenAI

    with OpenAI(base_url=cfg.api_root, api_key=api_key, max_retries=0, timeout=30) as client:
        models = client.models.list().data
    if not models:
        raise ValueError(f"{cfg.api_root}/models lists no model; give --model")
    return models[0].id


def run_serve_bench(cfg: ServeBenchConfig, out=sys.stdout) -> int:
    """Run the benchmark; the exit status: 0, or 1 when no request succeeded."""
    api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
    model = cfg.model or _first_model(cfg, api_key)
    client = ClientConfig(base_url=cfg.api_root, model=model, api_key=api_key, output_tokens=cfg.output_len,
                          prompt=cfg.prompt or DEFAULT_PROMPT, ignore_eos=cfg.ignore_eos,
                          request_timeout_s=cfg.request_timeout_s)
    pool = cfg.pool_size if cfg.reuse_fraction > 0 else 0
    data = RandomMultimodalDataset(cfg.image_size, pool, seed=cfg.seed)
    warm = data.requests(cfg.warmup_requests, cfg.images_per_request) + [(img,) for img in data.pool]
    measured = data.requests(cfg.num_prompts, cfg.images_per_request, cfg.reuse_fraction)
    print(f"mmpipe bench serve: {cfg.num_prompts} requests to {cfg.api_root} (model {model!r}), "
          f"{cfg.images_per_request} x {cfg.image_size}px image(s), reuse {cfg.reuse_fraction:g}, "
          f"{cfg.output_len} output tokens, rate {cfg.request_rate:g}/s, max concurrency "
          f"{cfg.max_concurrency or 'unbounded'}", file=out, flush=True)
    started = time.time()
    warm_errors: list[str] = []
    if warm:
        recs, _, _ = asyncio.run(run_requests(client, warm, max_concurrency=cfg.max_concurrency or len(warm),
                                              time_limit_s=cfg.time_limit_s))
        warm_errors = [r["error"] for r in recs if r["error"]]
        print(f"warm-up: {len(recs)} requests, {len(warm_errors)} failed"
              + (f" (first: {warm_errors[0]})" if warm_errors else ""), file=out, flush=True)
    recs, not_sent, wall = asyncio.run(run_requests(client, measured, request_rate=cfg.request_rate,
                                                    max_concurrency=cfg.max_concurrency,
                                                    time_limit_s=cfg.time_limit_s, seed=cfg.seed))
    summary = summarize(recs, not_sent, wall)
    print(format_table(summary), file=out, flush=True)
    if cfg.result_file:
        result = {"config": {**dataclasses.asdict(cfg), "api_key": None, "model": model,
                             "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate},
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "warmup": {"requests": len(warm), "errors": len(warm_errors)}, **summary}
        path = Path(cfg.result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"results written to {path}", file=out, flush=True)
    return 0 if summary["ok"] else 1
