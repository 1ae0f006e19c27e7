"""Keep freed memory for reuse during CPU training (glibc's malloc tuned in-process).

A training step allocates and frees the same activation tensors at every step. By
default glibc's malloc gives large freed blocks back to the system (it trims the heap
top and serves big blocks with mmap), so the next step faults the same pages in again,
zeroed by the kernel. On the `finetune` preset that is about 1,100 minor page faults
and 2.3-2.6 ms of system time per training image; keeping the memory cuts both about
fourfold, with no higher peak memory, and an epoch took 3-11% less time in two
measurements on this noisy 2-core machine (``benchmarks/allocator.py``, docs/performance.md).

jemalloc or tcmalloc preloaded with ``LD_PRELOAD`` keep freed blocks of every size (glibc's
mmap threshold cannot go above 32 MiB, so larger blocks are still returned at each
free); when one of them is in the process, nothing is changed here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
from pathlib import Path

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap top before a trim
TOP_PAD = 256 * 1024 * 1024

OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# where find_allocator_library looks
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_allocator_library(name: str) -> str | None:
    """The path of an installed jemalloc / tcmalloc / mimalloc shared library, for ``LD_PRELOAD``.

    tcmalloc is looked for as the minimal build first (Debian's libtcmalloc-minimal4).
    """
    patterns = [f"lib{name}_minimal.so*", f"lib{name}.so*"] if name == "tcmalloc" else [f"lib{name}.so*"]
    for pattern in patterns:
        for folder in LIBRARY_DIRS:
            hits = sorted(glob.glob(os.path.join(folder, pattern)))
            if hits:
                return hits[0]
    return None


def preloaded_allocator(maps: str | None = None) -> str | None:
    """The replacement allocator mapped into this process (jemalloc, tcmalloc, mimalloc), if any.

    ``maps`` is the text of ``/proc/self/maps`` (read when not given); None off Linux.
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        for allocator in OTHER_ALLOCATORS:
            if name.startswith(f"lib{allocator}"):
                return allocator
    return None


def keep_freed_memory() -> str:
    """Tune glibc's malloc to keep freed memory for reuse; returns what was done, in words.

    Process-wide and not undone (there is no way to read mallopt's settings back); the
    numbers a run computes do not change, only where its memory comes from. The peak
    resident memory stays about what it was: the blocks kept are those the next step
    allocates again.
    """
    other = preloaded_allocator()
    if other is not None:
        return f"{other} (preloaded): left as it is"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: left as it is"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "glibc's mallopt not found: left as it is"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = [mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, NEVER_TRIM), mallopt(M_TOP_PAD, TOP_PAD)]
    if not all(done):
        return "glibc's mallopt refused some of the settings"
    return "glibc, tuned: no trimming, mmap threshold 32 MiB"
