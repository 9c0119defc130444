"""Settings declared once, as dataclass fields; the CLI, the env fallback and the docs follow.

A process's settings are one frozen dataclass. Each field made with :func:`setting` names its
flag, its environment variable and its help; its annotation is the type and its default the
default. From that single declaration :class:`Cli` builds the argparse parser (``--help``),
resolves every value (flag beats environment variable beats default) into the frozen object,
and renders the README flag tables (``python -m glmserve.settings_doc``), so none of them can
drift from the others. Fields without :func:`setting` metadata stay internal (tests set them).

Stdlib only: both processes import this, and the bridge must pull neither torch nor, for the
model server, fastapi.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

_META = "glmserve.setting"
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_WORDS |= {"0": False, "false": False, "no": False, "off": False}
BOOL_SPELLINGS = "1/0, true/false, yes/no, on/off"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

S = TypeVar("S")
Kind = Literal["value", "bool", "list"]


@dataclass(frozen=True)
class Option:
    """How one setting appears outside the process.

    ``help`` and ``default_text`` may hold `code` spans: the docs keep them, --help drops the
    backticks.
    """

    flag: str
    env: str
    help: str
    # The default in words, where the bare value says too little (None: "the model's").
    default_text: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def setting(
    default: Any,
    *,
    flag: str,
    env: str,
    help: str,
    default_text: str | None = None,
    choices: Iterable[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a flag with an environment-variable fallback.

    The field's annotation says how values are read: ``int``, ``float`` or ``str`` (each may be
    ``| None``); ``bool``, as ``--x``/``--no-x``, or, when the flag itself is ``--no-x``, a
    switch that turns a default-on setting off (its variable, true, turns it off too); and
    ``tuple[str, ...]``, a repeatable flag whose values, like the variable's, are
    comma-separated.
    """
    option = Option(flag, env, help, default_text, tuple(choices) if choices else None, metavar)
    return dataclasses.field(default=default, metadata={_META: option})


def log_level_setting(help: str) -> Any:
    """``--log-level``: one variable, GLMSERVE_LOG_LEVEL, shared by both processes."""
    return setting(
        "info", flag="--log-level", env="GLMSERVE_LOG_LEVEL", help=help, choices=LOG_LEVELS
    )


def log_format_setting() -> Any:
    """``--log-format``: one variable, GLMSERVE_LOG_FORMAT, shared by both processes."""
    return setting(
        "text",
        flag="--log-format",
        env="GLMSERVE_LOG_FORMAT",
        help="`text` (key=value) or `json` (one object per line)",
        choices=LOG_FORMATS,
    )


def parse_bool(text: str) -> bool:
    """The yes/no spellings environment variables commonly use."""
    try:
        return _BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"expected one of {BOOL_SPELLINGS}") from None


def _split(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Declared:
    """One setting with everything derived from its field: attribute, kind, parser."""

    name: str
    option: Option
    kind: Kind
    parse: Callable[[str], Any]
    default: Any

    @property
    def negated(self) -> bool:
        """A ``--no-x`` switch: the flag (and a true variable) set the attribute to False."""
        return self.kind == "bool" and self.option.flag.startswith("--no-")

    def default_words(self) -> str:
        """The default as --help and the docs state it."""
        if self.option.default_text is not None:
            return self.option.default_text
        value = self.default
        if self.kind == "bool":
            return "on" if value != self.negated else "off"
        if self.kind == "list":
            return ",".join(value) or "none"
        if value is None:
            return "none"
        return f"{value:g}" if isinstance(value, float) else str(value)


def _kind(hint: Any) -> tuple[Kind, Callable[[str], Any]]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is bool:
        return "bool", parse_bool
    if typing.get_origin(hint) is tuple:
        return "list", str
    if hint in (int, float, str):
        return "value", hint
    raise TypeError(f"no flag type for {hint!r}")


def declared(cls: type) -> list[Declared]:
    """The settings of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _META in f.metadata:
            kind, parse = _kind(hints[f.name])
            out.append(Declared(f.name, f.metadata[_META], kind, parse, f.default))
    return out


class Cli(Generic[S]):
    """A console script's parser and settings, both generated from the dataclass ``settings``."""

    def __init__(self, settings: type[S], prog: str, description: str) -> None:
        self.settings = settings
        self.prog = prog
        self.description = description
        self.declared = declared(settings)

    def parser(self) -> argparse.ArgumentParser:
        """Every default is None here, so parse() can tell a flag given from one left out."""
        p = argparse.ArgumentParser(
            prog=self.prog,
            description=f"{self.description} Every flag falls back to the environment variable "
            "in [brackets]: a flag beats its variable, which beats the default.",
        )
        for d in self.declared:
            o = d.option
            env = f"{o.env}, comma-separated" if d.kind == "list" else o.env
            text = f"{o.help} [{env}; default: {d.default_words()}]"
            text = text.replace("`", "").replace("%", "%%")
            common: dict[str, Any] = {"dest": d.name, "default": None, "help": text}
            if d.negated:
                p.add_argument(o.flag, action="store_const", const=False, **common)
            elif d.kind == "bool":
                p.add_argument(o.flag, action=argparse.BooleanOptionalAction, **common)
            elif d.kind == "list":
                p.add_argument(o.flag, action="append", metavar=o.metavar, **common)
            else:
                p.add_argument(o.flag, type=d.parse, choices=o.choices, metavar=o.metavar, **common)
        return p

    def parse(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> S:
        """Flags, else non-empty environment variables, else the defaults; a bad value (or a
        combination the dataclass rejects) exits with argparse's usage error, status 2."""
        env = os.environ if env is None else env
        parser = self.parser()
        ns = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for d in self.declared:
            given = getattr(ns, d.name)
            if d.kind == "list":
                items = _split(given or ()) or _split([env.get(d.option.env, "")])
                if items:
                    values[d.name] = items
            elif given is not None:
                values[d.name] = given
            elif env.get(d.option.env, "").strip():
                values[d.name] = self._from_env(parser, d, env[d.option.env].strip())
        try:
            return self.settings(**values)
        except ValueError as err:
            parser.error(str(err))

    @staticmethod
    def _from_env(parser: argparse.ArgumentParser, d: Declared, raw: str) -> Any:
        name = d.option.env
        try:
            value = d.parse(raw)
        except ValueError:
            kind = f"yes/no ({BOOL_SPELLINGS})" if d.kind == "bool" else d.parse.__name__
            parser.error(f"{name}: invalid {kind} value: {raw!r}")
        if d.option.choices and value not in d.option.choices:
            parser.error(
                f"{name}: invalid choice: {raw!r} (choose from {', '.join(d.option.choices)})"
            )
        return not value if d.negated else value
