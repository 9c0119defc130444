"""A preloaded interpreter that starts model servers for the test suite by forking.

Why: a model server's start on a 2-core CI box takes ~7 s, ~6 of them importing torch and
transformers, and the suite starts ~40 servers. This process imports those once; each server
is a fork of it that runs the ``model-server`` console script's ``main`` with its own argv,
environment, working directory and log file. Only the interpreter's imports are shared: flags,
logging, ports, the model load, every thread and the exit happen in the fork, as in a fresh
process.

Fork-safety: nothing here runs a torch op, makes a gRPC object or uses a tokenizer before
forking, so no torch thread pool, gRPC core or tokenizers pool exists to be split by the fork.
The one extra thread, numpy's OpenBLAS pool, stops itself around a fork (its own atfork
handler).

Protocol, one JSON object per line: the harness (:mod:`glmserve.testing`) writes
``{"argv", "env", "cwd", "log"}`` on stdin; this process answers ``{"pid": N}`` once the server
is a child of the harness. The server is forked twice, so it is orphaned at once and adopted by
the harness, which made itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): the harness
waits for it and reads its exit status as for any child. Start it as ``python -m
glmserve.forkserver``; it answers ``{"ready": true}`` when its imports are done.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys

# What a model server imports on its way to SERVING (the heavy part of its start).
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "model_server.cli",
    "model_server.server",
    "model_server.servicer",
    "model_server.engine.engine",
    "model_server.engine.grammar",
    "model_server.models.registry",
    "model_server.models.hf",
    "model_server.models.chatglm2",
)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _become_server(request: dict) -> int:
    """In the forked server: its stdio, environment, directory and argv, then ``main``."""
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    import random

    random.seed()  # a fresh process's entropy, not a copy of this one's state

    from model_server.cli import main

    main()  # its SystemExit leaves through serve() and the interpreter, as a script's does
    return 0


def serve() -> int:
    """Preloads, then forks one server per request line until stdin closes. In a forked
    server it returns (or raises ``main``'s SystemExit) instead, so the server leaves through
    the interpreter's own exit: atexit handlers, non-daemon threads, flushed streams."""
    for name in PRELOAD:
        importlib.import_module(name)
    _reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        read_pid, write_pid = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the server, report it, leave it orphaned
            os.close(read_pid)
            server = os.fork()
            if server == 0:
                os.close(write_pid)
                return _become_server(request)
            os.write(write_pid, str(server).encode())
            os._exit(0)
        os.close(write_pid)
        with os.fdopen(read_pid, "rb") as r:
            pid = int(r.read())
        os.waitpid(middle, 0)  # after this the server's parent is the harness
        _reply({"pid": pid})
    return 0


if __name__ == "__main__":
    sys.exit(serve())
