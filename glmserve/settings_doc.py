"""The flag tables of README.md and docs/bridge.md, rendered from the settings declarations.

``python -m glmserve.settings_doc`` prints them; ``--write`` refreshes every block between
``<!-- BEGIN flags PROG ... -->`` and ``<!-- END flags -->`` in those files. A test fails when
a file differs from what this renders, so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from http_bridge.settings import CLI as BRIDGE_CLI
from model_server.settings import CLI as SERVER_CLI

from .settings import BOOL_SPELLINGS, Cli, Declared

CLIS: dict[str, Cli] = {cli.prog: cli for cli in (SERVER_CLI, BRIDGE_CLI)}
ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "bridge.md")
BLOCK = re.compile(r"(<!-- BEGIN flags (\S+) [^\n]*-->\n)(.*?)(<!-- END flags -->)", re.DOTALL)
INTRO = (
    "Every flag falls back to its environment variable: a flag beats the variable, which beats\n"
    f"the default. Empty variables count as unset; yes/no ones take {BOOL_SPELLINGS}."
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(d: Declared) -> str:
    o = d.option
    if d.kind == "bool" and not d.negated:
        flag = f"`{o.flag}`, `--no-{o.flag[2:]}`"
    else:
        flag = f"`{o.flag} {o.metavar}`" if o.metavar else f"`{o.flag}`"
    env = f"`{o.env}`" + {"list": " (comma-separated)", "bool": " (yes/no)"}.get(d.kind, "")
    words = d.default_words()
    plain = o.default_text is not None or d.kind == "bool" or words == "none"
    default = words if plain else f"`{words}`"
    return f"| {flag} | {env} | {_cell(default)} | {_cell(o.help)} |"


def table(cli: Cli) -> str:
    """The markdown block for one console script: a sentence and its flag table."""
    rows = [INTRO, "", "| flag | env | default | meaning |", "|---|---|---|---|"]
    return "\n".join(rows + [_row(d) for d in cli.declared]) + "\n"


def render(text: str) -> str:
    """``text`` with every flags block regenerated."""
    return BLOCK.sub(lambda m: f"{m[1]}\n{table(CLIS[m[2]])}\n{m[4]}", text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m glmserve.settings_doc", description=__doc__)
    ap.add_argument("--write", action="store_true", help="update README.md and docs/bridge.md")
    if ap.parse_args(argv).write:
        for path in DOCS:
            path.write_text(render(path.read_text()))
        return
    for prog, cli in CLIS.items():
        sys.stdout.write(f"### {prog}\n\n{table(cli)}\n")


if __name__ == "__main__":
    main()
