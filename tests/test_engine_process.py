"""The engine-core process (shared/engine/core_process.py + core_client.py) against the in-process engine:
the same tokens and logprobs for concurrent requests with embeddings and M-RoPE positions, aborts that free
the KV blocks while others go on, a killed core that fails its streams at once, a clean shutdown that leaves
no process; and in the generator service: health NOT_SERVING and UNAVAILABLE streams once its core is killed,
no core left after SIGTERM or after the front is killed."""
from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch
from services_helpers import start_stage_process

from mmpipe.services.generator.engine_setup import load_lm
from mmpipe.shared.engine import AsyncLLMEngine, EngineConfig, EngineCoreClient, EngineCoreSpec, LLMEngine
from mmpipe.shared.errors import LimitExceededError, ServiceUnavailableError
from mmpipe.shared.models.tiny import build_tiny_model
from mmpipe.shared.types import SamplingParams

from engine_helpers import REF_TOKENS, get_case

pytestmark = pytest.mark.timeout(240)

LONG = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def _wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_exists(pid):
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


@pytest.fixture(scope="module")
def model_dirs() -> dict[str, str]:
    """The same tiny models engine_helpers builds (the builds are deterministic), for the core to load."""
    root = Path(tempfile.mkdtemp(prefix="mmpipe-core-tests-"))
    return {f: str(build_tiny_model(f, root / f)) for f in ("qwen2_5_vl", "llava")}


def _client(model_dir: str, **engine_kw) -> EngineCoreClient:
    spec = EngineCoreSpec(load=load_lm, engine_config=EngineConfig(**engine_kw),
                          load_kwargs={"model": model_dir, "dtype": torch.float32, "device": "cpu",
                                       "trust_remote_code": False})
    return EngineCoreClient(spec, startup_timeout_s=120)


async def _collect(aengine, req) -> tuple[list[int], list[float], str | None]:
    toks: list[int] = []
    lps: list[float] = []
    reason = None
    async for out in aengine.generate(req):
        toks += out.new_token_ids
        lps += out.logprobs or []
        reason = out.finish_reason
    return toks, lps, reason


def _batch(case) -> list:
    """Six concurrent requests: each prompt greedy, and seeded sampling with logprobs."""
    reqs = []
    for i, p in enumerate(case.prompts):
        reqs.append(p.request(f"g{i}"))
        reqs.append(p.request(f"s{i}", SamplingParams(max_tokens=REF_TOKENS, temperature=0.9, top_p=0.9, seed=7 + i,
                                                      logprobs=1)))
    return reqs


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_engine_process_matches_in_process_engine(family, model_dirs):
    torch.set_num_threads(2)
    case = get_case(family)
    assert any(p.mm_embeds is not None for p in case.prompts)
    if family == "qwen2_5_vl":
        assert case.prompts[0].mrope_positions is not None
    reqs = _batch(case)

    async def run_all(aengine):
        return await asyncio.gather(*(_collect(aengine, r) for r in reqs))

    local = AsyncLLMEngine(LLMEngine(case.model, EngineConfig(max_num_batched_tokens=64)))
    try:
        want = asyncio.run(run_all(local))
    finally:
        local.shutdown(timeout=30)
    remote = _client(model_dirs[family], max_num_batched_tokens=64)
    try:
        got = asyncio.run(run_all(remote))
    finally:
        remote.shutdown(timeout=30)
    for (gt, glp, greason), (wt, wlp, wreason), req in zip(got, want, reqs):
        assert gt == wt and greason == wreason, req.request_id
        assert glp == pytest.approx(wlp, abs=1e-4), req.request_id
    for i, p in enumerate(case.prompts):  # and both are transformers' own greedy tokens
        assert got[2 * i][0] == p.ref
    assert any(len(lp) > 0 for _, lp, _ in got)


def test_abort_frees_blocks_while_others_continue(model_dirs):
    case = get_case("qwen2_5_vl")
    a, b, _ = case.prompts
    client = _client(model_dirs["qwen2_5_vl"])

    async def main():
        other = asyncio.create_task(_collect(client, b.request("b", SamplingParams(max_tokens=40, temperature=0.0,
                                                                                   ignore_eos=True))))
        got: list[int] = []
        async for out in client.generate(a.request("a", LONG)):
            got += out.new_token_ids
            if len(got) >= 3:
                break  # closes the stream: the core aborts the request at its next step
        cancelled = asyncio.create_task(_collect(client, a.request("c", LONG)))
        await asyncio.sleep(0.3)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        toks, _, reason = await other
        for _ in range(200):
            if client.engine.num_running_requests() == 0 and client.engine.num_waiting_requests() == 0:
                break
            await asyncio.sleep(0.02)
        return got, toks, reason

    try:
        got, toks, reason = asyncio.run(main())
        assert len(got) >= 3 and got == a.ref[:len(got)]  # outputs waiting behind each other come as one
        assert len(toks) == 40 and reason == "length" and toks[:len(b.ref)] == b.ref
        info = client.engine.kv_cache_info()
        assert client.engine.num_running_requests() == 0 and info["free_blocks"] == info["num_blocks"]
        assert client.num_unfinished() == 0
    finally:
        client.shutdown(timeout=30)


