"""Per-stage timing and traces through the real stack: one image chat, then /metrics and the spans.

The three stage processes and `mmpipe gateway` on the tiny Qwen2-VL model, each with --otlp-traces-endpoint
pointing at a small OTLP/HTTP collector run here (POST /v1/traces, decoded with opentelemetry-proto's
ExportTraceServiceRequest), and a short batch export delay. One streamed image chat (a data: URL, a cache miss)
must give ONE trace: the gateway's request span and its step spans, and the SERVER spans of ingest, encoder and
generator under the gateway span that made the call, each with its own step spans; and every stage's /metrics
must count the steps of that request in mmpipe_<stage>_step_duration_seconds.
"""
from __future__ import annotations

import base64
import gzip
import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import openai
import pytest
from services_helpers import scrape, served_stack

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STEPS = {
    "gateway": ("parse", "template", "tokenize", "resolve", "first_token"),
    "ingest": ("fetch", "decode", "hash", "load", "lookup", "preprocess", "encode"),
    "encoder": ("queue", "finish", "cache_write"),
    "generator": ("fetch", "build", "queue", "prefill"),
}


# --- a tiny OTLP/HTTP collector ----------------------------------------------------------------------------
class _Collector(BaseHTTPRequestHandler):
    spans: list[dict] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                               ExportTraceServiceResponse)

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportTraceServiceRequest.FromString(body)
        got = []
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({"service": attrs.get("service.name"), "name": s.name, "kind": s.kind,
                                "trace": s.trace_id.hex(), "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                "start": s.start_time_unix_nano, "end": s.end_time_unix_nano})
        with self.lock:
            self.spans.extend(got)
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def _png() -> str:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(11).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def traced(redis_server, tmp_path_factory):
    """The traced stack after one streamed image chat: (stack, gateway, collector spans)."""
    from mmpipe.shared.models.tiny import ensure_tiny_model

    model = str(ensure_tiny_model("qwen2_vl"))
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    trace = ["--otlp-traces-endpoint", url]
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # ms; the children inherit it
    try:
        with served_stack(model, redis_server, [*trace, "--shutdown-grace-s", "5"], encoder_args=trace,
                          generator_args=trace, ingest_args=trace, timeout_s=120) as (stack, gw):
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0)
            stream = client.chat.completions.create(
                model="tiny", stream=True, max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                                       {"type": "text", "text": "Describe it."}]}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None
            yield stack, gw, _Collector.spans
    finally:
        collector.shutdown()
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


def _one(spans: list[dict], service: str, name: str) -> dict:
    found = [s for s in spans if s["service"] == f"mmpipe-{service}" and s["name"] == name]
    assert len(found) == 1, (service, name, [(s["service"], s["name"]) for s in spans])
    return found[0]


def _trace_complete(spans: list[dict]) -> bool:
    names = {(s["service"], s["name"]) for s in spans}
    want = {("mmpipe-gateway", "/v1/chat/completions"), ("mmpipe-ingest", "mmpipe.v1.Ingest/Ingest"),
            ("mmpipe-encoder", "mmpipe.v1.Encoder/Encode"), ("mmpipe-generator", "mmpipe.v1.Generator/Generate")}
    want |= {(f"mmpipe-{svc}", step) for svc, steps in STEPS.items() for step in steps}
    return want <= names


def test_one_image_chat_is_one_trace_across_the_four_stages(traced):
    _, _, collected = traced
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _trace_complete(list(collected)):
        time.sleep(0.1)
    spans = list(collected)
    assert _trace_complete(spans), sorted({(s["service"], s["name"]) for s in spans})
    root = _one(spans, "gateway", "/v1/chat/completions")
    assert root["parent"] == "" and root["kind"] == SERVER
    assert {s["trace"] for s in spans} == {root["trace"]}  # one request, one trace, every process
    by_id = {s["id"]: s for s in spans}
    for s in spans:  # every span but the root hangs under one that arrived
        if s is not root:
            assert s["parent"] in by_id, s
            assert by_id[s["parent"]]["start"] <= s["start"] + 1_000_000, s  # 1 ms of clock slack

    def parent(s):
        return by_id[s["parent"]]

    for step in STEPS["gateway"]:
        assert parent(_one(spans, "gateway", step)) is root
    ingest = _one(spans, "ingest", "mmpipe.v1.Ingest/Ingest")
    generate = _one(spans, "generator", "mmpipe.v1.Generator/Generate")
    encode = _one(spans, "encoder", "mmpipe.v1.Encoder/Encode")
    lookup = _one(spans, "encoder", "mmpipe.v1.Encoder/Lookup")
    assert all(s["kind"] == SERVER for s in (ingest, generate, encode, lookup))
    # the stages' server spans are children of the gateway (or ingest) step that called them
    assert parent(ingest) is _one(spans, "gateway", "resolve")
    assert parent(generate) is _one(spans, "gateway", "first_token")
    assert parent(encode) is _one(spans, "ingest", "encode")
    assert parent(lookup) is _one(spans, "ingest", "lookup")
    # and each stage's own steps are children of its server span
    for step in ("load", "lookup", "preprocess", "encode"):
        assert parent(_one(spans, "ingest", step)) is ingest, step
    for step in ("fetch", "decode", "hash"):  # per item, in the worker threads
        assert parent(_one(spans, "ingest", step)) is _one(spans, "ingest", "load"), step
    for step in ("queue", "finish", "tower", "cache_write"):
        assert parent(_one(spans, "encoder", step)) is encode, step
    for step in STEPS["generator"]:
        assert parent(_one(spans, "generator", step)) is generate, step


