"""``model-server``: flags → Settings → serve until SIGTERM/Ctrl-C (then drain, exit 0).

Exit status: 0 after a drain, 1 when the model failed to load, 3 when the engine died (the
watchdog): the supervisor should restart the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from glmserve.logs import setup_logging

from .settings import parse_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    from .server import EXIT_ENGINE_DEAD, serve  # after logging: importing torch takes a while

    code = asyncio.run(serve(settings))
    if code == EXIT_ENGINE_DEAD:
        # The engine thread may still be stuck inside torch: interpreter shutdown would wait
        # on it or abort. Leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
