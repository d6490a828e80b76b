"""GeneratorConfig: everything the generator service takes from its flags (`mmpipe generator --help`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mmpipe.services.common import cli_args as ca
from mmpipe.services.common.cli_args import ServerConfig
from mmpipe.shared.cache.redis_options import RedisOptions

DEFAULT_PORT = 50053


@dataclass
class GeneratorConfig:
    model: str
    redis_url: str
    server: ServerConfig = field(default_factory=ServerConfig)
    dtype: str = "auto"
    device: str = "auto"
    mm_processor_kwargs: dict | None = None
    trust_remote_code: bool = False
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_blocks: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_waiting: int = 1024
    engine_process: bool = True  # the engine steps in its own process (engine_setup.py)
    redis_options: RedisOptions | None = None  # AUTH password / TLS files (--redis-password-file, ...)
    stream_interval: int = 1  # tokens per Generate message (--stream-interval; stream_interval.py)
    tensor_parallel_size: int = 1  # ranks the LM is sharded over (shared/engine/tp/)

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        ca.add_server_args(p, default_port=DEFAULT_PORT)
        ca.add_model_args(p)
        ca.add_redis_arg(p)
        g = p.add_argument_group("engine")
        g.add_argument("--max-model-len", type=int, default=ca.env_int("MAX_MODEL_LEN", 0) or None,
                       help="prompt + output tokens per sequence; default: the model's (env MMPIPE_MAX_MODEL_LEN)")
        g.add_argument("--max-num-seqs", type=int, default=ca.env_int("MAX_NUM_SEQS", 64))
        g.add_argument("--max-num-batched-tokens", type=int, default=ca.env_int("MAX_NUM_BATCHED_TOKENS", 2048))
        g.add_argument("--kv-cache-blocks", type=int, default=ca.env_int("KV_CACHE_BLOCKS", 0) or None)
        g.add_argument("--block-size", type=int, default=ca.env_int("BLOCK_SIZE", 16))
        g.add_argument("--gpu-memory-utilization", type=float, default=ca.env_float("GPU_MEMORY_UTILIZATION", 0.9))
        g.add_argument("--enforce-eager", action="store_true", default=ca.env_bool("ENFORCE_EAGER"),
                       help="no CUDA graphs")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=ca.env_bool("ENABLE_PREFIX_CACHING", True),
                       help="reuse the KV cache of shared prompt prefixes, media included (default on; env "
                            "MMPIPE_ENABLE_PREFIX_CACHING)")
        g.add_argument("--tensor-parallel-size", "-tp", type=_at_least_one,
                       default=str(ca.env("TENSOR_PARALLEL_SIZE", 1)),
                       help="shard the LM over N ranks (vLLM's flag): the engine runs rank 0 and starts N - 1 worker "
                            "processes, one per GPU (cuda:0..N-1) on CUDA, each reading only its shard of the "
                            "weights (env MMPIPE_TENSOR_PARALLEL_SIZE)")
        g.add_argument("--max-waiting", type=int, default=ca.env_int("MAX_WAITING", 1024),
                       help="requests queued before RESOURCE_EXHAUSTED (env MMPIPE_MAX_WAITING)")
        g.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                       default=ca.env_bool("ENABLE_ENGINE_PROCESS", True),
                       help="step the engine in its own process, so that it never waits on this process's GIL "
                            "(gRPC, asyncio); --no-engine-process steps it in a thread here, for debugging "
                            "(env MMPIPE_ENABLE_ENGINE_PROCESS, after vLLM's VLLM_ENABLE_V1_MULTIPROCESSING)")
        g = p.add_argument_group("streaming")
        g.add_argument("--stream-interval", type=_at_least_one, default=str(ca.env("STREAM_INTERVAL", 1)),
                       help="tokens buffered before a Generate message is sent (vLLM's flag): 1 sends every token; N "
                            "sends the first token at once, then every N tokens, and the last message at once, so "
                            "the gateway receives N times fewer messages (env MMPIPE_STREAM_INTERVAL)")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "GeneratorConfig":
        return cls(model=a.model, redis_url=a.redis_url, server=ca.server_config(a), dtype=a.dtype, device=a.device,
                   mm_processor_kwargs=ca.json_arg(a.mm_processor_kwargs, "mm-processor-kwargs"),
                   trust_remote_code=a.trust_remote_code, max_model_len=a.max_model_len,
                   max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                   kv_cache_blocks=a.kv_cache_blocks, block_size=a.block_size,
                   gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager,
                   enable_prefix_caching=a.enable_prefix_caching, max_waiting=a.max_waiting,
                   engine_process=a.engine_process, redis_options=ca.redis_options(a),
                   stream_interval=a.stream_interval, tensor_parallel_size=a.tensor_parallel_size)


def _at_least_one(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
