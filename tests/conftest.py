"""Shared pytest fixtures. Each area appends its own; keep them independent."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _forked_model_servers():  # noqa: ANN202 - Iterator[None]
    """Model servers start as forks of one interpreter that imported torch and transformers
    once (glmserve.forkserver): ~1 s a start instead of ~7 s on a 2-core box, ~40 starts.
    Tests of the process's own start pass ``fresh=True``."""
    from procs import forkserver

    with forkserver():
        yield


@pytest.fixture(scope="session")
def tiny_chatglm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM2 checkpoint (real layout, 2 .bin shards + index), written once per run."""
    from chatglm2_fixture import make_tiny_chatglm2

    return make_tiny_chatglm2(tmp_path_factory.mktemp("chatglm2") / "tiny-chatglm2")


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer + chat template, saved as plain transformers files."""
    from tiny_models import smollm_tokenizer_dir

    return smollm_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64, context 512) with SmolLM2's tokenizer."""
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm_tokenizer)


SCRIPT = "Hello there! 你好世界。 Done"


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: Path) -> Path:
    """A tiny Llama whose greedy reply to any prompt is exactly ``SCRIPT``."""
    from tiny_models import make_scripted_llama

    return make_scripted_llama(
        tmp_path_factory.mktemp("scripted") / "scripted", smollm_tokenizer, SCRIPT
    )


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path):  # noqa: ANN201 - Iterator[Proc]
    """One model server on the tiny random Llama with default flags, shared by every module
    that needs nothing else (a start costs ~1 s even as a fork). Tests that
    freeze it (SIGSTOP) let it go on before they end; none stops it."""
    import signal

    from procs import start_model_server

    with start_model_server(str(tiny_model_dir)) as server:
        yield server
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def api_stack(tiny_server):  # noqa: ANN001, ANN201 - Iterator[tuple[Proc, Proc]]
    """:func:`tiny_server` and a bridge in front of it, shared by the API feature tests
    (logprobs, structured outputs, tools, completions, client shapes)."""
    from procs import start_bridge

    with start_bridge("--backend", tiny_server.target, "--no-ui") as bridge:
        yield tiny_server, bridge
