"""The gateway's configuration: one frozen object built from CLI flags, each with an `MMPIPE_*` env default.

Flag names follow `vllm serve` where the meaning is the same (--host, --port, --api-key, --chat-template,
--limit-mm-per-prompt, --enable-mm-embeds, --max-model-len, --allowed-media-domains,
--allowed-local-media-path, --media-io-kwargs, --served-model-name, --enable-auto-tool-choice,
--tool-call-parser). Stdlib only: `mmpipe gateway --help`
must stay fast.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from mmpipe.services.common.cli_args import (add_connection_age_args, add_log_format_arg, add_tracing_arg,
                                             connection_age, env, env_float, env_int)
from mmpipe.services.common.tls import (ClientTLS, ServerTLS, add_client_tls_args, add_server_tls_args,
                                        client_tls_from_args, server_tls_from_args)
from mmpipe.shared.cache.redis_options import RedisOptions
from mmpipe.shared.errors import InvalidInputError
from mmpipe.shared.media.policy import parse_domain_list


def _env(name: str, default: Any = None) -> Any:
    return env(name, default)  # the one reader of MMPIPE_* flag defaults (services/common/cli_args.py)


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).strip().lower() in ("1", "true", "yes", "on")


def _json_dict(value: str | None, flag: str) -> dict[str, Any]:
    if value is None or not str(value).strip():
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{flag} must be a JSON object: {e}", param=flag) from None
    if not isinstance(parsed, dict):
        raise InvalidInputError(f"{flag} must be a JSON object, got {type(parsed).__name__}", param=flag)
    return parsed


ROUTING_LOGICS = ("prefixaware", "roundrobin", "session")


@dataclass(frozen=True)
class RoutingConfig:
    """--routing-logic, --block-size (the generators'), --routing-prefix-blocks, --routing-saturation-threshold,
    --session-key."""

    logic: str = "prefixaware"
    block_size: int = 16
    prefix_blocks: int = 4
    saturation_threshold: int = 0  # in-flight Generate calls per replica; 0: never saturated
    session_key: str | None = None  # the request header that names a session (--routing-logic session)

    def __post_init__(self) -> None:
        if self.logic not in ROUTING_LOGICS:
            raise InvalidInputError(f"--routing-logic must be one of {', '.join(ROUTING_LOGICS)}, got "
                                    f"{self.logic!r}", param="--routing-logic")
        for flag, v, low in (("--block-size", self.block_size, 1), ("--routing-prefix-blocks", self.prefix_blocks, 1),
                             ("--routing-saturation-threshold", self.saturation_threshold, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InvalidInputError(f"{flag} must be an integer >= {low}, got {v!r}", param=flag)
        if self.logic == "session" and not self.session_key:
            raise InvalidInputError("--routing-logic session needs --session-key (the header naming a session)",
                                    param="--session-key")


@dataclass(frozen=True)
class GatewayConfig:
    model: str
    served_model_names: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50050
    ingest_addr: str = "127.0.0.1:50051"
    encoder_addr: str = "127.0.0.1:50052"
    generator_addr: str = "127.0.0.1:50053"  # one replica, or several separated by commas
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # how a request picks a generator replica
    redis_url: str | None = None
    api_key: str | None = None  # one key, or several separated by commas
    # Isolation (docs/security.md, "Isolation"): every accepted key (--api-key list + --api-key-file), each its own
    # tenant; the tenant header is honoured only with --trust-tenant-header (set by a trusted proxy).
    api_keys: tuple[str, ...] = ()
    trust_tenant_header: bool = False
    tenant_header: str = "x-mmpipe-tenant"
    tls: ServerTLS | None = None  # the public gRPC port (--tls-*); the HTTP port stays plaintext
    stage_tls: ClientTLS | None = None  # channels to the stages (--stage-tls-*)
    redis_options: RedisOptions | None = None  # the /health ping to Redis (--redis-password-file, ...)
    chat_template: str | None = None
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    enable_mm_embeds: bool = False
    max_model_len: int | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    allowed_local_media_path: str | None = None
    # Media URLs naming loopback / private / link-local IP literals are refused up front unless set
    # (ingest checks every resolved address itself).
    allow_private_media_urls: bool = False
    # A chat template sent WITH a request is Jinja the client wrote: sandboxed, but nested loops and string
    # repetition can pin a CPU and gigabytes for as long as they like. Refused unless set (as vLLM does).
    trust_request_chat_template: bool = False
    media_io_kwargs: dict[str, Any] = field(default_factory=dict)
    # Tool calls (shared/tools): vLLM's --enable-auto-tool-choice (parse "auto" answers into tool calls) and
    # --tool-call-parser (the output format; also the format "required" / a named function are generated in).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # The stages' --mm-processor-kwargs: the defaults and ceilings a request's own mm_processor_kwargs are checked
    # against here, before any stage works (the stages check them again).
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # Seconds a request may take end to end before it fails with 504.
    request_timeout_s: float = 600.0
    # Requests in flight at once; one more gets 429 at once instead of queueing without bound.
    max_concurrent_requests: int = 256
    # The most samples (`n`) one request may ask for: each is a sequence in the generator's batch.
    max_n: int = 16
    # FastAPI's /docs, /redoc and /openapi.json (on by default, as in vLLM; --disable-fastapi-docs turns them off)
    disable_fastapi_docs: bool = False
    # The HTTP edge (docs/security.md, "Limits"): request bodies above this are a 413 (Content-Length, then
    # while reading); request headers must arrive within header_read_timeout_s and the body within
    # body_read_timeout_s, else 408 and the connection is closed.
    max_request_body_mb: float = 64.0
    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 30.0
    # On SIGTERM, seconds in-flight requests get to finish.
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    log_format: str | None = None  # --log-format text / json; None: text on a terminal, else JSON (common/logs.py)
    # One line per request (services/gateway/access_log.py), except for these paths; False: none at all.
    access_log: bool = True
    access_log_exclude: tuple[str, ...] = ()
    # Gateway processes serving the one HTTP (and gRPC) port (services/gateway/workers.py); 1: this process.
    api_server_count: int = 1
    # OTLP/HTTP URL for the request spans (services/common/tracing.py); None: no tracing.
    otlp_traces_endpoint: str | None = None
    # Let transformers run the model repository's own code for its config and processor (vLLM's flag).
    trust_remote_code: bool = False
    # The public gRPC API's connection age (--grpc-max-connection-age-ms / -grace-ms, services/common/cli_args.py).
    grpc_max_connection_age_ms: int = 300_000
    grpc_max_connection_age_grace_ms: int = 600_000

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        """Every key a client may present (empty: no authentication)."""
        return tuple(dict.fromkeys(self.api_keys + split_api_keys(self.api_key)))

    @property
    def served_model_name(self) -> str:
        """The name `/v1/models` lists and responses carry (vLLM: the first --served-model-name)."""
        return self.served_model_names[0] if self.served_model_names else self.model

    def accepts_model(self, name: str | None) -> bool:
        return not name or name in (self.served_model_names or (self.model,))


def add_cli_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The gateway's flags; every default comes from the matching MMPIPE_* variable when set."""
    p.add_argument("--model", default=_env("MODEL"), required=_env("MODEL") is None,
                   help="model directory or hub id; only its tokenizer, processor and config are loaded "
                        "[MMPIPE_MODEL]")
    p.add_argument("--trust-remote-code", action="store_true", default=_env_bool("TRUST_REMOTE_CODE"),
                   help="run the model repository's own code for its config and processor [MMPIPE_TRUST_REMOTE_CODE]")
    p.add_argument("--served-model-name", nargs="+", default=(_env("SERVED_MODEL_NAME") or "").split() or None,
                   help="name(s) clients use in `model`; the first is listed by /v1/models (default: --model) "
                        "[MMPIPE_SERVED_MODEL_NAME, space separated]")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="HTTP bind address [MMPIPE_HOST]")
    p.add_argument("--port", type=int, default=env_int("PORT", 8000), help="HTTP port [MMPIPE_PORT]")
    p.add_argument("--grpc-port", type=int, default=env_int("GRPC_PORT", 50050),
                   help="port of the public gRPC API, on --host [MMPIPE_GRPC_PORT]")
    p.add_argument("--ingest-addr", default=_env("INGEST_ADDR", "127.0.0.1:50051"),
                   help="host:port of the ingest service [MMPIPE_INGEST_ADDR]")
    p.add_argument("--encoder-addr", default=_env("ENCODER_ADDR", "127.0.0.1:50052"),
                   help="host:port of the encoder service [MMPIPE_ENCODER_ADDR]")
    p.add_argument("--generator-addr", default=_env("GENERATOR_ADDR", "127.0.0.1:50053"),
                   help="host:port of the generator service; several replicas separated by commas, one chosen per "
                        "request by --routing-logic [MMPIPE_GENERATOR_ADDR]")
    g = p.add_argument_group("routing over generator replicas (vLLM production-stack's router flags)")
    g.add_argument("--routing-logic", choices=ROUTING_LOGICS, default=_env("ROUTING_LOGIC", "prefixaware"),
                   help="prefixaware: requests sharing their first blocks go to the same replica (its prefix cache "
                        "holds them); session: by the --session-key header; roundrobin [MMPIPE_ROUTING_LOGIC]")
    g.add_argument("--session-key", default=_env("SESSION_KEY"),
                   help="request header naming a session, for --routing-logic session [MMPIPE_SESSION_KEY]")
    g.add_argument("--block-size", type=int, default=env_int("BLOCK_SIZE", 16),
                   help="the generators' KV block size (their --block-size): prefixaware keys full blocks of it "
                        "[MMPIPE_BLOCK_SIZE]")
    g.add_argument("--routing-prefix-blocks", type=int, default=env_int("ROUTING_PREFIX_BLOCKS", 4),
                   help="prefixaware hashes the prompt's first N full blocks (fewer when shorter) "
                        "[MMPIPE_ROUTING_PREFIX_BLOCKS]")
    g.add_argument("--routing-saturation-threshold", type=int,
                   default=env_int("ROUTING_SATURATION_THRESHOLD", 0),
                   help="a replica with this many requests in flight from this gateway is saturated: its requests "
                        "go to the least loaded replica; 0: never [MMPIPE_ROUTING_SATURATION_THRESHOLD]")
    p.add_argument("--redis-url", default=_env("REDIS_URL"),
                   help="the shared embedding cache; when set, /health also checks that it answers "
                        "[MMPIPE_REDIS_URL]")
    p.add_argument("--api-key", default=_env("API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* and on the gRPC API; several keys separated "
                        "by commas, each its own tenant (prefer --api-key-file: argv is visible in `ps`) "
                        "[MMPIPE_API_KEY]")
    p.add_argument("--api-key-file", default=_env("API_KEY_FILE"),
                   help="file with one API key per line (# comments), each its own tenant [MMPIPE_API_KEY_FILE]")
    p.add_argument("--trust-tenant-header", action="store_true", default=_env_bool("TRUST_TENANT_HEADER"),
                   help="take the tenant from the X-MMPipe-Tenant header; only behind a proxy that sets it and strips "
                        "it from client requests [MMPIPE_TRUST_TENANT_HEADER]")
    add_server_tls_args(p.add_argument_group("gRPC TLS of the public gRPC API"))
    add_client_tls_args(p.add_argument_group("gRPC TLS to the stages"))
    r = p.add_argument_group("redis auth and tls (the /health check)")
    r.add_argument("--redis-password-file", default=_env("REDIS_PASSWORD_FILE"),
                   help="file whose first line is the Redis password (or MMPIPE_REDIS_PASSWORD) "
                        "[MMPIPE_REDIS_PASSWORD_FILE]")
    r.add_argument("--redis-tls-ca-file", default=_env("REDIS_TLS_CA_FILE"), help="[MMPIPE_REDIS_TLS_CA_FILE]")
    r.add_argument("--redis-tls-cert-file", default=_env("REDIS_TLS_CERT_FILE"), help="[MMPIPE_REDIS_TLS_CERT_FILE]")
    r.add_argument("--redis-tls-key-file", default=_env("REDIS_TLS_KEY_FILE"), help="[MMPIPE_REDIS_TLS_KEY_FILE]")
    p.add_argument("--chat-template", default=_env("CHAT_TEMPLATE"),
                   help="chat template file or inline Jinja text (default: the model's own) [MMPIPE_CHAT_TEMPLATE]")
    p.add_argument("--limit-mm-per-prompt", default=_env("LIMIT_MM_PER_PROMPT"),
                   help='JSON, e.g. \'{"image": 2, "video": 1}\' [MMPIPE_LIMIT_MM_PER_PROMPT]')
    p.add_argument("--enable-mm-embeds", action="store_true", default=_env_bool("ENABLE_MM_EMBEDS"),
                   help="accept precomputed embeddings (image_embeds parts) [MMPIPE_ENABLE_MM_EMBEDS]")
    p.add_argument("--max-model-len", type=int, default=env_int("MAX_MODEL_LEN", 0) or None,
                   help="context length (default: the model's) [MMPIPE_MAX_MODEL_LEN]")
    p.add_argument("--allowed-media-domains", nargs="+", default=parse_domain_list(_env("ALLOWED_MEDIA_DOMAINS")),
                   help="hosts media URLs may point at; the gateway refuses others before any stage work "
                        "(ingest enforces its own list too) [MMPIPE_ALLOWED_MEDIA_DOMAINS, comma or space separated]")
    p.add_argument("--allowed-local-media-path", default=_env("ALLOWED_LOCAL_MEDIA_PATH"),
                   help="folder file:// media may come from; without it file:// URLs are refused "
                        "[MMPIPE_ALLOWED_LOCAL_MEDIA_PATH]")
    p.add_argument("--allow-private-media-urls", action="store_true",
                   default=_env_bool("MEDIA_ALLOW_PRIVATE_NETWORKS"),
                   help="accept media URLs naming loopback, private, link-local or CGNAT addresses (refused by "
                        "default: SSRF); give ingest the same flag. Trusted deployments only "
                        "[MMPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS]")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   default=_env_bool("TRUST_REQUEST_CHAT_TEMPLATE"),
                   help="accept a chat_template sent in the request body (client-written Jinja: a CPU and memory "
                        "DoS vector); refused by default [MMPIPE_TRUST_REQUEST_CHAT_TEMPLATE]")
    p.add_argument("--media-io-kwargs", default=_env("MEDIA_IO_KWARGS"),
                   help='JSON per modality, e.g. \'{"video": {"num_frames": 8}}\'; sent to ingest with every '
                        'request; the defaults a request\'s own media_io_kwargs overlay [MMPIPE_MEDIA_IO_KWARGS]')
    p.add_argument("--enable-auto-tool-choice", action="store_true", default=_env_bool("ENABLE_AUTO_TOOL_CHOICE"),
                   help='let the model decide when to call tools (tool_choice "auto", the default when a request '
                        'has tools); needs --tool-call-parser [MMPIPE_ENABLE_AUTO_TOOL_CHOICE]')
    p.add_argument("--tool-call-parser", default=_env("TOOL_CALL_PARSER"),
                   help="format of the model's tool calls, parsed into message.tool_calls (hermes: "
                        "<tool_call>{json}</tool_call> of the Qwen families) [MMPIPE_TOOL_CALL_PARSER]")
    p.add_argument("--mm-processor-kwargs", default=_env("MM_PROCESSOR_KWARGS"),
                   help='JSON, the stages\' --mm-processor-kwargs (e.g. \'{"max_pixels": 1003520}\'): the defaults and '
                        'ceilings a request\'s mm_processor_kwargs are checked against [MMPIPE_MM_PROCESSOR_KWARGS]')
    p.add_argument("--request-timeout", type=float, default=env_float("REQUEST_TIMEOUT", 600),
                   help="seconds before a request fails with 504 [MMPIPE_REQUEST_TIMEOUT]")
    p.add_argument("--max-concurrent-requests", type=int, default=env_int("MAX_CONCURRENT_REQUESTS", 256),
                   help="requests in flight before new ones get 429 [MMPIPE_MAX_CONCURRENT_REQUESTS]")
    p.add_argument("--max-n", type=int, default=env_int("MAX_N", 16),
                   help="the most samples (n) one request may ask for [MMPIPE_MAX_N]")
    p.add_argument("--max-request-body-mb", type=float, default=env_float("MAX_REQUEST_BODY_MB", 64),
                   help="largest HTTP request body in MiB; larger is a 413, from Content-Length or while reading "
                        "[MMPIPE_MAX_REQUEST_BODY_MB]")
    p.add_argument("--header-read-timeout", type=float, default=env_float("HEADER_READ_TIMEOUT", 10),
                   help="seconds a client has to send a request's headers (from connecting, or from the previous "
                        "response); then 408 and the connection is closed [MMPIPE_HEADER_READ_TIMEOUT]")
    p.add_argument("--body-read-timeout", type=float, default=env_float("BODY_READ_TIMEOUT", 30),
                   help="seconds a client has to send a request's body once its headers arrived; then 408 "
                        "[MMPIPE_BODY_READ_TIMEOUT]")
    p.add_argument("--shutdown-grace-s", type=float, default=env_float("SHUTDOWN_GRACE_S", 30),
                   help="on SIGTERM, seconds in-flight requests get to finish [MMPIPE_SHUTDOWN_GRACE_S]")
    add_connection_age_args(p.add_argument_group("gRPC connection age of the public gRPC API"))
    p.add_argument("--api-server-count", type=int, default=env_int("API_SERVER_COUNT", 1),
                   help="gateway processes serving the one --port and --grpc-port (vLLM's flag); their metrics are "
                        "merged on /metrics, process metrics labelled by worker [MMPIPE_API_SERVER_COUNT]")
    p.add_argument("--disable-fastapi-docs", action="store_true", default=_env_bool("DISABLE_FASTAPI_DOCS"),
                   help="do not serve FastAPI's /docs, /redoc and /openapi.json (vLLM's flag) "
                        "[MMPIPE_DISABLE_FASTAPI_DOCS]")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   type=str.lower, choices=("debug", "info", "warning", "error"), help="[MMPIPE_LOG_LEVEL]")
    add_log_format_arg(p)
    p.add_argument("--disable-access-log", "--disable-uvicorn-access-log", dest="disable_access_log",
                   action="store_true", default=_env_bool("DISABLE_ACCESS_LOG"),
                   help="no access-log line per request (method, path, status, latency, tokens, request id; HTTP and "
                        "gRPC); the second name is vLLM's [MMPIPE_DISABLE_ACCESS_LOG]")
    p.add_argument("--disable-access-log-for-endpoints", default=_env("DISABLE_ACCESS_LOG_FOR_ENDPOINTS"),
                   help="comma-separated HTTP paths without an access-log line, e.g. /health,/metrics (vLLM's flag) "
                        "[MMPIPE_DISABLE_ACCESS_LOG_FOR_ENDPOINTS]")
    add_tracing_arg(p)
    return p


