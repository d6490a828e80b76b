"""Audio decoding to float32 mono, resampling, and validation of in-memory waveforms.

Owns: bytes -> (float32 mono waveform, sampling rate) via soundfile (wav/flac/ogg/mp3/aiff...), with a
PyAV (bundled FFmpeg) fallback for containers libsndfile cannot read (m4a/aac, webm, mp4 audio tracks);
resampling with soxr; the OpenAI `input_audio` part format (base64 + format name); the duration cap.
Must not: fetch anything, compute model features (mel spectrograms are the processor's job), or import
librosa (its first import JIT-compiles for ~30 s; soxr gives the same resampling in milliseconds).
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import InvalidInputError, LimitExceededError, MediaDecodeError
from .budget import RequestBudget

INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


def _check_seconds(n_samples: int, sr: int, max_seconds: float | None) -> None:
    if max_seconds is not None and sr > 0 and n_samples / sr > max_seconds:
        raise LimitExceededError(f"audio is {n_samples / sr:.1f} s long, more than the limit of "
                                 f"{max_seconds:g} s; send a shorter clip")


# Beyond these the file is adversarial, not audio: 768 kHz is the highest rate any codec writes.
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64


def _check_header(sr: int, channels: int) -> None:
    if not 0 < sr <= MAX_SAMPLE_RATE:
        raise MediaDecodeError(f"audio declares a sampling rate of {sr} Hz (supported: 1-{MAX_SAMPLE_RATE})")
    if not 0 < channels <= MAX_CHANNELS:
        raise MediaDecodeError(f"audio declares {channels} channels (supported: 1-{MAX_CHANNELS})")


def _to_mono(x: np.ndarray) -> np.ndarray:
    # (samples, channels) -> mean over channels: the same downmix as librosa's mono=True.
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_samples(frames: int, channels: int, max_samples: int | None) -> None:
    if max_samples is not None and frames * channels > max_samples:
        raise LimitExceededError(
            f"audio holds {frames} frames x {channels} channels = {frames * channels} samples, more than the limit "
            f"of {max_samples} (MMPIPE_MEDIA_MAX_AUDIO_SAMPLES / --max-audio-samples); send fewer channels, a "
            f"lower sampling rate or a shorter clip")


# Frames read (and downmixed) at a time: the multichannel buffer stays a few MB whatever the file holds.
_BLOCK_FRAMES = 1 << 16


def _read_mono(f: Any, limit: int) -> np.ndarray:
    """Read up to `limit` frames (-1: all) from an open SoundFile, downmixing each block as it comes."""
    parts: list[np.ndarray] = []
    left = limit
    while left != 0:
        n = _BLOCK_FRAMES if left < 0 else min(_BLOCK_FRAMES, left)
        block = f.read(frames=n, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        parts.append(_to_mono(block))
        if left > 0:
            left -= block.shape[0]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def decode_audio(data: bytes, *, max_seconds: float | None = None, max_samples: int | None = None,
                 budget: RequestBudget | None = None) -> tuple[np.ndarray, int]:
    """Decode encoded audio bytes to (float32 mono waveform in [-1, 1], native sampling rate).
    `max_samples`: frames x channels cap from the header; `budget`: the request's, charged from the header."""
    if not data:
        raise MediaDecodeError("audio data is empty")
    import soundfile as sf

    sf_error: Exception | None = None
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels = int(f.samplerate), int(f.channels)
            _check_header(sr, channels)
            # The header's frame count: the duration cap is checked before the samples are decoded.
            _check_seconds(int(f.frames), sr, max_seconds)
            _check_samples(int(f.frames), channels, max_samples)
            if budget is not None:
                budget.charge_audio(int(f.frames) / sr)
            # Header counts can lie (mp3 estimates, a forged Xing header): never decode more than the caps
            # allow plus one frame, whatever the header said.
            limit = int(max_seconds * sr) + 1 if max_seconds is not None and sr > 0 else -1
            if max_samples is not None:
                by_samples = max_samples // channels + 1
                limit = by_samples if limit < 0 else min(limit, by_samples)
            wav = _read_mono(f, limit)
    except (LimitExceededError, MediaDecodeError):
        raise
    except Exception as e:  # sf.LibsndfileError (RuntimeError), TypeError for odd headers, ...
        sf_error = e
    else:
        if wav.shape[0] == 0:
            raise MediaDecodeError("audio has no samples")
        _check_seconds(wav.shape[0], int(sr), max_seconds)  # header frame counts can be estimates (mp3)
        _check_samples(wav.shape[0], channels, max_samples)
        return wav, int(sr)
    wav, sr = _decode_with_pyav(data, max_seconds, sf_error, max_samples)
    if budget is not None:
        budget.charge_audio(wav.shape[0] / sr)
    return wav, sr


