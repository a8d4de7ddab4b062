"""Compare two models in onnxruntime: per-output error statistics and interleaved latency.

Either model may be an ONNX file, an ORT-format file (``.ort``, what
:func:`onnx_lowrank.mobile.save_ort` writes) or a ``ModelProto``.

Inputs are random (seeded) from the original model's input types and shapes —
symbolic dims become 1 — or come from an ``.npz`` keyed by input name; an
``.npz`` that also holds ``labels`` gives accuracy and top-1 agreement. Random
inputs too large for this machine's memory, and data files that do not fit the
model's inputs, are refused before anything runs.
Non-finite outputs: a NaN where the other model has a NaN, or an infinity of the
same sign, counts as equal; the statistics are taken over the pairs where both
are finite, and the counts of non-finite values are reported beside them.
Latency: both sessions are warmed up, then run alternately (the order flips
each round so neither model always runs on a warm cache), thread spinning off;
the medians, their ratio and its 95 % interval (bootstrap over the paired runs,
:mod:`onnx_lowrank.stats`) are reported. The two sessions read one copy of the
weights the models have in common (:class:`onnx_lowrank.runtime.SharedWeights`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from .agreement import OutputAgreement, compare
from .data_io import InputSpec, check_allocation, check_samples, load_npz, load_sample, model_input_specs
from .errors import LowRankError
from .model_io import ModelLike, load_model
from .runtime import SharedWeights, first_line, make_session
from .shapes import concrete_input_shapes, needs_input_shape_message, random_feed, session_input_specs
from .stats import speedup_estimate
from .timing import LARGE_MODEL, kernel_times, paired_times

__all__ = [
    "OutputStats",
    "VerifyOptions",
    "VerifyResult",
    "answers",
    "check_random_inputs",
    "compare_outputs",
    "load_inputs",
    "random_inputs",
    "verify",
]


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
    # NaN/Inf counts; the statistics above are over the pairs where both values are finite
    nonfinite_original: int = 0
    nonfinite_candidate: int = 0
    nonfinite_mismatch: int = 0  # positions where one is non-finite and the other is not the same value


@dataclass
class VerifyResult:
    outputs: list[OutputStats]
    rtol: float
    atol: float
    providers: list[str]
    original_ms: float | None = None
    candidate_ms: float | None = None
    speedup_low: float | None = None  # the 95 % interval of the latency ratio (bootstrap over the paired runs)
    speedup_high: float | None = None
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


def check_random_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Refuse (:class:`LowRankError`) random inputs for ``model`` that would not fit in memory, or ``input_shapes``
    that do not fit its inputs, before anything runs (inputs with no size are refused when the inputs are made)."""
    specs = model_input_specs(model)
    shapes, _ = concrete_input_shapes(specs, input_shapes)
    total = 0
    for spec in specs:
        if spec.name in shapes and spec.dtype is not None:
            nbytes = math.prod(shapes[spec.name]) * (8 + spec.dtype.itemsize)
            check_allocation(nbytes, f"random input {spec.name!r} of shape {list(shapes[spec.name])}")
            total += nbytes
    check_allocation(total, "the random inputs")


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[npt.NDArray[Any]],
    candidate: Sequence[npt.NDArray[Any]],
    rtol: float,
    atol: float,
    labels: npt.NDArray[Any] | None = None,
) -> list[OutputStats]:
    """Per output: error statistics over the pairs where both values are finite, and the NaN/Inf counts.

    An output passes when every finite pair is within ``atol + rtol·|reference|`` and the
    non-finite values agree (NaN with NaN, an infinity with the same infinity).
    """
    stats = []
    for name, ref, cand in zip(names, reference, candidate, strict=False):
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(cand, dtype=np.float64)
        if a.shape != b.shape:
            raise LowRankError(f"output {name!r}: shapes differ, {list(a.shape)} vs {list(b.shape)}")
        with np.errstate(all="ignore"):  # NaN and Inf are counted, not warned about
            finite_a, finite_b = np.isfinite(a), np.isfinite(b)
            both = finite_a & finite_b
            same_special = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
            mismatch = int(np.count_nonzero(~both & ~same_special))
            fa, fb = a[both], b[both]
            diff = np.abs(fa - fb)
            ref_norm = float(np.linalg.norm(fa))
            cos_den = ref_norm * float(np.linalg.norm(fb))
            entry = OutputStats(
                name=name,
                shape=list(a.shape),
                max_abs=float(diff.max()) if diff.size else 0.0,
                max_rel=float((diff / np.maximum(np.abs(fa), 1e-12)).max()) if diff.size else 0.0,
                mean_abs=float(diff.mean()) if diff.size else 0.0,
                p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
                relative_l2=float(np.linalg.norm(fa - fb) / ref_norm) if ref_norm else float(np.linalg.norm(fb)),
                cosine=float(np.sum(fa * fb) / cos_den) if cos_den else 1.0,
                required_atol=float(np.max(diff - rtol * np.abs(fa), initial=0.0)),
                passed=mismatch == 0 and bool(np.all(diff <= atol + rtol * np.abs(fa))),
                nonfinite_original=int(a.size - np.count_nonzero(finite_a)),
                nonfinite_candidate=int(b.size - np.count_nonzero(finite_b)),
                nonfinite_mismatch=mismatch,
            )
            if a.ndim == 2 and a.shape[1] > 1:
                top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
                entry.top1_agreement = float(np.mean(top_a == top_b))
                if labels is not None and labels.ndim == 1 and len(labels) == a.shape[0]:
                    entry.accuracy_original = float(np.mean(top_a == labels))
                    entry.accuracy_candidate = float(np.mean(top_b == labels))
        stats.append(entry)
    return stats


