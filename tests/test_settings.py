"""The settings declarations: flag beats env beats default for every setting of both CLIs,
yes/no parsing, clean usage errors, and docs/--help generated from the same declarations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glmserve.settings import Cli, Declared, parse_bool
from glmserve.settings_doc import BLOCK, DOCS, render
from http_bridge.cli import parse_settings as parse_bridge
from http_bridge.settings import CLI as BRIDGE_CLI
from http_bridge.settings import Settings as BridgeSettings
from model_server.settings import CLI as SERVER_CLI
from model_server.settings import Settings as ServerSettings
from model_server.settings import parse_settings as parse_server

BIN = Path(sys.executable).parent
CASES = [(cli, d) for cli in (SERVER_CLI, BRIDGE_CLI) for d in cli.declared]
IDS = [f"{cli.prog}:{d.option.flag}" for cli, d in CASES]


def samples(d: Declared) -> tuple[str, Any, list[str], Any]:
    """(env value, what it parses to, flags, what they parse to); all differ from each other."""
    flag = d.option.flag
    if d.option.choices:
        env, given = d.option.choices[-1], d.option.choices[0]
        return env, env, [flag, given], given
    if d.negated:  # --no-ui: the flag can only turn it off, so it must win over a "0"
        return "1", False, [flag], False
    if d.kind == "bool" and not d.default:  # opt-in (--api-docs): the --no- form must win
        return "yes", True, ["--no-" + flag.removeprefix("--")], False
    if d.kind == "bool":
        return "no", False, [flag], True
    if d.kind == "list":
        return " a, b ,", ("a", "b"), [flag, "c", flag, "d,e"], ("c", "d", "e")
    return {
        int: ("7", 7, [flag, "9"], 9),
        float: ("7.5", 7.5, [flag, "9.25"], 9.25),
        str: ("from-env", "from-env", [flag, "from-flag"], "from-flag"),
    }[d.parse]


@pytest.mark.parametrize(("cli", "d"), CASES, ids=IDS)
def test_flag_beats_env_beats_default(cli: Cli, d: Declared) -> None:
    env_raw, from_env, flags, from_flag = samples(d)
    env = {d.option.env: env_raw}
    assert getattr(cli.parse([], {}), d.name) == d.default
    assert getattr(cli.parse([], env), d.name) == from_env != d.default
    if d.negated:
        env = {d.option.env: "0"}
        assert getattr(cli.parse([], env), d.name) == d.default
    else:
        assert from_flag != from_env
    assert getattr(cli.parse(flags, env), d.name) == from_flag


def test_defaults_are_the_dataclass_defaults() -> None:
    assert parse_server([], {}) == ServerSettings()
    assert parse_bridge([], {}) == BridgeSettings()


def test_other_process_variables_and_empty_ones_are_ignored() -> None:
    env = {"GLMSERVE_PORT": "1", "GLMSERVE_DRAIN_SECONDS": "1", "GLMSERVE_BRIDGE_HOST": ""}
    s = parse_bridge([], env)
    assert (s.port, s.drain_seconds, s.host) == (8000, 30.0, "127.0.0.1")
    assert parse_server([], {"GLMSERVE_BRIDGE_PORT": "1", "GLMSERVE_KV_CACHE_TOKENS": ""}) == (
        ServerSettings()
    )


def test_model_server_new_settings() -> None:
    s = parse_server(
        ["--kv-cache-tokens", "4096", "--kv-block-size", "32", "--no-prefix-caching"],
        {"GLMSERVE_STEP_TIMEOUT_SECONDS": "2.5"},
    )
    assert (s.kv_cache_tokens, s.kv_block_size, s.prefix_caching) == (4096, 32, False)
    assert s.step_timeout_seconds == 2.5
    d = ServerSettings()
    assert (d.kv_cache_tokens, d.kv_block_size, d.prefix_caching) == (None, 16, True)
    assert d.step_timeout_seconds == 60.0
    assert not hasattr(d, "max_num_batched_tokens")


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("1", "true", "yes", "on", " TRUE ", "Yes")]
    + [(f, False) for f in ("0", "false", "no", "off", "OFF")],
)
def test_bool_spellings(text: str, value: bool) -> None:
    assert parse_bool(text) is value
    assert parse_server([], {"GLMSERVE_PREFIX_CACHING": text}).prefix_caching is value
    assert parse_bridge([], {"GLMSERVE_NO_UI": text}).ui is not value


@pytest.mark.parametrize(
    ("cli", "argv", "env", "message"),
    [
        (SERVER_CLI, ["--port", "abc"], {}, "argument --port: invalid int value: 'abc'"),
        (SERVER_CLI, [], {"GLMSERVE_PORT": "abc"}, "GLMSERVE_PORT: invalid int value: 'abc'"),
        (SERVER_CLI, [], {"GLMSERVE_PREFIX_CACHING": "maybe"}, "invalid yes/no"),
        (SERVER_CLI, ["--kv-block-size", "0"], {}, "--kv-block-size must be >= 1"),
        (SERVER_CLI, ["--step-timeout-seconds", "0"], {}, "--step-timeout-seconds must be > 0"),
        (BRIDGE_CLI, [], {"GLMSERVE_BRIDGE_PORT": "70000"}, "--port must be in 1..65535"),
        (BRIDGE_CLI, [], {"GLMSERVE_REQUEST_TIMEOUT": "soon"}, "invalid float value: 'soon'"),
        (BRIDGE_CLI, [], {"GLMSERVE_LOG_LEVEL": "loud"}, "invalid choice: 'loud'"),
        (BRIDGE_CLI, ["--log-format", "xml"], {}, "invalid choice: 'xml'"),
    ],
)
def test_bad_values_are_usage_errors(
    cli: Cli, argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parse(argv, env)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {cli.prog}") and message in err


def test_console_script_bad_value_exits_cleanly() -> None:
    out = subprocess.run(
        [str(BIN / "model-server"), "--port", "abc"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "invalid int value: 'abc'" in out.stderr and "Traceback" not in out.stderr


def test_bridge_settings_still_validate_when_built_directly() -> None:
    with pytest.raises(ValueError, match="--backend"):
        BridgeSettings(backends=())
    assert BridgeSettings(backends=("h:1",), ui=False).backends == ("h:1",)


@pytest.mark.parametrize("cli", [SERVER_CLI, BRIDGE_CLI], ids=lambda c: c.prog)
def test_help_lists_every_declared_flag(cli: Cli) -> None:
    out = subprocess.run(
        [str(BIN / cli.prog), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert out.returncode == 0, out.stderr
    for d in cli.declared:
        assert d.option.flag in out.stdout and d.option.env in out.stdout
        if d.kind == "bool" and not d.negated:
            assert "--no-" + d.option.flag[2:] in out.stdout


def test_docs_flag_tables_are_generated() -> None:
    """Fix a failure with: .venv/bin/python -m glmserve.settings_doc --write"""
    progs = {path.name: [m[2] for m in BLOCK.finditer(path.read_text())] for path in DOCS}
    assert progs == {"README.md": ["model-server", "http-bridge"], "bridge.md": ["http-bridge"]}
    for path in DOCS:
        text = path.read_text()
        assert render(text) == text, f"{path} flag table is stale"


def test_settings_modules_import_neither_torch_nor_fastapi() -> None:
    code = (
        "import sys, glmserve.settings, model_server.settings, http_bridge.settings;"
        "bad = [m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
