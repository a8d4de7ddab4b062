"""Convert one model at several speedup targets and measure each result against the original.

Choosing ``--speedup S`` trades accuracy for speed; a sweep shows that trade.
One preparation serves every target: the model is loaded, BatchNormalization
folded, shapes inferred and the decomposable layers found once, and each
layer's singular values are computed once (by the first target that needs
them) and reused by the others. With calibration data the layers' damage
statistics, data-aware factorizations and gains (:mod:`onnx_lowrank.calibration`)
are also measured once; each target then allocates its ranks from those and
refits its own factors.

Per target the result is run in onnxruntime beside the original:

* **MAC ratio**: MACs of the decomposable layers before / after (the quantity
  ``--speedup`` budgets);
* **latency ratio**: original / candidate milliseconds, the medians of
  ``runs`` interleaved runs (:func:`onnx_lowrank.verify.interleaved_latency`) on
  one batch (one sample where the batch dimension is free);
* **output error**: :func:`onnx_lowrank.verify.compare_outputs` of every output
  over all evaluation samples (the evaluation inputs, else the ``--sample``,
  else random inputs), and the top-1 agreement of 2-D outputs; ``labels`` in
  the evaluation inputs give both models' accuracy;
* **conversion seconds**: planning, applying and refitting this target (the
  shared preparation is reported once, in :attr:`SweepResult.prepare_seconds`;
  the first target's time includes the spectra the later targets reuse).

With a fine-tune (``finetune=``, as :func:`onnx_lowrank.decompose` takes it) every target's converted model is
distilled toward the original on the calibration samples decompose would train on, after it was timed (the
fine-tune changes weights, not the graph: the timing stands); the row then measures the fine-tuned model
and keeps the converted model's errors, agreement and accuracy beside it (:class:`Untuned`).

A target that cannot be reached is a row with the reason, not an error.
Evaluation inputs are checked against the model before any conversion.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import numpy.typing as npt
import onnx

from .agreement import OutputAgreement, compare, summary_measure
from .api import calibrated_conversion, convert_prepared
from .config import DEFAULT_SPEEDUP, DecomposeConfig, DecomposeKeywords, is_whole
from .errors import LowRankError
from .factorization import Kind, decompose_kernel
from .layers import Prepared, load_samples, model_sizes, prepare
from .model_io import ModelLike, as_model, save_model
from .planning import CalibrationRun
from .ranks import tail_errors
from .report import Report
from .runtime import first_line, make_session
from .shapes import session_input_specs
from .stats import speedup_estimate
from .threads import single_threaded_blas
from .timing import kernel_times, paired_times
from .verify import OutputStats, compare_outputs, load_inputs, random_inputs

__all__ = [
    "DEFAULT_SPEEDUPS",
    "LayerSpectrum",
    "SweepResult",
    "SweepRow",
    "TargetRunner",
    "Untuned",
    "check_runs",
    "layer_spectra",
    "parse_speedups",
    "report_spectra",
    "sweep",
    "sweep_config",
]

DEFAULT_SPEEDUPS = (1.25, 1.5, 2.0, 3.0, 4.0)
EVAL_BATCH = 64  # samples per onnxruntime run where the batch dimension is free
RANDOM_SAMPLES = 4  # random inputs when no evaluation inputs are given (batch dimension free)

Array = npt.NDArray[Any]
Progress = Callable[[int, int, str], None]


@dataclass
class LayerSpectrum:
    """One layer's singular values for one kind of split, normalised: ``curve[k]`` is ``σ_{k+1} / σ_1``.

    For a grouped kernel ``σ_k = sqrt(Σ_g s_{g,k}²)`` (the groups share one rank).
    ``errors[K]`` is the relative kernel error ``||W − W_K|| / ||W||`` at rank ``K`` (``K = 0..full``).
    """

    node: str
    kind: str
    curve: list[float]
    errors: list[float]


@dataclass
class Untuned:
    """A target's converted model before its fine-tune, in the measures of the row (which are the fine-tuned model's)."""

    relative_l2: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    answers: list[OutputAgreement] = field(default_factory=list)


@dataclass
class SweepRow:
    """One target: what the conversion gave and how the result compares with the original."""

    target: float
    reached: bool
    reason: str | None = None  # why the target gave no model
    mac_ratio: float | None = None
    params_ratio: float | None = None
    original_ms: float | None = None
    candidate_ms: float | None = None
    speedup_low: float | None = None  # the 95 % interval of the latency ratio (bootstrap over the paired runs)
    speedup_high: float | None = None
    outputs: list[OutputStats] = field(default_factory=list)
    answers: list[OutputAgreement] = field(default_factory=list)  # each output in the measure that fits it (agreement.py)
    top1_agreement: float | None = None
    accuracy_original: float | None = None
    accuracy: float | None = None
    convert_seconds: float = 0.0
    decomposed: int = 0
    layers: int = 0
    allocation: str | None = None  # with calibration: "sensitivity" or "kernel error (...)"
    planned_by: str | None = None  # what the plan was made by: "latency" (measured here) or "macs"
    notes: list[str] = field(default_factory=list)  # what the user should know about this row
    saved: str | None = None
    kernels: dict[str, dict[str, float]] | None = None  # with profile: kernel ms per operator type, original and candidate
    untuned: Untuned | None = None  # with a fine-tune: the converted model's measures before it (the row's are after)
    finetune_seconds: float | None = None
    report: Report | None = None

    @property
    def latency_ratio(self) -> float | None:
        """Original / candidate milliseconds (> 1: the candidate is faster); ``None`` when not timed."""
        if not self.original_ms or not self.candidate_ms:
            return None
        return self.original_ms / self.candidate_ms

    @property
    def relative_l2(self) -> float | None:
        """The largest relative L2 error over the outputs."""
        return max((o.relative_l2 for o in self.outputs), default=None)

    @property
    def max_abs(self) -> float | None:
        return max((o.max_abs for o in self.outputs), default=None)

    @property
    def answer(self) -> OutputAgreement | None:
        """The output that speaks for the model's answers (:func:`onnx_lowrank.agreement.summary_measure`)."""
        return summary_measure(self.answers)

    @property
    def min_cosine(self) -> float | None:
        return min((o.cosine for o in self.outputs), default=None)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "report"}
        data["latency_ratio"] = self.latency_ratio
        data["relative_l2"] = self.relative_l2
        if self.report is not None:
            data["ranks"] = {
                layer.node: {"kind": layer.kind, "rank": layer.rank, "full_rank": layer.full_rank, "relative_error": layer.relative_error}
                for layer in self.report.decomposed
            }
        return data


