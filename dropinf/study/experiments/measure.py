"""Measurements of time, memory and machine load (Linux /proc), shared by notebook 03 (cost),
notebook 06's cost table and the scripts in ``bench/``.

Times are medians over repeated calls (CUDA synchronised around each); CPU peak memory is the
process's resident-set high-water mark reset through /proc/self/clear_refs; the load of other
processes is read from /proc/stat. All of it varies between runs and machines: it belongs in
tables, never in a summary that a seed determines.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ...blocks import BatchGrads
from ...compressors import Compressor


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


def _release_free_memory() -> None:
    """Return the allocator's free pages to the kernel (glibc ``malloc_trim``), so that the
    resident set is what is live and a step's new allocations show in the peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def machine_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat), NaN if unknown."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def own_cpu_s(children: bool = False) -> float:
    """CPU seconds of this process, all threads (and of its finished subprocesses, with
    ``children``)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    t = r.ru_utime + r.ru_stime
    if children:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += kids.ru_utime + kids.ru_stime
    return t


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median and minimum seconds per call over ``calls`` timed calls."""

    median: float
    min: float
    calls: int


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
               min_time: float = 0.0, before: Callable[[], object] | None = None) -> Timing:
    """``warmup`` untimed calls, then at least ``repeats`` timed calls and ``min_time`` seconds
    (device work included: CUDA is synchronised around each call). ``before``, if given, runs
    untimed before each timed call (e.g. to evict the caches)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        if before is not None:
            before()
            sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), len(times))


class OtherLoad:
    """The share of the machine's CPU time (all cores) that other processes used between
    :meth:`start` and :meth:`stop` (or inside a ``with`` block): ``share`` in [0, 1] and
    ``cpus``, the average number of cores they kept busy. This process's finished subprocesses
    count as its own with ``children``. NaN if unknown or if the span lasted under ``min_wall``
    seconds (/proc/stat counts in 10 ms ticks, too coarse for shorter spans)."""

    def __init__(self, min_wall: float = 0.2, children: bool = False):
        self.min_wall, self.children = min_wall, children
        self.share = self.cpus = float("nan")

    def start(self) -> OtherLoad:
        self._t = (machine_busy_s(), own_cpu_s(self.children), time.perf_counter())
        return self

    def stop(self) -> float:
        """End the span; returns ``share``."""
        busy0, own0, wall0 = self._t
        wall = time.perf_counter() - wall0
        if wall >= self.min_wall and wall > 0:
            other = machine_busy_s() - busy0 - (own_cpu_s(self.children) - own0)
            self.cpus = max(0.0, other / wall)
            self.share = min(1.0, self.cpus / (os.cpu_count() or 1))
        return self.share

    def __enter__(self) -> OtherLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def peak_bytes(fn: Callable[[], object], device: torch.device, timed: bool = False):
    """Peak memory of one call of ``fn`` above what was in use just before, in bytes; with
    ``timed``, ``(bytes, Timing of that one call)``.

    CUDA: ``max_memory_allocated`` (tensors only). CPU: the process's resident-set high-water mark
    (``VmHWM``, reset through /proc/self/clear_refs) above the resident set after returning free
    pages to the kernel; allocator slack counts. NaN where the mark cannot be reset.
    """
    _release_free_memory()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = proc_status_kb("VmRSS") if reset_peak() else None
    timing = time_calls(fn, device, 0, 1)
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device) - base)
    else:
        peak = float("nan") if base is None else 1024.0 * (proc_status_kb("VmHWM") - base)
    return (peak, timing) if timed else peak


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Objects that exist now are left out of garbage collections inside the block: a full
    collection over every object of torch and transformers (imported by the first GPT-2) takes
    up to a second, and the measurements collect before each peak."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def compression_step(comp: Compressor, bg: BatchGrads) -> Callable[[], Tensor]:
    """The compression step on one batch's fully captured factors, as a call returning (B, k):
    the compressor's capture-time reducers applied to them (:meth:`~dropinf.BatchGrads.reduced`,
    what :class:`~dropinf.PerSampleGrads` does inside its hooks) and ``compress``."""
    reducers = comp.reducers(bg.device)
    return lambda: comp.compress(bg.reduced(reducers))
