"""Compare two models in onnxruntime: per-output error statistics and interleaved latency.

Either model may be an ONNX file, an ORT-format file (``.ort``, what
:func:`onnx_lowrank.mobile.save_ort` writes) or a ``ModelProto``.

Inputs are random (seeded) from the original model's input types and shapes —
symbolic dims become 1 — or come from an ``.npz`` keyed by input name; an
``.npz`` that also holds ``labels`` gives accuracy and top-1 agreement.
Latency: both sessions are warmed up, then run alternately (the order flips
each round so neither model always runs on a warm cache), thread spinning off;
the medians and their ratio are reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from .errors import LowRankError
from .model_io import load_model
from .runtime import make_session
from .shapes import concrete_input_shapes, needs_input_shape_message, random_feed, session_input_specs

__all__ = [
    "CONV_OPS",
    "FC_OPS",
    "KernelTimes",
    "OutputStats",
    "VerifyResult",
    "compare_outputs",
    "interleaved_latency",
    "kernel_times",
    "make_session",
    "random_inputs",
    "verify",
]

ModelLike = str | os.PathLike[str] | onnx.ModelProto

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class OutputStats:
    """Error of one output, candidate against original."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    p99_abs: float
    relative_l2: float
    cosine: float
    required_atol: float  # the least atol that passes at the given rtol
    passed: bool
    top1_agreement: float | None = None
    accuracy_original: float | None = None
    accuracy_candidate: float | None = None


@dataclass
class VerifyResult:
    outputs: list[OutputStats]
    rtol: float
    atol: float
    providers: list[str]
    original_ms: float | None = None
    candidate_ms: float | None = None
    runs: int = 0
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # profiled kernel milliseconds per operator type, {"original": {...}, "candidate": {...}} (verify(profile=True))
    kernels: dict[str, dict[str, float]] | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def latency_ratio(self) -> float | None:
        """Original latency / candidate latency (> 1: the candidate is faster)."""
        if not self.original_ms or not self.candidate_ms:
            return None
        return self.original_ms / self.candidate_ms

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["latency_ratio"] = self.latency_ratio
        return data


