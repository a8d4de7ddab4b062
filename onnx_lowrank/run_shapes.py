"""The sizes that really run: static shape inference, then one onnxruntime run where it falls short.

The cost model needs the input size of every MAC-carrying layer. Static shape
inference (with data propagation) knows it for most CNNs, but not behind a
Reshape, Pad or Resize whose shape is computed at run time from a
Shape/Concat chain (OCR recognisers reshape their conv features into a
sequence, detectors build grids from the input size), and not inside control
flow: of an ``If`` only one branch runs per call, and a ``Loop``/``Scan`` body
runs once per iteration. So wherever inference leaves a layer's size unknown,
or a layer sits in a subgraph, the model is run once on a concrete *reference
input* and the sizes are read off that run.

The run: a copy of the graph (the weights are not copied; they are streamed
into the file onnxruntime loads) gets a ``Shape`` node on the input of every
layer of interest — Conv, ConvTranspose, QLinearConv, ConvInteger, Gemm,
MatMul, MatMulInteger, QLinearMatMul, LSTM, GRU, RNN — in the graph that holds
the layer. A probe in a subgraph is passed out through its owner: an extra
output of both ``If`` branches (the branch that did not run yields a ``-1``
sentinel, and a marker output says which branch ran), an extra scan output of
a ``Loop`` or ``Scan`` body (stacked over the iterations, so the rows give one
shape per iteration and their number the trip count). Only int64 shape vectors
leave the session, never activations.

The reference input is, in order: the given reference (the ``--sample``, else
the first calibration sample), else a seeded random input of the
``--input-shape`` / declared shapes with a symbolic first (batch) dim taken as
1. An input with another symbolic dim and no ``--input-shape`` has no size to
guess: the result then names it (:attr:`ModelShapes.missing_inputs`) and the
layers whose size inference left unknown stay unknown — callers refuse to plan
on them or, when asked to, count them at one output pixel. Random values are
said as such: where the random values of an integer or boolean input decide
what runs (an If's branch, a Loop's trip count, a size set from values;
:mod:`onnx_lowrank.value_flow`), :attr:`ModelShapes.random_choices` names each
place and what the run did there, and a random input the model cannot run on is
an error that names ``--sample``.

Every branch (``branches="all"``): of an If, one run sizes only the branch it
takes. The branches no run took are sized by runs of their own: first the
further samples given (each run as it is), then runs of the reference input on
a copy whose If condition is a constant — the branch *forced*. A forced branch
that cannot run (its nested If goes down a path that fails on this input, say)
is forced again with the nested If forced to each of its branches in turn; at
most :data:`MAX_BRANCH_RUNS` runs are made. Each branch records what sized it
(:attr:`ControlFlow.sized_by`); a branch no run could size keeps no size, with a
warning.

Preconditions and limits: layers inside model-local functions are not probed
(onnxruntime inlines function bodies; their sizes stay unknown); a model that
onnxruntime cannot run on the reference input is an error naming the input
(the instrumented copy is retried without probes to tell the two apart). The
sizes hold for the reference input: for a model with dynamic axes they are the
sizes of that input, and the plan's MACs say so.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from .data_io import InputSpec, model_input_specs
from .errors import LowRankError
from .graph import GraphPath, Names, namespace_names, subgraphs
from .model_io import PROTOBUF_LIMIT, copy_fields, estimated_size, write_model
from .runtime import first_line, make_session
from .shapes import Shape, concrete_input_shapes, infer_shapes, random_feed
from .value_flow import Decision, value_decisions

__all__ = ["MAC_OPS", "MAX_BRANCH_RUNS", "ControlFlow", "ModelShapes", "RandomChoice", "TensorSizes", "resolve_shapes"]

# the operators that carry a model's multiply-accumulates: the cost model counts every one of them
MAC_OPS = frozenset(
    {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "LSTM", "GRU", "RNN"}
)
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
# the operand of each MAC op whose size sets its cost (QLinearMatMul's second activation is input 3)
_PROBED_INPUTS = {"QLinearMatMul": (0, 3), "Gemm": (0, 1), "MatMul": (0, 1), "MatMulInteger": (0, 1)}
# runs beyond the reference one that branches="all" may make to size the branches it does not take
MAX_BRANCH_RUNS = 16
RANDOM = "a random input"  # ModelShapes.reference_from of a random reference input
IF_BRANCHES = ("then_branch", "else_branch")

Key = tuple[GraphPath, str]  # a tensor as read in one graph of the model


@dataclass
class ControlFlow:
    """A control-flow node that holds layers, and how it ran on the reference input.

    ``runs``: for an ``If``, how many times each branch ran (``then_branch``/``else_branch``); for a
    ``Loop``/``Scan``, ``{"body": iterations}`` summed over the executions of the node itself.
    """

    node: str
    op_type: str
    path: GraphPath  # the graph holding the node
    key: str  # its first output: the subgraphs' GraphPath entries name it so
    runs: dict[str, int] = field(default_factory=dict)
    sized_by: dict[str, str] = field(default_factory=dict)  # subgraph -> the run its sizes come from (what ran in it)

    @property
    def taken(self) -> list[str]:
        return [branch for branch, count in self.runs.items() if count]

    @property
    def ident(self) -> tuple[GraphPath, str]:
        return self.path, self.key


@dataclass
class RandomChoice:
    """A place where a random value of an integer or boolean input decided what the sizing run did
    (:class:`onnx_lowrank.value_flow.Decision`), the random values, and what the run did there."""

    decision: Decision
    values: dict[str, str]  # each deciding input's random value as shown ("3"; "(1, 4) values" for an array)
    outcome: str = ""  # "else_branch ran", "3 iterations"; "" when the run did not reach it or did not say

    @property
    def message(self) -> str:
        d = self.decision
        given = ", ".join(f"input {name!r}" + (f" ({name}={self.values[name]})" if name in self.values else "") for name in d.inputs)
        where = f" in {d.within[-1]}" if d.within else ""
        done = f" ({self.outcome})" if self.outcome else ""
        thing = {"branch": "the branch of", "trip count": "the trip count of", "sizes": "the output sizes of"}[d.what]
        verb = "was chosen" if d.what == "branch" else "was set" if d.what == "trip count" else "were set"
        return f"{thing} {d.op_type} {d.node!r}{where}{done} {verb} by a random value of {given}; pass --sample for the one you run"

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "node": d.node,
            "op_type": d.op_type,
            "what": d.what,
            "inputs": list(d.inputs),
            "values": dict(self.values),
            "outcome": self.outcome,
            "within": list(d.within),
            "message": self.message,
        }


@dataclass
class TensorSizes:
    """The shapes a tensor had each time its reader ran (``[]``: never ran), and whether they are observed.

    ``exact`` is False when no run saw them: a static shape counted as running once.
    """

    shapes: list[tuple[int, ...]]
    exact: bool


@dataclass
class ModelShapes:
    """One source of sizes for every consumer: the cost model, the allocations, ``--measure``, the refit, ``inspect``."""

    static: dict[str, Shape]  # from the declared input shapes only: holds for every input (explicit pads come from these)
    planning: dict[str, Shape]  # static inference with the reference input's shapes
    observed: dict[Key, list[tuple[int, ...]]] = field(default_factory=dict)  # from the run: each execution's shape
    source: Literal["static", "run", "unknown"] = "static"
    reference: dict[str, npt.NDArray[Any]] | None = None  # the input the run used (or would use)
    reference_from: str = ""  # where the reference input came from, for the report
    missing_inputs: dict[str, str] = field(default_factory=dict)  # inputs that need --input-shape, and why
    control_flow: list[ControlFlow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    random_choices: list[RandomChoice] = field(default_factory=list)  # what random values decided in the run
    branches: str = "run"  # "all": every If branch sized by a run of its own
    branch_runs: list[str] = field(default_factory=list)  # the runs beyond the reference one that sized branches

    def sizes(self, path: GraphPath, name: str, in_function: bool = False) -> TensorSizes | None:
        """The shapes ``name`` had when read in the graph at ``path``; None when unknown."""
        if in_function:
            return None
        if (path, name) in self.observed:
            return TensorSizes(self.observed[(path, name)], True)
        shape = self.planning.get(name)
        if shape is None or any(d is None for d in shape):
            return None
        # a main-graph tensor whose size inference fixed runs once per inference; one in a subgraph was
        # not seen by a run, so how often it runs is not known
        return TensorSizes([tuple(int(d) for d in shape)], exact=not path)  # type: ignore[arg-type]

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the reference input (empty when none could be built)."""
        return {name: tuple(value.shape) for name, value in (self.reference or {}).items()}