def test_refused_request_keeps_its_error_class(model_dirs):
    case = get_case("qwen2_5_vl")
    a = case.prompts[0]
    client = _client(model_dirs["qwen2_5_vl"], max_model_len=128)

    async def main():
        with pytest.raises(LimitExceededError):
            await _collect(client, a.request("big", prompt_token_ids=a.token_ids * 4))
        return await _collect(client, a.request("ok"))

    try:
        toks, _, _ = asyncio.run(main())
        assert toks == a.ref
    finally:
        client.shutdown(timeout=30)


def test_killed_core_fails_streams_fast(model_dirs):
    case = get_case("qwen2_5_vl")
    a, b, _ = case.prompts
    client = _client(model_dirs["qwen2_5_vl"])

    async def main():
        streams = [client.generate(a.request("a", LONG)).__aiter__(), client.generate(b.request("b", LONG))
                   .__aiter__()]
        for s in streams:
            await s.__anext__()  # both running
        os.kill(client.pid, signal.SIGKILL)
        t0 = time.monotonic()
        for s in streams:
            with pytest.raises(ServiceUnavailableError, match="died"):
                while True:
                    await s.__anext__()
        waited = time.monotonic() - t0
        with pytest.raises(ServiceUnavailableError):
            await _collect(client, a.request("late"))
        return waited

    try:
        waited = asyncio.run(asyncio.wait_for(main(), 30))
        assert waited < 5
        assert not client.is_alive() and client.num_unfinished() == 0
    finally:
        client.shutdown(timeout=10)


def test_shutdown_finishes_in_flight_then_leaves_no_process(model_dirs):
    case = get_case("llava")
    a = case.prompts[0]
    client = _client(model_dirs["llava"])
    pid = client.pid

    async def main():
        stream = client.generate(a.request("a")).__aiter__()
        first = await stream.__anext__()
        stopping = asyncio.get_running_loop().run_in_executor(None, client.shutdown, 30)
        toks = list(first.new_token_ids)
        async for out in stream:
            toks += out.new_token_ids
        await stopping
        return toks

    toks = asyncio.run(main())
    assert toks == a.ref  # the request in flight ran to its end
    assert not client.is_alive() and client._proc.exitcode == 0
    assert _wait_gone(pid)


# --- the generator service ------------------------------------------------------------------------------------------
def _health(addr: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _generator_core_pid(sp) -> int:
    """The generator's spawned engine core (its other child is multiprocessing's resource tracker)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cores = [k for k in _children(sp.proc.pid)
                 if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        if cores:
            assert len(cores) == 1, cores
            return cores[0]
        time.sleep(0.1)
    raise AssertionError("the generator has no engine-core process")


def test_generator_service_supervises_its_core(qwen2_vl_dir, redis_url):  # noqa: F811
    from grpc_health.v1 import health_pb2

    from mmpipe.services.common.stage_clients import StageClients
    from mmpipe.shared.models.light import load_preprocess_adapter

    ids = load_preprocess_adapter(qwen2_vl_dir).tokenizer("Tell me a very long story.").input_ids
    sp = start_stage_process("generator", qwen2_vl_dir, redis_url, timeout_s=120)
    try:
        core = _generator_core_pid(sp)

        async def go():
            c = StageClients.connect(generator=sp.addr)
            try:
                stream = c.generator.generate("long", ids, [], LONG).__aiter__()
                await stream.__anext__()
                os.kill(core, signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(ServiceUnavailableError, match="died"):
                    async for _ in stream:
                        pass
                waited = time.monotonic() - t0
                with pytest.raises(ServiceUnavailableError):
                    async for _ in c.generator.generate("after", ids, [], SamplingParams(max_tokens=2)):
                        pass
                return waited
            finally:
                await c.close()

        assert asyncio.run(asyncio.wait_for(go(), 60)) < 5
        deadline = time.monotonic() + 10
        while _health(sp.addr) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _health(sp.addr) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        sp.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_generator_service_leaves_no_core_behind(how, qwen2_vl_dir, redis_url):  # noqa: F811
    sp = start_stage_process("generator", qwen2_vl_dir, redis_url, timeout_s=120)
    core = _generator_core_pid(sp)
    sp.stop(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    if how == "sigterm":
        assert sp.proc.returncode == 0
    assert _wait_gone(core), f"engine core {core} outlived its generator ({how})"
