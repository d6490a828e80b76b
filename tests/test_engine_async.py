"""AsyncLLMEngine: concurrent streams match the sync engine, cancellation frees blocks, bounded queue,
graceful shutdown."""
from __future__ import annotations

import asyncio

import pytest
import torch

from mmpipe.shared.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from mmpipe.shared.errors import LimitExceededError, OverloadedError, ServiceUnavailableError
from mmpipe.shared.types import SamplingParams

from engine_helpers import get_case

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(2)
    return get_case("qwen2_5_vl")


async def collect(aengine, req):
    toks, last = [], None
    async for out in aengine.generate(req):
        toks += out.new_token_ids
        last = out
    return toks, last


def test_concurrent_streams_match_reference(case):
    a, b, c = case.prompts
    aengine = AsyncLLMEngine(LLMEngine(case.model, EngineConfig(max_num_batched_tokens=32)))

    async def main():
        return await asyncio.gather(collect(aengine, a.request("a")), collect(aengine, b.request("b")),
                                    collect(aengine, c.request("c")))

    try:
        results = asyncio.run(main())
    finally:
        aengine.shutdown(timeout=30)
    for (toks, last), p in zip(results, case.prompts):
        assert toks == p.ref and last.finished and last.finish_reason == "length"
    assert not aengine.is_alive()


def test_consumer_leaving_aborts_and_frees_blocks(case):
    a, b, _ = case.prompts
    engine = LLMEngine(case.model, EngineConfig())
    aengine = AsyncLLMEngine(engine)

    async def leave_early():
        got = []
        async for out in aengine.generate(a.request("a", SamplingParams(max_tokens=1000, temperature=0.0,
                                                                       ignore_eos=True))):
            got += out.new_token_ids
            if len(got) >= 3:
                break  # closes the generator -> abort
        return got

    async def cancelled_task():
        task = asyncio.create_task(collect(aengine, b.request("b", SamplingParams(max_tokens=1000,
                                                                                   ignore_eos=True))))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        got = await leave_early()
        await cancelled_task()
        for _ in range(100):  # the engine thread applies the aborts at the next step boundary
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
        assert len(got) >= 3 and got == a.ref[:len(got)]  # outputs waiting behind each other come as one
        info = engine.kv_cache_info()
        assert not engine.has_unfinished_requests() and info["free_blocks"] == info["num_blocks"]
        assert aengine.num_unfinished() == 0
    finally:
        aengine.shutdown(timeout=30)


def test_bounded_queue_and_errors(case):
    a = case.prompts[0]
    aengine = AsyncLLMEngine(LLMEngine(case.model, EngineConfig(max_num_seqs=1, max_model_len=128)),
                             max_waiting=1)

    async def main():
        long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        # r0 is running once its first token is out (no sleeps: CI machines are slow and busy) ...
        r0 = aengine.generate(a.request("r0", long)).__aiter__()
        head = await r0.__anext__()

        async def rest() -> tuple[list[int], object]:
            toks, last = list(head.new_token_ids), head
            async for out in r0:
                toks += out.new_token_ids
                last = out
            return toks, last

        first = asyncio.create_task(rest())
        # ... r1 then waits (max_num_seqs=1) in the one waiting slot, and a third request overflows
        second = asyncio.create_task(collect(aengine, a.request("r1", long)))
        deadline = asyncio.get_running_loop().time() + 10
        while aengine.engine.num_waiting_requests() < 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)
        with pytest.raises(OverloadedError):
            await collect(aengine, a.request("r2"))
        with pytest.raises(LimitExceededError):
            await collect(aengine, a.request("big", prompt_token_ids=a.token_ids * 4))
        return await first, await second

    try:
        (t0, l0), (t1, l1) = asyncio.run(main())
        assert len(t0) == 60 and len(t1) == 60 and l0.finished and l1.finished
    finally:
        aengine.shutdown(timeout=30)


def test_shutdown_finishes_in_flight_work(case):
    a, b, _ = case.prompts
    aengine = AsyncLLMEngine(LLMEngine(case.model, EngineConfig()))

    async def main():
        tasks = [asyncio.create_task(collect(aengine, p.request(rid))) for rid, p in (("a", a), ("b", b))]
        await asyncio.sleep(0.05)
        await aengine.shutdown_async(timeout=60)
        with pytest.raises(ServiceUnavailableError):
            await collect(aengine, a.request("late"))
        return await asyncio.gather(*tasks)

    (ta, la), (tb, lb) = asyncio.run(main())
    assert ta == a.ref and tb == b.ref and la.finished and lb.finished
    assert not aengine.is_alive()