def _nodes(graph: onnx.GraphProto, path: GraphPath = ()) -> Iterator[tuple[GraphPath, onnx.NodeProto]]:
    for node in graph.node:
        yield path, node
        for label, g in subgraphs(node):
            yield from _nodes(g, (*path, (node.output[0] if node.output else node.name, label)))


def _probes_wanted(model: onnx.ModelProto) -> dict[GraphPath, list[str]]:
    """The tensors to probe, by graph: the sizing operands of every MAC op of the main graph tree."""
    wanted: dict[GraphPath, list[str]] = {}
    for path, node in _nodes(model.graph):
        if node.op_type not in MAC_OPS:
            continue
        for index in _PROBED_INPUTS.get(node.op_type, (0,)):
            if index < len(node.input) and node.input[index]:
                names = wanted.setdefault(path, [])
                if node.input[index] not in names:
                    names.append(node.input[index])
    return wanted


def _needs_run(model: onnx.ModelProto, wanted: Mapping[GraphPath, list[str]], planning: Mapping[str, Shape]) -> bool:
    """A run is needed when a layer sits in a subgraph or inference left one of its operands' sizes open."""
    if any(path for path in wanted):
        return True
    return any(planning.get(name) is None or any(d is None for d in planning[name]) for name in wanted.get((), []))


