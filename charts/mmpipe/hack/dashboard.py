"""Generates the Grafana dashboard: `python charts/mmpipe/hack/dashboard.py > charts/mmpipe/dashboards/mmpipe.json`.

Panels over the services' Prometheus metrics (services/*/metrics, services/common/metrics.py) and the NVIDIA
DCGM exporter (GPU memory, utilisation). Variables: datasource, namespace, model. tests/test_deploy_chart.py
fails when the committed JSON is stale.
"""
from __future__ import annotations

import json

SEL = 'namespace=~"$namespace", model=~"$model"'
RI = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
            "refId": ref}


def panel(pid: int, title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, *, w: int = 12,
          h: int = 8, description: str = "", stack: bool = False, max_: float | None = None) -> dict:
    defaults: dict = {"unit": unit, "custom": {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
                                               "stacking": {"mode": "normal" if stack else "none"}}}
    if max_ is not None:
        defaults["max"] = max_
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
    }


def row(pid: int, title: str, y: int) -> dict:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RI}])))", f"p{int(q * 100)}{legend_by}")
            for q in (0.5, 0.9, 0.99)]


def p50_p99(metric: str, by: str, legend: str = "") -> list[tuple[str, str]]:
    """p50 and p99 of a histogram per value of label `by` (legend: that value, or `legend` when given)."""
    name = legend or f"{{{{{by}}}}}"
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
             f"p{int(q * 100)} {name}") for q in (0.5, 0.99)]


# The steps of each stage (services/common/steps.py) and what each panel adds beside them.
STAGE_STEPS = (
    ("gateway", "Gateway: parse, template, tokenize, resolve (media), first_token (Generate to its first message)", [],
     "The gateway's part of TTFT: CPU steps (parse, template, tokenize), then waiting for the stages."),
    ("ingest", "Ingest: fetch, decode, hash (per item); load, lookup, preprocess, encode (per request)", [],
     "Per item in the worker threads (fetch, decode, hash), per request around them; encode is the Encode call."),
    ("encoder", "Encoder: queue (per item), finish (per batch), tower (per batch), cache_write",
     p50_p99("mmpipe_encoder_encode_duration_seconds", "modality", "tower {{modality}}"),
     "queue growing with load: too few encoders or a batch window too long; tower: the GPU."),
    ("generator", "Generator: fetch, build, queue, prefill, and its time to first token",
     p50_p99("mmpipe_generator_time_to_first_token_seconds", "model", "first token"),
     "queue: waiting in the engine before the first scheduled step (KV memory, max_num_seqs); prefill: the "
     "step that sampled the first token."),
)


