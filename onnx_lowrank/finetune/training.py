"""The distillation loop: the converted model (student, in torch) trained toward the original (teacher, in onnxruntime).

Order of work, each step a refusal point that says why in one line:

1. split the samples into a training part and a held-back slice (seeded);
2. choose what torch evaluates (:mod:`.segment`: the whole graph, or the segment around the trained
   weights) and build the :class:`~.interpreter.GraphModule`;
3. one onnxruntime pass of the original model gives the targets (the segment's outputs, and the feature
   tensors when the feature term is on; kept in float16, a regulariser needs no more), one of the
   converted model gives the segment's fed tensors and the reference for the equivalence check; each
   tensor's sample axis is found by running one and two samples;
4. **equivalence check**: the interpreter against onnxruntime on the converted model, held-back inputs;
   beyond the tolerance the fine-tune refuses rather than train a different function;
5. Adam over the trained tensors, batches in a seeded order, the learning rate warmed up then decayed
   (cosine), every ``eval_every`` steps the held-back loss and metric; the best state (by the metric
   where it differs by more than its noise on the slice, else by the loss: :func:`_better`) is kept and
   restored at the end; stop at the step or time budget or after ``patience`` evaluations without a
   better state;
6. write-back into the converted model's initializers, then the **write-back check**: onnxruntime on the
   written model against the trained torch network on the held-back inputs, beyond the tolerance a
   refusal; the metric after is onnxruntime's.

Determinism: the split, the batch order and the learning rate depend only on the seed and the step count,
torch runs on a fixed number of threads, so the same inputs and options give the same bytes — unless the
time budget (which depends on the machine) stops the loop before the step budget; the result says which
stopped it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
import torch.nn.functional as F

from ..agreement import BLANK, STRINGS, agreement
from ..calibration.collect import prepare
from ..calibration.data import batch_size_of
from ..errors import LowRankError
from ..runtime import run_session
from ..threads import default_threads
from .interpreter import GraphModule, describe_problems, graph_problems, inline_functions
from .ops import Unsupported
from .options import CheckResult, FinetuneOptions, FinetuneResult, HeldBackMetric, OutputLossResult
from .outputs import OutputLoss, choose_loss, primary
from .segment import Segment, choose_segment
from .writeback import write_back

__all__ = ["Progress", "train"]

Array = npt.NDArray[Any]
Tensor = torch.Tensor
Progress = Callable[[int, int, str], None]

_16BIT = (np.float16,)


@dataclass
class _Data:
    """Sample-first arrays of everything the loop reads, and each tensor's sample axis in the graph."""

    feeds: dict[str, Array]  # the student's inputs (graph inputs, and tensors onnxruntime made upstream)
    targets: dict[str, Array]  # the teacher's values at the segment outputs
    features: dict[str, Array]  # the teacher's values at the feature tensors (float16)
    converted: dict[str, Array]  # onnxruntime on the converted model at the segment outputs (held-back rows)
    axes: dict[str, int]


# --------------------------------------------------------------------------- onnxruntime passes


def _session(model: onnx.ModelProto, names: Sequence[str], threads: int, what: str) -> Any:
    collection = prepare(model, [], names=list(names))
    missing = [n for n in names if n not in collection.outputs and n not in collection.inputs]
    if missing:
        raise LowRankError(f"the {what} model has no tensor {missing[0]!r}")
    try:
        return collection.session(threads)
    except LowRankError as exc:
        raise LowRankError(f"onnxruntime cannot run the {what} model for the fine-tune: {exc}") from None


def _run(session: Any, names: Sequence[str], feed: Mapping[str, Array], what: str) -> dict[str, Array]:
    wanted = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    values = run_session(session, {k: v for k, v in feed.items() if k in wanted}, outputs, what=f"run the {what} model")
    got = dict(zip(outputs, values, strict=True))
    return {name: got[name] if name in got else feed[name] for name in names}


def _rows(arrays: Mapping[str, Array], index: Sequence[int] | Array) -> dict[str, Array]:
    return {k: np.ascontiguousarray(v[np.asarray(index)]) for k, v in arrays.items()}