def load_inputs(
    inputs: str | os.PathLike[str] | Mapping[str, npt.ArrayLike], specs: Sequence[InputSpec], what: str = "inputs file"
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[Any] | None]:
    """The arrays of an ``.npz`` (or a mapping) for the model inputs ``specs``, checked and cast; and its ``labels``.

    ``what`` names the data in messages (``"inputs file"``, ``"eval inputs file"``)."""
    if isinstance(inputs, (str, os.PathLike)):
        data: dict[str, Any] = load_npz(inputs, what)
    else:
        data = {str(k): np.asarray(v) for k, v in inputs.items()}
    labels = data.pop("labels", None)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim not in (1, 2) or not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
            raise LowRankError(
                f"{what}: labels of shape {tuple(labels.shape)} and dtype {labels.dtype}; expected one class index per "
                "sample, or per sample a sequence of class indices padded with -1"
            )
    return check_samples(data, specs, what.removesuffix(" file").removesuffix("s"), what), labels


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


InputsLike = str | os.PathLike[str] | Mapping[str, npt.NDArray[Any]]
SampleLike = str | os.PathLike[str] | Mapping[str, npt.ArrayLike]


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`verify` compares, checked once here.

    What the models run on: ``inputs`` (an ``.npz`` or a mapping, samples on axis 0; ``labels`` too for
    accuracy), else ``sample`` (one input set as the model takes it — no sample axis, a scalar input as a 0-d
    array — what a model with a scalar input is run on), else random inputs from ``seed``, shaped by
    ``input_shapes`` where the model leaves dims symbolic. The tolerances: ``rtol``, ``atol``. The timing:
    ``runs`` interleaved pairs after ``warmup`` runs, on ``threads`` and ``providers``; ``profile`` also times
    each operator type of both models with onnxruntime's profiler (``runs`` runs each, after the interleaved
    timing), which shows where a measured speedup falls short of the MAC ratio. A model with more than
    ``large_model`` bytes of weights runs without onnxruntime's prepacking.
    """

    inputs: InputsLike | None = None
    sample: SampleLike | None = None
    input_shapes: Mapping[str, Sequence[int]] | None = None
    seed: int = 0
    rtol: float = 1e-3
    atol: float = 1e-4
    runs: int = 20
    warmup: int = 3
    threads: int | None = None
    providers: Sequence[str] | None = None
    profile: bool = False
    large_model: int = LARGE_MODEL

    def __post_init__(self) -> None:
        rtol, atol = self.rtol, self.atol
        if not rtol >= 0 or not atol >= 0:
            raise LowRankError(f"tolerances must be >= 0, got rtol={rtol} atol={atol}")
        if not (math.isfinite(rtol) and math.isfinite(atol)):
            raise LowRankError(f"tolerances must be finite, got rtol={rtol} atol={atol}")
        if self.inputs is not None and self.sample is not None:
            raise LowRankError("give inputs (samples on axis 0) or one sample, not both")


def verify(original: ModelLike, candidate: ModelLike, options: VerifyOptions | None = None, /, **keywords: Any) -> VerifyResult:
    """Run both models in onnxruntime on the same inputs and compare (see the module docstring).

    ``options`` (:class:`VerifyOptions`) say on what and how; keywords name single options
    (``verify(a, b, runs=0)``) and override ``options``'. The two sessions share the weights the models have in
    common (:class:`~onnx_lowrank.runtime.SharedWeights`).
    """
    # an unknown keyword is a TypeError, as for any Python function (and for decompose)
    options = replace(options, **keywords) if options is not None else VerifyOptions(**keywords)
    for model in (original, candidate):
        if isinstance(model, (str, os.PathLike)):
            _check_readable(model)  # one-line errors for a missing or unreadable file before onnxruntime sees it
    with SharedWeights() as store:
        ref, cand = _sessions(store, original, candidate, options)
        return _compare(ref, cand, original, candidate, options)


def _sessions(store: SharedWeights, original: ModelLike, candidate: ModelLike, options: VerifyOptions) -> tuple[Any, Any]:
    """The sessions of both models; an ONNX model's large weights are held once in ``store``, shared where the
    candidate has the original's tensors (an ORT-format file is loaded as it is)."""
    from .mobile import is_ort_format

    sessions = []
    for model in (original, candidate):
        if isinstance(model, (str, os.PathLike)) and is_ort_format(Path(model)):
            sessions.append(make_session(model, options.providers, options.threads))
            continue
        proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        held = store.hold(proto)
        del proto
        if not sessions:  # the original's size decides, for both sessions alike
            store.prepack = store.held_bytes <= options.large_model
        sessions.append(store.session(held, options.providers, options.threads))
    return sessions[0], sessions[1]


