"""What every benchmark measures the same way: peak memory of a phase, and the machine it ran on.

    from measure import machine, reset_peak_rss, peak_rss_gib   # run as `python bench/<name>.py`

Peak RSS is the kernel's high-water mark of this process (VmHWM), reset between phases through
/proc/self/clear_refs (Linux) after the heap's free pages went back to the OS (`trim_heap`); on a
GPU, torch.cuda's peak allocation is the figure that counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path

import torch


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`): glibc keeps what an
    earlier phase freed, and the next phase would reuse it without raising the RSS at all."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux), to measure one phase."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    """The process's peak RSS since the last `reset_peak_rss` (GiB)."""
    return _status_gib("VmHWM")


def rss_gib() -> float:
    """The process's RSS now (GiB)."""
    return _status_gib("VmRSS")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, dtype: torch.dtype | None = None) -> str:
    """One line naming the machine: CPU, cores, GPU if used, torch version, threads, dtype."""
    parts = [f"{cpu_name()} ({os.cpu_count()} cores, {platform.machine()})"]
    if torch.device(device).type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if dtype is not None:
        parts.append(f"model {str(dtype).removeprefix('torch.')} on {device}")
    return ", ".join(parts)
