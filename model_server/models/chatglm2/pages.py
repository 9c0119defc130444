"""Give back the memory-mapped pages of a shard tensor once it has been copied.

``torch.load(mmap=True)`` maps a whole shard; every page we read stays resident (and counts in
RSS) until the *last* tensor of the shard is freed, so peak RAM would be model + one shard.
Dropping the pages right after each copy (:func:`copy_releasing`: a big tensor in row chunks)
brings that down to model + one chunk.

Only pages that (a) lie entirely inside the tensor's own bytes and (b) belong to a mapping
of the shard file itself are released. ``MADV_DONTNEED`` on a clean file-backed mapping just
unmaps the pages (a later read faults them back in from the file), so this can never corrupt
data; on anything else (other OS, anonymous memory) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or _MADV_DONTNEED is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def file_mappings(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``file`` (from /proc/self/maps)."""
    if _LIBC is None:
        return []
    target = os.path.realpath(file)
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def release(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """madvise(DONTNEED) the whole pages of a contiguous tensor's bytes; returns bytes released."""
    if _LIBC is None or not mappings or tensor.device.type != "cpu":
        return 0
    if not tensor.is_contiguous():
        return 0
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + size) // _PAGE * _PAGE
    if hi <= lo or not any(a <= lo and hi <= b for a, b in mappings):
        return 0
    if _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED) != 0:
        return 0
    return hi - lo


def copy_releasing(
    dst: torch.Tensor,
    src: torch.Tensor,
    mappings: list[tuple[int, int]],
    chunk_bytes: int = 64 << 20,
) -> None:
    """``dst.copy_(src)`` in row chunks, giving each chunk's mapped pages back once copied.

    This bounds the transient RAM of a big tensor (the 0.5 GB embedding of 6B) to one chunk.
    """
    if src.dim() == 0 or not mappings:
        dst.copy_(src)
        release(src, mappings)
        return
    row_bytes = max(1, src[0].numel() * src.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for i in range(0, src.shape[0], step):
        part = src[i : i + step]
        dst[i : i + step].copy_(part)
        release(part, mappings)
