"""Media that is small on disk and huge decoded (issue 16): every decoder checks its size from the header against the
request's decode budget before decoding, compositing works in place, and ingest's memory stays bounded.

The crafted files are built by tests/media_craft.py: a 9000x9000 RGBA PNG of ~330 KB, a 17 KB mp4 of 350 720p frames,
a FLAC whose STREAMINFO claims 590 s of 8 channels at 96 kHz. Here the loader runs in a fresh subprocess that reports
its peak RSS growth; the served checks (the real ingest process) are in tests/test_services_stages.py, on its stack.
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpipe.shared.errors import InvalidInputError, LimitExceededError
from mmpipe.shared.media.audio import decode_audio
from mmpipe.shared.media.image import decode_image, normalize_image
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy

from media_craft import RSS_BOUND, flac, rgba_png_bomb


# --- offline: a fresh process per measure -------------------------------------------------------------------------
_MEASURE = r"""
import json, sys
from pathlib import Path
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy
def hwm():
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) * 1024
modality, path = sys.argv[1], sys.argv[2]
data = Path(path).read_bytes()
policy = MediaPolicy.from_env()
loader = MediaLoader(policy)
import soundfile, av, PIL.PngImagePlugin  # imports charged before the measure
before, err = hwm(), ""
try:
    loader.load(modality, data, target_sampling_rate=16000, budget=policy.budget())
except Exception as e:
    err = f"{type(e).__name__}: {e}"