@dataclass
class SweepResult:
    """Every target's row, and what they share."""

    model: str
    rows: list[SweepRow]
    inputs: str  # the evaluation inputs: a path, or "random"
    samples: int
    labelled: bool
    runs: int
    threads: int
    prepare_seconds: float  # loading, folding, shapes, sites; with calibration also the damage curves
    calibration: dict[str, Any] = field(default_factory=dict)
    spectra: list[LayerSpectrum] = field(default_factory=list)
    default_target: float = DEFAULT_SPEEDUP
    by: str | None = None  # what the targets were asked to plan by (None: latency wherever the model can be timed, as decompose)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "inputs": self.inputs,
            "samples": self.samples,
            "labelled": self.labelled,
            "runs": self.runs,
            "threads": self.threads,
            "prepare_seconds": self.prepare_seconds,
            "calibration": self.calibration,
            "default_target": self.default_target,
            "by": self.by,
            "rows": [row.to_dict() for row in self.rows],
        }


def parse_speedups(text: str) -> list[float]:
    """``"1.25,1.5,2"`` → ``[1.25, 1.5, 2.0]``: finite numbers >= 1, sorted, without repeats."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise LowRankError(f"--speedups: {part.strip()!r} is not a number; give numbers >= 1 separated by commas") from None
        if not (math.isfinite(value) and value >= 1.0):
            raise LowRankError(f"--speedups: {part.strip()} is not a number >= 1")
        values.append(value)
    return sorted(set(values))


# --------------------------------------------------------------------------- evaluation inputs


@dataclass
class _Evaluation:
    """The inputs every target is compared on, and the original's outputs on them."""

    batches: list[dict[str, Array]]
    timing_feed: dict[str, Array]
    labels: Array | None
    names: list[str]
    reference: list[Array]
    samples: int
    description: str


def _free_batch(session: Any) -> bool:
    return all(not (i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0) for i in session.get_inputs())