def _sample_axes(session: Any, names: Sequence[str], inputs: Mapping[str, Array], fixed: int | None, what: str) -> dict[str, int]:
    """The axis of each tensor that holds the samples: the one that doubles from one sample to two."""
    if fixed is not None or len(next(iter(inputs.values()))) < 2:
        return dict.fromkeys(names, 0)
    one = _run(session, names, _rows(inputs, [0]), what)
    two = _run(session, names, _rows(inputs, [0, 1]), what)
    axes: dict[str, int] = {}
    for name in names:
        a, b = one[name].shape, two[name].shape
        found = [i for i in range(len(a)) if len(a) == len(b) and b[i] == 2 * a[i] and all(a[j] == b[j] for j in range(len(a)) if j != i)]
        if len(found) != 1:
            raise LowRankError(
                f"tensor {name!r} of the {what} model does not hold the samples on one axis (shape {a} for 1 sample, {b} for 2)"
            )
        axes[name] = found[0]
    return axes


def _batches(count: int, size: int, fixed: int | None) -> Iterator[tuple[Array, int]]:
    """Index blocks over ``range(count)``; with a fixed batch the last block is filled up by repeating samples."""
    step = fixed or size
    for start in range(0, count, step):
        index = np.arange(start, min(start + step, count))
        real = len(index)
        if fixed is not None and real < fixed:
            index = np.concatenate([index, np.resize(index, fixed - real)])
        yield index, real


def _ort_pass(
    session: Any, names: Sequence[str], inputs: Mapping[str, Array], axes: Mapping[str, int], batch: int, fixed: int | None,
    what: str, dtypes: Mapping[str, Any] | None = None,
) -> dict[str, Array]:  # fmt: skip
    """Every tensor of ``names`` over all samples, sample axis first (cast to ``dtypes[name]`` where given)."""
    count = len(next(iter(inputs.values())))
    parts: dict[str, list[Array]] = {n: [] for n in names}
    for index, real in _batches(count, batch, fixed):
        got = _run(session, names, _rows(inputs, index), what)
        for name in names:
            value = np.moveaxis(np.asarray(got[name]), axes[name], 0)[:real]
            parts[name].append(value.astype(dtypes[name]) if dtypes and name in dtypes else value)
    return {n: np.concatenate(v) for n, v in parts.items()}


# --------------------------------------------------------------------------- losses


def _log_probs(values: Tensor, loss: OutputLoss, temperature: float) -> Tensor:
    scores = values.float()
    if loss.scores == "probabilities":
        scores = torch.log(torch.clamp(scores, min=1e-12))
    return torch.log_softmax(scores / temperature, dim=-1)


def _output_loss(loss: OutputLoss, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    if loss.kind == "kl":
        s, t = _log_probs(student, loss, temperature), _log_probs(teacher, loss, temperature)
        return (t.exp() * (t - s)).sum(dim=-1).mean() * temperature**2
    diff = student.float() - teacher.float()
    return (diff * diff).mean() / loss.variance


def _sequence_loss(loss: OutputLoss, student: Tensor, teacher: Tensor) -> Tensor:
    """CTC of the student's ``[N, T, C]`` scores toward the teacher's greedy decoding (class 0 the blank)."""
    best = teacher.argmax(dim=-1)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    lengths = keep.sum(dim=1)
    width = max(int(lengths.max()), 1)
    labels = torch.zeros((best.shape[0], width), dtype=torch.int64)
    for row in range(best.shape[0]):
        decoded = best[row][keep[row]]
        labels[row, : len(decoded)] = decoded
    log_probs = _log_probs(student, loss, 1.0).transpose(0, 1)  # (T, N, C)
    steps = torch.full((best.shape[0],), best.shape[1], dtype=torch.int64)
    return F.ctc_loss(log_probs, labels, steps, lengths, blank=BLANK, reduction="mean", zero_infinity=True)


class _Objective:
    """The loss of one batch: Σ output terms + feature_weight · mean of the feature terms."""

    def __init__(
        self, losses: Sequence[OutputLoss], features: Sequence[tuple[str, str]], variances: Mapping[str, float], options: FinetuneOptions
    ) -> None:
        self.losses = [loss for loss in losses if loss.kind != "none"]
        self.features = list(features)
        self.variances = dict(variances)
        self.options = options

    @property
    def requested(self) -> list[str]:
        return [loss.name for loss in self.losses] + [student for student, _ in self.features if self.options.feature_weight > 0]

    def term(self, loss: OutputLoss, student: Tensor, teacher: Tensor) -> Tensor:
        """One output's part of the loss (with its CTC term, when on)."""
        value = _output_loss(loss, student, teacher, self.options.temperature)
        if self.options.sequence_weight > 0 and loss.metric == STRINGS:
            value = value + self.options.sequence_weight * _sequence_loss(loss, student, teacher)
        return value

    def __call__(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for loss in self.losses:
            total = total + self.term(loss, outputs[loss.name], targets[loss.name])
        if self.options.feature_weight > 0 and self.features:
            term = torch.zeros((), dtype=torch.float32)
            for student, teacher in self.features:
                diff = outputs[student].float() - features[teacher].float()
                term = term + (diff * diff).mean() / self.variances[teacher]
            total = total + self.options.feature_weight * term / len(self.features)
        return total


# --------------------------------------------------------------------------- the student's passes


def _native(arrays: Mapping[str, Array], axes: Mapping[str, int]) -> dict[str, Tensor]:
    """Sample-first arrays as the graph holds them (sample axis back in place), as torch tensors."""
    return {name: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, 0, axes.get(name, 0)))) for name, v in arrays.items()}