print(json.dumps({"grown": hwm() - before, "error": err}))
"""


def _measure(tmp_path: Path, modality: str, data: bytes) -> dict:
    p = tmp_path / f"item.{modality}"
    p.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", _MEASURE, modality, str(p)], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flac_claiming_8ch_96khz_is_refused_from_its_header(tmp_path):
    data = flac(0.1, 96_000, 8, claim_frames=590 * 96_000)
    assert len(data) < 600_000
    r = _measure(tmp_path, "audio", data)
    assert r["error"].startswith("LimitExceededError") and "MMPIPE_MEDIA_MAX_AUDIO_SAMPLES" in r["error"], r
    assert r["grown"] < RSS_BOUND, r


def test_multichannel_audio_decodes_in_blocks_to_the_same_mono():
    import soundfile as sf

    data = flac(3.0, 48_000, 6)
    full, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wav, got_sr = decode_audio(data, max_seconds=10.0, max_samples=10 ** 8)
    assert got_sr == sr == 48_000 and wav.dtype == np.float32
    np.testing.assert_array_equal(wav, full.mean(axis=1).astype(np.float32))
    with pytest.raises(LimitExceededError, match="MAX_AUDIO_SAMPLES"):
        decode_audio(data, max_seconds=10.0, max_samples=6 * 48_000)  # 1 s of 6 channels


def test_rgba_compositing_is_exact_and_in_place(tmp_path):
    # every (foreground, alpha) pair against the integer formula round((fg*a + bg*(255-a)) / 255)
    f, a = np.meshgrid(np.arange(256, dtype=np.uint32), np.arange(256, dtype=np.uint32))
    rgba = np.stack([f, (f * 7) % 256, 255 - f, a], -1).astype(np.uint8)
    bg = np.asarray((17, 128, 254), np.uint32)
    from mmpipe.shared.media.image import ImageIOOptions

    got = np.asarray(normalize_image(Image.fromarray(rgba, "RGBA"), ImageIOOptions((17, 128, 254))))
    r = rgba.astype(np.uint32)
    want = (r[..., :3] * r[..., 3:4] + bg * (255 - r[..., 3:4]) + 127) // 255
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    # a 4000x4000 RGBA PNG within every limit: decoding plus compositing peaks at about the RGBA image plus the
    # RGB result (PIL keeps both at 4 bytes a pixel), not at wide-integer copies of the whole image
    r = _measure_png(tmp_path, 4000)
    assert r["error"] == "" and r["grown"] < 3.5 * 4000 * 4000 * 4, r  # the old uint32 path: > 600 MB


def _measure_png(tmp_path: Path, side: int) -> dict:
    p = tmp_path / "big.png"
    p.write_bytes(rgba_png_bomb(side, side))
    env_code = _MEASURE.replace("policy = MediaPolicy.from_env()",
                                f"policy = MediaPolicy.from_env(max_image_decode_pixels={side * side})")
    out = subprocess.run([sys.executable, "-c", env_code, "image", str(p)], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_jpeg_above_the_decode_limit_is_decoded_downscaled_other_formats_refused():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG", quality=80)
    img.save(png, "PNG", compress_level=1)
    policy = MediaPolicy.from_env(max_image_decode_pixels=1_000_000)
    budget = policy.budget()
    out = decode_image(jpg.getvalue(), budget=budget)
    assert out.size == (1000, 750) and out.mode == "RGB"  # PIL draft at 1/2 scale, never 3 MP decoded
    assert budget.pixels == 1000 * 750
    with pytest.raises(LimitExceededError, match="2000x1500.*max-image-decode-pixels"):
        decode_image(png.getvalue(), budget=policy.budget())
    # within the limit nothing changes: the full-size pixels, exactly as without a budget
    roomy = MediaPolicy.from_env().budget()
    assert np.array_equal(np.asarray(decode_image(jpg.getvalue(), budget=roomy)),
                          np.asarray(decode_image(jpg.getvalue())))


def test_the_model_raises_the_per_image_limit_and_a_request_may_lower_it(qwen2_vl_dir):
    from mmpipe.shared.inputs.media_settings import SettingsSpace
    from mmpipe.shared.models.registry import load_adapter

    adapter = load_adapter(qwen2_vl_dir, device="cpu", part="lm")
    space = SettingsSpace(adapter, qwen2_vl_dir, policy=MediaPolicy.from_env(max_image_decode_pixels=1000))
    kept = adapter.processor.image_processor.size["longest_edge"]
    assert space.budget().limits.image_pixels == 4 * kept  # 4x what the processor keeps
    low = space.resolve({"max_pixels": 56 * 56})
    assert space.budget(low).limits.image_pixels == 4 * 56 * 56  # the request's lower max_pixels lowers it
    floor = space.resolve({"max_pixels": 200})
    assert space.budget(floor).limits.image_pixels == 1000  # ... down to the policy's floor
    with pytest.raises(InvalidInputError, match="max_pixels"):
        space.resolve({"max_pixels": kept * 2})  # never raised above the server's


def test_request_budget_counts_every_item_of_a_request():
    policy = MediaPolicy.from_env(max_request_pixels=3000, max_request_audio_seconds=2.5)
    loader = MediaLoader(policy)
    img = np.zeros((40, 50, 3), np.uint8)  # 2000 pixels
    budget = policy.budget()
    loader.load("image", img, budget=budget)
    with pytest.raises(LimitExceededError, match="max-request-pixels") as e:
        loader.load("image", img, budget=budget)
    assert "4000" in e.value.message and "3000" in e.value.message
    loader.load("image", img, budget=policy.budget())  # a new request starts afresh
    audio = flac(1.5, 16_000, 1)
    budget = policy.budget()
    loader.load("audio", audio, budget=budget)
    with pytest.raises(LimitExceededError, match="max-request-audio-seconds"):
        loader.load("audio", audio, budget=budget)
    frames = np.zeros((4, 30, 30, 3), np.uint8)  # 3600 pixels
    with pytest.raises(LimitExceededError, match="max-request-pixels"):
        loader.load("video", frames, budget=policy.budget())


def test_ingest_flags_reach_the_policy():
    import argparse

    from mmpipe.services.ingest.config import IngestConfig

    p = argparse.ArgumentParser()
    IngestConfig.add_args(p)
    a = p.parse_args(["--model", "m", "--encoder-addr", "x:1", "--max-request-pixels", "5000",
                      "--max-request-audio-seconds", "7.5", "--max-image-decode-pixels", "4096"])
    cfg = IngestConfig.from_args(a)
    policy = MediaPolicy.from_env(**cfg.media_limits())
    assert (policy.max_request_pixels, policy.max_request_audio_seconds, policy.max_image_decode_pixels) == (
        5000, 7.5, 4096)
    assert IngestConfig.from_args(p.parse_args(["--model", "m", "--encoder-addr", "x:1"])).media_limits() == {}


def _ico(frame: bytes, listed: int = 16) -> bytes:
    """An ICO whose one directory entry says `listed`x`listed` and holds `frame` (a PNG of any size)."""
    entry = struct.pack("<BBBBHHII", listed, listed, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + frame


def test_ico_directory_that_disagrees_with_its_frame_is_checked_on_the_real_frame(tmp_path):
    bomb = _ico(rgba_png_bomb(9000, 9000))
    # PIL's ICO plugin decodes inside Image.open: the check must come first, and nothing is decoded
    r = _measure(tmp_path, "image", bomb)
    assert r["error"].startswith("LimitExceededError") and "ICO frame is 9000x9000" in r["error"], r
    assert r["grown"] < RSS_BOUND, r
    with pytest.raises(LimitExceededError, match="ICO frame is 9000x9000.*max-image-decode-pixels"):
        decode_image(bomb, budget=MediaPolicy.from_env().budget())
    with pytest.raises(LimitExceededError, match="9000x9000"):
        decode_image(bomb, max_pixels=10_000_000)  # the header cap sees the real frame too
    # an honest ICO still decodes
    small = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    b = io.BytesIO()
    small.save(b, "PNG")
    got = decode_image(_ico(b.getvalue()), budget=MediaPolicy.from_env().budget())
    assert got.size == (16, 16) and np.array_equal(np.asarray(got), np.asarray(normalize_image(small)))
