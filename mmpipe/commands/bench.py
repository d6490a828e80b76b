"""`mmpipe bench serve`: benchmark any OpenAI-compatible endpoint with random multimodal chat requests.

Each request: --images-per-request random JPEGs of --image-size px (a --reuse-fraction of them drawn from a pool of
--pool-size images, sent once during warm-up: cache hits on a server with an embedding cache), the --prompt text,
and --output-len output tokens (ignore_eos, greedy), streamed through the official openai client. Requests arrive
at --request-rate per second (Poisson; inf: all at once) with at most --max-concurrency in flight, until
--num-prompts are sent or --time-limit-s has passed. Prints req/s, output tok/s, TTFT / TPOT / ITL / E2E mean,
p50, p90 and p99 and the failures; --result-file writes the same as JSON.

    mmpipe serve MODEL --port 8000 &
    mmpipe bench serve --base-url http://127.0.0.1:8000/v1 --num-prompts 64 --max-concurrency 8 \\
        --image-size 448 --reuse-fraction 0.5 --output-len 64 --result-file bench.json
"""
from __future__ import annotations

import argparse
import math
import sys

from mmpipe.services.common.cli_args import env

BENCHMARKS = ("serve",)


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fraction(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {x}")
    return x


def _rate(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive (inf: all at once), got {x}")
    return x


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark a served endpoint (`mmpipe bench serve`)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", metavar="BENCHMARK", choices=BENCHMARKS, help="serve: an OpenAI-compatible endpoint")
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="the OpenAI API root (a URL without a path gets /v1)")
    g.add_argument("--model", default=None, help="the model name to ask for (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=env("API_KEY"),
                   help="bearer token (env MMPIPE_API_KEY, else OPENAI_API_KEY)")
    d = p.add_argument_group("dataset (random multimodal)")
    d.add_argument("--dataset-name", default="random-mm", choices=("random-mm",), help="vLLM's name of this dataset")
    d.add_argument("--num-prompts", type=_positive_int, default=100, help="requests to send (after the warm-up)")
    d.add_argument("--image-size", type=_positive_int, default=448, help="width and height of each image, px")
    d.add_argument("--images-per-request", type=int, default=1, help="images in each request (0: text only)")
    d.add_argument("--reuse-fraction", type=_fraction, default=0.0,
                   help="fraction of images drawn from the pool (repeats) rather than fresh")
    d.add_argument("--pool-size", type=_positive_int, default=8, help="images in the repeat pool")
    d.add_argument("--output-len", type=_positive_int, default=64, help="output tokens per request (max_tokens)")
    d.add_argument("--prompt", default=None, help="the text of every request (default: a short question about it)")
    d.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly --output-len tokens (vLLM's ignore_eos); a request that streams another "
                        "count is a failure")
    d.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("load")
    t.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once, up to --max-concurrency)")
    t.add_argument("--max-concurrency", type=_positive_int, default=None,
                   help="requests in flight at most (with rate inf: a closed loop of this many clients)")
    t.add_argument("--warmup-requests", type=int, default=1, help="requests sent first and not counted")
    t.add_argument("--time-limit-s", type=float, default=300.0, help="no new request after this many seconds")
    t.add_argument("--request-timeout-s", type=float, default=120.0, help="a request unanswered by then fails")
    p.add_argument("--result-file", default=None, help="write the configuration and the results here as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    import openai

    from mmpipe.bench.serve import ServeBenchConfig, run_serve_bench

    try:
        cfg = ServeBenchConfig.from_args(args)
        return run_serve_bench(cfg)
    except ValueError as e:
        print(f"mmpipe bench serve: error: {e}", file=sys.stderr)
        return 2
    except openai.APIError as e:  # e.g. the endpoint is not there when asking for its models
        print(f"mmpipe bench serve: error: {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
