"""Timing whole models in onnxruntime: interleaved runs, the check of a result, the kernel profile.

Two models compared on a busy machine must be timed at the same moments:
:func:`interleaved_latency` runs them alternately (the order flips each round so
neither always runs on a warm cache) and takes each one's median.
:func:`adaptive_interleaved` fits the number of rounds to a time budget at the
pace of the warm-up rounds. :class:`Timing` holds what one conversion times
against — the original's session, the reference input, the threads and the
layer-timing store — made before the model is rewritten in place;
:func:`check_result` times the result against it and says why it did not when it
cannot. :func:`kernel_times` profiles models with onnxruntime's profiler and
sums each node's median kernel time by operator type: where the time goes.

Timing one layer alone (for the plan by latency) is :mod:`onnx_lowrank.layer_timing`'s.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .errors import LowRankError
from .run_shapes import ModelShapes
from .runtime import first_line, make_session
from .timing_cache import TimingStore, cpu_description

__all__ = [
    "CONV_OPS",
    "FC_OPS",
    "KernelTimes",
    "Timing",
    "adaptive_interleaved",
    "check_candidate",
    "check_result",
    "interleaved_latency",
    "kernel_block",
    "kernel_times",
    "no_reference_reason",
    "start_timing",
    "timed_runs",
]

ModelLike = str | os.PathLike[str] | onnx.ModelProto

# the check of a plan not made by latency: fewer runs than asked for (down to CHECK_MIN_RUNS) when a run of
# both models takes long — it is a quick look, a few seconds on VGG-16
CHECK_MIN_RUNS = 3
CHECK_BUDGET_MS = 3000.0


def timed_runs(session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` runs of one session."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def interleaved_latency(first: Any, second: Any, feed: Mapping[str, Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of each session over interleaved runs (order flipped every round)."""
    for _ in range(warmup):
        first.run(None, feed)
        second.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    sessions = (first, second)
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for j in order:
            t0 = time.perf_counter()
            sessions[j].run(None, feed)
            times[j].append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times[0]), statistics.median(times[1])


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


def kernel_block() -> int | None:
    """The channel block of onnxruntime's blocked (NCHWc) CPU convolution on this machine: 16 with AVX-512,
    8 with AVX/AVX2, None where it has none (its blocked kernels are x86 only)."""
    isa = set(cpu_description()["isa"])
    if "avx512f" in isa:
        return 16
    if isa & {"avx", "avx2"}:
        return 8
    return None


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


def no_reference_reason(shapes: ModelShapes) -> str | None:
    """Why the model cannot be timed at all (no input to time it on), or None."""
    from .shapes import needs_input_shape_message

    if shapes.reference is not None:
        return None
    if shapes.missing_inputs:
        return f"no input of a known size to time it on: {needs_input_shape_message(shapes.missing_inputs)}"
    return "no input to time it on"