def _student_outputs(module: GraphModule, feeds: Mapping[str, Tensor], names: Sequence[str], axes: Mapping[str, int]) -> dict[str, Tensor]:
    values = module(feeds, names)
    return {name: value.movedim(axes.get(name, 0), 0) for name, value in zip(names, values, strict=True)}


def _evaluate(module: GraphModule, data: _Data, names: Sequence[str], rows: Array, batch: int, fixed: int | None) -> dict[str, Array]:
    """The student's tensors ``names`` on the samples ``rows`` (sample axis first), without gradients."""
    parts: dict[str, list[Array]] = {n: [] for n in names}
    with torch.no_grad():
        for index, real in _batches(len(rows), batch, fixed):
            got = _student_outputs(module, _native(_rows(data.feeds, rows[index]), data.axes), names, data.axes)
            for name in names:
                parts[name].append(got[name][:real].numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def _mixed(arrays: Mapping[str, Array], rng: np.random.Generator, alpha: float) -> dict[str, Array]:
    """Each sample blended with another of the batch: ``λ·x_i + (1 − λ)·x_π(i)``, ``λ ~ Beta(α, α)`` per sample."""
    count = len(next(iter(arrays.values())))
    weight = rng.beta(alpha, alpha, size=count)
    partner = rng.permutation(count)
    out: dict[str, Array] = {}
    for name, values in arrays.items():
        w = weight.reshape(-1, *([1] * (values.ndim - 1)))
        blend = w * values.astype(np.float64) + (1 - w) * values[partner].astype(np.float64)
        out[name] = blend.astype(values.dtype)
    return out


def _compare(what: str, ours: Mapping[str, Array], reference: Mapping[str, Array], options: FinetuneOptions) -> CheckResult:
    """``max|a − b| / max|b|`` per tensor against its tolerance; :class:`LowRankError` beyond it."""
    per: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    worst_abs = 0.0
    samples = 0
    for name, ref in reference.items():
        a, b = np.asarray(ours[name], dtype=np.float64), np.asarray(ref, dtype=np.float64)
        samples = len(b)
        if a.shape != b.shape:
            raise LowRankError(f"{what}: tensor {name!r} has shape {a.shape} in torch, {b.shape} in onnxruntime")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        if not math.isfinite(diff):
            diff = math.inf
        per[name] = diff / scale if scale > 0 else diff
        tolerances[name] = options.tolerance_16bit if np.asarray(ref).dtype in _16BIT else options.tolerance
        worst_abs = max(worst_abs, diff)
    worst = max(per, key=lambda n: per[n] / tolerances[n])
    result = CheckResult(what, samples, worst_abs, per[worst], tolerances[worst], tolerances, per)
    if not per[worst] <= tolerances[worst]:
        raise LowRankError(
            f"{what}: torch and onnxruntime differ by {per[worst]:.2e} of the output's magnitude at {worst!r} "
            f"(tolerance {tolerances[worst]:g}); refusing rather than train or write a different function"
        )
    return result


def _metrics(losses: Sequence[OutputLoss], student: Mapping[str, Array], teacher: Mapping[str, Array]) -> dict[str, float]:
    return {loss.name: agreement(loss.metric, student[loss.name], teacher[loss.name]) for loss in losses if loss.kind != "none"}


def _held_back_loss(
    objective: _Objective, student: Mapping[str, Array], teacher: Mapping[str, Array], features: Mapping[str, Array]
) -> float:
    with torch.no_grad():
        value = objective(
            {k: torch.from_numpy(v) for k, v in student.items()},
            {k: torch.from_numpy(v) for k, v in teacher.items()},
            {k: torch.from_numpy(v) for k, v in features.items()},
        )
    return float(value)


def _output_losses(objective: _Objective, student: Mapping[str, Array], teacher: Mapping[str, Array]) -> dict[str, float]:
    """Each output's loss term on the held-back slice (no feature term)."""
    with torch.no_grad():
        return {
            loss.name: float(objective.term(loss, torch.from_numpy(student[loss.name]), torch.from_numpy(teacher[loss.name])))
            for loss in objective.losses
        }


def _short(loss: OutputLoss, value: float) -> str:
    return f"agree {100 * value:.1f}%" if loss.higher_is_better else f"rel L2 {value:.4f}"


def _better(metric: float, loss: float, best_metric: float, best_loss: float, peak: float, watched: OutputLoss, samples: int) -> bool:
    """Whether a held-back state beats the best so far.

    An agreement (a share of ``samples``) must be higher than the best's by more than its standard error
    ``√(p(1 − p)/n)`` (at least one sample) to win outright, and one lower than the highest agreement of
    any kept state (``peak``) by as much loses; within that band the difference is noise on a slice this
    small, and the lower held-back loss wins. A relative L2 (continuous) wins when lower, ties going to
    the lower loss.
    """
    if not watched.higher_is_better:
        return metric < best_metric or (metric == best_metric and loss < best_loss)
    noise = max(math.sqrt(peak * (1 - peak) / samples), 1 / samples) + 1e-12
    if metric > best_metric + noise:
        return True
    if metric < peak - noise:
        return False
    return loss < best_loss


# --------------------------------------------------------------------------- the fine-tune


def _lr_factor(step: int, options: FinetuneOptions, fraction: float) -> float:
    """Warm-up then cosine decay; ``fraction``: how far through the budget the step is (0..1)."""
    if options.schedule == "constant":
        return 1.0
    warm = min(1.0, step / options.warmup) if options.warmup else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))


