"""This process's memory, one way everywhere: resident set now, its peak, and a reset of the peak mark.

Linux reads /proc/self (RssAnon and RssFile apart: a memory-mapped checkpoint's pages count as resident
while they stay mapped and touched); elsewhere `resource` gives the peak only.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def status_bytes(field: str) -> int | None:
    """A /proc/self/status field (VmRSS, VmHWM, RssAnon, RssFile) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now (0 where the system does not say)."""
    rss = status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started, or since the last `reset_peak_rss`."""
    hwm = status_bytes("VmHWM")  # follows clear_refs resets, where ru_maxrss does not
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


KEEP_PEAK_ENV = "RGEXPORT_KEEP_PEAK_RSS"


def reset_peak_rss() -> bool:
    """Resets the peak-RSS mark (Linux: 5 written to /proc/self/clear_refs), so that a later peak covers only
    what follows; False where the system cannot, or where RGEXPORT_KEEP_PEAK_RSS=1 asks it not to.

    The kernel keeps one mark: after a reset even the process's own maximum (`getrusage`, what `/usr/bin/time
    -v` prints) counts only from the last one. A build resets it at every stage, so its closing summary (the
    largest stage) is its peak and `time -v`'s figure is the peak since the last reset, lower where an earlier
    stage was higher (measured: 6,383,932 kB beside a 6.83 GiB stage at 2B). With RGEXPORT_KEEP_PEAK_RSS=1
    each stage reports the peak so far and `time -v` the whole run's: the way to check one against the other."""
    if os.environ.get(KEEP_PEAK_ENV) == "1":
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_split() -> dict[str, int | None]:
    """Anonymous and file-backed resident bytes (Linux), e.g. to tell weights read from a mapped file apart."""
    return {"anon_bytes": status_bytes("RssAnon"), "file_bytes": status_bytes("RssFile")}


def release_freed() -> None:
    """Collects garbage and hands freed heap memory back to the system (`trim_heap`).

    Tensors of a few MB to tens of MB come from glibc's heap, not from their own mappings, once its
    mmap threshold has grown; freed, they stay in the process (resident) until trimmed. A build that has
    just let a model or a graph go calls this before the next stage, so the next stage's peak is its own.
    """
    import gc

    gc.collect()
    trim_heap()


def forget_last_export() -> None:
    """Drops the graph nodes that `torch.export` keeps after tracing, in a module global of torch's proxy tensor
    tracer (`_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT`, cleared by torch itself only when the next trace starts).
    A converter that inlines the program's constants into those nodes (litert-torch) otherwise keeps every
    weight alive for the rest of the process: 2.7 GB of int8 at RecurrentGemma-2B, measured. Nothing where a
    torch has no such global."""
    from torch.fx.experimental import proxy_tensor

    nodes = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(nodes, dict):
        nodes.clear()


def trim_heap() -> None:
    """glibc's `malloc_trim(0)`: the free pages of every heap arena go back to the system. Nothing elsewhere
    (macOS, musl)."""
    if platform.system() != "Linux":
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """From now on, allocations of `threshold` bytes or more get their own mappings (glibc's
    `M_MMAP_THRESHOLD`), which go back to the system when freed. By default glibc raises that threshold to
    the size of the largest block freed so far (up to 32 MB), so a run that allocates and frees tens of MB per
    step keeps them in its heap: the MIL interpreter's 2B prefill grew by 2 GB that way (5.2 GB peak with a
    fixed 1 MB threshold, 6.3 without, same speed). Process-wide; a no-op off glibc."""
    if platform.system() != "Linux":
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(threshold))
    except (OSError, AttributeError):
        pass
