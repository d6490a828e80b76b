"""Video decode time per clip: PyAV (the default backend) against decord, through `decode_video` as ingest runs it.

    python bench/video_decode_bench.py                     # the test clips + two 640x480 ones, 8 frames sampled
    python bench/video_decode_bench.py --num-frames 0 --repeats 20 --json .tmp/video_decode.json   # all frames

Each clip is decoded --repeats times per backend after one warm-up call, in this process (no decode pool), with
the header check, the index, the sampling and the RGB conversion included (everything `decode_video` does);
the median and the minimum wall time are printed per clip, and the ratio decord / PyAV. decord is skipped (its
column says so) where it is not installed or cannot open the clip. CPU only; one thread per decoder call is not
forced: PyAV uses FFmpeg's frame and slice threads, decord runs with num_threads=1 as the backend configures it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpipe.shared.errors import MediaDecodeError  # noqa: E402
from mmpipe.shared.media.policy import MediaPolicy  # noqa: E402
from mmpipe.shared.media.video import VideoIOOptions, decode_video  # noqa: E402
from tests.video_clips import CLIPS, ClipSpec, encode_clip  # noqa: E402

# larger than the test clips (those stay small for the suite): 5 s of 640x480 at 30 fps, H.264 and VP9
LARGE = (ClipSpec("h264-640x480-150f-mp4", "mp4", "libx264", frames=150, width=640, height=480, fps=30),
         ClipSpec("vp9-640x480-150f-webm", "webm", "libvpx-vp9", frames=150, width=640, height=480, fps=30))


def _time(data: bytes, opts: VideoIOOptions, backend: str, repeats: int) -> list[float] | None:
    policy = MediaPolicy()
    try:
        decode_video(data, opts, policy, backend=backend)  # warm-up: libraries loaded, codec tables built
    except MediaDecodeError:
        return None
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        decode_video(data, opts, policy, backend=backend)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip; 0 = all")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    opts = VideoIOOptions(num_frames=a.num_frames or None)
    backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
    rows = []
    print(f"{'clip':24s} {'frames':>6s} {'bytes':>7s} {'pyav ms':>14s} {'decord ms':>14s} {'decord/pyav':>11s}")
    for spec in (*CLIPS, *LARGE):
        data = encode_clip(spec)
        row = {"clip": spec.name, "frames": spec.frames, "size": f"{spec.width}x{spec.height}", "bytes": len(data)}
        for b in backends:
            ts = _time(data, opts, b, a.repeats)
            row[b] = None if ts is None else {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
        rows.append(row)
        cell = {b: f"{row[b]['median_ms']:6.2f} ({row[b]['min_ms']:5.2f})" if row.get(b) else "cannot open"
                for b in ("pyav", "decord")}
        if "decord" not in backends:
            cell["decord"] = "not installed"
        ratio = (f"{row['decord']['median_ms'] / row['pyav']['median_ms']:.2f}"
                 if row.get("decord") and row.get("pyav") else "-")
        print(f"{spec.name:24s} {spec.frames:6d} {len(data):7d} {cell['pyav']:>14s} {cell['decord']:>14s} {ratio:>11s}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"num_frames": a.num_frames, "repeats": a.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