@dataclass
class _Probe:
    output: str  # the main-graph output that carries it
    key: Key | None  # the probed tensor (None: an If marker)
    marker_of: ControlFlow | None = None  # for markers: which If, and which branch wrote 1
    loops: list[ControlFlow] = field(default_factory=list)  # Loop/Scan nodes it is stacked under, outermost first


class _Instrumenter:
    """Adds the probes to a copy of the graph (see the module docstring)."""

    def __init__(self, names: Names, wanted: Mapping[GraphPath, list[str]], ranks: Mapping[str, int]) -> None:
        self.names = names
        self.wanted = wanted
        self.ranks = ranks
        self.control_flow: list[ControlFlow] = []

    def _holds_probes(self, path: GraphPath) -> bool:
        return any(p[: len(path)] == path for p in self.wanted if len(p) >= len(path))

    def graph(self, graph: onnx.GraphProto, path: GraphPath) -> list[tuple[str, _Probe, int]]:
        """Probe ``graph``; returns (output name in this graph, probe, rank of the shape vector) per probe."""
        out: list[tuple[str, _Probe, int]] = []
        for name in self.wanted.get(path, []):
            shape_out = self.names.fresh(f"lowrank_probe/{name}")
            graph.node.append(helper.make_node("Shape", [name], [shape_out], name=self.names.fresh("lowrank_probe/Shape")))
            out.append((shape_out, _Probe(shape_out, (path, name)), self.ranks.get(name, 1)))
        for node in list(graph.node):
            if node.op_type not in CONTROL_FLOW or node.domain not in ("", "ai.onnx"):
                continue
            key = node.output[0] if node.output else node.name
            inner = [(label, g, (*path, (key, label))) for label, g in subgraphs(node)]
            if not any(self._holds_probes(p) for _, _, p in inner):
                continue
            flow = ControlFlow(node.name or key, node.op_type, path, key)
            self.control_flow.append(flow)
            if node.op_type == "If":
                out += self._if(graph, node, flow, inner)
            else:
                out += self._loop(node, flow, inner[0][1], inner[0][2])
        return out

    def _constant(self, graph: onnx.GraphProto, values: Sequence[int]) -> str:
        name = self.names.fresh("lowrank_probe/constant")
        tensor = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
        graph.node.append(helper.make_node("Constant", [], [name], name=self.names.fresh("lowrank_probe/Constant"), value=tensor))
        return name

    def _sentinel(self, graph: onnx.GraphProto, rank: int, loops: int) -> str:
        """What a branch that holds no such probe yields: ``-1`` s, or no rows at all for a probe stacked by loops."""
        if not loops:
            return self._constant(graph, [-1] * rank)
        name = self.names.fresh("lowrank_probe/empty")
        tensor = numpy_helper.from_array(np.zeros((0,) * loops + (rank,), dtype=np.int64), name)
        graph.node.append(helper.make_node("Constant", [], [name], name=self.names.fresh("lowrank_probe/Constant"), value=tensor))
        return name

    def _if(
        self, graph: onnx.GraphProto, node: onnx.NodeProto, flow: ControlFlow, inner: list[tuple[str, onnx.GraphProto, GraphPath]]
    ) -> list[tuple[str, _Probe, int]]:
        found = {label: self.graph(g, p) for label, g, p in inner}
        out: list[tuple[str, _Probe, int]] = []
        # every branch yields every probe: its own, and sentinels of the same length for the others' probes
        for owner_label, probes in found.items():
            for name, probe, rank in probes:
                merged = self.names.fresh(f"{name}/if")
                for label, g, _ in inner:
                    value = name if label == owner_label else self._sentinel(g, rank, len(probe.loops))
                    _set_output(g, len(g.output), value)
                node.output.append(merged)
                probe.output = merged
                out.append((merged, probe, rank))
        marker = self.names.fresh("lowrank_probe/branch")
        for label, g, _ in inner:
            _set_output(g, len(g.output), self._constant(g, [1 if label == "then_branch" else 0]))
        node.output.append(marker)
        out.append((marker, _Probe(marker, None, marker_of=flow), 1))
        return out

    def _loop(self, node: onnx.NodeProto, flow: ControlFlow, body: onnx.GraphProto, path: GraphPath) -> list[tuple[str, _Probe, int]]:
        probes = self.graph(body, path)
        out: list[tuple[str, _Probe, int]] = []
        for name, probe, rank in probes:
            _set_output(body, len(body.output), name)  # a scan output: stacked over the iterations
            stacked = self.names.fresh(f"{name}/stacked")
            node.output.append(stacked)
            if node.op_type == "Scan":
                for attr in node.attribute:
                    if attr.name in ("scan_output_axes", "scan_output_directions"):
                        attr.ints.append(0)
            probe.output = stacked
            probe.loops.insert(0, flow)
            out.append((stacked, probe, rank))
        return out