def train(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    inputs: Mapping[str, Array],
    trained: Sequence[str],
    options: FinetuneOptions,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, FinetuneResult]:
    """Fine-tune ``converted`` toward ``original`` on ``inputs`` (checked, sample-first, the model's dtypes)."""
    threads = options.threads or default_threads()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            return _train(original, converted, inputs, list(trained), options, progress, threads)
    finally:
        torch.set_num_threads(saved_threads)


@dataclass
class _Student:
    """What torch evaluates: the module over the segment, the tensors it is fed and those the loss reads."""

    inlined: onnx.ModelProto
    module: GraphModule
    mode: str
    outputs: list[str]  # the segment's outputs (graph outputs and the cut)
    fed: list[str]  # tensors onnxruntime computes upstream of the segment (graph inputs excluded)
    features: list[tuple[str, str]]


def _student(converted: onnx.ModelProto, trained: list[str], inputs: Mapping[str, Array], options: FinetuneOptions) -> _Student:
    try:
        inlined = inline_functions(converted)
    except Unsupported as exc:
        raise LowRankError(f"the fine-tune cannot read the converted model: {exc}") from None
    problems = graph_problems(inlined)
    if any(i < 0 for i in problems):
        raise LowRankError(f"the fine-tune interpreter cannot read the converted model: {describe_problems(inlined, problems)}")
    segment: Segment = choose_segment(inlined, trained, problems)
    mode = segment.describe(len(inlined.graph.node))
    if problems:
        mode += f" (the interpreter has no kernel for the rest: {describe_problems(inlined, problems)})"
    try:
        module = GraphModule(inlined, trained, nodes=segment.nodes)
    except Unsupported as exc:
        raise LowRankError(f"the fine-tune interpreter cannot run the converted model: {exc}") from None
    unknown = sorted(set(options.loss_kinds) - set(module.output_names))
    if unknown:
        raise LowRankError(f"loss kind given for {unknown[0]!r}, which is not an output of the model")
    features = list(options.features) if options.feature_weight > 0 else []
    made = {o for i in segment.nodes for o in inlined.graph.node[i].output if o}
    for name, _ in features:
        if name not in made:
            raise LowRankError(f"feature tensor {name!r} is not computed by the part of the converted model that is trained")
    outputs = list(segment.outputs)
    fed = [n for n in module.external_reads(outputs + [s for s, _ in features]) if n not in inputs]
    return _Student(inlined, module, mode, outputs, fed, features)


