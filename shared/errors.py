"""The one exception hierarchy of mmpipe, and the one table that maps it to HTTP and gRPC status codes.

Every layer raises these; transports (gateway HTTP handlers, gRPC interceptors) translate them with
`http_status` / `grpc_code_name` so the two wire protocols can never disagree. Bad input is always the
client's fault (4xx / INVALID_ARGUMENT ...), never a 500.
"""
from __future__ import annotations


class MMPipeError(Exception):
    """Base class. `param` names the offending request field where one can be named."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInputError(MMPipeError):
    """The request is malformed: wrong shapes, unknown modality, bad base64, bad media_io_kwargs."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class LimitExceededError(InvalidInputError):
    """More media items than `limit_mm_per_prompt` allows, a prompt longer than max_model_len, ..."""


class RequestTooLargeError(LimitExceededError):
    """A request body larger than --max-request-body-mb (HTTP 413; the client's fault, never retryable)."""

    http_status = 413


class ClientTimeoutError(InvalidInputError):
    """The client sent its request headers or body too slowly (--header-read-timeout / --body-read-timeout):
    HTTP 408, and the connection is closed."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class MediaDecodeError(InvalidInputError):
    """Media that could not be decoded (truncated, corrupt or of an unsupported format)."""


class MediaFetchError(InvalidInputError):
    """A media URL that could not be fetched (404, connection refused, too large)."""


class MediaPolicyError(InvalidInputError):
    """A fetch refused by policy: domain not allowed, redirect refused, path outside the allowed folder."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    error_type = "permission_error"


class MediaTimeoutError(MMPipeError):
    """Fetching media took longer than the configured timeout."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout_error"


class NotCachedError(InvalidInputError):
    """A media item given only by UUID whose embedding is not in the cache."""


class UnsupportedError(InvalidInputError):
    """A feature the loaded model or configuration does not support (e.g. audio on an image-only model)."""


class ModelLoadError(MMPipeError):
    """The model's files cannot give a stage its weights: a needed tensor missing from the checkpoint, a shape
    that does not match the config, a parameter no stage owns. The deployment's fault, never the client's."""


class NotFoundError(MMPipeError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "not_found_error"


class AuthenticationError(MMPipeError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "authentication_error"


class OverloadedError(MMPipeError):
    """A bounded queue is full: retry later."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"


class QuotaExceededError(OverloadedError):
    """One tenant's share of a shared resource (the embedding cache) is used up: 429, retry once its entries
    age out; other tenants are not affected."""


class ServiceUnavailableError(MMPipeError):
    """A stage is down or not ready: retryable."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable"


class EngineWorkerError(ServiceUnavailableError):
    """A tensor-parallel worker process of the engine died or failed: the engine cannot step any more (503;
    the generator's health turns to NOT_SERVING and the process is restarted)."""


class CancelledError(MMPipeError):
    """The request was cancelled (client went away)."""

    http_status = 499
    grpc_code = "CANCELLED"
    error_type = "cancelled"


# grpc code name -> exception class, for turning a remote error back into the same domain error.
_BY_GRPC_CODE: dict[str, type[MMPipeError]] = {
    "INVALID_ARGUMENT": InvalidInputError,
    "PERMISSION_DENIED": MediaPolicyError,
    "DEADLINE_EXCEEDED": MediaTimeoutError,
    "NOT_FOUND": NotFoundError,
    "UNAUTHENTICATED": AuthenticationError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "UNAVAILABLE": ServiceUnavailableError,
    "CANCELLED": CancelledError,
}


def error_from_grpc_code(code_name: str, message: str) -> MMPipeError:
    """Rebuild a domain error from a gRPC status seen on the client side of a stage call."""
    return _BY_GRPC_CODE.get(code_name, MMPipeError)(message)


def openai_error_body(err: MMPipeError) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": _utf8_safe(err.message), "type": err.error_type,
                      "param": None if err.param is None else _utf8_safe(err.param), "code": err.http_status}}


def _utf8_safe(text: object) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates a client sent) backslash-escaped: the JSON of an
    error that quotes user input must never fail to encode (a 500 instead of the 400)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


# gRPC sends metadata values as HTTP/2 headers: printable ASCII only (a non-ASCII value fails the whole call
# with INTERNAL), and trailers above the peer's metadata limit (8 KiB by default) turn the status into
# RESOURCE_EXHAUSTED. User text (a uuid, a dict key, a URL) can end up in a message or a param, so what goes on
# the wire is escaped to ASCII and truncated, here, once.
MAX_WIRE_MESSAGE_CHARS = 1024
MAX_WIRE_PARAM_CHARS = 128


def wire_text(text: object, limit: int = MAX_WIRE_MESSAGE_CHARS) -> str:
    """`text` as printable ASCII (other characters backslash-escaped) of at most `limit` characters."""
    s = str(text).encode("ascii", "backslashreplace").decode("ascii")
    s = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in s)
    return s if len(s) <= limit else s[:limit - 15] + "... (truncated)"