def _set_output(graph: onnx.GraphProto, index: int, name: str) -> None:
    """Make ``name`` the graph's output number ``index`` (appending; a graph output may repeat a name)."""
    assert index == len(graph.output)
    graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))


def _instrumented(
    model: onnx.ModelProto, wanted: Mapping[GraphPath, list[str]], ranks: Mapping[str, int]
) -> tuple[onnx.ModelProto, _Instrumenter, list[_Probe]]:
    """A copy of ``model`` without its main-graph initializers, probed; the initializers are written separately."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip=("graph",))
    copy_fields(model.graph, shell.graph, skip=("initializer",))
    instrumenter = _Instrumenter(namespace_names(model)[0], wanted, ranks)
    found = instrumenter.graph(shell.graph, ())
    for name, _, _ in found:
        _set_output(shell.graph, len(shell.graph.output), name)
    return shell, instrumenter, [probe for _, probe, _ in found]


# ops whose output sizes (or whose branch taken) can depend on the values flowing through the model: with any
# of them the run keeps the real weights
VALUE_DEPENDENT = frozenset(
    {"If", "Loop", "Scan", "NonZero", "NonMaxSuppression", "TopK", "Unique", "Compress", "RoiAlign", "Where", "Range"}
)
STAND_IN_BYTES = 1 << 20  # an initializer this large is generated at run time instead of written out


def _stand_ins(model: onnx.ModelProto) -> bool:
    """Whether the run may use zeros of the right shape for the large weights.

    Sizes of a CNN follow from its input and its weights' shapes, not their values; a model whose sizes or
    branches can follow values (:data:`VALUE_DEPENDENT`, anywhere) keeps its weights. ``ConstantOfShape``
    needs opset 9.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 9:
        return False
    return not any(node.op_type in VALUE_DEPENDENT for _, node in _nodes(model.graph)) and not model.functions