@dataclass
class _References:
    """onnxruntime's side: the sessions (kept for input mixing), the tensors they run, and what they computed."""

    data: _Data
    teacher: Any
    reference: Any
    teacher_names: list[str]
    student_names: list[str]


def _references(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    student: _Student,
    inputs: Mapping[str, Array],
    options: FinetuneOptions,
    held_rows: Array,
    fixed: int | None,
    threads: int,
) -> _References:
    """The teacher's targets (the original) and the fed tensors and outputs of the converted model, all samples."""
    outputs, fed, features = student.outputs, student.fed, student.features
    teacher_names = list(dict.fromkeys(outputs + [t for _, t in features]))
    teacher = _session(original, teacher_names, threads, "original")
    student_names = list(dict.fromkeys(fed + outputs))
    reference = _session(converted, student_names, threads, "converted")
    axes = _sample_axes(teacher, teacher_names, inputs, fixed, "original")
    converted_axes = _sample_axes(reference, student_names, inputs, fixed, "converted")
    for name in outputs:
        if axes[name] != converted_axes[name]:
            raise LowRankError(
                f"tensor {name!r} holds the samples on axis {axes[name]} in the original model, {converted_axes[name]} in the converted one"
            )
    axes.update(converted_axes)
    feature_types = {t: np.float16 for _, t in features if t not in outputs}
    teacher_values = _ort_pass(teacher, teacher_names, inputs, axes, options.eval_batch_size, fixed, "original", feature_types)
    converted_values = _ort_pass(reference, student_names, inputs, axes, options.eval_batch_size, fixed, "converted")
    data = _Data(
        feeds={**{k: np.asarray(v) for k, v in inputs.items()}, **{n: converted_values[n] for n in fed}},
        targets={n: teacher_values[n] for n in outputs},
        features={t: teacher_values[t] for _, t in features},
        converted={n: converted_values[n][held_rows] for n in outputs},
        axes=axes,
    )
    return _References(data, teacher, reference, teacher_names, student_names)


class _HeldBack:
    """Evaluations on the held-back slice: the student's tensors, the metric of every output, the loss."""

    def __init__(
        self, student: _Student, data: _Data, objective: _Objective, rows: Array, options: FinetuneOptions, fixed: int | None
    ) -> None:
        self.student, self.data, self.objective, self.rows = student, data, objective, rows
        self.batch, self.fixed = options.eval_batch_size, fixed
        self.targets = {loss.name: data.targets[loss.name][rows] for loss in objective.losses}
        self.features = {t: data.features[t][rows] for _, t in objective.features}

    def outputs(self, names: Sequence[str]) -> dict[str, Array]:
        return _evaluate(self.student.module, self.data, names, self.rows, self.batch, self.fixed)

    def metrics(self, outputs: Mapping[str, Array]) -> dict[str, float]:
        return _metrics(self.objective.losses, outputs, self.targets)

    def loss(self, outputs: Mapping[str, Array]) -> float:
        return _held_back_loss(self.objective, outputs, self.targets, self.features)

    def output_losses(self, outputs: Mapping[str, Array]) -> dict[str, float]:
        return _output_losses(self.objective, outputs, self.targets)


