"""Bridge settings: one frozen object built by the CLI (or a test) and handed to ``create_app``.

Each setting is declared once here (flag, GLMSERVE_* variable, type, default, help); the
``http-bridge`` parser, the environment fallback and the flag tables in the docs are generated
from it. Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.settings import Cli, log_format_setting, log_level_setting, setting

DEFAULT_BACKEND = "127.0.0.1:50051"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 600.0


@dataclass(frozen=True)
class Settings:
    """Everything the HTTP bridge needs to know; docs/bridge.md's flag table is rendered from it.

    BRIDGE_ in the host/port/drain variables: GLMSERVE_HOST/PORT/DRAIN_SECONDS belong to the
    model server, and both processes often share one environment.
    """

    backends: tuple[str, ...] = setting(
        (DEFAULT_BACKEND,),
        flag="--backend",
        env="GLMSERVE_BACKEND",
        metavar="TARGET",
        help="gRPC target(s) of the model server(s); repeat the flag or comma-separate. "
        "`host:port` / `dns:///name:port` (system resolver) or `dns://DNS-IP:PORT/name:port` "
        "names are resolved again every `--backend-resolve-seconds`, one connection per "
        "address; `ipv4:`, `ipv6:`, `unix:` and IP literals are fixed",
    )
    backend_routing: str = setting(
        "least-loaded",
        flag="--backend-routing",
        env="GLMSERVE_BACKEND_ROUTING",
        choices=("least-loaded", "round-robin"),
        help="which healthy backend gets each call: `least-loaded` (fewest of this bridge's "
        "calls in flight) or `round-robin`",
    )
    backend_resolve_seconds: float = setting(
        5.0,
        flag="--backend-resolve-seconds",
        env="GLMSERVE_BACKEND_RESOLVE_SECONDS",
        help="how often DNS backend names are resolved again: new addresses get calls, gone "
        "ones get no new calls and are closed once their calls end",
    )
    backend_accept_timeout: float = setting(
        5.0,
        flag="--backend-accept-timeout",
        env="GLMSERVE_BACKEND_ACCEPT_TIMEOUT",
        help="seconds a model server may take to accept a call (its response headers, sent "
        "before queueing); past it, or on `UNAVAILABLE` before any token, the call moves to "
        "another backend (when there is one)",
    )
    backend_ca: str | None = setting(
        None,
        flag="--backend-ca",
        env="GLMSERVE_BACKEND_CA",
        metavar="FILE",
        help="PEM CA bundle that signed the model servers' certificates; "
        "given, the channel speaks TLS",
        default_text="off (plaintext)",
    )
    backend_cert: str | None = setting(
        None,
        flag="--backend-cert",
        env="GLMSERVE_BACKEND_CERT",
        metavar="FILE",
        help="PEM client certificate chain for mutual TLS (with `--backend-key`)",
        default_text="off",
    )
    backend_key: str | None = setting(
        None,
        flag="--backend-key",
        env="GLMSERVE_BACKEND_KEY",
        metavar="FILE",
        help="PEM private key of `--backend-cert`",
        default_text="off",
    )
    backend_token_file: str | None = setting(
        None,
        flag="--backend-token-file",
        env="GLMSERVE_BACKEND_TOKEN_FILE",
        metavar="FILE",
        help="file holding the model servers' `--auth-token-file` token, "
        "sent as `authorization: Bearer <token>` on every call",
        default_text="off",
    )
    host: str = setting(
        "127.0.0.1", flag="--host", env="GLMSERVE_BRIDGE_HOST", help="address to bind"
    )
    port: int = setting(8000, flag="--port", env="GLMSERVE_BRIDGE_PORT", help="HTTP port")
    # Empty: no authentication. Otherwise every /v1 route needs one of these bearer keys.
    api_keys: tuple[str, ...] = setting(
        (),
        flag="--api-key",
        env="GLMSERVE_API_KEYS",
        metavar="KEY",
        help="when any key is set, every `/v1` route needs `Authorization: Bearer <key>` "
        "(prefer the variable: flags show up in `ps`)",
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        flag="--cors-origin",
        env="GLMSERVE_CORS_ORIGINS",
        metavar="ORIGIN",
        help="browser origins allowed to call the API (`*` for any); "
        "no CORS headers at all when unset",
    )
    max_request_bytes: int = setting(
        DEFAULT_MAX_REQUEST_BYTES,
        flag="--max-request-bytes",
        env="GLMSERVE_MAX_REQUEST_BYTES",
        help="larger request bodies get 413",
    )
    # Seconds; becomes the deadline of every Chat RPC (the whole stream must finish in it).
    request_timeout: float = setting(
        DEFAULT_REQUEST_TIMEOUT,
        flag="--request-timeout",
        env="GLMSERVE_REQUEST_TIMEOUT",
        help="seconds; the deadline of each Chat RPC, covering the whole stream. "
        "Past it: 504 (or an error chunk if the stream had started)",
    )
    rate_limit: str | None = setting(
        None,
        flag="--rate-limit",
        env="GLMSERVE_RATE_LIMIT",
        metavar="RATE",
        help="requests per key (API key, else client IP) to `/v1/chat/completions` and "
        "`/v1/completions` (one budget), in the "
        "`limits` syntax: `5/minute`, `10/second;100/minute`; moving window; over it: 429",
    )
    token_rate_limit: str | None = setting(
        None,
        flag="--token-rate-limit",
        env="GLMSERVE_TOKEN_RATE_LIMIT",
        metavar="RATE",
        help="tokens (each distinct prompt once + completion) per key, same syntax, fixed "
        "window; charged as "
        "each choice finishes, so the last request may overshoot; over it: 429",
    )
    max_concurrent_per_key: int | None = setting(
        None,
        flag="--max-concurrent-per-key",
        env="GLMSERVE_MAX_CONCURRENT_PER_KEY",
        metavar="N",
        help="open `/v1/chat/completions` and `/v1/completions` requests (streams included) "
        "per key; the next: 429",
    )
    # Serve the chat page at / and /static when the static directory exists.
    ui: bool = setting(
        True,
        flag="--no-ui",
        env="GLMSERVE_NO_UI",
        help="do not serve the chat page (`/`, `/static/*`)",
    )
    health_details: bool = setting(
        False,
        flag="--health-details",
        env="GLMSERVE_HEALTH_DETAILS",
        help="`/health` also lists the backend targets (for operators); by default it answers "
        'only `{"status": ...}`',
    )
    metrics_require_key: bool = setting(
        False,
        flag="--metrics-require-key",
        env="GLMSERVE_METRICS_REQUIRE_KEY",
        help="`/metrics` needs an `--api-key` too (Prometheus: `authorization` bearer token)",
    )
    api_docs: bool = setting(
        False,
        flag="--api-docs",
        env="GLMSERVE_API_DOCS",
        help="serve the interactive API docs (`/docs`, `/redoc`); `/openapi.json` is always served",
    )
    # grpc.health.v1 service name the client-side health checks watch ("" = whole server).
    health_service: str = ""
    # HTTP/2 keepalive ping interval towards the backends, seconds (0 disables): a backend
    # that stops answering (SIGSTOP, a dead host) loses its connection 5 s after a ping.
    keepalive_seconds: float = 10.0
    # Upper bound of grpc's reconnect backoff, so a restarted backend is picked up in seconds.
    max_reconnect_backoff_seconds: float = 2.0
    drain_seconds: float = setting(
        30.0,
        flag="--drain-seconds",
        env="GLMSERVE_BRIDGE_DRAIN_SECONDS",
        help="on SIGTERM, how long open requests (streams) may finish; streams still open then "
        "get an error chunk and `data: [DONE]`",
    )
    stream_write_timeout: float = setting(
        60.0,
        flag="--stream-write-timeout",
        env="GLMSERVE_STREAM_WRITE_TIMEOUT",
        help="seconds a stream may wait for a client that does not read (its socket buffers "
        "full); then the connection is closed and the generation cancelled",
    )
    backend_idle_timeout: float = setting(
        60.0,
        flag="--backend-idle-timeout",
        env="GLMSERVE_BACKEND_IDLE_TIMEOUT",
        help="seconds without a message from the model server (queueing included) before the "
        "call is cancelled: 504, or an error chunk if the stream had started",
    )
    max_connections: int | None = setting(
        None,
        flag="--max-connections",
        env="GLMSERVE_MAX_CONNECTIONS",
        metavar="N",
        help="open HTTP connections (or requests) at most; beyond it uvicorn answers a plain "
        "503 (`limit_concurrency`)",
    )
    log_level: str = log_level_setting(
        "`debug`, `info`, `warning`, `error`; info: one structured line per `/v1` request "
        "(`http_bridge.access`: method, path, status, duration_ms, request_id); `/health`, "
        "`/metrics` and the page only at debug"
    )
    log_format: str = log_format_setting()

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("at least one --backend target is required")
        if self.request_timeout <= 0:
            raise ValueError("--request-timeout must be > 0")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if self.max_concurrent_per_key is not None and self.max_concurrent_per_key < 1:
            raise ValueError("--max-concurrent-per-key must be >= 1")
        if self.stream_write_timeout <= 0:
            raise ValueError("--stream-write-timeout must be > 0")
        if self.backend_idle_timeout <= 0:
            raise ValueError("--backend-idle-timeout must be > 0")
        if self.backend_resolve_seconds <= 0:
            raise ValueError("--backend-resolve-seconds must be > 0")
        if self.backend_accept_timeout <= 0:
            raise ValueError("--backend-accept-timeout must be > 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("--max-connections must be >= 1")


CLI = Cli(
    Settings,
    prog="http-bridge",
    description="glmserve HTTP bridge: the OpenAI chat-completions API in front of one or more "
    "gRPC model servers.",
)