def _session_for(model: onnx.ModelProto, shell: onnx.ModelProto, tmp: Path) -> Any:
    """An onnxruntime session of ``shell`` with ``model``'s initializers, built from a file streamed to ``tmp``.

    Where :func:`_stand_ins` allows, each large initializer becomes a ``ConstantOfShape`` of its dims: the
    file stays small and onnxruntime allocates each weight only while the node that reads it runs, instead
    of the run writing and loading a copy of every weight (seconds and a model's worth of memory for a
    500 MB model).
    """
    initializers: list[onnx.TensorProto] = list(model.graph.initializer)
    if _stand_ins(model):
        large = {t.name for t in initializers if _bytes(t) >= STAND_IN_BYTES}
        if large:
            shell = _with_stand_ins(shell, [t for t in initializers if t.name in large])
            initializers = [t for t in initializers if t.name not in large]
    if estimated_size(model) > PROTOBUF_LIMIT and len(initializers) == len(model.graph.initializer):
        full = onnx.ModelProto()
        full.CopyFrom(shell)
        full.graph.initializer.extend(initializers)
        return make_session(full, optimization="disable")
    path = tmp / "probed.onnx"
    write_model(shell, path, initializers=initializers)
    return make_session(str(path), optimization="disable")


def _bytes(tensor: onnx.TensorProto) -> int:
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _with_stand_ins(shell: onnx.ModelProto, tensors: list[onnx.TensorProto]) -> onnx.ModelProto:
    """``shell`` with a ``ConstantOfShape`` node (zeros) in front of the graph for each of ``tensors``."""
    out = onnx.ModelProto()
    copy_fields(shell, out, skip=("graph",))
    copy_fields(shell.graph, out.graph, skip=("node", "input"))
    names = {t.name for t in tensors}
    out.graph.input.extend(v for v in shell.graph.input if v.name not in names)  # IR 3 lists initializers as inputs
    for tensor in tensors:
        dims = numpy_helper.from_array(np.array(list(tensor.dims), dtype=np.int64), f"{tensor.name}/lowrank_dims")
        zero = onnx.TensorProto(data_type=tensor.data_type, dims=[1])
        zero.raw_data = bytes(_bytes(onnx.TensorProto(data_type=tensor.data_type, dims=[1])))
        out.graph.node.append(helper.make_node("Constant", [], [dims.name], value=dims))
        out.graph.node.append(helper.make_node("ConstantOfShape", [dims.name], [tensor.name], value=zero))
    out.graph.node.extend(shell.graph.node)
    return out


def _run(model: onnx.ModelProto, shell: onnx.ModelProto, feeds: Mapping[str, Any], names: list[str]) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        session = _session_for(model, shell, Path(tmp))
        wanted = {i.name for i in session.get_inputs()}
        return list(session.run(names, {k: v for k, v in feeds.items() if k in wanted}))


def _reference(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None,
    reference: Mapping[str, Any] | None,
    reference_from: str,
) -> tuple[dict[str, npt.NDArray[Any]] | None, str, dict[str, str]]:
    """The reference input, where it comes from, and the inputs that have no size (then the input is None)."""
    specs = model_input_specs(model)
    if reference is not None:
        absent = [spec.name for spec in specs if spec.name not in reference]
        if absent:
            raise LowRankError(f"the reference input lacks model input(s) {', '.join(absent)}")
        return {spec.name: np.asarray(reference[spec.name]) for spec in specs}, reference_from, {}
    shapes, missing = concrete_input_shapes(specs, input_shapes)
    if missing:
        return None, "", missing
    return random_feed(specs, shapes), RANDOM, {}


def _random_choices(model: onnx.ModelProto, specs: Sequence[InputSpec], feeds: Mapping[str, Any]) -> list[RandomChoice]:
    """What the random values of the integer and boolean inputs decide (see :mod:`onnx_lowrank.value_flow`)."""
    chosen = [spec.name for spec in specs if spec.dtype is not None and spec.dtype.kind in "biu"]
    out = []
    for decision in value_decisions(model, chosen, MAC_OPS):
        values = {}
        for name in decision.inputs:
            value = np.asarray(feeds[name])
            values[name] = str(value.item()) if value.size == 1 else f"{tuple(value.shape)} values"
        out.append(RandomChoice(decision, values))
    return out