def _decode_with_pyav(data: bytes, max_seconds: float | None, sf_error: Exception | None,
                      max_samples: int | None = None) -> tuple[np.ndarray, int]:
    # Fallback for formats libsndfile lacks. Not librosa/audioread: audioread needs an ffmpeg or
    # gstreamer binary on PATH (absent on these machines) and would fail on exactly these formats.
    try:
        import av
    except ImportError:  # pragma: no cover - av is a declared dependency
        raise MediaDecodeError(f"cannot decode audio: {sf_error}") from None
    chunks: list[np.ndarray] = []
    n = 0
    sr = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaDecodeError("media contains no audio stream")
            stream = container.streams.audio[0]
            sr = int(stream.rate or stream.codec_context.sample_rate or 0)
            _check_header(sr, int(stream.codec_context.channels or 1))
            if max_seconds is not None and container.duration and container.duration / 1e6 > max_seconds:
                # container.duration is in microseconds (AV_TIME_BASE): refuse before decoding anything.
                raise LimitExceededError(f"audio is {container.duration / 1e6:.1f} s long, more than the limit "
                                         f"of {max_seconds:g} s; send a shorter clip")
            # Packed float output at the native rate and layout; we downmix ourselves (mean), the same
            # way as the soundfile path, so one clip decodes identically through either backend.
            resampler = av.AudioResampler(format="flt", rate=sr)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    ch = out.layout.nb_channels
                    arr = out.to_ndarray().reshape(-1, ch)
                    chunks.append(_to_mono(arr))  # downmixed per frame: memory is mono whatever the layout
                    n += arr.shape[0]
                    _check_seconds(n, sr, max_seconds)  # during decode: stop early on long inputs
                    _check_samples(n, ch, max_samples)
            for out in resampler.resample(None):
                arr = out.to_ndarray().reshape(-1, out.layout.nb_channels)
                chunks.append(_to_mono(arr))
                n += arr.shape[0]
    except (MediaDecodeError, LimitExceededError):
        raise
    except Exception as e:
        raise MediaDecodeError(
            f"cannot decode audio ({len(data)} bytes): not a readable audio file (soundfile: "
            f"{type(sf_error).__name__ if sf_error else 'n/a'}; ffmpeg: {type(e).__name__}: {e})") from None
    if n == 0 or sr <= 0:
        raise MediaDecodeError("audio has no decodable samples")
    _check_seconds(n, sr, max_seconds)
    return np.concatenate(chunks, axis=0), sr


def resample(audio: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Resample a float32 mono waveform from `sr` to `target_sr` Hz (soxr, high quality)."""
    if sr <= 0 or target_sr <= 0:
        raise InvalidInputError(f"sampling rates must be > 0, got {sr} -> {target_sr}")
    if int(sr) == int(target_sr):
        return audio
    import soxr

    return np.ascontiguousarray(soxr.resample(audio, int(sr), int(target_sr), quality="HQ"), dtype=np.float32)


def _int_pcm_to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "u":
        half = float(2 ** (8 * a.dtype.itemsize - 1))
        return ((a.astype(np.float64) - half) / half).astype(np.float32)
    return (a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))).astype(np.float32)


def normalize_audio(obj: Any, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Validate an `(array, sampling_rate)` pair and return (float32 mono, sr).

    Arrays may be 1-D, or 2-D with the channel axis first or last (whichever is small, <= 8); integer
    PCM is scaled to [-1, 1]; NaN/Inf are refused.
    """
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise InvalidInputError("audio must be given as an (array, sampling_rate) pair, got "
                                f"{type(obj).__name__}")
    arr, sr = obj
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.number)) or not np.isfinite(sr) \
            or sr <= 0 or float(sr) != int(sr):
        raise InvalidInputError(f"audio sampling rate must be a positive integer, got {sr!r}")
    sr = int(sr)
    mod = type(arr).__module__ or ""
    if mod.startswith("torch") and hasattr(arr, "detach"):
        arr = arr.detach().cpu().float().numpy()
    try:
        a = np.asarray(arr)
    except Exception as e:
        raise InvalidInputError(f"audio array could not be read: {e}") from None
    if a.dtype.kind in "iu":
        a = _int_pcm_to_float(a)
    elif a.dtype.kind != "f":
        raise InvalidInputError(f"audio samples must be float or integer PCM, got dtype {a.dtype}")
    if a.ndim == 2:
        r, c = a.shape
        if c <= 8 and r > c:
            a = a.mean(axis=1)          # (samples, channels): soundfile's layout
        elif r <= 8 and c > r:
            a = a.mean(axis=0)          # (channels, samples): librosa / torchaudio layout
        else:
            raise InvalidInputError(f"audio array of shape {a.shape} is ambiguous; pass 1-D mono samples")
    elif a.ndim != 1:
        raise InvalidInputError(f"audio array must be 1-D (mono) or 2-D (with channels), got shape {a.shape}")
    if a.size == 0:
        raise InvalidInputError("audio array is empty")
    if not np.isfinite(a).all():
        raise InvalidInputError("audio array contains NaN or Inf")
    _check_seconds(a.shape[0], sr, max_seconds)
    return np.ascontiguousarray(a, dtype=np.float32), sr


def decode_input_audio(b64: str, fmt: str, *, max_seconds: float | None = None, max_bytes: int | None = None,
                       max_samples: int | None = None, budget: RequestBudget | None = None
                       ) -> tuple[np.ndarray, int]:
    """Decode an OpenAI `input_audio` part ({"data": base64, "format": "wav"|"mp3"|"flac"|"ogg"})."""
    from .fetch import b64decode_strict

    f = (fmt or "").strip().lower() if isinstance(fmt, str) else ""
    if f not in INPUT_AUDIO_FORMATS:
        raise InvalidInputError(f"input_audio.format {fmt!r} is not supported; use one of "
                                f"{list(INPUT_AUDIO_FORMATS)}", param="input_audio.format")
    if not isinstance(b64, str) or not b64.strip():
        raise InvalidInputError("input_audio.data must be a non-empty base64 string", param="input_audio.data")
    if max_bytes is not None and len(b64) * 3 // 4 > max_bytes:
        raise LimitExceededError(f"input_audio.data is larger than the media size cap of {max_bytes} bytes",
                                 param="input_audio.data")
    s = b64.strip()
    if s.startswith("data:") and "," in s:  # some clients send a data URL here; tolerate it
        s = s.split(",", 1)[1]
    raw = b64decode_strict(s, what="input_audio.data", param="input_audio.data")
    # The format name is only a hint: the decoders sniff the real container, so a mislabelled but valid
    # file still decodes instead of failing on a technicality.
    return decode_audio(raw, max_seconds=max_seconds, max_samples=max_samples, budget=budget)
