"""Native decoders in worker processes (shared/media/decode_pool.py, issue 16): a worker that aborts, segfaults or
hangs costs its own item only (a MediaDecodeError naming it), is replaced, and every other item decodes, concurrently,
to exactly the pixels the in-process decoders give. The faults come from the test-only hook
(MMPIPE_TEST_DECODE_FAULTS=1 in the workers' environment); the workers are real spawned processes. The same with the
real ingest process (--decode-workers) is in tests/test_services_stages.py, on its stack.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mmpipe.shared.errors import LimitExceededError, MediaDecodeError, ServiceUnavailableError
from mmpipe.shared.media.decode_pool import TEST_FAULTS_ENV, DecodePool, DecodePoolConfig
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy


def _png(seed: int, w: int = 48, h: int = 40) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def pool():
    mp = pytest.MonkeyPatch()
    mp.setenv(TEST_FAULTS_ENV, "1")  # read by the spawned workers (replacements too) only
    p = DecodePool(DecodePoolConfig(workers=2, timeout_s=3.0, cpu_seconds=10, memory_mb=4096))
    yield p
    p.close()
    mp.undo()


def test_crash_and_hang_cost_only_their_own_item_under_concurrent_load(pool):
    policy = MediaPolicy.from_env()
    pooled, local = MediaLoader(policy, pool=pool), MediaLoader(policy)
    good = {f"items[{i}]": _png(i) for i in range(12)}
    bad = {"items[12]": b"MMPIPE-FAULT:abort", "items[13]": b"MMPIPE-FAULT:segv ", "items[14]": b"MMPIPE-FAULT:hang "}
    jobs = list(good.items())
    for k, v in bad.items():  # the faults in the middle of the load
        jobs.insert(4 + len(jobs) % 5, (k, v))

    def run(job):
        name, data = job
        try:
            return name, pooled.load("image", data, budget=policy.budget(), name=name)
        except (MediaDecodeError, ServiceUnavailableError) as e:
            return name, e

    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as ex:
        out = dict(ex.map(run, jobs))
    assert time.monotonic() - t0 < 12
    for name, data in good.items():  # every other item: the in-process decoders' exact pixels and hash
        want = local.load("image", data)
        assert not isinstance(out[name], Exception), out[name]
        assert out[name].content_hash == want.content_hash
        assert np.array_equal(np.asarray(out[name].data), np.asarray(want.data))
    assert "items[12]" in out["items[12]"].message and "SIGABRT" in out["items[12]"].message
    assert out["items[12]"].param == "items[12]"
    seg = out["items[13]"]  # the input's fault: always the 400 naming it, never the retryable 503
    assert isinstance(seg, MediaDecodeError) and "SIGSEGV" in seg.message and seg.param == "items[13]", seg
    assert "items[14]" in out["items[14]"].message and "longer than 3 s" in out["items[14]"].message
    assert pool.replaced >= 3
    # the pool is whole again: both workers decode
    with ThreadPoolExecutor(2) as ex:
        again = list(ex.map(lambda d: pooled.load("image", d).content_hash, [_png(1), _png(2)]))
    assert again == [local.load("image", _png(1)).content_hash, local.load("image", _png(2)).content_hash]


def test_a_crash_is_the_inputs_fault_even_when_another_thread_reaps_the_worker(pool):
    """The CI flake's root cause: multiprocessing's _cleanup() (every Process.start(), e.g. a replacement worker
    started by another thread, and every active_children()) reaps finished children with waitpid(WNOHANG); when it
    won the race, the pool's own waitpid got ECHILD, read the exit code as None and answered 503. Here a thread
    runs _cleanup() without pause while workers segfault: every item must still get its 400 naming SIGSEGV."""
    import multiprocessing
    import threading

    stop = threading.Event()

    def reap() -> None:
        while not stop.is_set():
            multiprocessing.active_children()

    th = threading.Thread(target=reap, daemon=True)
    th.start()
    got = []
    try:
        for i in range(8):  # without the fix about a third of these were 503s ("exit code None")
            with pytest.raises(MediaDecodeError, match="SIGSEGV") as e:
                pool.decode("image", b"MMPIPE-FAULT:segv ", {}, f"items[{i}]")
            got.append(e.value.param)
    finally:
        stop.set()
        th.join(5)
    assert got == [f"items[{i}]" for i in range(8)]


def test_limits_and_decode_errors_come_back_as_the_same_errors(pool):
    policy = MediaPolicy.from_env(max_image_decode_pixels=1000)
    pooled = MediaLoader(policy, pool=pool)
    with pytest.raises(LimitExceededError, match="max-image-decode-pixels"):
        pooled.load("image", _png(3), budget=policy.budget())
    with pytest.raises(MediaDecodeError, match="not a readable image"):
        pooled.load("image", b"not an image at all", budget=policy.budget())
    budget = MediaPolicy.from_env(max_request_pixels=3000).budget()
    MediaLoader(policy, pool=pool).load("image", _png(4), budget=budget)  # 1920 pixels, charged by the parent
    assert budget.pixels == 48 * 40


def test_the_hop_to_a_worker_is_cheap(pool):
    """Per image: the pool's hop (pipe + shared memory) over decoding in this process, reported."""
    data = _png(9, 448, 448)
    policy = MediaPolicy.from_env()
    pooled, local = MediaLoader(policy, pool=pool), MediaLoader(policy)
    for ld in (pooled, local):
        ld.load("image", data)  # warm: imports in the workers
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        local.load("image", data)
    t_local = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        pooled.load("image", data)
    t_pool = (time.perf_counter() - t0) / n
    print(f"448x448 PNG: in-process {t_local * 1e3:.2f} ms, through the pool {t_pool * 1e3:.2f} ms, "
          f"hop {(t_pool - t_local) * 1e3:.2f} ms")
    assert t_pool - t_local < 0.05


