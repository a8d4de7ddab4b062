"""What planning by measured latency needs besides the allocator: threads, the timing store, the checks.

``--speedup S`` plans by latency measured on this machine when the planner can
time the model — a concrete reference input exists and every layer it would
plan has a known size on it — and by MACs otherwise or when asked (``--by
macs``: a plan to deploy on other hardware). Either way the result is timed
against the original in onnxruntime, interleaved, so the report holds the MAC
ratio and the measured one.

Timing runs with ``threads`` intra-op threads: onnxruntime's default (the
physical cores) unless asked otherwise, because a plan for one thread is not a
plan for two (a thin pair parallelises worse than the layer it replaces).

Between the ranks a layer is timed at, its latency is interpolated linearly:
a pair's work grows linearly in the rank, and the steps of onnxruntime's
blocked kernels are small against a layer's time except at the smallest ranks,
which are timed. The whole-model check that follows every allocation corrects
what the interpolation misses.
"""

from __future__ import annotations

import bisect
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ._threads import default_threads
from .errors import LowRankError
from .passes._rewrite import Site
from .run_shapes import ModelShapes
from .runtime import make_session
from .shapes import needs_input_shape_message
from .timing_cache import TimingStore, cache_folder, cpu_description, machine_key
from .verify import interleaved_latency

__all__ = [
    "BY_CHOICES",
    "CHECK_RUNS",
    "Timing",
    "TimingFailed",
    "adaptive_interleaved",
    "check_candidate",
    "interpolate",
    "kernel_block",
    "open_store",
    "resolve_by",
    "resolve_threads",
    "timed_ranks",
    "untimeable_reason",
]

BY_CHOICES = ("latency", "macs")
# the check of a plan not made by latency (its rounds time it already): at most CHECK_RUNS interleaved runs of
# each model, fewer (down to 3) when a run of both takes long — it is a quick look, a few seconds on VGG-16
CHECK_RUNS = 10
CHECK_MIN_RUNS = 3
CHECK_BUDGET_MS = 3000.0


def kernel_block() -> int | None:
    """The channel block of onnxruntime's blocked (NCHWc) CPU convolution on this machine: 16 with AVX-512,
    8 with AVX/AVX2, None where it has none (its blocked kernels are x86 only)."""
    isa = set(cpu_description()["isa"])
    if "avx512f" in isa:
        return 16
    if isa & {"avx", "avx2"}:
        return 8
    return None


def resolve_threads(threads: int | None) -> int:
    """The intra-op thread count to time with: the one asked for, else onnxruntime's default here."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LowRankError(f"--threads must be a whole number >= 1, got {threads!r}")
    return threads


def resolve_by(by: str | None, measure: bool) -> str | None:
    """``"latency"``, ``"macs"``, or None (latency where the model can be timed); ``measure`` is ``by="latency"``."""
    if by is not None and by not in BY_CHOICES:
        raise LowRankError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    if measure:
        if by == "macs":
            raise LowRankError("--measure plans by latency: it contradicts --by macs")
        return "latency"
    return by


def open_store(threads: int, timing_cache: bool | str | os.PathLike[str]) -> TimingStore:
    """The timing store of this machine and thread count: in the user's cache folder, a given folder, or memory only."""
    machine = machine_key(threads)
    if timing_cache is False:
        return TimingStore.open(machine, None)
    folder = cache_folder() if timing_cache is True else Path(timing_cache)
    return TimingStore.open(machine, folder)


def untimeable_reason(shapes: ModelShapes, sites: Iterable[Site]) -> str | None:
    """Why the planner cannot time the model on this machine, or None when it can."""
    if shapes.reference is None:
        if shapes.missing_inputs:
            return f"no input of a known size to time it on: {needs_input_shape_message(shapes.missing_inputs)}"
        return "no input to time it on"
    unsized = [site.key for site in sites if site.cost is not None and not site.shape_known and site.ran is not False]
    if unsized:
        shown = ", ".join(unsized[:3]) + (", …" if len(unsized) > 3 else "")
        return f"{len(unsized)} layer(s) have no known size on the reference input ({shown})"
    return None


class TimingFailed(LowRankError):
    """onnxruntime could not time a layer: a plan by latency cannot be made (the default then plans by MACs)."""


@dataclass
class Timing:
    """What timing one conversion uses: threads, the timing store, the reference input and the original's session."""

    threads: int
    store: TimingStore | None  # layer timings kept across runs; None when only the whole model is timed
    feeds: dict[str, Any]
    original: Any  # onnxruntime session of the model before any layer was rewritten

    @classmethod
    def start(cls, model: onnx.ModelProto, feeds: Mapping[str, Any], threads: int, store: TimingStore | None) -> Timing:
        return cls(threads, store, dict(feeds), make_session(model, threads=threads))


def adaptive_interleaved(
    first: Any, second: Any, feeds: Mapping[str, Any], max_runs: int, min_runs: int, budget_ms: float, warmup: int = 1
) -> tuple[float, float, int]:
    """Median milliseconds of each session over interleaved runs, and their number: after ``warmup`` rounds, as
    many rounds as fit in ``budget_ms`` at the last warm-up round's pace (the first pays the sessions' lazy
    set-up), between ``min_runs`` and ``max_runs``."""
    per_round = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        first.run(None, feeds)
        second.run(None, feeds)
        per_round = (time.perf_counter() - start) * 1000.0
    runs = max(min_runs, min(max_runs, int(budget_ms / per_round) if per_round > 0 else max_runs))
    original_ms, candidate_ms = interleaved_latency(first, second, feeds, runs=runs, warmup=0)
    return original_ms, candidate_ms, runs


def check_candidate(timing: Timing, candidate: onnx.ModelProto, runs: int = CHECK_RUNS) -> dict[str, Any]:
    """The candidate against the original: median milliseconds of up to ``runs`` interleaved runs each (fewer for a
    slow model, see ``CHECK_BUDGET_MS``), and their ratio."""
    session = make_session(candidate, threads=timing.threads)
    try:
        original_ms, candidate_ms, done = adaptive_interleaved(
            timing.original, session, timing.feeds, runs, min(runs, CHECK_MIN_RUNS), CHECK_BUDGET_MS, warmup=2
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed to time the model: {text}") from None
    return {
        "original_ms": original_ms,
        "candidate_ms": candidate_ms,
        "measured_speedup": original_ms / candidate_ms,
        "threads": timing.threads,
        "runs": done,
    }


def timed_ranks(grid: Sequence[int], points: int) -> list[int]:
    """At most ``points`` ranks of ``grid`` (sorted), spread evenly, the smallest and the largest among them."""
    if len(grid) <= points:
        return list(grid)
    return sorted({grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)})


def interpolate(timed: Mapping[int, float], rank: int) -> float:
    """Milliseconds at ``rank`` from the ranks timed: exact where timed, linear between the nearest two,
    the nearest one's time outside them."""
    if rank in timed:
        return timed[rank]
    ranks = sorted(timed)
    i = bisect.bisect_left(ranks, rank)
    if i == 0:
        return timed[ranks[0]]
    if i == len(ranks):
        return timed[ranks[-1]]
    lo, hi = ranks[i - 1], ranks[i]
    return timed[lo] + (timed[hi] - timed[lo]) * (rank - lo) / (hi - lo)


def median_ms(times: Sequence[float]) -> float:
    return float(statistics.median(times))
