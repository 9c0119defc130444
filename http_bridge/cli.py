"""``http-bridge``: flags (each with a GLMSERVE_* environment fallback) → Settings → uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence

from glmserve.logs import setup_logging
from http_bridge.settings import (
    DEFAULT_BACKEND,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    Settings,
)

log = logging.getLogger("http_bridge")

_TRUE = {"1", "true", "yes", "on"}


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def e(name: str, default: object = None) -> object:
        return env.get("GLMSERVE_" + name, default)

    p = argparse.ArgumentParser(
        prog="http-bridge",
        description="glmserve HTTP bridge: the OpenAI chat-completions API in front of one or "
        "more gRPC model servers. Each flag falls back to the environment variable in [brackets]; "
        "a flag given on the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--backend",
        action="append",
        default=argparse.SUPPRESS,
        metavar="TARGET",
        help="gRPC target of a model server; repeat it (or separate with commas) for several, "
        f"load-balanced round robin over the healthy ones [GLMSERVE_BACKEND] "
        f"(default: {DEFAULT_BACKEND})",
    )
    # BRIDGE_ in the names: GLMSERVE_HOST/PORT belong to the model server, often in one env.
    p.add_argument(
        "--host",
        default=e("BRIDGE_HOST", "127.0.0.1"),
        help="address to bind [GLMSERVE_BRIDGE_HOST]",
    )
    p.add_argument(
        "--port", type=int, default=e("BRIDGE_PORT", 8000), help="HTTP port [GLMSERVE_BRIDGE_PORT]"
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes; repeatable "
        "[GLMSERVE_API_KEYS, comma-separated; prefer it: flags show up in ps]",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=argparse.SUPPRESS,
        metavar="ORIGIN",
        help="allow browser calls from this origin (e.g. https://chat.example.com, or *); "
        "repeatable; none by default [GLMSERVE_CORS_ORIGINS, comma-separated]",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=e("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
        help="largest request body accepted (larger: 413) [GLMSERVE_MAX_REQUEST_BYTES]",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=e("REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT),
        help="seconds a completion (the whole stream) may take; the gRPC deadline "
        "(past it: 504, or an error chunk mid-stream) [GLMSERVE_REQUEST_TIMEOUT]",
    )
    p.add_argument(
        "--no-ui",
        action="store_true",
        default=str(e("NO_UI", "")).lower() in _TRUE,
        help="do not serve the chat page at / and /static [GLMSERVE_NO_UI=1]",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=e("BRIDGE_DRAIN_SECONDS", 30.0),
        help="on SIGTERM, how long open requests may finish [GLMSERVE_BRIDGE_DRAIN_SECONDS]",
    )
    p.add_argument(
        "--log-level",
        default=e("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="info: one line per /v1 request; debug adds probes and static files "
        "[GLMSERVE_LOG_LEVEL, shared with the model server]",
    )
    p.add_argument(
        "--log-format",
        default=e("LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="key=value text or one JSON object per line [GLMSERVE_LOG_FORMAT]",
    )
    return p


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over GLMSERVE_* variables, which win over the defaults."""
    env = os.environ if env is None else env
    ns = parser(env).parse_args(argv)
    backends = [b for value in getattr(ns, "backend", []) for b in _split(value)]
    backends = backends or _split(env.get("GLMSERVE_BACKEND")) or [DEFAULT_BACKEND]
    api_keys = [k for value in getattr(ns, "api_key", []) for k in _split(value)]
    api_keys = api_keys or _split(env.get("GLMSERVE_API_KEYS"))
    origins = [o for value in getattr(ns, "cors_origin", []) for o in _split(value)]
    origins = origins or _split(env.get("GLMSERVE_CORS_ORIGINS"))
    return Settings(
        backends=tuple(backends),
        host=str(ns.host),
        port=int(ns.port),
        api_keys=tuple(api_keys),
        cors_origins=tuple(origins),
        max_request_bytes=int(ns.max_request_bytes),
        request_timeout=float(ns.request_timeout),
        ui=not ns.no_ui,
        drain_seconds=float(ns.drain_seconds),
        log_level=str(ns.log_level),
        log_format=str(ns.log_format),
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)
    except ValueError as err:
        raise SystemExit(f"http-bridge: {err}") from None
    setup_logging(settings.log_level, settings.log_format)
    import uvicorn

    from http_bridge.app import create_app

    try:
        app = create_app(settings)
    except ValueError as err:  # e.g. an unusable --backend list
        raise SystemExit(f"http-bridge: {err}") from None
    log.info(
        "listening",
        extra={
            "fields": {
                "address": f"http://{settings.host}:{settings.port}",
                "backends": ",".join(settings.backends),
            }
        },
    )
    # Our own structured lines replace uvicorn's access log (http_bridge.access); uvicorn's
    # own loggers go through the same handler and stay at warning unless --log-level debug.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.drain_seconds,
    )


if __name__ == "__main__":
    main()
