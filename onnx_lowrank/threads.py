"""Threads: keeping numpy's BLAS from fighting other threads for the cores, and onnxruntime's default count."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from threadpoolctl import threadpool_limits

__all__ = ["available_cpus", "default_threads", "single_threaded_blas"]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS on one thread inside the block.

    Used where our own threads (layers factored in parallel) or onnxruntime's
    already occupy the cores: a multi-threaded OpenBLAS keeps its threads
    spinning after each product, and on a 2-core machine a job of 1 s was seen
    to take 10-40 s when both kinds of threads competed.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def default_threads() -> int:
    """The intra-op thread count onnxruntime uses when none is set: the physical cores this process may run on.

    Read from ``/proc/cpuinfo`` (one core per distinct physical id and core id among the CPUs of this
    process' affinity mask); where that is not available, the CPUs this process may run on.
    """
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        processor, physical, core = -1, "0", ""
        for line in [*Path("/proc/cpuinfo").read_text().splitlines(), ""]:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor" and value.isdigit():
                processor = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id":
                core = value
            elif not line.strip():  # the end of one processor's block
                if processor in usable and core:
                    cores.add((physical, core))
                processor, physical, core = -1, "0", ""
    return len(cores) or len(usable) or 1


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; every CPU where the platform has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
