"""Timing whole models in onnxruntime: paired runs and their interval, the check of a result, the kernel profile.

Two models compared on a busy machine must be timed at the same moments:
:func:`paired_times` runs them alternately (the order flips each round so
neither always runs on a warm cache). :func:`measure_speedup` takes pairs in
batches until the ratio's 95 % interval (:mod:`onnx_lowrank.stats`, bootstrap
over pairs) is narrower than asked, or a time budget or run cap ends: on two
busy cores one median of ten runs is not a figure, a figure with its interval
is. :class:`Timing` holds what the plan by latency times against — the
original's session, the reference input, the threads, the layer-timing store
and the :class:`Clock` — made before the model is rewritten in place; the
original's large weights are held once
(:class:`~onnx_lowrank.runtime.SharedWeights`) and every candidate's session
reads the tensors it has unchanged from the same maps.
:class:`ResultCheck` is the check of a result planned otherwise: the original's
weights held before the rewrite, the result's after it, both models timed
against each other at the end (after the caller has let go of them), or why not.
:func:`kernel_times` profiles models with onnxruntime's profiler and sums each
node's median kernel time by operator type: where the time goes.

Everything that reads a clock goes through a :class:`Clock`
(:class:`OnnxruntimeClock`, the real one, unless :data:`CLOCK` is replaced):
the plan by latency and the result check ask it for a session, a layer's
milliseconds, the original's, a candidate's speedup and the machine's load, so
tests of the plan's logic give it a fake clock and depend on no machine's speed.

Timing one layer alone (for the plan by latency) is :mod:`onnx_lowrank.layer_timing`'s.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from .config import LARGE_MODEL_MIB
from .errors import LowRankError
from .model_io import ModelLike
from .run_shapes import ModelShapes
from .runtime import HeldModel, SharedWeights, first_line, make_session
from .stats import SpeedupEstimate, speedup_estimate
from .timing_cache import TimingStore, cpu_description

__all__ = [
    "CLOCK",
    "CONV_OPS",
    "FC_OPS",
    "LARGE_MODEL",
    "MIN_PAIRS",
    "Clock",
    "KernelTimes",
    "LayerTime",
    "OnnxruntimeClock",
    "ResultCheck",
    "Timing",
    "interleaved_latency",
    "kernel_block",
    "kernel_times",
    "measure_speedup",
    "no_reference_reason",
    "paired_times",
    "plan_outcome",
    "start_timing",
    "timed_runs",
]


# the check of a plan not made by latency: fewer pairs than asked for when the interval is narrow early, or when a
# run of both models takes long (a budget of a few seconds, at least MIN_PAIRS pairs) — a look, with its interval
CHECK_BUDGET_MS = 3000.0
CHECK_WIDTH = 0.05  # the check stops early once its interval is this narrow (relative to the ratio)
# bytes of weights above which a model is large (config.LARGE_MODEL_MIB; --large-model)
LARGE_MODEL = LARGE_MODEL_MIB * 2**20


def timed_runs(session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` runs of one session."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def paired_times(first: Any, second: Any, feed: Mapping[str, Any], runs: int, start: int = 0) -> tuple[list[float], list[float]]:
    """Milliseconds of ``runs`` interleaved runs of each session (the order flipped every round; ``start``
    continues the alternation of earlier rounds)."""
    times: tuple[list[float], list[float]] = ([], [])
    sessions = (first, second)
    for i in range(start, start + runs):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            sessions[j].run(None, feed)
            times[j].append((time.perf_counter() - t0) * 1000.0)
    return times


def interleaved_latency(first: Any, second: Any, feed: Mapping[str, Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of each session over interleaved runs (order flipped every round)."""
    for _ in range(warmup):
        first.run(None, feed)
        second.run(None, feed)
    original, candidate = paired_times(first, second, feed, runs)
    return statistics.median(original), statistics.median(candidate)


# a measured speedup: pairs in batches of BATCH_PAIRS, at least MIN_PAIRS, until the 95 % interval's width is below
# the one asked for (relative to the ratio), or the time budget or the run cap ends
MIN_PAIRS = 6
BATCH_PAIRS = 4


