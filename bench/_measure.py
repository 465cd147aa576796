"""Process and machine measurements shared by the benchmarks (Linux /proc; fresh subprocesses)."""

from __future__ import annotations

import os
import resource


def proc_status_kb(key: str) -> int:
    """A field of /proc/self/status in kB, e.g. ``VmRSS`` or ``VmHWM`` (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat), NaN if unknown."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def own_cpu_s(children: bool = False) -> float:
    """CPU seconds of this process (and of its finished subprocesses, with ``children``)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    t = own.ru_utime + own.ru_stime
    if children:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += kids.ru_utime + kids.ru_stime
    return t
