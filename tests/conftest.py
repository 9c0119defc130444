"""Shared pytest fixtures. Each area appends its own; keep them independent."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_chatglm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM2 checkpoint (real layout, 2 .bin shards + index), written once per run."""
    from chatglm2_fixture import make_tiny_chatglm2

    return make_tiny_chatglm2(tmp_path_factory.mktemp("chatglm2") / "tiny-chatglm2")