def test_every_stage_counts_its_steps_on_metrics(traced):
    stack, gw, _ = traced
    urls = {"gateway": f"{gw.url}/metrics", **{s: stack.metrics_url(s) for s in ("ingest", "encoder", "generator")}}
    for stage, steps in STEPS.items():
        for step in steps:
            n = scrape(urls[stage], f"mmpipe_{stage}_step_duration_seconds_count", model="tiny" if stage == "gateway"
                       else stack.model_dir, step=step)
            assert n >= 1, (stage, step)
    assert scrape(urls["encoder"], "mmpipe_encoder_encode_duration_seconds_count") >= 1  # the tower, per batch
    for stage in ("gateway", "generator"):
        assert scrape(urls[stage], f"mmpipe_{stage}_time_to_first_token_seconds_count") >= 1


def test_without_the_flag_nothing_of_opentelemetry_is_imported():
    """Tracing off: the stage client metadata, the step timer and the interceptor's helpers stay plain."""
    code = """
import asyncio, sys
from prometheus_client import CollectorRegistry, Histogram
from mmpipe.services.common import grpc_server, stage_clients, tracing
from mmpipe.services.common.steps import StepTimer
from mmpipe.services.common.logs import REQUEST_ID
assert not tracing.setup("ingest", None) and not tracing.enabled()
REQUEST_ID.set("r1")
assert stage_clients._metadata(None) == (("x-request-id", "r1"),)
h = Histogram("x_seconds", "x", ["model", "step"], registry=CollectorRegistry())
steps = StepTimer(h, "m")
with steps.time("a"):
    pass
asyncio.run(steps.timed("b", asyncio.sleep(0)))
steps.since("c", 0.0)
tracing.record("d", 0.0, 1.0)
tracing.shutdown()
assert h.labels("m", "a")._sum.get() >= 0 and h.labels("m", "b")._sum.get() >= 0
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_traces_endpoint_flag_values():
    from mmpipe.services.common.tracing import traces_endpoint

    assert traces_endpoint(None) is None and traces_endpoint(" ") is None
    assert traces_endpoint("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_endpoint("c:4318") == "http://c:4318/v1/traces"
    assert traces_endpoint("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"


def test_first_token_clock_reports_each_request_once():
    """Queue / prefill from the engine's stepper: first scheduled, then the step that sampled the first token."""
    from types import SimpleNamespace

    from mmpipe.shared.engine.outputs import StepOutput
    from mmpipe.shared.engine.timing import FirstTokenClock, FirstTokenTimes

    def out(rid, toks):
        return StepOutput(rid, toks, None, False, None, 3)

    clock, times = FirstTokenClock(), FirstTokenTimes()
    engine = SimpleNamespace(scheduler=SimpleNamespace(waiting=[SimpleNamespace(request_id="b")]))
    for rid in ("a", "b", "gone"):
        clock.added(rid)
        times.open(rid)
    times.close("gone")
    # step 1 (1.0-2.0): "a" and "gone" admitted, "a" is still in prefill (no output); "b" waits
    assert clock.stepped(engine, [], 1.0, 2.0) == []
    engine.scheduler.waiting = []
    # step 2 (2.0-3.0): "a" samples its first token, "b" is admitted; "gone" too
    firsts = clock.stepped(engine, [out("a", [5]), out("gone", [1])], 2.0, 3.0)
    assert firsts == [("a", 1.0, 3.0), ("gone", 1.0, 3.0)]
    times.note(firsts)
    assert clock.stepped(engine, [out("a", [6]), out("b", [7])], 3.0, 4.0) == [("b", 2.0, 4.0)]
    assert times.take("a") == (1.0, 3.0) and times.take("a") is None
    assert times.take("gone") is None  # its stream had closed: nothing kept for it
