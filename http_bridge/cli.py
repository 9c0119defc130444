"""``http-bridge``: flags (each with a GLMSERVE_* environment fallback) → Settings → uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from glmserve.logs import setup_logging
from http_bridge.drain import GRACE_SECONDS, Drain
from http_bridge.settings import CLI, Settings

log = logging.getLogger("http_bridge")

# What a client that stops reading can hold up before the bridge's writes wait (then the
# bridge stops reading its gRPC stream, the model server pauses the request, and
# --stream-write-timeout starts to count). The kernel keeps at most UNSENT_BYTES of a
# connection's data that it could not send yet (TCP_NOTSENT_LOWAT: a client whose receive
# window is shut leaves the rest in uvicorn's write buffer, which waits past WRITE_BUFFER_BYTES),
# while data in flight is left to the kernel's send-buffer autotuning: a fast client far away
# keeps its throughput, a stalled one holds ~5 KiB here (~2 tokens with 20 top logprobs). The
# high-water mark only decides when a stream's writes wait (a large body is still handed over
# whole), so it can be small. Without TCP_NOTSENT_LOWAT the send buffer is fixed instead
# (FALLBACK_SEND_BUFFER_BYTES, which Linux doubles; autotuning would let it grow to megabytes).
UNSENT_BYTES = 1024
WRITE_BUFFER_BYTES = 4 * 1024
FALLBACK_SEND_BUFFER_BYTES = 16 * 1024


class BoundedBufferProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol with the per-connection buffers above."""

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_BYTES)
            except (AttributeError, OSError):  # not on this platform
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FALLBACK_SEND_BUFFER_BYTES)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        super().connection_made(transport)


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the command line and the environment (os.environ unless given)."""
    return CLI.parse(argv, env)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    from http_bridge.app import create_app
    from http_bridge.routes.chat import CutStreamLogFilter

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
    # Streams get --drain-seconds (then the Drain ends them in-band), uvicorn a little more.
    drain = Drain()
    app.state.drain = drain
    logging.getLogger("uvicorn.error").addFilter(CutStreamLogFilter())
    config = uvicorn.Config(
        app,
        http=BoundedBufferProtocol,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.drain_seconds + GRACE_SECONDS,
    )
    sock = config.bind_socket()
    server = _DrainingServer(config, drain, settings.drain_seconds)
    server.run(sockets=[sock])
    if not server.started:  # e.g. the port is taken; uvicorn.run exits the same way
        raise SystemExit(3)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, arming the drain deadline as its graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, drain: Drain, seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_seconds = seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.start(self.drain_seconds)
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