def _compare(ref: Any, cand: Any, original: ModelLike, candidate: ModelLike, options: VerifyOptions) -> VerifyResult:
    inputs, sample, runs = options.inputs, options.sample, options.runs
    names = [o.name for o in ref.get_outputs()]
    cand_names = [o.name for o in cand.get_outputs()]
    if names != cand_names:
        raise LowRankError(f"outputs differ: {names} vs {cand_names}")
    input_names = [i.name for i in ref.get_inputs()]
    labels = None
    if sample is not None:
        batches = [load_sample(sample, session_input_specs(ref))]
    elif inputs is None:
        batches = [random_inputs(ref, options.seed, input_shapes=options.input_shapes)]
    else:
        data, labels = load_inputs(inputs, session_input_specs(ref))
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
    stats = compare_outputs(names, merged_ref, merged_cand, options.rtol, options.atol, labels)
    count = 1 if sample is not None else sum(_samples_in(b) for b in batches)
    result = VerifyResult(stats, options.rtol, options.atol, list(cand.get_providers()), samples=count)
    if runs > 0:
        for _ in range(options.warmup):
            ref.run(None, batches[0])
            cand.run(None, batches[0])
        estimate = speedup_estimate(*paired_times(ref, cand, batches[0], runs))
        result.original_ms, result.candidate_ms = estimate.original_ms, estimate.candidate_ms
        result.speedup_low, result.speedup_high = estimate.low, estimate.high
        result.runs = runs
        if options.profile:
            before, after = kernel_times(
                [original, candidate], batches[0], options.threads, runs=runs, warmup=options.warmup, providers=options.providers
            )
            result.kernels = {"original": before.by_op, "candidate": after.by_op}
    return result


def _samples_in(batch: Mapping[str, npt.NDArray[Any]]) -> int:
    """The samples of a batch: the first dim of its first input (one for a scalar input)."""
    first = next(iter(batch.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


def _check_readable(path: str | os.PathLike[str]) -> None:
    """An ORT-format model (``.ort``) is a readable file onnxruntime opens; an ONNX model is checked as it is loaded."""
    from .mobile import is_ort_format

    p = Path(path)
    if p.is_file() and is_ort_format(p) and not os.access(p, os.R_OK):
        raise LowRankError(f"{p}: permission denied")
    if not p.is_file() and p.suffix.lower() == ".ort":
        load_model(p)  # the one-line error of a missing file or a folder


def answers(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: Mapping[str, npt.NDArray[Any]],
    *,
    threads: int | None = None,
    batch: int = 64,
    labels: npt.NDArray[Any] | None = None,
    large_model: int = LARGE_MODEL,
) -> list[OutputAgreement]:
    """How the candidate's answers compare with the original's on ``data`` (samples on axis 0, checked already):
    per output the measure that fits it (:mod:`onnx_lowrank.agreement`). The two sessions read one copy of the
    weights the models have in common, as :func:`verify`'s do."""
    with SharedWeights() as store:
        held = store.hold(original)
        store.prepack = store.held_bytes <= large_model  # the original's size decides, for both sessions alike
        ref = store.session(held, threads=threads)
        cand = store.session(store.hold(candidate), threads=threads)
        return _answers(ref, cand, original, data, batch, labels)


def _answers(
    ref: Any, cand: Any, original: onnx.ModelProto, data: Mapping[str, npt.NDArray[Any]], batch: int, labels: npt.NDArray[Any] | None
) -> list[OutputAgreement]:
    names = [o.name for o in ref.get_outputs()]
    inputs = [i.name for i in ref.get_inputs()]
    fixed = {i.name: (i.shape[0] if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 else None) for i in ref.get_inputs()}
    fixed_batch = min((b for b in fixed.values() if b), default=None)
    step = fixed_batch or batch
    count = min(len(data[n]) for n in inputs)
    if fixed_batch:
        count -= count % fixed_batch  # a fixed batch takes whole batches only
    outs: tuple[list[list[npt.NDArray[Any]]], list[list[npt.NDArray[Any]]]] = ([], [])
    try:
        for start in range(0, count, step):
            feed = {n: np.ascontiguousarray(data[n][start : start + step]) for n in inputs}
            outs[0].append(ref.run(names, feed))
            outs[1].append(cand.run(names, feed))
    except Exception as exc:  # onnxruntime's own exception types
        raise LowRankError(f"onnxruntime failed to run on the held-back samples: {first_line(exc)}") from None
    merged = [[np.concatenate([b[i] for b in side]) for i in range(len(names))] for side in outs]
    return compare(names, merged[0], merged[1], original, labels)