def _evaluation(
    session: Any,
    inputs: str | os.PathLike[str] | Mapping[str, Array] | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    sample: tuple[str, dict[str, Array]] | None = None,
) -> _Evaluation:
    """Load and check the evaluation inputs and run the original on them (raises :class:`LowRankError` when they do not fit).

    ``sample``: without evaluation inputs, the (name, input set) to evaluate on instead of random inputs."""
    free = _free_batch(session)
    names = [i.name for i in session.get_inputs()]
    labels: Array | None = None
    if inputs is None and sample is not None:
        feed = {n: sample[1][n] for n in names}
        outputs = [o.name for o in session.get_outputs()]
        try:
            reference = session.run(outputs, feed)
        except Exception as exc:  # onnxruntime's own exception types
            raise LowRankError(f"onnxruntime cannot run the model on {sample[0]}: {first_line(exc)}") from None
        return _Evaluation([feed], feed, None, outputs, list(reference), 1, sample[0].removeprefix("the "))
    if inputs is None:
        feeds = random_inputs(session, seed=0, batch=RANDOM_SAMPLES if free else 1, input_shapes=input_shapes)
        description = "random"
    else:
        # names, shapes, dtypes and sample counts checked against the model's inputs, as verify does
        data, labels = load_inputs(inputs, session_input_specs(session), "eval inputs file")
        description = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "given arrays"
        feeds = {n: data[n] for n in names}
        count = len(next(iter(feeds.values())))
        if labels is not None and len(labels) != count:
            raise LowRankError(f"eval inputs: labels has shape {list(labels.shape)}; expected one label per sample ({count})")
    count = len(next(iter(feeds.values())))
    fixed = [i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    step = min(fixed) if fixed else EVAL_BATCH
    if fixed and count < step:
        raise LowRankError(f"eval inputs hold {count} samples; the model's batch size is fixed at {step}")
    if fixed:
        count -= count % step  # a fixed batch takes whole batches only
    batches = [{n: v[start : start + step] for n, v in feeds.items()} for start in range(0, count, step)]
    outputs = [o.name for o in session.get_outputs()]
    try:
        runs = [session.run(outputs, feed) for feed in batches]
    except Exception as exc:  # onnxruntime's own exception types: the inputs do not fit the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"eval inputs do not fit the model: onnxruntime says {first}") from None
    reference = [np.concatenate([r[i] for r in runs]) if len(runs) > 1 else runs[0][i] for i in range(len(outputs))]
    timing_feed = {n: v[:1] for n, v in batches[0].items()} if free else batches[0]
    if labels is not None:
        labels = labels[:count]
    return _Evaluation(batches, timing_feed, labels, outputs, reference, count, description)


def _compare(
    evaluation: _Evaluation,
    original: tuple[onnx.ModelProto, Any],
    candidate_model: onnx.ModelProto,
    runs: int,
    threads: int,
    profile: bool,
    row: SweepRow,
) -> None:
    """Fill ``row`` with the candidate's errors, agreement, accuracy and latency against the ``original`` (model, session)."""
    candidate = make_session(candidate_model, threads=threads)
    try:
        outs = [candidate.run(evaluation.names, feed) for feed in evaluation.batches]
    except Exception as exc:  # onnxruntime's own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed to run the converted model: {first}") from None
    merged = [np.concatenate([o[i] for o in outs]) if len(outs) > 1 else outs[0][i] for i in range(len(evaluation.names))]
    # compare_outputs scores class-index labels (1-D) by top-1; compare also scores class sequences (2-D)
    row.outputs = compare_outputs(evaluation.names, evaluation.reference, merged, rtol=1e-3, atol=1e-4, labels=evaluation.labels)
    row.answers = compare(evaluation.names, evaluation.reference, merged, original[0], evaluation.labels)
    classified = next((o for o in row.outputs if o.top1_agreement is not None), None)
    if classified is not None:
        row.top1_agreement = classified.top1_agreement
        row.accuracy_original, row.accuracy = classified.accuracy_original, classified.accuracy_candidate
    if runs > 0:
        for _ in range(3):  # warm-up
            original[1].run(None, evaluation.timing_feed)
            candidate.run(None, evaluation.timing_feed)
        estimate = speedup_estimate(*paired_times(original[1], candidate, evaluation.timing_feed, runs))
        row.original_ms, row.candidate_ms = estimate.original_ms, estimate.candidate_ms
        row.speedup_low, row.speedup_high = estimate.low, estimate.high
    if profile and runs > 0:
        before, after = kernel_times([original[0], candidate_model], evaluation.timing_feed, threads, runs=runs)
        row.kernels = {"original": before.by_op, "candidate": after.by_op}


# --------------------------------------------------------------------------- spectra


def _curves(prepared: Prepared, node: str, kind: Kind) -> LayerSpectrum | None:
    """The normalised spectrum of one layer for one kind, from the prepared model's cache (computed if missing)."""
    site = next((s for s in prepared.sites if s.key == node), None)
    if site is None or site.weight is None:
        return None
    cache = prepared.decompositions.setdefault((site.weight_key, type(site), site.groups), {})
    if kind not in cache:
        try:
            cache[kind] = decompose_kernel(site.kernel(), site.groups, kind)
        except ValueError:  # non-finite weights: the layer was not decomposed either
            return None
    s = cache[kind].s
    energy = np.sqrt(np.square(s).sum(axis=0))
    top = float(energy[0]) if energy.size else 0.0
    curve = (energy / top).tolist() if top > 0 else [0.0] * energy.size
    return LayerSpectrum(node, kind, curve, np.sqrt(tail_errors(s)).tolist())


def layer_spectra(prepared: Prepared, reports: Sequence[Report]) -> list[LayerSpectrum]:
    """The spectra of every layer decomposed in any of ``reports``, for each kind it was decomposed with, in graph order."""
    wanted: dict[str, list[Kind]] = {}
    for report in reports:
        for layer in report.decomposed:
            kinds = wanted.setdefault(layer.node, [])
            if layer.kind not in kinds:
                kinds.append(layer.kind)  # type: ignore[arg-type]
    out = []
    with single_threaded_blas():
        for site in prepared.sites:
            for kind in sorted(wanted.get(site.key, [])):
                spectrum = _curves(prepared, site.key, kind)
                if spectrum is not None:
                    out.append(spectrum)
    return out


def report_spectra(
    model: ModelLike,
    report: Report,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    sample: Any = None,
    branches: str | None = None,
) -> list[LayerSpectrum]:
    """:func:`layer_spectra` of one finished conversion of ``model`` (the model is prepared again, as the conversion
    did, on the same ``input_shapes``, ``sample`` and ``branches``)."""
    config = DecomposeConfig.from_keywords(input_shapes=input_shapes, sample=sample, branches=branches)
    prepared = prepare(as_model(model), shapes=config.shapes, fold_bn=bool(report.policy.get("fold_bn", True)))
    return layer_spectra(prepared, [report])


# --------------------------------------------------------------------------- the sweep


def _targets(speedups: Sequence[float]) -> list[float]:
    values = []
    for value in speedups:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1.0:
            raise LowRankError(f"--speedups: {value!r} is not a number >= 1")
        values.append(float(value))
    if not values:
        raise LowRankError("--speedups: give at least one target")
    return sorted(set(values))


class TargetRunner:
    """One preparation shared by conversions at any ``--speedup`` target, each result compared with the original.

    The model is loaded, sized, folded and its layers found once; with calibration data the statistics the
    targets share are measured by the first conversion and reused (the samples decompose holds back are held
    back here too: each row is what decompose writes). :meth:`row` converts at one target and fills its
    :class:`SweepRow`; the evaluation inputs are checked against the model before any conversion.
    """

    def __init__(
        self,
        model: ModelLike,
        config: DecomposeConfig,
        eval_inputs: str | os.PathLike[str] | Mapping[str, Array] | None,
        runs: int,
        profile: bool = False,
        workers: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        if config.finetune.enabled:
            from .finetune import check_torch

            check_torch()  # before any work
        self.proto = as_model(model)
        self.config = config
        self.runs = runs
        self.profile = profile
        self.workers = workers
        self.progress = progress  # the fine-tunes' steps
        self.threads = config.speed.resolved_threads
        self.session = make_session(self.proto, threads=self.threads)
        samples = load_samples(self.proto, config.shapes)
        self.evaluation = _evaluation(self.session, eval_inputs, config.shapes.input_shapes, samples[0] if samples else None)
        self.calibration: dict[str, Any] = {}
        start = time.perf_counter()
        data = None
        if config.calibration.given:
            from .calibration import hold_back, load_calibration

            data, _ = hold_back(load_calibration(config.calibration.source, self.proto), self.proto)
        self.data = data  # what the conversions (and the fine-tunes) use: the calibration samples decompose does not hold back
        sizes = model_sizes(self.proto, config.shapes, data, samples)
        self.prepared = prepare(as_model(self.proto), shapes=config.shapes, fold_bn=config.policy.fold_bn, sizes=sizes)
        self._run = None if data is None else CalibrationRun(data, config.calibration, config.policy)
        if self._run is not None:
            self.calibration = {"samples": len(next(iter(data.values()))) if data else 0, "refit": self._run.refit}
        self.prepare_seconds = time.perf_counter() - start

    def convert(self, target: float) -> tuple[onnx.ModelProto, Report]:
        """The model converted at ``target`` as decompose converts it (raises :class:`LowRankError` when unreachable)."""
        config = DecomposeConfig.from_keywords(self.config, speedup=target)
        with single_threaded_blas():
            if self._run is None:
                return convert_prepared(self.prepared, config, workers=self.workers)
            new, report = calibrated_conversion(self.proto, self._run, config, self.prepared, None, self.workers)
        if self._run.plan is not None and "statistics_seconds" not in self.calibration:
            self.calibration.update(self._run.plan.to_dict())  # measured by the first target, shared by the rest
        return new, report

    def row(self, target: float) -> tuple[SweepRow, onnx.ModelProto | None]:
        """The row of one target and its converted model (``None`` when the target gave none: the row says why)."""
        row = SweepRow(target=target, reached=True)
        start = time.perf_counter()
        try:
            candidate, report = self.convert(target)
        except LowRankError as exc:
            row.reached, row.reason = False, str(exc)
            return row, None
        _fill(row, report, time.perf_counter() - start)
        try:
            _compare(self.evaluation, (self.proto, self.session), candidate, self.runs, self.threads, self.profile, row)
        except LowRankError as exc:
            row.notes.append(str(exc))
            return row, candidate
        if self.config.finetune.enabled:
            candidate = self._finetune(row, report, candidate)
        return row, candidate

    def _finetune(self, row: SweepRow, report: Report, candidate: onnx.ModelProto) -> onnx.ModelProto:
        """The target's model fine-tuned (the row measures it, :class:`Untuned` keeps what it replaced); a fine-tune
        that cannot run is a note, and the converted model stays the row's."""
        from .finetune import finetune_conversion

        assert self.data is not None  # a fine-tune needs calibration data (DecomposeConfig checks it)
        start = time.perf_counter()
        try:
            tuned, report.finetune = finetune_conversion(
                self.proto, candidate, report, self.data, self.config.finetune, self.config.speed.threads, self.progress
            )
        except LowRankError as exc:
            row.notes.append(f"not fine-tuned: {exc}")
            return candidate
        row.finetune_seconds = time.perf_counter() - start
        if "skipped" in report.finetune:
            row.notes.append(f"not fine-tuned: {report.finetune['skipped']}")
            return candidate
        row.untuned = Untuned(row.relative_l2, row.top1_agreement, row.accuracy, row.answers)
        try:  # the same graph, other weights: the timing stands, the answers are measured again
            _compare(self.evaluation, (self.proto, self.session), tuned, 0, self.threads, False, row)
        except LowRankError as exc:
            row.notes.append(str(exc))
        return tuned


def sweep(
    model: ModelLike,
    speedups: Sequence[float] = DEFAULT_SPEEDUPS,
    config: DecomposeConfig | None = None,
    /,
    *,
    eval_inputs: str | os.PathLike[str] | Mapping[str, Array] | None = None,
    runs: int = 20,
    profile: bool = False,
    save_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    **options: Unpack[DecomposeKeywords],
) -> SweepResult:
    """Convert ``model`` at each of ``speedups`` (``--speedup`` targets) and compare each result with it.

    Each target is planned exactly as :func:`onnx_lowrank.decompose` plans ``--speedup S`` with the same
    options (``config`` and the keyword arguments, as for :func:`~onnx_lowrank.decompose`; by default by
    latency measured here at onnxruntime's default threads wherever the model can be timed), so the row of
    the default target is the model ``decompose`` writes. ``eval_inputs``: an ``.npz`` (or mapping) keyed by
    input name with samples on axis 0, and optionally ``labels`` (one class index per sample, or for
    per-position class scores a ``[N, L]`` array of class sequences padded with -1) for accuracy;
    default: the sample (``sample=``), else seeded random inputs. ``runs``: interleaved timed runs of each model per target (0: not timed),
    at the plan's threads. ``profile``: also time each operator type (onnxruntime's profiler).
    ``save_dir``: write each converted model there as ``<model>-x<target>.onnx``; nothing is written
    otherwise. ``progress(done, total, name)`` is called as targets finish (and as a fine-tune steps, ``name``
    starting with ``"fine-tune "``). With ``finetune=`` (which needs calibration data) every target's model is
    fine-tuned after it is timed, each row measuring the fine-tuned model beside the converted one (``untuned``).
    """
    targets = _targets(speedups)
    config = sweep_config(DecomposeConfig.from_keywords(config, **options), targets[0])
    check_runs(runs)
    if profile and runs == 0:
        raise LowRankError("--profile times the models: it needs --runs > 0")
    out_dir = Path(save_dir) if save_dir is not None else None
    if out_dir is not None and not out_dir.is_dir():
        raise LowRankError(f"{out_dir}: --save-dir folder does not exist")
    name = Path(model).name if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    runner = TargetRunner(model, config, eval_inputs, runs, profile, workers, progress)
    rows: list[SweepRow] = []
    for done, target in enumerate(targets, 1):
        row, candidate = runner.row(target)
        if candidate is not None and out_dir is not None:
            path = out_dir / f"{Path(name).stem}-x{target:g}.onnx"
            save_model(candidate, path, inputs=(model,) if not isinstance(model, onnx.ModelProto) else ())
            row.saved = str(path)
        del candidate
        rows.append(row)
        if progress is not None:
            progress(done, len(targets), f"{target:g}x")
    spectra = layer_spectra(runner.prepared, [r.report for r in rows if r.report is not None])
    return SweepResult(
        model=name,
        rows=rows,
        inputs=runner.evaluation.description,
        samples=runner.evaluation.samples,
        labelled=runner.evaluation.labels is not None,
        runs=runs,
        threads=runner.threads,
        prepare_seconds=runner.prepare_seconds,
        calibration=runner.calibration,
        spectra=spectra,
        by=config.speed.by,
    )


def check_runs(runs: object) -> None:
    """Raise :class:`LowRankError` unless ``runs`` (timed runs per target) is a whole number >= 0."""
    if not is_whole(runs, 0):
        raise LowRankError(f"--runs must be a whole number >= 0, got {runs!r}")


def sweep_config(config: DecomposeConfig, first: float) -> DecomposeConfig:
    """``config`` as a sweep of targets uses it (raises :class:`LowRankError` for options that are decompose's alone):
    the conversions' own result check is off, each target's result is timed by the sweep itself."""
    if config.policy.name != "budget" or config.policy.params_ratio is not None:
        raise LowRankError("sweep converts at --speedup targets: --rank, --energy, --ranks and --params-ratio are decompose's")
    if config.mobile.wanted:
        raise LowRankError("sweep does not quantize or keep mobile partitions: --mobile-safe and --quantize are decompose's")
    return DecomposeConfig.from_keywords(config, speedup=first, check_runs=0)


def _fill(row: SweepRow, report: Report, seconds: float) -> None:
    row.report = report
    row.mac_ratio = report.mac_ratio
    row.params_ratio = report.params_after / report.params_before if report.params_before else None
    row.convert_seconds = seconds
    row.decomposed = len(report.decomposed)
    row.layers = len(report.layers)
    row.allocation = report.policy.get("allocation")
    row.planned_by = report.policy.get("by")
    if row.allocation and row.allocation.startswith("kernel error ("):
        row.notes.append(f"ranks by kernel error: {row.allocation[len('kernel error (') : -1]}")
    if report.latency.get("by") == "latency" and not report.latency.get("met", True):
        row.notes.append(f"by latency reached {report.latency['measured_speedup']:.2f}x, below the target; the fastest round is kept")
    row.notes += report.warnings
