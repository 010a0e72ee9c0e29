"""Memory of this process: peak and current resident set size, glibc's heap (trimmed, fixed mmap threshold), and
pages of a live allocation handed back to the OS."""

from __future__ import annotations

import ctypes
import mmap
import resource
import sys
from pathlib import Path


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM where /proc has it: ru_maxrss survives fork and exec, so a rank or subprocess started by
    a large parent would report the parent's peak as its own.
    """
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (None where /proc is missing)."""
    return _proc_status_mb("VmRSS")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): no malloc_trim/mallopt to call
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps per layer)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> None:
    """Have glibc serve every allocation of `nbytes` or more with its own mapping, unmapped on free.

    By default glibc raises that threshold each time such a block is freed, up to 32 MiB, after
    which a layer's large tensors (Hessians, solver work arrays, weight copies: 1-32 MiB each) come
    from the heap, where they fragment it around small long-lived objects: each layer's peak then
    depends on the heap's history rather than on the layer (measured at width 1024: 812-940 MiB
    over 32 layers, against 756-759 MiB with a fixed threshold), and the run's peak is the worst
    of them. A fixed threshold disables that adjustment, so big blocks go back to the OS as soon as
    they are freed. Process-wide and permanent; each large allocation then costs an mmap and
    fresh zeroed pages (measured 10-20% more calibration time at width 1024, 1 thread).
    """
    try:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)
    except AttributeError:  # not glibc: its allocator has no such drift to undo
        pass


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
PAGES_RELEASABLE = sys.platform == "linux" and _LIBC is not None and _MADV_DONTNEED is not None


def release_pages(address: int, nbytes: int) -> bool:
    """Hand the whole pages inside [address, address + nbytes) back to the OS: memory that a live allocation no
    longer uses (its tail, once the data moved to the front). The pages read as zeros afterwards and are freed with
    the allocation as usual. False where that could not be done (PAGES_RELEASABLE: Linux with glibc)."""
    if not PAGES_RELEASABLE:
        return False
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return True
    return _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
