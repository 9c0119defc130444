"""The tests' name for the shared process harness, :mod:`glmserve.testing` (bench uses it too).

Real processes on loopback, nothing mocked: see that module for what each helper waits for.
"""

from glmserve.testing import (
    BIN,
    SERVING,
    Proc,
    forkserver,
    free_port,
    health_status,
    http_status,
    parse_metrics,
    scrape,
    spawn_bridge,
    spawn_model_server,
    start_bridge,
    start_model_server,
    wait_serving,
    wait_until,
)

__all__ = [
    "BIN",
    "SERVING",
    "Proc",
    "forkserver",
    "free_port",
    "health_status",
    "http_status",
    "parse_metrics",
    "scrape",
    "spawn_bridge",
    "spawn_model_server",
    "start_bridge",
    "start_model_server",
    "wait_serving",
    "wait_until",
]