def random_inputs(
    session: Any, seed: int = 0, batch: int = 1, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Seeded random inputs for every input of ``session``, of the shape ``input_shapes`` gives it, else the
    declared one with a symbolic first dim as ``batch``; any other symbolic dim is an error naming the input."""
    specs = session_input_specs(session)
    shapes, missing = concrete_input_shapes(specs, input_shapes, batch)
    if missing:
        raise LowRankError(f"random inputs need a size for every dim: {needs_input_shape_message(missing)}")
    return random_feed(specs, shapes, seed)


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[npt.NDArray[Any]],
    candidate: Sequence[npt.NDArray[Any]],
    rtol: float,
    atol: float,
    labels: npt.NDArray[Any] | None = None,
) -> list[OutputStats]:
    stats = []
    for name, ref, cand in zip(names, reference, candidate, strict=False):
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(cand, dtype=np.float64)
        if a.shape != b.shape:
            raise LowRankError(f"output {name!r}: shapes differ, {list(a.shape)} vs {list(b.shape)}")
        diff = np.abs(a - b)
        finite = bool(np.all(np.isfinite(b)) or np.array_equal(np.isfinite(a), np.isfinite(b)))
        ref_norm = float(np.linalg.norm(a))
        cos_den = ref_norm * float(np.linalg.norm(b))
        entry = OutputStats(
            name=name,
            shape=list(a.shape),
            max_abs=float(diff.max()) if diff.size else 0.0,
            max_rel=float((diff / np.maximum(np.abs(a), 1e-12)).max()) if diff.size else 0.0,
            mean_abs=float(diff.mean()) if diff.size else 0.0,
            p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
            relative_l2=float(np.linalg.norm(a - b) / ref_norm) if ref_norm else float(np.linalg.norm(b)),
            cosine=float(np.sum(a * b) / cos_den) if cos_den else 1.0,
            required_atol=float(np.max(diff - rtol * np.abs(a), initial=0.0)),
            passed=finite and bool(np.all(diff <= atol + rtol * np.abs(a))),
        )
        if a.ndim == 2 and a.shape[1] > 1:
            top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
            entry.top1_agreement = float(np.mean(top_a == top_b))
            if labels is not None and len(labels) == a.shape[0]:
                entry.accuracy_original = float(np.mean(top_a == labels))
                entry.accuracy_candidate = float(np.mean(top_b == labels))
        stats.append(entry)
    return stats


def _load_inputs(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    p = Path(path)
    if not p.is_file():
        raise LowRankError(f"{p}: no such inputs file")
    try:
        with open(p, "rb") as f:
            if f.read(2) != b"PK":  # np.load would take a .npy or a pickle, or fail on an empty file with EOFError
                raise ValueError("not a zip archive")
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise LowRankError(f"{p}: not a readable .npz ({exc})") from None


def _batches(
    feeds: Mapping[str, npt.NDArray[Any]], names: Sequence[str], fixed_batch: Mapping[str, int | None]
) -> list[dict[str, npt.NDArray[Any]]]:
    """Split an npz whose first axis is samples into batches the model accepts."""
    out = []
    count = min(len(feeds[n]) for n in names)
    step = min((b for b in fixed_batch.values() if b), default=count) or count
    for start in range(0, count, step):
        out.append({n: feeds[n][start : start + step] for n in names})
    return out


def verify(
    original: ModelLike,
    candidate: ModelLike,
    *,
    inputs: str | os.PathLike[str] | Mapping[str, npt.NDArray[Any]] | None = None,
    providers: Sequence[str] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
    profile: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> VerifyResult:
    """Run both models in onnxruntime on the same inputs and compare (see the module docstring).

    ``input_shapes``: shapes of the random inputs (by input name) where the model leaves dims symbolic.
    ``profile``: also time each operator type of both models with onnxruntime's profiler (``runs`` runs each,
    after the interleaved timing), which shows where a measured speedup falls short of the MAC ratio.
    """
    if not rtol >= 0 or not atol >= 0:
        raise LowRankError(f"tolerances must be >= 0, got rtol={rtol} atol={atol}")
    for model in (original, candidate):
        if isinstance(model, (str, os.PathLike)):
            _check_readable(model)  # one-line errors for a missing or broken file before onnxruntime sees it
    ref = make_session(original, providers, threads)
    cand = make_session(candidate, providers, threads)
    names = [o.name for o in ref.get_outputs()]
    cand_names = [o.name for o in cand.get_outputs()]
    if names != cand_names:
        raise LowRankError(f"outputs differ: {names} vs {cand_names}")
    input_names = [i.name for i in ref.get_inputs()]
    labels = None
    if inputs is None:
        batches = [random_inputs(ref, seed, input_shapes=input_shapes)]
    else:
        data = dict(_load_inputs(inputs)) if isinstance(inputs, (str, os.PathLike)) else dict(inputs)
        labels = data.pop("labels", None)
        missing = [n for n in input_names if n not in data]
        if missing:
            raise LowRankError(f"inputs file lacks model input(s): {', '.join(missing)}")
        fixed = {i.name: (i.shape[0] if i.shape and isinstance(i.shape[0], int) else None) for i in ref.get_inputs()}
        batches = _batches(data, input_names, fixed)
    ref_out: list[list[npt.NDArray[Any]]] = []
    cand_out: list[list[npt.NDArray[Any]]] = []
    try:
        for feed in batches:
            ref_out.append(ref.run(names, feed))
            cand_out.append(cand.run(names, feed))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed to run: {first}") from None
    merged_ref = [np.concatenate([b[i] for b in ref_out]) if len(ref_out) > 1 else ref_out[0][i] for i in range(len(names))]
    merged_cand = [np.concatenate([b[i] for b in cand_out]) if len(cand_out) > 1 else cand_out[0][i] for i in range(len(names))]
    stats = compare_outputs(names, merged_ref, merged_cand, rtol, atol, labels)
    result = VerifyResult(stats, rtol, atol, list(cand.get_providers()), samples=sum(len(next(iter(b.values()))) for b in batches))
    if runs > 0:
        result.original_ms, result.candidate_ms = interleaved_latency(ref, cand, batches[0], runs, warmup)
        result.runs = runs
        if profile:
            before, after = kernel_times([original, candidate], batches[0], threads, runs=runs, warmup=warmup, providers=providers)
            result.kernels = {"original": before.by_op, "candidate": after.by_op}
    return result


def _check_readable(path: str | os.PathLike[str]) -> None:
    """An ONNX model loads (with its external data); an ORT-format model (``.ort``) is a readable file onnxruntime opens."""
    from .mobile import is_ort_format

    p = Path(path)
    if not (p.is_file() and is_ort_format(p)):
        load_model(p)
        return
    if not os.access(p, os.R_OK):
        raise LowRankError(f"{p}: permission denied")


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
    import json

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