def split_addrs(value: str | Sequence[str]) -> tuple[str, ...]:
    """`a:1,b:2` (or a list) -> ("a:1", "b:2"); at least one, no duplicates."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    addrs = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not addrs:
        raise InvalidInputError("--generator-addr names no generator", param="--generator-addr")
    return addrs


def _paths(value: str | None) -> tuple[str, ...]:
    """--disable-access-log-for-endpoints: each a path starting with '/'."""
    out = tuple(p.strip() for p in (value or "").split(",") if p.strip())
    for p in out:
        if not p.startswith("/"):
            raise InvalidInputError(f"--disable-access-log-for-endpoints: {p!r} is not a path (starts with '/')",
                                    param="--disable-access-log-for-endpoints")
    return out


def split_api_keys(value: str | None) -> tuple[str, ...]:
    """`--api-key a,b` -> ("a", "b"); keys never contain commas or whitespace."""
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(split_api_keys(args.api_key))
    path = getattr(args, "api_key_file", None)
    if path:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise InvalidInputError(f"--api-key-file: cannot read {path}: {e.strerror or e}",
                                    param="--api-key-file") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise InvalidInputError(f"--api-key-file {path} holds no key", param="--api-key-file")
    for k in keys:
        if any(c.isspace() or c == "," for c in k):
            raise InvalidInputError("an API key may not contain whitespace or commas", param="--api-key")
    return tuple(dict.fromkeys(keys))


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    limits = _json_dict(args.limit_mm_per_prompt, "--limit-mm-per-prompt")
    for k, v in limits.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidInputError(f"--limit-mm-per-prompt: {k!r} must be a non-negative integer, got {v!r}",
                                    param="--limit-mm-per-prompt")
    from mmpipe.shared.tools.plan import ToolSettings  # pure Python; checks the pair of flags and the name

    tools = ToolSettings(bool(getattr(args, "enable_auto_tool_choice", False)),
                         getattr(args, "tool_call_parser", None) or None)
    for flag in ("max_request_body_mb", "header_read_timeout", "body_read_timeout"):
        value = getattr(args, flag, 1.0)
        if not value > 0:
            name = "--" + flag.replace("_", "-")
            raise InvalidInputError(f"{name} must be positive, got {value!r}", param=name)
    count = getattr(args, "api_server_count", 1)
    if not isinstance(count, int) or count < 1:
        raise InvalidInputError(f"--api-server-count must be at least 1, got {count!r}", param="--api-server-count")
    split_addrs(args.generator_addr)  # at least one replica
    return GatewayConfig(
        model=args.model,
        served_model_names=tuple(args.served_model_name or ()),
        host=args.host, port=args.port, grpc_port=args.grpc_port,
        ingest_addr=args.ingest_addr, encoder_addr=args.encoder_addr, generator_addr=args.generator_addr,
        routing=RoutingConfig(logic=getattr(args, "routing_logic", "prefixaware"),
                              block_size=getattr(args, "block_size", 16),
                              prefix_blocks=getattr(args, "routing_prefix_blocks", 4),
                              saturation_threshold=getattr(args, "routing_saturation_threshold", 0),
                              session_key=getattr(args, "session_key", None) or None),
        redis_url=args.redis_url or None, api_keys=_api_keys(args), chat_template=args.chat_template,
        trust_tenant_header=bool(args.trust_tenant_header),
        tls=server_tls_from_args(args), stage_tls=client_tls_from_args(args),
        redis_options=RedisOptions.load(password_file=getattr(args, "redis_password_file", None),
                                        tls_ca_file=getattr(args, "redis_tls_ca_file", None),
                                        tls_cert_file=getattr(args, "redis_tls_cert_file", None),
                                        tls_key_file=getattr(args, "redis_tls_key_file", None)),
        limit_mm_per_prompt=limits, enable_mm_embeds=bool(args.enable_mm_embeds),
        max_model_len=args.max_model_len,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_private_media_urls=bool(args.allow_private_media_urls),
        trust_request_chat_template=bool(args.trust_request_chat_template),
        media_io_kwargs=_json_dict(args.media_io_kwargs, "--media-io-kwargs"),
        enable_auto_tool_choice=tools.enable_auto_tool_choice, tool_call_parser=tools.tool_call_parser,
        mm_processor_kwargs=_json_dict(getattr(args, "mm_processor_kwargs", None), "--mm-processor-kwargs"),
        request_timeout_s=args.request_timeout, max_concurrent_requests=args.max_concurrent_requests,
        max_n=args.max_n, disable_fastapi_docs=bool(getattr(args, "disable_fastapi_docs", False)),
        max_request_body_mb=getattr(args, "max_request_body_mb", 64.0),
        header_read_timeout_s=getattr(args, "header_read_timeout", 10.0),
        body_read_timeout_s=getattr(args, "body_read_timeout", 30.0),
        shutdown_grace_s=args.shutdown_grace_s, log_level=args.log_level, api_server_count=count,
        log_format=getattr(args, "log_format", None), access_log=not getattr(args, "disable_access_log", False),
        access_log_exclude=_paths(getattr(args, "disable_access_log_for_endpoints", None)),
        otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None),
        trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
        grpc_max_connection_age_ms=connection_age(args)[0], grpc_max_connection_age_grace_ms=connection_age(args)[1],
    )
