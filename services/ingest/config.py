"""IngestConfig: everything the ingest service takes from its flags (`mmpipe ingest --help`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mmpipe.services.common import cli_args as ca
from mmpipe.services.common.cli_args import ServerConfig
from mmpipe.services.common.tls import ClientTLS
from mmpipe.shared.media.policy import parse_domain_list
from mmpipe.shared.media.video_readers import DEFAULT_VIDEO_BACKEND, VIDEO_BACKENDS, parse_video_backend

DEFAULT_PORT = 50051


@dataclass
class IngestConfig:
    model: str
    encoder_addr: str
    server: ServerConfig = field(default_factory=ServerConfig)
    media_io_kwargs: dict | None = None
    mm_processor_kwargs: dict | None = None
    trust_remote_code: bool = False
    allowed_media_domains: list[str] | None = None
    allowed_local_media_path: str | None = None
    allow_private_media_urls: bool = False
    limit_mm_per_prompt: dict[str, int] | None = None
    num_workers: int = 4
    wire_dtype: str = "auto"
    stage_tls: ClientTLS | None = None  # --stage-tls-*: the channel to the encoder
    max_pending_items: int = 256
    encoder_timeout_s: float = 60.0
    # the per-request decode budget and the per-image decode limit (None: MediaPolicy's env default)
    max_request_pixels: int | None = None
    max_request_audio_seconds: float | None = None
    max_image_decode_pixels: int | None = None
    # native decoders in worker processes (0: in the ingest process)
    decode_workers: int = 0
    decode_timeout_s: float = 30.0
    decode_cpu_seconds: int = 30
    decode_memory_mb: int = 8192
    video_backend: str = DEFAULT_VIDEO_BACKEND  # --video-backend: pyav or decord (mmpipe[decord])

    def media_limits(self) -> dict:
        """The MediaPolicy overrides these flags set (only the ones given)."""
        out = {"max_request_pixels": self.max_request_pixels,
               "max_request_audio_seconds": self.max_request_audio_seconds,
               "max_image_decode_pixels": self.max_image_decode_pixels}
        return {k: v for k, v in out.items() if v is not None}

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        ca.add_server_args(p, default_port=DEFAULT_PORT)
        ca.add_model_args(p)
        g = p.add_argument_group("ingest")
        g.add_argument("--encoder-addr", default=ca.env("ENCODER_ADDR"), required=ca.env("ENCODER_ADDR") is None,
                       help="encoder service, host:port or dns:///name:port (env MMPIPE_ENCODER_ADDR)")
        g.add_argument("--redis-url", default=ca.env("REDIS_URL"),
                       help="accepted for symmetry with the other stages; ingest itself never talks to Redis")
        g.add_argument("--allowed-media-domains", nargs="+", default=parse_domain_list(ca.env("ALLOWED_MEDIA_DOMAINS")),
                       help="only fetch media from these hosts (and their subdomains) (env MMPIPE_ALLOWED_MEDIA_DOMAINS, "
                            "comma or space separated)")
        g.add_argument("--allowed-local-media-path", default=ca.env("ALLOWED_LOCAL_MEDIA_PATH"),
                       help="folder whose files may be read via file:// URLs and paths (env "
                            "MMPIPE_ALLOWED_LOCAL_MEDIA_PATH)")
        g.add_argument("--allow-private-media-urls", action="store_true",
                       default=ca.env_bool("MEDIA_ALLOW_PRIVATE_NETWORKS"),
                       help="let http(s) media URLs reach loopback, private, link-local and CGNAT addresses "
                            "(refused by default: SSRF); cloud metadata endpoints stay refused. Trusted "
                            "deployments only (env MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS)")
        g.add_argument("--limit-mm-per-prompt", default=ca.env("LIMIT_MM_PER_PROMPT"),
                       help='JSON, e.g. \'{"image": 4, "video": 1}\': most items per request '
                            "(env MMPIPE_LIMIT_MM_PER_PROMPT)")
        g.add_argument("--num-workers", type=int, default=ca.env_int("INGEST_WORKERS", 4),
                       help="threads fetching, decoding and preprocessing media (env MMPIPE_INGEST_WORKERS)")
        g.add_argument("--max-pending-items", type=int, default=ca.env_int("MAX_PENDING_ITEMS", 256),
                       help="media items in progress (queued for or running on the workers) before Ingest answers "
                            "RESOURCE_EXHAUSTED (env MMPIPE_MAX_PENDING_ITEMS)")
        g.add_argument("--max-request-pixels", type=int, default=None,
                       help="decoded pixels one request's media may take in all (images + video frames), checked from "
                            "the headers before decoding (env MMPIPE_MEDIA_MAX_REQUEST_PIXELS, default 268435456)")
        g.add_argument("--max-request-audio-seconds", type=float, default=None,
                       help="seconds of audio one request may carry in all, checked from the headers before "
                            "decoding (env MMPIPE_MEDIA_MAX_REQUEST_AUDIO_SECONDS, default 1200)")
        g.add_argument("--max-image-decode-pixels", type=int, default=None,
                       help="pixels an image or video frame is decoded to, unless the model keeps more (then 4x its "
                            "max_pixels); larger JPEGs decode downscaled, other formats are refused (env "
                            "MMPIPE_MEDIA_MAX_IMAGE_DECODE_PIXELS, default 16777216)")
        g.add_argument("--decode-workers", type=int, default=ca.env_int("DECODE_WORKERS", 0),
                       help="decode media in this many worker processes, so that a crash or hang in a native decoder "
                            "(Pillow, FFmpeg, libsndfile) costs one item, not the stage; 0 = in the ingest process "
                            "(env MMPIPE_DECODE_WORKERS)")
        g.add_argument("--decode-timeout", type=float, default=ca.env_float("DECODE_TIMEOUT", 30),
                       help="wall-clock seconds one item may take in a decode worker before it is stopped and replaced "
                            "(env MMPIPE_DECODE_TIMEOUT)")
        g.add_argument("--decode-cpu-seconds", type=int, default=ca.env_int("DECODE_CPU_SECONDS", 30),
                       help="CPU seconds one item may use in a decode worker (RLIMIT_CPU; env MMPIPE_DECODE_CPU_SECONDS)")
        g.add_argument("--decode-memory-mb", type=int, default=ca.env_int("DECODE_MEMORY_MB", 8192),
                       help="address space of a decode worker, MB (RLIMIT_AS; 0 = unlimited; env "
                            "MMPIPE_DECODE_MEMORY_MB)")
        g.add_argument("--video-backend", choices=VIDEO_BACKENDS,
                       default=ca.env_choice("VIDEO_BACKEND", DEFAULT_VIDEO_BACKEND, VIDEO_BACKENDS),
                       help="video decoder: pyav (FFmpeg bundled in the PyAV wheel, every platform) or decord "
                            "(x86-64 only: pip install 'mmpipe[decord]'); both sample the same frames (env "
                            "MMPIPE_VIDEO_BACKEND; default %(default)s)")
        g.add_argument("--encoder-timeout", type=float, default=ca.env_float("ENCODER_TIMEOUT", 60),
                       help="deadline in seconds of each Lookup / Encode call to the encoder, shortened to the "
                            "caller's own deadline (env MMPIPE_ENCODER_TIMEOUT)")
        g.add_argument("--wire-dtype", default=ca.env("WIRE_DTYPE", "auto"),
                       help="dtype of floating tensors sent to the encoder (audio features, and pixels of "
                            "processors without a compact uint8 form): auto = float32, or the encoder's --dtype "
                            "(bfloat16/float16) to halve the bytes; the encoder refuses a narrower dtype than its own")
        ca.add_stage_client_args(p)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "IngestConfig":
        limits = ca.json_arg(a.limit_mm_per_prompt, "limit-mm-per-prompt")
        return cls(model=a.model, encoder_addr=a.encoder_addr, server=ca.server_config(a),
                   media_io_kwargs=ca.json_arg(a.media_io_kwargs, "media-io-kwargs"),
                   mm_processor_kwargs=ca.json_arg(a.mm_processor_kwargs, "mm-processor-kwargs"),
                   trust_remote_code=a.trust_remote_code, allowed_media_domains=a.allowed_media_domains,
                   allowed_local_media_path=a.allowed_local_media_path,
                   allow_private_media_urls=bool(a.allow_private_media_urls),
                   limit_mm_per_prompt={k: int(v) for k, v in limits.items()} if limits else None,
                   num_workers=a.num_workers, wire_dtype=a.wire_dtype, stage_tls=ca.stage_client_tls(a), max_pending_items=a.max_pending_items,
                   encoder_timeout_s=a.encoder_timeout, max_request_pixels=a.max_request_pixels,
                   max_request_audio_seconds=a.max_request_audio_seconds,
                   max_image_decode_pixels=a.max_image_decode_pixels, decode_workers=a.decode_workers,
                   decode_timeout_s=a.decode_timeout, decode_cpu_seconds=a.decode_cpu_seconds,
                   decode_memory_mb=a.decode_memory_mb,
                   video_backend=parse_video_backend(a.video_backend, param="video-backend"))