def start_timing(proto: onnx.ModelProto, shapes: ModelShapes, threads: int, store: TimingStore | None) -> tuple[Timing | None, str | None]:
    """A session of the model as it is now, for timing against; or None and the reason it cannot be made."""
    why = no_reference_reason(shapes)
    if why is not None or shapes.reference is None:
        return None, why
    try:
        timing = Timing.start(proto, shapes.reference, threads, store)
    except LowRankError as exc:
        return None, str(exc)
    try:  # a model onnxruntime loads but cannot run (no output, an attribute its kernel refuses) is not timed
        timing.original.run(None, timing.feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        return None, f"onnxruntime cannot run the model on the reference input ({first_line(exc)})"
    return timing, None


def check_candidate(timing: Timing, candidate: onnx.ModelProto, runs: int) -> dict[str, Any]:
    """The candidate against the original: median milliseconds of up to ``runs`` interleaved runs each (fewer for a
    slow model, see ``CHECK_BUDGET_MS``), and their ratio."""
    session = make_session(candidate, threads=timing.threads)
    try:
        original_ms, candidate_ms, done = adaptive_interleaved(
            timing.original, session, timing.feeds, runs, min(runs, CHECK_MIN_RUNS), CHECK_BUDGET_MS, warmup=2
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LowRankError(f"onnxruntime failed to time the model: {first_line(exc)}") from None
    return {
        "original_ms": original_ms,
        "candidate_ms": candidate_ms,
        "measured_speedup": original_ms / candidate_ms,
        "threads": timing.threads,
        "runs": done,
    }


def check_result(
    candidate: onnx.ModelProto, timing: Timing | None, runs: int, decomposes: bool, why_not: str | None, by: str | None
) -> dict[str, Any]:
    """The measured ratio of a plan not made by latency (``by``: "macs", or None for a per-layer policy), or why there is none."""
    out: dict[str, Any] = {"by": by}
    if why_not is not None:
        out["why_macs"] = why_not
    if not decomposes:
        return {**out, "not_timed": "no layer was decomposed"}
    if runs == 0:
        return {**out, "not_timed": "not asked for (0 check runs)"}
    if timing is None:
        return {**out, "not_timed": why_not or "the model cannot be run"}
    try:
        return {**out, **check_candidate(timing, candidate, runs)}
    except LowRankError as exc:
        return {**out, "not_timed": str(exc)}


# operator types of onnxruntime's optimized CPU graphs that carry a model's MACs (after its fusions and NCHWc rewrite)
CONV_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "NhwcConv", "NhwcFusedConv"})
FC_OPS = frozenset({"Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


@dataclass
class KernelTimes:
    """Milliseconds per run spent in each operator type, from onnxruntime's profiler (median per node, summed)."""

    by_op: dict[str, float]

    @property
    def conv_ms(self) -> float:
        return sum(ms for op, ms in self.by_op.items() if op in CONV_OPS)

    @property
    def fc_ms(self) -> float:
        return sum(ms for op, ms in self.by_op.items() if op in FC_OPS)

    @property
    def other_ms(self) -> float:
        """Everything that carries no MACs: pooling, elementwise, layout reorders, concatenation …"""
        return sum(ms for op, ms in self.by_op.items() if op not in CONV_OPS and op not in FC_OPS)

    @property
    def total_ms(self) -> float:
        return sum(self.by_op.values())


def kernel_times(
    models: Sequence[ModelLike],
    feed: Mapping[str, Any],
    threads: int | None = None,
    optimization: str = "default",
    runs: int = 10,
    warmup: int = 3,
    providers: Sequence[str] | None = None,
) -> list[KernelTimes]:
    """Where each model's time goes: each node's median kernel time over ``runs`` profiled runs, by operator type.

    The models run alternately (order flipped every round, as :func:`interleaved_latency` does), so their
    profiles come from the same moments of a busy machine and their ratios are fair. The profiler's per-node
    timer sees only the kernels, not the session's own overhead; a profiled session is a little slower than
    a plain one, so whole-model latency is timed without it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [
            make_session(model, providers, threads, optimization, profile_prefix=str(Path(tmp) / f"profile{i}"))
            for i, model in enumerate(models)
        ]
        for _ in range(warmup):
            for session in sessions:
                session.run(None, feed)
        for i in range(runs):
            for session in sessions if i % 2 == 0 else sessions[::-1]:
                session.run(None, feed)
        traces = [json.loads(Path(session.end_profiling()).read_text()) for session in sessions]
    return [_by_op(events, warmup) for events in traces]


def _by_op(events: list[dict[str, Any]], warmup: int) -> KernelTimes:
    """Median kernel milliseconds of each node after its first ``warmup`` runs, summed by operator type."""
    durations: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        durations.setdefault(name, []).append(event["dur"] / 1000.0)
        op_of[name] = event.get("args", {}).get("op_name", "?")
    by_op: dict[str, float] = {}
    for name, times in durations.items():
        timed = times[warmup:] or times
        by_op[op_of[name]] = by_op.get(op_of[name], 0.0) + statistics.median(timed)
    return KernelTimes(by_op)
