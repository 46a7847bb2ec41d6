"""What benchmarks/train_step.py and benchmarks/encoder_loss.py share: fresh worker processes, timed runs and the
peak memory of a case over its inputs, measured as benchmarks/drift_loss.py measures it.

Peak memory. On CPU: the resident set size (RSS) once the case's inputs exist is the baseline, the kernel's peak-RSS
mark is reset there (so a transient peak of the imports or the set-up does not hide the growth) and ru_maxrss after
the runs, minus the baseline, is the peak extra. glibc keeps freed memory mapped, so an earlier phase of the same
process could hide a later one's growth: each measured case therefore runs in a fresh process (``run_isolated``). On
CUDA: max_memory_allocated minus memory_allocated at the baseline.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch
from drift_loss import _cpu_model, _reset_peak_rss, _rss_bytes, mb, ms
from drift_loss import _engine_version as engine_version

ROOT = Path(__file__).resolve().parents[1]

# Re-exported: the benchmarks import drift_loss.py's formatting and engine hash from here.
__all__ = ["CLOCKS", "ROOT", "PeakMemory", "engine_version", "machine", "mb", "ms", "run_isolated", "summary", "sync",
           "timed_runs"]


def run_isolated(fn: Callable[[dict], dict], spec: dict) -> dict:
    """``fn(spec)`` in a fresh process -> its dict, or the spec with "error" when it raises.

    On CPU the process is forked from this one: the imports (Lightning's take 5-10 s) are inherited, and so is a
    small, untouched heap, as long as this process has run no large tensor work. A CUDA context does not survive a
    fork, so on CUDA the process is spawned (and imports again).
    """
    ctx = multiprocessing.get_context("spawn" if spec["device"].startswith("cuda") else "fork")
    with ctx.Pool(1) as pool:
        try:
            return pool.apply(fn, (spec,))
        except Exception as err:  # anything the case raised, reported in its row
            return {**spec, "error": f"{type(err).__name__}: {err}"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "cpu" is the process's CPU time: on a shared machine, the time the work took rather than the time it also waited for
# a core (meaningful for single-threaded CPU runs only).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, clock: str = "wall") -> dict:
    """``summary`` of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones (allocations, kernel choice),
    on the ``CLOCKS[clock]`` clock."""
    now = CLOCKS[clock]
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = now()
        fn()
        sync(device)
        if i >= warmup:
            times.append(now() - start)
    return summary(times)


def summary(times: list[float]) -> dict:
    """{"time": median seconds, "times": every run's seconds}: the result format drift_loss.py's ``ms`` prints."""
    return {"time": statistics.median(times), "times": times}


class PeakMemory:
    """Peak memory of what runs between ``start`` (or entering the block) and ``stop``, over the memory at ``start``.

    After ``stop``: ``base`` (bytes in use at the start: RSS on CPU, allocated on CUDA) and ``extra`` (the peak
    above it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = self.extra = 0

    def start(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _rss_bytes()
            if not _reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): CPU peak memory needs Linux")

    def stop(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra = max(0, peak - self.base)

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def machine(device: torch.device) -> str:
    """The device in words: GPU name, or CPU model, cores and the current load average."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