def _train(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    inputs: Mapping[str, Array],
    trained: list[str],
    options: FinetuneOptions,
    progress: Progress | None,
    threads: int,
) -> tuple[onnx.ModelProto, FinetuneResult]:
    start = time.perf_counter()
    count = len(next(iter(inputs.values())))
    held = max(options.min_held_back, round(options.held_back * count))
    if count - held < 1:
        raise LowRankError(f"fine-tuning needs more samples: {count} given, {held} of them held back for early stopping")
    order = np.random.default_rng(options.seed).permutation(count)
    held_rows, train_rows = np.sort(order[:held]), np.sort(order[held:])
    fixed = batch_size_of(converted)
    student = _student(converted, trained, inputs, options)
    refs = _references(original, converted, student, inputs, options, held_rows, fixed, threads)
    data = refs.data

    # per output: its loss, chosen on the training rows (a cut tensor inside the graph is fitted by MSE)
    graph_outputs = set(student.module.output_names)
    losses = [
        choose_loss(name, data.targets[name][train_rows], student.inlined, options.loss_kinds.get(name))
        if name in graph_outputs
        else choose_loss(name, data.targets[name][train_rows], None, "mse")
        for name in student.outputs
    ]
    if all(loss.kind == "none" for loss in losses):
        raise LowRankError("no output of the trained part is floating point: nothing to fit")
    watched = primary(losses)
    variances = {t: max(float(np.var(data.features[t][train_rows].astype(np.float64))), 1e-12) for _, t in student.features}
    objective = _Objective(losses, student.features, variances, options)
    held_back = _HeldBack(student, data, objective, held_rows, options, fixed)

    # the same function? (interpreter against onnxruntime, converted model, held-back inputs)
    before = held_back.outputs(objective.requested)
    equivalence = _compare("equivalence check (converted model)", before, data.converted, options)
    metrics_before = held_back.metrics(data.converted)
    module = student.module
    result = FinetuneResult(
        mode=student.mode,
        trained=list(module.parameter_names),
        trained_elements=int(sum(p.numel() for p in module.weights)),
        loss_kinds={loss.name: loss.description for loss in losses},
        samples_train=len(train_rows),
        samples_held_back=len(held_rows),
        batch_size=options.batch_size if fixed is None else math.ceil(options.batch_size / fixed) * fixed,
        seed=options.seed,
        threads=threads,
        equivalence=equivalence,
        held_back_loss_before=held_back.loss(before),
        features=[list(p) for p in student.features],
        options=options.to_dict(),
    )
    mixing = _mixer(refs, student, objective, inputs, options) if options.mixup > 0 else None
    if mixing is None:
        refs.teacher = refs.reference = None  # let the sessions go: everything is cached
    _fit(held_back, watched, train_rows, options, result, metrics_before, mixing, progress)

    # write back, then onnxruntime must compute what the trained network computes
    written = write_back(converted, module.stored_arrays())
    names = [loss.name for loss in objective.losses]
    trained_outputs = held_back.outputs(names)
    check = _session(written, refs.student_names, threads, "written")
    after = _ort_pass(check, names, _rows(data.feeds, held_rows), data.axes, options.eval_batch_size, fixed, "written")
    result.write_back = _compare("write-back check (written model)", trained_outputs, after, options)
    metrics_after = held_back.metrics(after)
    result.metrics = [
        HeldBackMetric(loss.name, loss.metric, metrics_before[loss.name], metrics_after[loss.name], loss.higher_is_better)
        for loss in objective.losses
    ]
    result.metric = next(m for m in result.metrics if m.output == watched.name)
    losses_before, losses_after = held_back.output_losses(before), held_back.output_losses(trained_outputs)
    result.output_losses = {
        loss.name: OutputLossResult(loss.kind, loss.description, losses_before[loss.name], losses_after[loss.name])
        for loss in objective.losses
    }
    result.seconds = time.perf_counter() - start
    return written, result


Batch = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]


def _mixer(
    refs: _References, student: _Student, objective: _Objective, inputs: Mapping[str, Array], options: FinetuneOptions
) -> Callable[[Array], Batch]:
    """A batch of blended inputs (:func:`_mixed`) with the teacher's targets and the fed tensors onnxruntime makes for it."""
    not_float = [n for n, v in inputs.items() if not np.issubdtype(v.dtype, np.floating)]
    if not_float:
        raise LowRankError(f"mixup blends inputs, and input {not_float[0]!r} is not floating point")
    rng = np.random.default_rng(options.seed + 2)
    axes = refs.data.axes

    def mixed_batch(index: Array) -> Batch:
        blended = _mixed(_rows(inputs, index), rng, options.mixup)
        wanted = _run(refs.teacher, refs.teacher_names, blended, "original")
        upstream = _run(refs.reference, student.fed, blended, "converted") if student.fed else {}
        feeds = {**_native(blended, {}), **{n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in upstream.items()}}
        first = {n: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, axes[n], 0))) for n, v in wanted.items()}
        return feeds, {loss.name: first[loss.name] for loss in objective.losses}, {t: first[t] for _, t in objective.features}

    return mixed_batch


