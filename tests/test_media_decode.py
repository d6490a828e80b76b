"""Decode / normalise / hash / embeds tests for shared/media (all local, no network).

Covers: RGBA compositing at pixel level, image io kwargs validation, truncated and corrupt media, the pixel
cap before decode, video sampling and normalisation, audio decode/resample/validation, content hashes, and
the safety of client-supplied embedding tensors (pickled code must never run).
"""
from __future__ import annotations

import base64
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from mmpipe.shared.errors import (InvalidInputError, LimitExceededError, MediaDecodeError)
from mmpipe.shared.media.audio import decode_audio, decode_input_audio, normalize_audio, resample
from mmpipe.shared.media.hashing import hash_audio, hash_bytes, hash_image, hash_rgb_array, hash_video
from mmpipe.shared.media.image import (ImageIOOptions, decode_image, normalize_image, parse_image_io_kwargs)
from mmpipe.shared.media.loader import MediaLoader
from mmpipe.shared.media.policy import MediaPolicy
from mmpipe.shared.media.video import (VideoIOOptions, decode_video, normalize_video, parse_video_io_kwargs)

HEX = set("0123456789abcdef")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _noise(w=64, h=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mp4(n=16, w=64, h=48, fps=8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = i * 15  # frame index readable from the red channel
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return _mp4()


def _wav(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    b = io.BytesIO()
    sf.write(b, x, sr, format=fmt)
    return b.getvalue()


# ------------------------------------------------------------------------------------------------- images

def _blend(fg: int, bg: int, a: int) -> float:
    return (fg * a + bg * (255 - a)) / 255


def test_rgba_composited_at_pixel_level():
    arr = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128], [10, 20, 30, 64]]], np.uint8)
    bg = (0, 0, 255)
    out = np.asarray(normalize_image(Image.fromarray(arr, "RGBA"), parse_image_io_kwargs(
        {"rgba_background_color": list(bg)})))
    assert out.shape == (1, 4, 3)
    assert tuple(out[0, 0]) == bg                    # alpha 0 -> exactly the background
    assert tuple(out[0, 1]) == (255, 0, 0)           # alpha 255 -> exactly the foreground
    for x in (2, 3):
        a = int(arr[0, x, 3])
        want = [_blend(int(arr[0, x, c]), bg[c], a) for c in range(3)]
        assert np.allclose(out[0, x], want, atol=0.51), (out[0, x], want)
    # default background is white
    out = np.asarray(normalize_image(Image.fromarray(arr, "RGBA")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert np.allclose(out[0, 2], [255, _blend(0, 255, 128), _blend(0, 255, 128)], atol=0.51)


def test_rgba_png_roundtrip_through_decode():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (200, 100, 50, 0)
    arr[1, 1] = (200, 100, 50, 255)
    img = decode_image(_encode(Image.fromarray(arr, "RGBA"), "PNG"), ImageIOOptions((1, 2, 3)))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (1, 2, 3) and img.getpixel((1, 1)) == (200, 100, 50)


def test_la_and_palette_transparency():
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
    out = normalize_image(la, ImageIOOptions((10, 20, 30)))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (100, 100, 100)
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    gif = decode_image(_encode(p, "GIF", transparency=0), ImageIOOptions((0, 255, 0)))
    assert gif.getpixel((0, 0)) == (0, 255, 0) and gif.getpixel((1, 0)) == (255, 0, 0)


def test_rgb_untouched_and_other_modes_converted():
    rgb = _noise(8, 8)
    assert normalize_image(rgb) is rgb
    dec = decode_image(_encode(rgb, "PNG"))
    assert np.array_equal(np.asarray(dec), np.asarray(rgb))
    gray = Image.fromarray(np.full((3, 3), 77, np.uint8), "L")
    assert normalize_image(gray).mode == "RGB" and normalize_image(gray).getpixel((1, 1)) == (77, 77, 77)
    # 16-bit grayscale is scaled, not clipped to white
    g16 = decode_image(_encode(Image.fromarray(np.full((2, 2), 65535 // 2, np.uint16)), "PNG"))
    assert g16.getpixel((0, 0)) == (127, 127, 127) or g16.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, 3, 4], [0, 0, 256], [-1, 0, 0], [0.5, 0, 0], "red",
                                 [True, 0, 0], None, ["1", "2", "3"]])
def test_bad_rgba_background_rejected(bad):
    with pytest.raises(InvalidInputError) as ei:
        parse_image_io_kwargs({"rgba_background_color": bad})
    assert repr(bad) in ei.value.message or str(bad) in ei.value.message
    assert ei.value.param == "media_io_kwargs.image.rgba_background_color"


def test_image_kwargs_ok_and_unknown_key():
    assert parse_image_io_kwargs(None).rgba_background_color == (255, 255, 255)
    assert parse_image_io_kwargs({"rgba_background_color": (0, 128, 255)}).rgba_background_color == (0, 128, 255)
    with pytest.raises(InvalidInputError, match="background_colour"):
        parse_image_io_kwargs({"background_colour": [0, 0, 0]})


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_refused(fmt):
    data = _encode(_noise(), fmt)
    with pytest.raises(MediaDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_garbage_and_empty_image_refused():
    with pytest.raises(MediaDecodeError):
        decode_image(b"definitely not an image" * 10)
    with pytest.raises(MediaDecodeError):
        decode_image(b"")


def test_pixel_cap_checked_before_decode():
    data = _encode(Image.new("RGB", (2000, 1000)), "PNG")
    # Truncated too: if the pixels were decoded first, this would be a MediaDecodeError instead.
    with pytest.raises(LimitExceededError, match="2000x1000"):
        decode_image(data[: len(data) // 2], max_pixels=1_000_000)
    assert decode_image(data, max_pixels=2_000_000).size == (2000, 1000)


# ------------------------------------------------------------------------------------------------- video

def test_video_num_frames(mp4):
    frames, meta = decode_video(mp4, parse_video_io_kwargs({"num_frames": 4}), MediaPolicy())
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert meta["frame_indices"] == [0, 5, 10, 15]
    assert meta["fps"] == pytest.approx(8.0) and meta["duration_s"] == pytest.approx(2.0)
    assert meta["sampled_fps"] == pytest.approx(2.0)
    red = frames[:, 24, 32, 0].astype(int)
    assert np.all(np.abs(red - np.array([0, 75, 150, 225])) <= 6), red  # right frames, modulo codec loss


def test_video_fps_all_and_caps(mp4):
    frames, meta = decode_video(mp4, VideoIOOptions(fps=4.0), MediaPolicy())
    assert frames.shape[0] == 8 and meta["frame_indices"] == list(range(0, 16, 2))
    assert meta["sampled_fps"] == pytest.approx(4.0)
    frames, meta = decode_video(mp4, None, MediaPolicy())
    assert frames.shape[0] == 16 and meta["sampled_fps"] == pytest.approx(8.0)
    frames, meta = decode_video(mp4, None, MediaPolicy(max_video_frames=10))
    assert frames.shape[0] == 10  # implicit "all frames" is thinned to the cap
    with pytest.raises(LimitExceededError, match="num_frames=20"):
        decode_video(mp4, VideoIOOptions(num_frames=20), MediaPolicy(max_video_frames=10))
    with pytest.raises(LimitExceededError, match="request fewer frames"):
        decode_video(mp4, None, MediaPolicy(max_video_decoded_bytes=64 * 48 * 3 * 10))
    with pytest.raises(LimitExceededError, match="64x48"):
        decode_video(mp4, None, MediaPolicy(max_image_pixels=1000))


def test_corrupt_video_refused(mp4):
    for bad in (b"garbage" * 200, mp4[: len(mp4) // 2], mp4[:100], b""):
        with pytest.raises(MediaDecodeError):
            decode_video(bad, None, MediaPolicy())


@pytest.mark.parametrize("bad,match", [({"num_frames": 0}, "num_frames"), ({"num_frames": "4"}, "num_frames"),
                                       ({"num_frames": 2.5}, "num_frames"), ({"fps": -1}, "fps"),
                                       ({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"),
                                       ({"frames": 4}, "unknown video media_io_kwargs")])
def test_video_kwargs_validation(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_video_io_kwargs(bad)


def test_normalize_video_inputs():
    import torch

    arr = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    for src in (arr, list(arr), [Image.fromarray(f) for f in arr], torch.from_numpy(arr.copy())):
        out = normalize_video(src)
        assert out.shape == (3, 5, 7, 3) and out.dtype == np.uint8 and np.array_equal(out, arr)
    with pytest.raises(InvalidInputError, match="rank 4"):
        normalize_video(arr[0])
    with pytest.raises(InvalidInputError, match="channels-first"):
        normalize_video(np.zeros((2, 3, 5, 7), np.uint8))
    with pytest.raises(InvalidInputError, match="3 RGB channels"):
        normalize_video(np.zeros((2, 5, 7, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="same size"):
        normalize_video([arr[0], arr[0][:4]])
    with pytest.raises(InvalidInputError, match="uint8"):
        normalize_video(arr.astype(np.float32) / 255)
    with pytest.raises(InvalidInputError, match="no frames"):
        normalize_video([])
    with pytest.raises(LimitExceededError):
        normalize_video(arr, max_frames=2)


# ------------------------------------------------------------------------------------------------- audio

def _tone(sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_audio_decode_stereo_to_mono_and_formats():
    x = _tone(16000)
    st = np.stack([x, np.zeros_like(x)], axis=1)
    for fmt in ("WAV", "FLAC", "OGG"):
        wav, sr = decode_audio(_wav(st, 16000, fmt))
        assert sr == 16000 and wav.dtype == np.float32 and wav.ndim == 1
        assert abs(wav.shape[0] - 16000) <= 1
        assert abs(float(np.abs(wav).max()) - 0.25) < 0.02  # mean of the two channels
    wav, _ = decode_audio(_wav(st, 16000, "WAV"))
    assert np.allclose(wav, st.mean(axis=1), atol=1e-4)


def test_audio_resample_length():
    x = _tone(44100)
    y = resample(x, 44100, 16000)
    assert y.dtype == np.float32 and abs(y.shape[0] - 16000) <= 1
    assert resample(x, 16000, 16000) is x
    item = MediaLoader(MediaPolicy()).load_audio((x, 44100), 16000)
    assert item.meta["sampling_rate"] == 16000 and abs(item.data.shape[0] - 16000) <= 1
    assert item.content_hash == hash_audio(item.data, 16000)  # hashed after resampling
    assert item.content_hash != MediaLoader(MediaPolicy()).load("audio", (x, 44100)).content_hash


def test_corrupt_audio_refused():
    good = _wav(_tone(16000), 16000)
    for bad in (b"garbage" * 100, b"RIFF" + b"\0" * 60, b""):
        with pytest.raises(MediaDecodeError):
            decode_audio(bad)
    with pytest.raises(LimitExceededError, match="limit of 0.5 s"):
        decode_audio(good, max_seconds=0.5)


def test_normalize_audio_validation():
    x = _tone(8000)
    a, sr = normalize_audio((x, 8000))
    assert sr == 8000 and a.dtype == np.float32
    a, _ = normalize_audio((np.stack([x, x]), 8000))  # (channels, samples)
    assert a.shape == x.shape
    a, _ = normalize_audio(((x * 32767).astype(np.int16), 8000))
    assert np.allclose(a, x, atol=1e-3)
    for bad in ((x, 0), (x, -5), (x, 8000.5), (x, "8000"), x, (x,), (np.zeros((4, 4, 4)), 8000),
                (np.array([np.nan, 0.0], np.float32), 8000), (np.array([], np.float32), 8000)):
        with pytest.raises(InvalidInputError):
            normalize_audio(bad)


def test_decode_input_audio():
    x = _tone(16000, 0.5)
    wav_b64 = base64.b64encode(_wav(x, 16000)).decode()
    wav, sr = decode_input_audio(wav_b64, "wav")
    assert sr == 16000 and abs(wav.shape[0] - 8000) <= 1
    flac_b64 = base64.b64encode(_wav(x, 16000, "FLAC")).decode()
    assert decode_input_audio(flac_b64, "FLAC")[1] == 16000
    with pytest.raises(InvalidInputError) as ei:
        decode_input_audio("!!!not base64!!!", "wav")
    assert ei.value.param == "input_audio.data"
    with pytest.raises(InvalidInputError) as ei:
        decode_input_audio(wav_b64, "aiff")
    assert ei.value.param == "input_audio.format"
    with pytest.raises(MediaDecodeError):
        decode_input_audio(base64.b64encode(b"not audio at all" * 20).decode(), "mp3")
    item = MediaLoader(MediaPolicy()).load_input_audio(wav_b64, "wav", target_sampling_rate=8000)
    assert item.modality == "audio" and item.meta["sampling_rate"] == 8000


# ------------------------------------------------------------------------------------------------ hashing

def test_hashing_properties():
    img = _noise(8, 6)
    h = hash_image(img)
    assert len(h) == 64 and set(h) <= HEX
    assert hash_image(img.copy()) == h
    assert hash_image(decode_image(_encode(img, "PNG"))) == h  # same pixels, re-encoded -> same hash
    # same bytes, different shape / mode -> different hash
    assert hash_image(Image.frombytes("RGB", (6, 8), img.tobytes())) != h
    assert hash_image(Image.frombytes("L", (24, 6), img.tobytes())) != h
    # the decode pool's arrays are hashed from their own buffer: the same digest as the image built from them
    arr = np.asarray(img)
    assert hash_rgb_array(arr) == h and hash_rgb_array(np.asfortranarray(arr)) == h
    assert hash_rgb_array(np.ascontiguousarray(arr[:, ::-1])) == hash_image(img.transpose(Image.FLIP_LEFT_RIGHT))
    for bad in (arr[..., :2], arr.astype(np.int16), arr[..., 0]):
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
            hash_rgb_array(bad)
    # the loader keys an RGB array (hashed from its buffer), the same PIL image and its PNG bytes alike
    loader = MediaLoader(MediaPolicy())
    keys = {loader.load("image", src).content_hash for src in (arr, np.asfortranarray(arr), img, _encode(img, "PNG"))}
    assert keys == {h}
    assert loader.load("image", np.ascontiguousarray(arr[::-1])).content_hash != h
    v = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    hv = hash_video(v)
    assert len(hv) == 64 and hash_video(v.copy()) == hv
    assert hash_video(v.reshape(4, 2, 6, 3)) != hv and hash_video(v.reshape(2, 6, 4, 3)) != hv
    assert hash_video(np.asfortranarray(v)) == hv  # layout in memory does not matter, content does
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    assert hash_audio(a, 16000) == hash_audio(a.copy(), 16000)
    assert hash_audio(a, 16000) != hash_audio(a, 8000)
    assert hash_audio(a, 16000) != hash_audio(a.reshape(50, 2), 16000)
    # the same raw bytes as different modalities / as plain bytes never collide
    assert hash_bytes(v.tobytes()) != hv and len(hash_bytes(b"x")) == 64
    assert hash_bytes(b"abc") == hash_bytes(bytearray(b"abc")) != hash_bytes(b"abd")


def test_loader_dispatch_and_validation(mp4):
    loader = MediaLoader(MediaPolicy(), {"image": {"rgba_background_color": [0, 0, 0]}, "video": {"num_frames": 2}})
    rgba = Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA")
    item = loader.load("image", rgba, uuid="u1")
    assert item.data.getpixel((0, 0)) == (0, 0, 0) and item.uuid == "u1"
    assert loader.load("image", _encode(rgba, "PNG")).content_hash == item.content_hash
    v = loader.load("video", mp4)
    assert v.data.shape[0] == 2 and v.content_hash == hash_video(v.data, v.meta["sampled_fps"])
    assert v.meta["sampled_fps"] and hash_video(v.data, v.meta["sampled_fps"]) != hash_video(v.data)  # rate counts
    arr = np.zeros((3, 4, 4, 3), np.uint8)
    v2 = loader.load("video", (arr, {"fps": 2.0}))
    assert v2.meta["fps"] == 2.0 and v2.meta["duration_s"] == pytest.approx(1.5)
    with pytest.raises(InvalidInputError, match="unknown modality"):
        loader.load("smell", b"x")
    with pytest.raises(InvalidInputError, match="unknown media_io_kwargs"):
        MediaLoader(MediaPolicy(), {"images": {}})
    with pytest.raises(InvalidInputError):
        MediaLoader(MediaPolicy(), {"video": {"num_frames": -3}})
    with pytest.raises(InvalidInputError):
        MediaLoader(MediaPolicy(), {"audio": {"sr": 16000}})
    assert MediaLoader(MediaPolicy(), '{"video": {"num_frames": 3}}').video_opts.num_frames == 3
    with pytest.raises(LimitExceededError):
        MediaLoader(MediaPolicy(max_bytes=10)).load("image", b"x" * 11)
    with pytest.raises(LimitExceededError):
        MediaLoader(MediaPolicy(max_image_pixels=10)).load("image", _noise(4, 4))


# ------------------------------------------------------------------------------------------------- embeds

class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_embeds_roundtrip_and_safetensors():
    import torch
    from safetensors.torch import save as st_save

    from mmpipe.shared.media.embeds import decode_tensor_b64, encode_tensor_b64

    t = torch.randn(5, 16)
    assert torch.equal(decode_tensor_b64(encode_tensor_b64(t), param="image_embeds"), t)
    bf = torch.randn(3, 8).to(torch.bfloat16)
    assert torch.equal(decode_tensor_b64(encode_tensor_b64(bf), param="image_embeds"), bf)
    s = base64.b64encode(st_save({"embeds": t})).decode()
    assert torch.equal(decode_tensor_b64(s, param="image_embeds"), t)
    two = base64.b64encode(st_save({"a": t, "b": t.clone()})).decode()
    with pytest.raises(InvalidInputError, match="exactly one tensor"):
        decode_tensor_b64(two, param="image_embeds")


def test_embeds_pickle_code_never_runs(tmp_path):
    import torch

    from mmpipe.shared.media.embeds import decode_tensor_b64

    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker)), protocol=2)
    raw_pickle = base64.b64encode(evil).decode()
    buf = io.BytesIO()
    torch.save({"x": _Evil(str(marker))}, buf)  # torch.save zip whose data.pkl calls os.system on load
    zipped = base64.b64encode(buf.getvalue()).decode()
    for payload in (raw_pickle, zipped):
        with pytest.raises(InvalidInputError) as ei:
            decode_tensor_b64(payload, param="image_embeds")
        assert ei.value.param == "image_embeds"
    assert not marker.exists(), "pickled code ran during decode_tensor_b64"
    # Control: the payload is live (a plain unpickle DOES run it), so the check above proves something.
    pickle.loads(evil)
    assert marker.exists()


def test_embeds_rejections():
    import torch

    from mmpipe.shared.media.embeds import decode_tensor_b64, encode_tensor_b64

    def enc(obj) -> str:
        b = io.BytesIO()
        torch.save(obj, b)
        return base64.b64encode(b.getvalue()).decode()

    cases = {
        "NaN": encode_tensor_b64(torch.tensor([[1.0, float("nan")]])),
        "Inf": encode_tensor_b64(torch.tensor([[1.0, float("inf")]])),
        "dtype": encode_tensor_b64(torch.arange(6).reshape(2, 3)),
        "single tensor": enc({"a": torch.zeros(2, 2)}),
        "base64": "%%%%",
        "not a loadable": base64.b64encode(b"hello world, not a tensor").decode(),
    }
    for match, payload in cases.items():
        with pytest.raises(InvalidInputError, match=match) as ei:
            decode_tensor_b64(payload, param="audio_embeds")
        assert ei.value.param == "audio_embeds"
    with pytest.raises(InvalidInputError, match="limit"):
        decode_tensor_b64(encode_tensor_b64(torch.zeros(1024, 1024)), param="image_embeds", max_bytes=1 << 20)


def test_media_modules_do_not_import_torch_or_librosa():
    import subprocess
    import sys

    code = ("import sys, mmpipe.shared.media.loader, mmpipe.shared.media.fetch, mmpipe.shared.media.hashing; "
            "bad = [m for m in ('torch', 'librosa', 'decord') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------- video decoders: PyAV vs decord
# The clips of tests/video_clips.py (one per container / codec / pixel format), the sampling options a request
# can give, and how decord's output relates to PyAV's on each clip, as measured (decord 0.6.0 with its FFmpeg
# 4.1, PyAV 18 with FFmpeg 7.1): the same frames, pixel for pixel, except where listed here.
from tests.video_clips import CLIPS, clip_frames, encode_clip  # noqa: E402

SAMPLINGS = [None, {"num_frames": 4}, {"num_frames": 7}, {"fps": 2}, {"fps": 3, "num_frames": 5}, {"fps": 100}]
# 10-bit to 8-bit conversion differs between the two FFmpegs: mean |difference| 2.9, both as far from the source
DECORD_CLOSE = {"hevc-10bit-mkv": 4.0}
# decord 0.6.0 returns frames 12..23 and then the last one repeated for a 24-frame MPEG-TS (the stream's start
# time is not subtracted when it seeks), and cannot open AV1 at all; PyAV decodes both right.
DECORD_WRONG_FRAMES = {"mpeg2-ts"}
DECORD_CANNOT_OPEN = {"av1-mkv"}


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    """name -> encoded clip, for the clips whose encoder this PyAV build has (PyAV 12 lacks libsvtav1)."""
    import av

    out = {}
    for c in CLIPS:
        try:
            av.codec.Codec(c.codec, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        out[c.name] = encode_clip(c)
    return out


def _clip(clips: dict[str, bytes], name: str) -> bytes:
    if name not in clips:
        pytest.skip(f"this PyAV build cannot encode the {name} test clip")
    return clips[name]


def _nearest_source_frames(frames: np.ndarray, src: np.ndarray) -> list[int]:
    """For each decoded frame, the index of the source frame it is closest to (the right frame, whatever the
    codec's loss)."""
    d = np.abs(frames[:, None].astype(np.int16) - src[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return [int(i) for i in d.argmin(axis=1)]


@pytest.mark.parametrize("spec", CLIPS, ids=[c.name for c in CLIPS])
def test_pyav_decodes_the_right_frames_of_every_clip(spec, clips):
    frames, meta = decode_video(_clip(clips, spec.name), None, MediaPolicy(), backend="pyav")
    src = clip_frames(spec)
    assert frames.shape == src.shape and frames.dtype == np.uint8
    assert meta["total_num_frames"] == spec.frames and meta["fps"] == pytest.approx(spec.fps)
    assert _nearest_source_frames(frames, src) == list(range(spec.frames))
    assert np.abs(frames.astype(int) - src).mean() < 20  # codec loss on low-contrast noise, not a wrong picture
    frames, meta = decode_video(clips[spec.name], VideoIOOptions(num_frames=5), MediaPolicy(), backend="pyav")
    assert _nearest_source_frames(frames, src) == meta["frame_indices"]


@pytest.mark.parametrize("spec", CLIPS, ids=[c.name for c in CLIPS])
def test_decord_and_pyav_sample_the_same_frames(spec, clips):
    pytest.importorskip("decord", reason="decord is optional (mmpipe[decord], x86-64 wheels only)")
    data = _clip(clips, spec.name)
    if spec.name in DECORD_CANNOT_OPEN:
        with pytest.raises(MediaDecodeError, match="not a readable video"):
            decode_video(data, None, MediaPolicy(), backend="decord")
        return
    src = clip_frames(spec)
    for sampling in SAMPLINGS:
        opts = parse_video_io_kwargs(sampling)
        ours, ours_meta = decode_video(data, opts, MediaPolicy(), backend="pyav")
        theirs, theirs_meta = decode_video(data, opts, MediaPolicy(), backend="decord")
        assert ours_meta == theirs_meta, (sampling, ours_meta, theirs_meta)  # indices, rates, duration, size
        assert ours.shape == theirs.shape
        if spec.name in DECORD_WRONG_FRAMES:
            assert _nearest_source_frames(ours, src) == ours_meta["frame_indices"]
            assert _nearest_source_frames(theirs, src) != theirs_meta["frame_indices"]
        elif spec.name in DECORD_CLOSE:
            diff = np.abs(ours.astype(int) - theirs.astype(int)).mean()
            assert diff <= DECORD_CLOSE[spec.name], (sampling, diff)
            assert _nearest_source_frames(theirs, src) == _nearest_source_frames(ours, src)
        else:
            assert np.array_equal(ours, theirs), (sampling, np.abs(ours.astype(int) - theirs.astype(int)).max())


def test_decord_backend_through_the_loader_and_the_decode_pool(clips):
    pytest.importorskip("decord", reason="decord is optional (mmpipe[decord], x86-64 wheels only)")
    from mmpipe.shared.media.decode_pool import DecodePool, DecodePoolConfig

    data = clips["h264-bframes-gop4-mp4"]
    want = MediaLoader(MediaPolicy(), {"video": {"num_frames": 6}}).load("video", data)
    pool = DecodePool(DecodePoolConfig(workers=1))
    try:
        for loader in (MediaLoader(MediaPolicy(), {"video": {"num_frames": 6}}, video_backend="decord"),
                       MediaLoader(MediaPolicy(), {"video": {"num_frames": 6}}, pool, video_backend="decord")):
            got = loader.load("video", data)
            assert got.content_hash == want.content_hash and got.meta == want.meta
    finally:
        pool.close()


def test_video_backend_names_are_checked():
    from mmpipe.shared.media.video_readers import parse_video_backend

    assert parse_video_backend(None) == parse_video_backend("") == parse_video_backend("PyAV") == "pyav"
    with pytest.raises(InvalidInputError, match="unknown video backend 'vlc'") as ei:
        MediaLoader(MediaPolicy(), video_backend="vlc")
    assert ei.value.param == "video_backend"


def test_decord_backend_missing_names_the_extra():
    import importlib.util

    from mmpipe.shared.media.video_readers import parse_video_backend

    if importlib.util.find_spec("decord") is not None:
        assert parse_video_backend("decord") == "decord"
        pytest.skip("decord is installed here; the missing-extra error is checked where it is not "
                    "(make test-lower-bounds)")
    with pytest.raises(InvalidInputError, match=r"mmpipe\[decord\]"):
        parse_video_backend("decord")