def resolve_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    reference: Mapping[str, Any] | None = None,
    *,
    reference_from: str = "the first calibration sample",
    more: Sequence[tuple[str, Mapping[str, Any]]] = (),
    branches: str = "run",
) -> ModelShapes:
    """Sizes of every layer's operands (see the module docstring).

    ``input_shapes`` fix symbolic input dims (``--input-shape``); ``reference`` is a concrete input
    (one input set as the model takes it: the sample, or the first calibration sample with its batch axis)
    that takes precedence, and ``reference_from`` says what it is. A size given to an input whose dims are
    symbolic is always run once, even when inference alone knows every layer's size: the run is what checks
    that the model accepts it. ``branches="all"`` sizes every If branch by a run of its own: ``more``
    (description, input) are further inputs run first, then runs with the branch forced.
    """
    start = time.perf_counter()
    specs = model_input_specs(model)
    feeds, reference_from, missing = _reference(model, input_shapes, reference, reference_from)
    overrides = {name: tuple(v.shape) for name, v in feeds.items()} if feeds is not None else dict(input_shapes or {})
    static = infer_shapes(model)
    planning = infer_shapes(model, overrides) if overrides else static
    result = ModelShapes(static, planning, reference=feeds, reference_from=reference_from, missing_inputs=missing, branches=branches)
    wanted = _probes_wanted(model)
    sized = set(input_shapes or {}) | set(reference or {})
    given_dynamic = any(spec.name in sized and (spec.dims is None or any(not isinstance(d, int) for d in spec.dims[1:])) for spec in specs)
    if not (_needs_run(model, wanted, planning) or given_dynamic):
        result.seconds = time.perf_counter() - start
        return result
    if feeds is None:
        result.source = "unknown"
        result.seconds = time.perf_counter() - start
        return result
    choices = _random_choices(model, specs, feeds) if reference is None else []
    ranks = {name: len(shape) for name, shape in planning.items()}
    run = _probed_run(model, wanted, ranks, feeds, {})
    if isinstance(run, str):
        _explain_failure(model, feeds, reference_from, choices)
        result.source = "unknown"
        result.warnings.append(f"the sizes could not be read from a run ({run}); sizes inference left open stay unknown")
        result.seconds = time.perf_counter() - start
        return result
    result.source = "run"
    result.control_flow, result.observed = run
    for key, shapes in result.observed.items():
        if not key[0] and shapes:
            result.planning[key[1]] = shapes[0]
    for flow in result.control_flow:
        flow.sized_by = {label: reference_from for label in flow.taken}
    result.random_choices = choices
    _outcomes(choices, result.control_flow)
    result.warnings += [choice.message for choice in choices]
    if branches == "all":
        _size_every_branch(model, result, wanted, ranks, feeds, more)
    result.seconds = time.perf_counter() - start
    return result


Forcing = dict[tuple[GraphPath, str], str]  # If (graph path, key) -> the branch its condition is forced to
Run = tuple[list[ControlFlow], dict[Key, list[tuple[int, ...]]]]


def _probed_run(
    model: onnx.ModelProto, wanted: Mapping[GraphPath, list[str]], ranks: Mapping[str, int], feeds: Mapping[str, Any], forcing: Forcing
) -> Run | str:
    """One probed run (the If branches of ``forcing`` forced): how the control flow ran and each probed tensor's
    shapes; or onnxruntime's first line when the run fails."""
    shell, instrumenter, probes = _instrumented(model, wanted, ranks)
    for (path, key), label in forcing.items():
        _force(shell.graph, path, key, label == "then_branch", instrumenter.names)
    try:
        values = _run(model, shell, feeds, [probe.output for probe in probes])
    except LowRankError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        return first_line(exc)
    observed: dict[Key, list[tuple[int, ...]]] = {}
    _read(observed, probes, values, instrumenter.control_flow)
    return instrumenter.control_flow, observed


def _graph_at(graph: onnx.GraphProto, path: GraphPath) -> onnx.GraphProto | None:
    for key, label in path:
        node = next((n for n in graph.node if (n.output[0] if n.output else n.name) == key), None)
        inner = dict(subgraphs(node)) if node is not None else {}
        if label not in inner:
            return None
        graph = inner[label]
    return graph


def _force(graph: onnx.GraphProto, path: GraphPath, key: str, value: bool, names: Names) -> None:
    """Make the condition of the If ``key`` in the graph at ``path`` a constant ``value``."""
    holder = _graph_at(graph, path)
    node = next((n for n in holder.node if n.op_type == "If" and (n.output[0] if n.output else n.name) == key), None) if holder else None
    if holder is None or node is None:
        return
    name = names.fresh("lowrank_probe/forced")
    constant = helper.make_node(
        "Constant", [], [name], name=names.fresh("lowrank_probe/Constant"), value=numpy_helper.from_array(np.array(value), name)
    )
    node.input[0] = name
    nodes = list(holder.node)
    del holder.node[:]
    holder.node.extend([constant, *nodes])