def test_offline_llm_opts_into_the_pool_and_applies_the_request_budget(qwen2_vl_dir, monkeypatch):
    from mmpipe import LLM, SamplingParams
    from offline_helpers import ENGINE, hf_generate, make_image, png_bytes

    monkeypatch.setenv("MMPIPE_MEDIA_MAX_REQUEST_PIXELS", "15000")  # one 112x84 image fits, two do not
    llm = LLM(qwen2_vl_dir, device="cpu", engine=ENGINE, decode_workers=1, mm_cache=None)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        img = make_image(seed=61)
        tok = llm.adapter.placeholder_token("image")
        out = llm.generate({"prompt": f"Look {tok}", "multi_modal_data": {"image": png_bytes(img)}}, greedy,
                           use_tqdm=False)[0]
        # decoded in the worker, the tokens transformers gives for the same image
        assert out.outputs[0].token_ids == hf_generate(qwen2_vl_dir, f"Look {tok}", images=[img], max_new_tokens=6)
        with pytest.raises(LimitExceededError, match="max-request-pixels"):
            llm.generate({"prompt": f"Two {tok} {tok}", "multi_modal_data": {"image": [png_bytes(img)] * 2}},
                         greedy, use_tqdm=False)
        again = llm.generate({"prompt": f"Look {tok}", "multi_modal_data": {"image": png_bytes(img)}}, greedy,
                             use_tqdm=False)[0]
        assert again.outputs[0].token_ids == out.outputs[0].token_ids
    finally:
        llm.decode_pool.close()


def test_video_and_audio_decode_in_the_pool_to_the_same_arrays(pool):
    import av
    import soundfile as sf

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"preset": "ultrafast"}
        rng = np.random.default_rng(0)
        for _ in range(12):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    wav = io.BytesIO()
    sf.write(wav, (np.random.default_rng(1).standard_normal((24000, 2)) * 0.1).astype(np.float32), 24000,
             format="WAV", subtype="FLOAT")
    policy = MediaPolicy.from_env()
    pooled, local = MediaLoader(policy, pool=pool), MediaLoader(policy)
    for modality, data in (("video", buf.getvalue()), ("audio", wav.getvalue())):
        budget = policy.budget()
        a = pooled.load(modality, data, target_sampling_rate=16000, budget=budget)
        b = local.load(modality, data, target_sampling_rate=16000)
        assert a.content_hash == b.content_hash and np.array_equal(a.data, b.data) and a.meta == b.meta
        assert (budget.pixels if modality == "video" else budget.audio_seconds) > 0  # charged by the worker


def test_a_worker_killed_from_outside_is_a_retryable_503_and_is_replaced(pool):
    import multiprocessing
    import os
    import signal
    import threading

    from mmpipe.shared.errors import ServiceUnavailableError

    loader = MediaLoader(MediaPolicy.from_env(), pool=pool)
    got: list[BaseException] = []

    def hang():
        try:
            loader.load("image", b"MMPIPE-FAULT:hang ", name="items[0]")
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            got.append(e)

    t = threading.Thread(target=hang)
    t.start()
    time.sleep(0.5)
    for child in multiprocessing.active_children():  # not the input's fault: SIGKILL, as the OOM killer sends
        if child.name == "mmpipe-decode":
            os.kill(child.pid, signal.SIGKILL)
    t.join(10)
    assert len(got) == 1 and isinstance(got[0], ServiceUnavailableError), got
    assert got[0].http_status == 503 and "retry" in got[0].message
    assert loader.load("image", _png(7)).content_hash == MediaLoader(MediaPolicy.from_env()).load(
        "image", _png(7)).content_hash  # the idle worker killed too: replaced before it is used
