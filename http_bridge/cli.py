"""``http-bridge``: flags (each with a GLMSERVE_* environment fallback) → Settings → uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from glmserve.logs import setup_logging
from http_bridge.settings import CLI, Settings

log = logging.getLogger("http_bridge")


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the command line and the environment (os.environ unless given)."""
    return CLI.parse(argv, env)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
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
