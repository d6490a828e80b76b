"""EncoderConfig: everything the encoder service takes from its flags (`mmpipe encoder --help`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mmpipe.services.common import cli_args as ca
from mmpipe.services.common.cli_args import ServerConfig
from mmpipe.shared.cache.redis_options import RedisOptions

DEFAULT_PORT = 50052


@dataclass
class EncoderConfig:
    model: str
    redis_url: str
    server: ServerConfig = field(default_factory=ServerConfig)
    dtype: str = "auto"
    device: str = "auto"
    media_io_kwargs: dict | None = None
    mm_processor_kwargs: dict | None = None
    trust_remote_code: bool = False
    enable_mm_embeds: bool = False
    max_batch_items: int = 16
    batch_wait_ms: float = 5.0
    max_queued_items: int = 1024
    cache_ttl_s: int | None = None
    redis_options: RedisOptions | None = None  # AUTH password / TLS files (--redis-password-file, ...)
    # Per-tenant share of the cache for user-supplied embeddings (services/encoder/tenant_share.py): a fraction
    # of the capacity (--cache-capacity-mb, else Redis maxmemory; 0 or unknown: off) per window.
    tenant_cache_share: float = 0.25
    tenant_cache_window_s: float = 600.0
    cache_capacity_mb: float | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        ca.add_server_args(p, default_port=DEFAULT_PORT)
        ca.add_model_args(p)
        ca.add_redis_arg(p)
        g = p.add_argument_group("encoder")
        g.add_argument("--enable-mm-embeds", action="store_true", default=ca.env_bool("ENABLE_MM_EMBEDS"),
                       help="accept user-supplied embeddings (PutEmbeddings) (env MMPIPE_ENABLE_MM_EMBEDS)")
        g.add_argument("--max-batch-items", type=int, default=ca.env_int("MAX_BATCH_ITEMS", 16),
                       help="most items per tower batch (env MMPIPE_MAX_BATCH_ITEMS)")
        g.add_argument("--batch-wait-ms", type=float, default=ca.env_float("BATCH_WAIT_MS", 5.0),
                       help="how long a batch waits for more items (env MMPIPE_BATCH_WAIT_MS)")
        g.add_argument("--max-queued-items", type=int, default=ca.env_int("MAX_QUEUED_ITEMS", 1024),
                       help="items waiting for a tower batch before Encode answers RESOURCE_EXHAUSTED "
                            "(env MMPIPE_MAX_QUEUED_ITEMS)")
        g.add_argument("--tenant-cache-share", type=float, default=ca.env_float("TENANT_CACHE_SHARE", 0.25),
                       help="fraction of the cache one tenant's precomputed embeddings (PutEmbeddings) may fill "
                            "within --tenant-cache-window-s; beyond it 429 / RESOURCE_EXHAUSTED; 0: off "
                            "(env MMPIPE_TENANT_CACHE_SHARE)")
        g.add_argument("--tenant-cache-window-s", type=float, default=ca.env_float("TENANT_CACHE_WINDOW_S", 600),
                       help="the window of --tenant-cache-share (env MMPIPE_TENANT_CACHE_WINDOW_S)")
        g.add_argument("--cache-capacity-mb", type=float, default=ca.env_float("CACHE_CAPACITY_MB", 0) or None,
                       help="the embedding cache's capacity for --tenant-cache-share; default: Redis maxmemory "
                            "(a cluster: set it) (env MMPIPE_CACHE_CAPACITY_MB)")
        g.add_argument("--cache-ttl-s", type=int, default=ca.env_int("CACHE_TTL_S", 0) or None,
                       help="expiry of cached embeddings; default: until evicted (env MMPIPE_CACHE_TTL_S)")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "EncoderConfig":
        return cls(model=a.model, redis_url=a.redis_url, server=ca.server_config(a), dtype=a.dtype, device=a.device,
                   media_io_kwargs=ca.json_arg(a.media_io_kwargs, "media-io-kwargs"),
                   mm_processor_kwargs=ca.json_arg(a.mm_processor_kwargs, "mm-processor-kwargs"),
                   trust_remote_code=a.trust_remote_code, enable_mm_embeds=a.enable_mm_embeds,
                   max_batch_items=a.max_batch_items, batch_wait_ms=a.batch_wait_ms, cache_ttl_s=a.cache_ttl_s,
                   redis_options=ca.redis_options(a),
                   max_queued_items=a.max_queued_items, tenant_cache_share=a.tenant_cache_share,
                   tenant_cache_window_s=a.tenant_cache_window_s, cache_capacity_mb=a.cache_capacity_mb)