def _outcomes(choices: list[RandomChoice], flows: list[ControlFlow]) -> None:
    """What the run did at each random choice it reached: the branch that ran, the iterations."""
    by_ident = {flow.ident: flow for flow in flows}
    for choice in choices:
        flow = by_ident.get((choice.decision.path, choice.decision.key))
        if flow is None:
            continue
        if flow.op_type == "If" and flow.taken:
            choice.outcome = " and ".join(flow.taken) + " ran"
        elif flow.op_type == "Loop":
            choice.outcome = f"{flow.runs.get('body', 0)} iteration(s)"


def _holds(wanted: Mapping[GraphPath, list[str]], path: GraphPath) -> bool:
    return any(p[: len(path)] == path for p in wanted if len(p) >= len(path))


def _describe(reference_from: str, forcing: Forcing, flows: Mapping[tuple[GraphPath, str], ControlFlow]) -> str:
    forced = ", ".join(f"If {flows[ident].node!r} forced to {label}" for ident, label in forcing.items() if ident in flows)
    return f"{reference_from} with {forced}"


def _size_every_branch(
    model: onnx.ModelProto,
    result: ModelShapes,
    wanted: Mapping[GraphPath, list[str]],
    ranks: Mapping[str, int],
    feeds: Mapping[str, Any],
    more: Sequence[tuple[str, Mapping[str, Any]]],
) -> None:
    """Size the If branches the reference run did not take (see the module docstring), in ``result``."""
    flows = {flow.ident: flow for flow in result.control_flow}
    reached: dict[tuple[GraphPath, str], Forcing] = {f.ident: {} for f in result.control_flow if f.op_type == "If" and f.taken}

    def merge(run: Run, description: str, forcing: Forcing) -> None:
        found, observed = run
        differ = []
        for key, shapes in observed.items():
            if key[0] and shapes and not result.observed.get(key):
                result.observed[key] = shapes
            elif shapes and result.observed.get(key) and shapes != result.observed[key]:
                differ.append(key[1])
        if differ:  # a layer has one size per execution, not one per path: the reference input's stands
            shown = ", ".join(differ[:3]) + (", …" if len(differ) > 3 else "")
            result.warnings.append(
                f"on {description}, {len(differ)} tensor(s) read by layers that also run on the reference input have other sizes "
                f"({shown}): those layers are counted at the reference input's sizes on every path"
            )
        for flow in found:
            ours = flows.setdefault(flow.ident, flow)
            if ours is flow:
                result.control_flow.append(flow)
                flow.runs, flow.sized_by = dict.fromkeys(flow.runs, 0), {}
            for label in flow.taken:
                ours.sized_by.setdefault(label, description)
            if flow.op_type == "If" and flow.taken:
                reached.setdefault(flow.ident, forcing)

    def open_branches() -> list[tuple[ControlFlow, str]]:
        return [
            (flow, label)
            for flow in result.control_flow
            if flow.op_type == "If" and flow.ident in reached
            for label in IF_BRANCHES
            if label not in flow.sized_by and _holds(wanted, (*flow.path, (flow.key, label)))
        ]

    for description, sample in more:
        run = _probed_run(model, wanted, ranks, sample, {})
        if isinstance(run, str):
            _explain_failure(model, sample, description, [])
            raise LowRankError(f"onnxruntime cannot run the probed model on {description}: {run}")
        merge(run, description, {})
        result.branch_runs.append(description)
    failed: dict[tuple[tuple[GraphPath, str], str], str] = {}
    runs = 0
    while runs < MAX_BRANCH_RUNS:
        todo = [(flow, label) for flow, label in open_branches() if (flow.ident, label) not in failed]
        if not todo:
            break
        flow, label = todo[0]
        attempts: list[Forcing] = [{**reached[flow.ident], flow.ident: label}]
        why = ""
        while attempts and runs < MAX_BRANCH_RUNS:
            forcing = attempts.pop(0)
            runs += 1
            run = _probed_run(model, wanted, ranks, feeds, forcing)
            if not isinstance(run, str):
                description = _describe(result.reference_from, forcing, flows)
                merge(run, description, forcing)
                result.branch_runs.append(description)
                if label in flow.sized_by:
                    break
                why = "the branch did not run even with its condition forced"
                continue
            why = run
            # a nested If may have sent the forced run down a path that fails: force it too, to each branch
            inner = (*flow.path, (flow.key, label))
            nested = [f for f in result.control_flow if f.op_type == "If" and f.path[: len(inner)] == inner and f.ident not in forcing]
            if nested:
                attempts += [{**forcing, nested[0].ident: branch} for branch in IF_BRANCHES]
        if label not in flow.sized_by:
            failed[(flow.ident, label)] = why or f"more than {MAX_BRANCH_RUNS} runs"
    for (ident, label), why in failed.items():
        result.warnings.append(
            f"the {label} of If {flows[ident].node!r} could not be sized by a run with its condition forced ({why}): "
            "its layers have no size and are left as they are; pass a further --sample that takes it"
        )
    left = [(flow, label) for flow, label in open_branches() if (flow.ident, label) not in failed]
    if left:
        shown = ", ".join(f"the {label} of If {flow.node!r}" for flow, label in left[:3])
        result.warnings.append(f"{len(left)} branch(es) not sized within {MAX_BRANCH_RUNS} forced runs ({shown}): left as they are")