def build() -> dict:
    p: list[dict] = []
    y = 0
    p.append(row(100, "Latency and throughput (gateway)", y)); y += 1
    p.append(panel(1, "Time to first token (TTFT)", quantiles("mmpipe_gateway_time_to_first_token_seconds"), "s", 0, y,
                   description="Request arrival to first generated token, at the gateway (includes ingest, "
                               "encode and prefill)."))
    p.append(panel(2, "Time per output token (TPOT)", quantiles("mmpipe_gateway_time_per_output_token_seconds"),
                   "s", 12, y, description="Mean gap between tokens after the first, per request.")); y += 8
    p.append(panel(3, "Requests per second by status", [
        (f'sum by (status) (rate(mmpipe_gateway_requests_total{{{SEL}}}[{RI}]))', "{{status}}")], "reqps", 0, y,
        stack=True))
    p.append(panel(4, "Tokens per second", [
        (f'sum(rate(mmpipe_gateway_generation_tokens_total{{{SEL}}}[{RI}]))', "generated"),
        (f'sum(rate(mmpipe_gateway_prompt_tokens_total{{{SEL}}}[{RI}]))', "prompt")], "short", 12, y)); y += 8
    p.append(panel(5, "End-to-end latency", quantiles("mmpipe_gateway_request_duration_seconds"), "s", 0, y))
    p.append(panel(6, "Stage errors seen by the gateway", [
        (f'sum by (stage, code) (rate(mmpipe_gateway_stage_errors_total{{namespace=~"$namespace"}}[{RI}]))',
         "{{stage}} {{code}}")], "reqps", 12, y)); y += 8

    p.append(row(105, "Per-stage time (where a request's time goes: p50 and p99 per step)", y)); y += 1
    for i, (stage, title, extra, description) in enumerate(STAGE_STEPS):
        p.append(panel(17 + i, title, p50_p99(f"mmpipe_{stage}_step_duration_seconds", "step") + extra, "s",
                       12 * (i % 2), y, description=description))
        if i % 2:
            y += 8

    p.append(row(101, "Embedding cache", y)); y += 1
    hits = f'sum(rate(mmpipe_gateway_mm_cache_hits_total{{{SEL}}}[{RI}]))'
    misses = f'sum(rate(mmpipe_gateway_mm_cache_misses_total{{{SEL}}}[{RI}]))'
    p.append(panel(7, "Cache hit rate (media items)", [
        (f"{hits} / clamp_min({hits} + {misses}, 1e-9)", "hit rate"),
        (f'sum by (modality) (rate(mmpipe_gateway_mm_cache_hits_total{{{SEL}}}[{RI}])) / clamp_min('
         f'sum by (modality) (rate(mmpipe_gateway_mm_cache_hits_total{{{SEL}}}[{RI}])) + '
         f'sum by (modality) (rate(mmpipe_gateway_mm_cache_misses_total{{{SEL}}}[{RI}])), 1e-9)', "{{modality}}")],
        "percentunit", 0, y, max_=1,
        description="Share of media items whose embedding was already in Redis. Every hit is an encode the "
                    "encoder did not run (docs/deploy.md: sizing)."))
    p.append(panel(8, "Cache traffic (encoder writes, generator reads)", [
        (f'sum(rate(mmpipe_encoder_cache_written_bytes_total{{{SEL}}}[{RI}]))', "encoder written"),
        (f'sum(rate(mmpipe_generator_cache_read_bytes_total{{{SEL}}}[{RI}]))', "generator read"),
        (f'sum by (result) (rate(mmpipe_generator_cache_reads_total{{{SEL}}}[{RI}]))', "generator reads {{result}}")],
        "Bps", 12, y)); y += 8

    p.append(row(102, "Queues and batches", y)); y += 1
    p.append(panel(9, "Queue depth", [
        (f'sum by (pod) (mmpipe_encoder_queue_depth{{{SEL}}})', "encoder queue {{pod}}"),
        (f'sum by (pod) (mmpipe_generator_engine_waiting_requests{{{SEL}}})', "generator waiting {{pod}}"),
        (f'sum(mmpipe_gateway_requests_in_flight{{{SEL}}})', "gateway in flight")], "short", 0, y,
        description="Work waiting for a GPU. A growing generator queue means too few generator replicas or "
                    "too little KV memory; a growing encoder queue, too few encoders (or a falling hit rate)."))
    p.append(panel(10, "Batch sizes", [
        (f'sum(rate(mmpipe_encoder_batch_size_sum{{{SEL}}}[{RI}])) / clamp_min(sum(rate(mmpipe_encoder_batch_size_count{{{SEL}}}[{RI}])), 1e-9)',
         "encoder mean items per batch"),
        (f'histogram_quantile(0.9, sum by (le) (rate(mmpipe_encoder_batch_size_bucket{{{SEL}}}[{RI}])))',
         "encoder p90 items per batch"),
        (f'sum by (pod) (mmpipe_generator_engine_running_requests{{{SEL}}})', "generator running (decode batch) {{pod}}")],
        "short", 12, y)); y += 8
    p.append(panel(11, "Stage RPC latency p99", [
        (f'histogram_quantile(0.99, sum by (le, method) (rate(mmpipe_{svc}_request_duration_seconds_bucket{{{SEL}}}[{RI}])))',
         f"{svc} {{{{method}}}}") for svc in ("ingest", "encoder", "generator")], "s", 0, y))
    p.append(panel(12, "Stage RPCs per second by code", [
        (f'sum by (code) (rate(mmpipe_{svc}_requests_total{{{SEL}}}[{RI}]))', f"{svc} {{{{code}}}}")
        for svc in ("ingest", "encoder", "generator")], "reqps", 12, y)); y += 8

    p.append(row(104, "Generator engine", y)); y += 1
    p.append(panel(15, "KV cache in use", [
        (f'max by (pod) (mmpipe_generator_engine_kv_cache_usage_ratio{{{SEL}}})', "{{pod}}")],
        "percentunit", 0, y, max_=1, description="Near 1 with waiting requests: admission is limited by KV memory "
                                                 "(raise gpu_memory_utilization or add replicas)."))
    p.append(panel(16, "Engine steps per second by kind, preemptions, blocks freed behind the window", [
        (f'sum by (kind) (rate(mmpipe_generator_engine_steps_total{{{SEL}}}[{RI}]))', "steps {{kind}}"),
        (f'sum (rate(mmpipe_generator_engine_preemptions_total{{{SEL}}}[{RI}]))', "preemptions"),
        (f'sum (rate(mmpipe_generator_engine_window_freed_blocks_total{{{SEL}}}[{RI}]))', "window-freed blocks")],
        "short", 12, y, description="eager steps on a GPU mean steps no CUDA graph fits (over 8 prefill chunks or "
                                    "--enforce-eager); preemptions mean the KV cache ran out; window-freed blocks "
                                    "are KV blocks given back mid-sequence behind the sliding window (models "
                                    "whose every layer is windowed).")); y += 8
    p.append(panel(40, "Prefix cache hit rate (prompt tokens served from cached KV blocks)", [
        (f'sum (rate(mmpipe_generator_prefix_cache_hits_tokens_total{{{SEL}}}[{RI}])) / '
         f'clamp_min(sum (rate(mmpipe_generator_prefix_cache_queries_tokens_total{{{SEL}}}[{RI}])), 1)', "hit rate")],
        "percentunit", 0, y, max_=1, description="Share of admitted prompt tokens whose KV was reused (same tokens, "
                                                 "positions and media keys); it shows in usage.cached_tokens."))
    p.append(panel(41, "Cached KV blocks kept for reuse", [
        (f'max by (pod) (mmpipe_generator_prefix_cache_cached_blocks{{{SEL}}})', "{{pod}}")],
        "short", 12, y, description="Full blocks registered in the prefix cache (in use or evictable); evicted "
                                    "least recently freed first when new blocks are needed.")); y += 8
    p.append(panel(42, "Requests routed per generator replica", [
        (f'sum by (replica) (rate(mmpipe_gateway_routed_requests_total{{{SEL}}}[{RI}]))', "{{replica}}"),
        (f'sum by (replica) (mmpipe_gateway_replica_requests_in_flight{{{SEL}}})', "in flight {{replica}}")],
        "short", 0, y, description="Generate calls per second the gateways sent to each --generator-addr replica, "
                                   "and those in flight (--routing-logic; one replica: all of them)."))
    p.append(panel(43, "Routing decisions", [
        (f'sum by (decision) (rate(mmpipe_gateway_routing_decisions_total{{{SEL}}}[{RI}]))', "{{decision}}")],
        "short", 12, y, description="hit: the replica the prompt's first blocks (or session) hash to; fallback: "
                                    "that one was saturated (--routing-saturation-threshold), the least loaded "
                                    "took it; no_prefix: shorter than one block.")); y += 8

    p.append(row(103, "GPUs (NVIDIA DCGM exporter)", y)); y += 1
    gpu_sel = 'namespace=~"$namespace", pod=~".*-(encoder|generator)-.*"'
    p.append(panel(13, "GPU memory used", [
        (f"DCGM_FI_DEV_FB_USED{{{gpu_sel}}} * 1024 * 1024", "{{pod}} gpu{{gpu}}"),
        (f"(DCGM_FI_DEV_FB_USED{{{gpu_sel}}} + DCGM_FI_DEV_FB_FREE{{{gpu_sel}}}) * 1024 * 1024", "{{pod}} gpu{{gpu}} total")],
        "bytes", 0, y, description="DCGM_FI_DEV_FB_USED is in MiB. The generator pre-allocates its KV cache, so "
                                   "its memory is flat by design; watch the encoder's."))
    p.append(panel(14, "GPU utilisation", [
        (f"DCGM_FI_DEV_GPU_UTIL{{{gpu_sel}}}", "{{pod}} gpu{{gpu}}")], "percent", 12, y, max_=100)); y += 8

    return {
        "title": "mmpipe",
        "uid": "mmpipe-overview",
        "description": "mmpipe multimodal serving: latency, throughput, per-stage time, embedding cache, queues, "
                       "batches, GPUs.",
        "tags": ["mmpipe", "llm", "inference"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "namespace", "label": "Namespace", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(mmpipe_gateway_requests_in_flight, namespace)", "refId": "ns"},
             "definition": "label_values(mmpipe_gateway_requests_in_flight, namespace)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
            {"name": "model", "label": "Model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": 'label_values(mmpipe_gateway_requests_in_flight{namespace=~"$namespace"}, model)',
                       "refId": "model"},
             "definition": 'label_values(mmpipe_gateway_requests_in_flight{namespace=~"$namespace"}, model)',
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        ]},
        "panels": p,
    }


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
