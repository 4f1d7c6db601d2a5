"""Keep freed memory in the process (glibc), so XLA-CPU's per-call buffers stop page-faulting.

XLA-CPU allocates each executable's temporaries with malloc on every call. Above 32 MB (one
attention-score buffer of a 128 x 128 MiniLM batch is ~100 MB) glibc serves them with a fresh
mmap and returns them with munmap, so every call touches new pages: ~530k minor page faults
and 1.1-1.4 s of system time per 256 wiki sentences on the 2-core machine, against ~0 and 0.02 s
with these settings (the same as the GLIBC_TUNABLES of benchmarks/bench_train_step.py, set
with mallopt because tunables are read only at process start). The cost: freed memory is kept
for reuse instead of given back, so the resident size stays at its peak (the peak itself does
not grow). Off with SIMCSE_MALLOC_TUNING=off; a no-op without glibc.
"""

from __future__ import annotations

import ctypes
import os

ENV = "SIMCSE_MALLOC_TUNING"
# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {
    M_MMAP_MAX: 0,  # no mmap per allocation: large blocks come from the heap and are reused
    M_TRIM_THRESHOLD: 2**31 - 1,  # (an int) keep up to 2 GiB of free heap top instead of trimming it
    M_ARENA_MAX: 1,  # one arena: XLA's threads reuse one another's freed blocks
}


def keep_freed_memory() -> bool:
    """Applies SETTINGS with mallopt; True when glibc accepted them all. Call once, early."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