def _explain_failure(model: onnx.ModelProto, feeds: Mapping[str, Any], reference_from: str, choices: Sequence[RandomChoice]) -> None:
    """Raise the user's error when the model itself rejects the reference input; return when only the probes failed."""
    with tempfile.TemporaryDirectory() as tmp:
        shell = onnx.ModelProto()
        copy_fields(model, shell, skip=("graph",))
        copy_fields(model.graph, shell.graph, skip=("initializer",))
        try:
            session = _session_for(model, shell, Path(tmp))
            wanted = {i.name for i in session.get_inputs()}
            session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        except LowRankError:
            raise
        except Exception as plain:  # onnxruntime raises its own exception types
            shapes = ", ".join(f"{k}={','.join(map(str, np.shape(v))) or 'scalar'}" for k, v in feeds.items())
            advice = ""
            if reference_from == RANDOM:
                decided = ", ".join(
                    dict.fromkeys(
                        ("the sizes of " if c.decision.what == "sizes" else "") + f"{c.decision.op_type} {c.decision.node!r}"
                        for c in choices
                    )
                )
                values = ", ".join(dict.fromkeys(f"{n}={v}" for c in choices for n, v in c.values.items()))
                advice = (
                    f"; random values ({values}) decide {decided}: pass --sample FILE.npz with an input the model runs on"
                    if decided
                    else "; pass --sample FILE.npz with an input the model runs on"
                )
            raise LowRankError(f"onnxruntime cannot run the model on {reference_from} ({shapes}): {first_line(plain)}{advice}") from None


def _read(observed: dict[Key, list[tuple[int, ...]]], probes: list[_Probe], values: list[Any], flows: list[ControlFlow]) -> None:
    for probe, value in zip(probes, values, strict=True):
        array = np.asarray(value, dtype=np.int64)
        if probe.marker_of is not None:
            flags = array.reshape(-1)
            flow = probe.marker_of
            flow.runs["then_branch"] = flow.runs.get("then_branch", 0) + int(np.sum(flags == 1))
            flow.runs["else_branch"] = flow.runs.get("else_branch", 0) + int(np.sum(flags == 0))
            continue
        assert probe.key is not None
        rank = array.shape[-1] if array.ndim else 0
        rows = array.reshape(-1, rank) if rank else np.zeros((0, 0), np.int64)
        shapes = [tuple(int(d) for d in row) for row in rows if not np.any(row < 0)]
        observed[probe.key] = shapes
        if probe.loops:
            # the leading axes of a stacked probe are the iterations of each enclosing loop
            iterations = int(np.prod(array.shape[: len(probe.loops)])) if array.ndim > len(probe.loops) else 0
            innermost = probe.loops[-1]
            innermost.runs["body"] = max(innermost.runs.get("body", 0), iterations)
    for flow in flows:
        if flow.op_type in ("Loop", "Scan") and "body" not in flow.runs:
            flow.runs["body"] = 0