def measure_speedup(
    first: Any,
    second: Any,
    feed: Mapping[str, Any],
    *,
    max_runs: int = 40,
    budget_ms: float = 4000.0,
    width: float = 0.05,
    warmup: int = 2,
    min_runs: int = MIN_PAIRS,
) -> SpeedupEstimate:
    """The speedup of ``second`` over ``first`` with its interval: ``warmup`` rounds, then pairs until the interval
    is narrower than ``width`` (relative) or ``budget_ms`` is spent (at least ``min_runs`` pairs, at most
    ``max_runs``)."""
    for _ in range(warmup):
        first.run(None, feed)
        second.run(None, feed)
    started = time.perf_counter()
    original: list[float] = []
    candidate: list[float] = []
    floor = min(min_runs, max_runs)
    while True:
        wanted = floor - len(original) if len(original) < floor else BATCH_PAIRS
        batch = max(1, min(wanted, max_runs - len(original)))
        o, c = paired_times(first, second, feed, batch, start=len(original))
        original += o
        candidate += c
        estimate = speedup_estimate(original, candidate)
        spent = (time.perf_counter() - started) * 1000.0
        if len(original) >= max_runs or (len(original) >= floor and (estimate.relative_width <= width or spent >= budget_ms)):
            return estimate


@dataclass(frozen=True)
class LayerTime:
    """One small model timed alone: the median milliseconds and the runs' spread (interquartile range / median)."""

    ms: float
    spread: float


# a layer timing is the median of at least ``runs`` runs, and of more (up to LAYER_MAX_RUNS) until the timed runs add
# up to LAYER_TIMED_MS: a median of 3 runs of 50 ms is steady, one of 7 runs of 50 µs is mostly scheduler noise
LAYER_TIMED_MS = 30.0
LAYER_MAX_RUNS = 50


def _layer_time(session: Any, feeds: Mapping[str, Any], runs: int, warmup: int) -> LayerTime:
    for _ in range(warmup):
        session.run(None, feeds)
    times: list[float] = []
    while len(times) < LAYER_MAX_RUNS and (len(times) < runs or sum(times) < LAYER_TIMED_MS):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    q1, median, q3 = np.quantile(times, [0.25, 0.5, 0.75])
    return LayerTime(float(median), float((q3 - q1) / median) if median > 0 else 0.0)


