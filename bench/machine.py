"""What the benchmark ran on, and how busy the machine was with other work meanwhile."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil


def machine_info() -> dict[str, Any]:
    """CPU count and model, versions, and the load average now."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "loadavg_start": loadavg(),
        "git": git_revision(),
    }


def git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ (None outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuWatch:
    """CPU time the machine spent on processes other than ``pids`` between start and stop,
    as a share of all cores over the wall time (0.5 = one of two cores busy elsewhere)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._busy = _busy_seconds()
        self._own = _own_seconds(pids)
        self._wall = time.monotonic()

    def foreign_share(self) -> float:
        wall = time.monotonic() - self._wall
        busy = _busy_seconds() - self._busy
        own = _own_seconds(self.pids) - self._own
        cores = psutil.cpu_count() or 1
        return max(0.0, busy - own) / (wall * cores) if wall > 0 else 0.0