def _fit(
    held_back: _HeldBack,
    watched: OutputLoss,
    train_rows: Array,
    options: FinetuneOptions,
    result: FinetuneResult,
    metrics_before: Mapping[str, float],
    mixing: Callable[[Array], Batch] | None,
    progress: Progress | None,
) -> None:
    """The optimisation loop over ``train_rows`` (the student, its data, objective and fixed batch are those the
    held-back evaluations use); leaves the module in its best held-back state and records the run in ``result``."""
    data, objective, fixed = held_back.data, held_back.objective, held_back.fixed
    module = held_back.student.module
    requested = objective.requested

    assert result.held_back_loss_before is not None
    best_metric, best_state, best_loss = metrics_before[watched.name], module.snapshot(), result.held_back_loss_before
    peak = best_metric
    result.history.append({"step": 0, "loss": best_loss, "metric": metrics_before[watched.name]})
    optimizer = torch.optim.Adam(list(module.weights), lr=options.lr)
    micro = fixed or options.batch_size
    accumulate = math.ceil(options.batch_size / fixed) if fixed else 1
    shuffle = np.random.default_rng(options.seed + 1)
    queue: list[int] = []
    budget = options.minutes * 60 if options.minutes is not None else None
    train_start = time.perf_counter()
    losses_seen: list[float] = []
    stale = step = 0
    result.stop_reason = "step budget reached"
    total = options.steps or 0
    while options.steps is None or step < options.steps:
        elapsed = time.perf_counter() - train_start
        if budget is not None and elapsed >= budget:
            result.stop_reason = f"time budget reached ({options.minutes:g} min)"
            result.stopped_early = options.steps is not None
            break
        fraction = step / options.steps if options.steps else elapsed / (budget or 1.0)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * _lr_factor(step + 1, options, fraction)
        optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for _ in range(accumulate):
            while len(queue) < micro:
                queue.extend(int(i) for i in train_rows[shuffle.permutation(len(train_rows))])
            index, queue = np.asarray(queue[:micro]), queue[micro:]
            if mixing is None:
                feeds = _native(_rows(data.feeds, index), data.axes)
                targets = {loss.name: torch.from_numpy(data.targets[loss.name][index]) for loss in objective.losses}
                features = {t: torch.from_numpy(data.features[t][index]) for _, t in objective.features}
            else:
                feeds, targets, features = mixing(index)
            value = objective(_student_outputs(module, feeds, requested, data.axes), targets, features) / accumulate
            value.backward()  # type: ignore[no-untyped-call]
            batch_loss += float(value.detach())
        optimizer.step()
        step += 1
        if not math.isfinite(batch_loss):
            result.stop_reason = "the training loss is not finite; the best state before it is kept"
            result.stopped_early = True
            break
        losses_seen.append(batch_loss)
        last = options.steps is not None and step == options.steps
        if step % options.eval_every == 0 or last:
            outputs = held_back.outputs(requested)
            metrics, held_loss = held_back.metrics(outputs), held_back.loss(outputs)
            result.history.append({"step": step, "loss": held_loss, "metric": metrics[watched.name]})
            if _better(metrics[watched.name], held_loss, best_metric, best_loss, peak, watched, len(held_back.rows)):
                best_metric, best_state, best_loss, result.best_step = metrics[watched.name], module.snapshot(), held_loss, step
                peak = max(peak, best_metric) if watched.higher_is_better else min(peak, best_metric)
                stale = 0
            else:
                stale += 1
            if progress is not None:
                progress(step, total, f"loss {batch_loss:.4f} held-back {_short(watched, metrics[watched.name])}")
            if options.patience is not None and stale >= options.patience and not last:
                result.stop_reason = f"no better held-back state in {stale} evaluations ({stale * options.eval_every} steps)"
                result.stopped_early = True
                break
        elif progress is not None:
            progress(step, total, f"loss {batch_loss:.4f}")
    result.steps = step
    result.train_seconds = time.perf_counter() - train_start
    result.train_loss_start = losses_seen[0] if losses_seen else None
    result.train_loss_end = float(np.mean(losses_seen[-10:])) if losses_seen else None
    module.restore(best_state)
    result.held_back_loss_after = best_loss
