"""Bridge settings: one frozen object built by the CLI (or a test) and handed to ``create_app``.

Kept free of argparse and environment lookups so that tests can build an app directly.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BACKEND = "127.0.0.1:50051"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 600.0


@dataclass(frozen=True)
class Settings:
    """Everything the HTTP bridge needs to know; see docs/bridge.md for the flag table."""

    backends: tuple[str, ...] = (DEFAULT_BACKEND,)
    host: str = "127.0.0.1"
    port: int = 8000
    # Empty: no authentication. Otherwise every /v1 route needs one of these bearer keys.
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Seconds; becomes the deadline of every Chat RPC (the whole stream must finish in it).
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # Serve the chat page at / and /static when the static directory exists.
    ui: bool = True
    # grpc.health.v1 service name the client-side health checks watch ("" = whole server).
    health_service: str = ""
    # HTTP/2 keepalive ping interval towards the backends, seconds (0 disables).
    keepalive_seconds: float = 30.0
    # Upper bound of grpc's reconnect backoff, so a restarted backend is picked up in seconds.
    max_reconnect_backoff_seconds: float = 2.0
    # On SIGTERM, how long open requests (streams) may finish before they are cut.
    drain_seconds: float = 30.0
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("at least one --backend target is required")
        if self.request_timeout <= 0:
            raise ValueError("--request-timeout must be > 0")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
