"""``model-server``: flags → Settings → serve until SIGTERM/Ctrl-C (then drain, exit 0)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from glmserve.logs import setup_logging

from .settings import parse_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    from .server import serve  # after logging is set up: importing torch takes a while

    sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
