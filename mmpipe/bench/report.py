"""The printed result of `mmpipe bench serve`: one table of throughput, failures and latency percentiles."""
from __future__ import annotations

from typing import Any

from .client import PERCENTILES

_ROWS = (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("ITL (ms)", "itl_ms"), ("E2E (ms)", "e2e_ms"))


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def format_table(summary: dict[str, Any], title: str = "Serving benchmark") -> str:
    head = [
        ("successful requests", summary["ok"]),
        ("failed requests", summary["errors"]),
        ("not sent (time limit)", summary["not_sent"]),
        ("duration (s)", summary["wall_s"]),
        ("request throughput (req/s)", summary["req_per_s"]),
        ("output token throughput (tok/s)", summary["out_tokens_per_s"]),
        ("output tokens", summary["output_tokens"]),
    ]
    cols = ["mean", *(f"p{q}" for q in PERCENTILES)]
    width = max(len(k) for k, _ in head)
    lines = [f"{'=' * 16} {title} {'=' * 16}"]
    lines += [f"{k:<{width}}  {_f(v):>10}" for k, v in head]
    lines.append(f"{'':<11}" + "".join(f"{c:>10}" for c in cols))
    for label, key in _ROWS:
        lines.append(f"{label:<11}" + "".join(f"{_f(summary[key][c]):>10}" for c in cols))
    for msg, n in summary["error_messages"].items():
        lines.append(f"error x{n}: {msg}")
    lines.append("=" * len(lines[0]))
    return "\n".join(lines)