class Clock(Protocol):
    """What reads time for the plan by latency and the result check (a fake one in tests of the plan's logic)."""

    def session(self, weights: SharedWeights, model: HeldModel, threads: int) -> Any:
        """The session a whole model is timed in, its large weights read from ``weights`` (shared with every other
        session of that store: the original's, and each candidate's)."""
        ...

    def layer(self, model: onnx.ModelProto, feeds: Mapping[str, Any], threads: int, runs: int, warmup: int) -> LayerTime:
        """One small model (a layer alone, or its pair) timed alone."""
        ...

    def model_runs(self, session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
        """Milliseconds of ``runs`` runs of one session."""
        ...

    def speedup(self, timing: Timing, candidate: HeldModel, *, max_runs: int, budget_ms: float, width: float) -> SpeedupEstimate:
        """The candidate (held in ``timing.weights``) against the original of ``timing``, interleaved, with the ratio's
        interval."""
        ...

    def load(self, threads: int) -> float:
        """Milliseconds of a fixed probe model now: against its quiet time, how busy the machine is."""
        ...


def _probe_model() -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A fixed 3×3 conv (32 → 32 channels at 56×56, 29M MACs): a few milliseconds, the same on every run."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "load_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model, {"x": rng.standard_normal((1, 32, 56, 56)).astype(np.float32)}


class OnnxruntimeClock:
    """The real clock: models run in onnxruntime, times read with ``time.perf_counter``."""

    def session(self, weights: SharedWeights, model: HeldModel, threads: int) -> Any:
        return weights.session(model, threads=threads)

    def layer(self, model: onnx.ModelProto, feeds: Mapping[str, Any], threads: int, runs: int, warmup: int) -> LayerTime:
        return _layer_time(make_session(model, threads=threads), feeds, runs, warmup)

    def model_runs(self, session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
        return timed_runs(session, feeds, runs)

    def speedup(self, timing: Timing, candidate: HeldModel, *, max_runs: int, budget_ms: float, width: float) -> SpeedupEstimate:
        session = timing.weights.session(candidate, threads=timing.threads)
        return measure_speedup(timing.original, session, timing.feeds, max_runs=max_runs, budget_ms=budget_ms, width=width)

    def load(self, threads: int) -> float:
        model, feeds = _probe_model()
        session = make_session(model, threads=threads)
        return statistics.median(timed_runs(session, feeds, 9)[2:])


CLOCK: Clock = OnnxruntimeClock()


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
    """What timing one conversion uses: threads, the timing store, the reference input, the original's session and
    the clock that times it.

    The original's large weights are held once in ``weights`` (:class:`~onnx_lowrank.runtime.SharedWeights`); every
    candidate timed against it (:meth:`candidate`, then the clock's ``speedup``) reads the tensors it has unchanged
    from the same maps. :meth:`close` drops the session and removes the store's file.
    """

    threads: int
    store: TimingStore | None  # layer timings kept across runs; None when only the whole model is timed
    feeds: dict[str, Any]
    original: Any  # onnxruntime session of the model before any layer was rewritten
    clock: Clock
    weights: SharedWeights
    held: HeldModel  # the original without its large weights (the store holds them)
    model: onnx.ModelProto | None = None  # the original itself, where candidates are built from it

    @classmethod
    def start(
        cls, model: onnx.ModelProto, feeds: Mapping[str, Any], threads: int, store: TimingStore | None, large_model: int = LARGE_MODEL
    ) -> Timing:
        weights = SharedWeights()
        try:
            held = weights.hold(model)
            weights.prepack = weights.held_bytes <= large_model
            return cls(threads, store, dict(feeds), CLOCK.session(weights, held, threads), CLOCK, weights, held, model)
        except BaseException:
            weights.close()
            raise

    def candidate(self, build: Callable[[onnx.ModelProto], onnx.ModelProto]) -> HeldModel:
        """The candidate ``build(original)`` makes (from a copy), held in the original's store.

        The candidate is built from the original without its large weights (a copy of a few kilobytes: the rewrite
        adds the factors it computed, and the store shares the rest); where the rewrite would need a weight's values
        it is built from the original itself.
        """
        try:
            candidate = build(self.held.proto)
        except (LowRankError, ValueError, KeyError, AssertionError):
            if self.model is None:
                raise
            candidate = build(self.model)
        return self.weights.hold(candidate)

    def close(self) -> None:
        """Drop the original's session and the shared weights' file."""
        self.original = None
        self.weights.close()


def no_reference_reason(shapes: ModelShapes) -> str | None:
    """Why the model cannot be timed at all (no input to time it on), or None."""
    from .shapes import needs_input_shape_message

    if shapes.reference is not None:
        return None
    if shapes.missing_inputs:
        return f"no input of a known size to time it on: {needs_input_shape_message(shapes.missing_inputs)}"
    return "no input to time it on"


def start_timing(
    proto: onnx.ModelProto, shapes: ModelShapes, threads: int, store: TimingStore | None, large_model: int = LARGE_MODEL
) -> tuple[Timing | None, str | None]:
    """A session of the model as it is now, for timing against; or None and the reason it cannot be made."""
    why = no_reference_reason(shapes)
    if why is not None or shapes.reference is None:
        return None, why
    try:
        timing = Timing.start(proto, shapes.reference, threads, store, large_model)
    except LowRankError as exc:
        return None, str(exc)
    try:  # a model onnxruntime loads but cannot run (no output, an attribute its kernel refuses) is not timed
        timing.original.run(None, timing.feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        timing.close()
        return None, f"onnxruntime cannot run the model on the reference input ({first_line(exc)})"
    return timing, None


def plan_outcome(runs: int, decomposes: bool, why_not: str | None, by: str | None) -> dict[str, Any]:
    """What the report says of a plan not made by latency (``by``: "macs", or None for a per-layer policy) before
    its check runs: what it was planned by, and why it will not be timed (``not_timed``) when it will not."""
    out: dict[str, Any] = {"by": by}
    if why_not is not None:
        out["why_macs"] = why_not
    if not decomposes:
        return {**out, "not_timed": "no layer was decomposed"}
    if runs == 0:
        return {**out, "not_timed": "not asked for (0 check runs)"}
    if why_not is not None:
        return {**out, "not_timed": why_not}
    return out


class ResultCheck:
    """The check of a result not planned by latency: the result timed against the original, paired runs and the
    ratio's interval.

    Made (:meth:`start`) before the original's layers are rewritten in place: the original's large weights go to a
    :class:`~onnx_lowrank.runtime.SharedWeights` store then. :meth:`hold` gives it the final candidate, whose
    unchanged tensors are the original's; nothing else is kept, so the caller may drop both models before
    :meth:`run` builds the two sessions on the store (through the :class:`Clock`), times them (at most ``runs``
    pairs; fewer when the interval is narrow early, or a slow model spends ``CHECK_BUDGET_MS``) and removes the
    store's file. A model whose weights exceed ``large_model`` bytes is checked without onnxruntime's prepacking,
    which would copy every matrix weight per session, and :meth:`cost_note` says beforehand what the check costs.
    """

    def __init__(
        self, weights: SharedWeights, original: HeldModel, feeds: Mapping[str, Any], threads: int, runs: int, large_model: int
    ) -> None:
        self.weights, self.original = weights, original
        self.candidate: HeldModel | None = None
        self.feeds, self.threads, self.runs, self.large_model = dict(feeds), threads, runs, large_model
        self.clock = CLOCK
        self.seconds = 0.0  # spent on the check so far: holding the weights, then the sessions and runs
        self.model_bytes = 0

    @classmethod
    def start(
        cls, proto: onnx.ModelProto, shapes: ModelShapes, threads: int, runs: int, large_model: int = LARGE_MODEL
    ) -> tuple[ResultCheck | None, str | None]:
        """The check of ``proto``'s result (its weights held now), or None and why the model cannot be timed."""
        why = no_reference_reason(shapes)
        if why is not None or shapes.reference is None:
            return None, why
        start = time.perf_counter()
        weights = SharedWeights()
        try:
            check = cls(weights, weights.hold(proto), shapes.reference, threads, runs, large_model)
        except BaseException:
            weights.close()
            raise
        check.model_bytes = weights.held_bytes
        weights.prepack = not check.large
        check.seconds = time.perf_counter() - start
        return check, None

    def hold(self, candidate: onnx.ModelProto) -> None:
        """The final candidate: its tensors the original has are shared, the others written to the store."""
        start = time.perf_counter()
        self.candidate = self.weights.hold(candidate)
        self.seconds += time.perf_counter() - start

    @property
    def large(self) -> bool:
        return self.model_bytes > self.large_model

    def cost_note(self) -> str | None:
        """What the check of a model above ``large_model`` will cost, to say before it runs (None for a smaller one)."""
        if not self.large:
            return None
        held = self.weights.file_bytes
        folder = self.weights.folder.parent if self.weights.folder is not None else Path(tempfile.gettempdir())
        return (
            f"checking the result against the original: its weights take {_mib(self.model_bytes)} (above --large-model "
            f"{_mib(self.large_model)}), so both onnxruntime sessions read one copy of them, a {_mib(held)} temporary file "
            f"in {folder} mapped once (about {_mib(held)} more memory), without onnxruntime's weight prepacking; two "
            f"warm-up runs of both models, then at most {self.runs} pairs of runs, at least {min(self.runs, MIN_PAIRS)}, "
            f"within about {CHECK_BUDGET_MS / 1000:g} s (--check-runs 0 skips the check)"
        )

    def run(self, notice: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Time the candidate against the original (``notice`` first gets :meth:`cost_note`); the figures, or
        ``not_timed`` and why. The store's file is removed whatever happens."""
        start = time.perf_counter()
        note = self.cost_note()
        out: dict[str, Any] = {"check_note": note} if note else {}
        if note is not None and notice is not None:
            notice(note)
        original: Any = None
        timing: Timing | None = None
        try:
            if self.candidate is None:
                raise LowRankError("no candidate to time")
            original = self.clock.session(self.weights, self.original, self.threads)
            try:  # a model onnxruntime loads but cannot run (no output, an attribute its kernel refuses) is not timed
                original.run(None, self.feeds)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise LowRankError(f"onnxruntime cannot run the model on the reference input ({first_line(exc)})") from None
            timing = Timing(self.threads, None, self.feeds, original, self.clock, self.weights, self.original)
            try:
                estimate = self.clock.speedup(timing, self.candidate, max_runs=self.runs, budget_ms=CHECK_BUDGET_MS, width=CHECK_WIDTH)
            except LowRankError:
                raise
            except Exception as exc:  # onnxruntime raises its own exception types
                raise LowRankError(f"onnxruntime failed to time the model: {first_line(exc)}") from None
            out.update(estimate.to_dict(), threads=self.threads)
        except LowRankError as exc:
            out["not_timed"] = str(exc)
        finally:
            held = self.weights.file_bytes
            original = timing = None  # both sessions go before the check returns
            self.close()
            self.seconds += time.perf_counter() - start
        out["check"] = {
            "seconds": self.seconds,
            "weights_file_bytes": held,  # one copy of the weights of both models
            "shared_bytes": self.candidate.shared if self.candidate is not None else 0,  # the candidate's, read from the original's
            "prepacking": self.weights.prepack,
        }
        return out

    def close(self) -> None:
        """Remove the store's file (idempotent; sessions already made keep their maps)."""
        self.weights.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


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
