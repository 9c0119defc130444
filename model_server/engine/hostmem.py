"""Host-memory policy for KV buffers on the CPU: freed buffers' pages are kept for reuse.

Why: glibc hands large freed blocks back to the kernel (``munmap``, heap trimming), so the
next buffer of that size is fresh memory, and touching fresh memory costs a page fault per
4 KiB page that the kernel must also zero. On the 2-core bench box that was ~30 ms for the
160 MB a turn-16 prefix hit copies, about as much as the copy itself (docs/engine.md,
"multiturn"). With these settings a KV buffer of up to 32 MiB (a lane layer, a prefix-hit
slab, see ``kv.SLAB_BYTES``) comes from glibc's heap and a freed one stays there for the
next: the process keeps the memory it has used at its peak, which the KV pool accounts for.

Process-wide and applied once by the KV store when the engine runs on the CPU. Elsewhere
(no glibc ``mallopt``: musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes

# glibc <malloc.h>
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# Blocks from this size on are mmap'ed (and unmapped on free): glibc's largest allowed value
# (its dynamic default starts at 128 KiB and only rises once such blocks are freed).
MMAP_THRESHOLD = 32 * 2**20
# Free memory kept at the top of a heap instead of being trimmed; at glibc's 64 MiB heap
# size (threads' arenas) an emptied heap is also kept instead of unmapped.
TOP_PAD = 64 * 2**20


def keep_freed_pages() -> bool:
    """Sets glibc's malloc to reuse freed memory instead of returning it to the kernel;
    True when it applied."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already uses
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TOP_PAD, TOP_PAD))
