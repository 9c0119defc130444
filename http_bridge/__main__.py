"""``python -m http_bridge`` is the same as the ``http-bridge`` console script."""

from http_bridge.cli import main

main()
