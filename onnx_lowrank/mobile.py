"""The mobile path: the ORT format, mobile execution-provider coverage, and whether a decomposed pair costs coverage.

ORT format
    :func:`save_ort` converts a model with onnxruntime's own tool
    (``onnxruntime.tools.convert_onnx_models_to_ort``, optimization style
    *Fixed*, level *all*, the x86-only NCHWc layout left out so the file runs
    on ARM) and writes ``NAME.ort`` and the required-operators config of a
    reduced build (``NAME.required_operators.config``, onnxruntime's
    ``--include_ops_by_config`` input) beside it, each through a temporary file
    in the destination folder and a rename, with the plain file mode.

Coverage
    :func:`coverage` runs onnxruntime's mobile usability checker
    (``onnxruntime.tools.mobile_helpers.usability_checker``) on a model, as
    ``check_onnx_model_mobile_usability`` does: optimized at level *basic*
    first (what the ORT-format conversion does), ONNX shape inference, then
    onnxruntime's partitioning estimate (``check_partitioning``, a copy of the
    EP partitioner's grouping) for NNAPI, CoreML NeuralNetwork and CoreML
    MLProgram with the supported-operator tables shipped in the wheel.
    Per EP: ``partitions``, ``supported_nodes``, ``total_nodes`` and
    ``unsupported_ops``; the nodes that split partitions (an unsupported node
    with partitions on both sides: say a BatchNormalization left unfolded,
    which CoreML MLProgram lacks); and, for a model with dynamic input shapes
    (which NNAPI and the checker refuse), the same numbers with shapes
    ignored (``if_shapes_fixed``, as the checker's own second pass).
    ``input_shapes`` fixes input shapes first with onnxruntime's
    ``make_input_shape_fixed``.

    onnxruntime's checker decides support by operator type, fixed input
    shapes and tensor rank only. For ``Conv`` — the node the decomposition
    multiplies — two limits of the EPs' own operator builders are applied on
    top, so a pair that an EP would refuse is seen: NNAPI takes 2-D convs
    only and no dilation on a grouped conv that is not depthwise
    (``group != 1`` and ``weight.shape[1] != 1``; the spatial split of a
    dilated depthwise conv with a channel multiplier makes exactly such a
    horizontal conv at ranks above 1); CoreML takes 1-D/2-D convs. Nodes refused
    this way are listed in ``refused_nodes``; where none is, the numbers are
    the checker's own.

Per-layer check
    :func:`layers_adding_partitions`: a decomposed layer costs coverage on an
    EP when the EP supports the original node but not one of its pair. With
    the same operator type and constant factors, that happens only through
    an EP's attribute limits (above), a dynamic intermediate shape or a
    tensor-rank limit. ``decompose(mobile_safe=True)`` keeps such layers whole.

What this machine cannot do: the PyPI onnxruntime wheel has the CPU EP only
(XNNPACK, NNAPI and CoreML are in the Android/iOS packages and run on those
devices), so coverage is the checker's estimate, not a measured placement.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .errors import LowRankError
from .model_io import ModelLike
from .report import Report

__all__ = [
    "MOBILE_EPS",
    "EPCoverage",
    "MobileCoverage",
    "OrtFiles",
    "StagedOrt",
    "captured_logs",
    "coverage",
    "is_ort_format",
    "keep_partitions_whole",
    "layers_adding_partitions",
    "ort_config_path",
    "ort_path_for",
    "partitions_added",
    "save_ort",
    "save_with_ort",
    "staged_ort",
]


# key, display name, onnxruntime's supported-ops table, tensor rank limit (as usability_checker's checks use them)
MOBILE_EPS: tuple[tuple[str, str, str, int], ...] = (
    ("nnapi", "NNAPI", "nnapi_supported_ops.md", 999),
    ("coreml_neuralnetwork", "CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops.md", 5),
    ("coreml_mlprogram", "CoreML MLProgram", "coreml_supported_mlprogram_ops.md", 5),
)
EP_NAMES = {key: name for key, name, _, _ in MOBILE_EPS}

_ORT_IDENTIFIER = b"ORTM"  # the flatbuffer file identifier of an ORT-format model (bytes 4..8)


def is_ort_format(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ORT-format (flatbuffer) model: by its file identifier, else by its ``.ort`` suffix."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return p.suffix.lower() == ".ort"
    return head[4:8] == _ORT_IDENTIFIER or (len(head) < 8 and p.suffix.lower() == ".ort")


# --------------------------------------------------------------------------- ORT format


@dataclass
class OrtFiles:
    """What :func:`save_ort` wrote."""

    model: Path
    config: Path
    optimization: str


def _plain_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def install_file(staged: Path, dest: Path) -> None:
    """Move a finished file from the staging folder (beside ``dest``) into place in one rename, with the plain mode."""
    _plain_mode(staged)
    os.replace(staged, dest)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Route Python logging to a list for the duration (onnxruntime's tools log progress at INFO to stderr)."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [_Collect()]
    try:
        yield records
    finally:
        root.handlers = saved


def ort_config_path(ort_path: Path) -> Path:
    """Where the required-operators config of ``NAME.ort`` goes: ``NAME.required_operators.config`` (onnxruntime's name)."""
    return ort_path.with_suffix(".required_operators.config")


@dataclass
class StagedOrt:
    """An ORT model and its config converted into a staging folder beside their destinations; :meth:`commit` moves them in."""

    files: OrtFiles
    staged_model: Path
    staged_config: Path

    def commit(self) -> OrtFiles:
        """Two renames, the config first; if the model's fails, the config is removed again."""
        moved: Path | None = None
        try:
            install_file(self.staged_config, self.files.config)
            moved = self.files.config
            install_file(self.staged_model, self.files.model)
        except OSError as exc:
            if moved is not None:
                moved.unlink(missing_ok=True)
            raise LowRankError(f"{self.files.model}: cannot write ({exc.strerror or exc})") from None
        return self.files


@contextlib.contextmanager
def staged_ort(model: ModelLike, path: str | os.PathLike[str], *, target_platform: str | None = None) -> Iterator[StagedOrt]:
    """Convert ``model`` to ORT format into a temporary folder beside ``path``; the folder goes away on exit.

    onnxruntime's ``convert_onnx_models_to_ort`` does the conversion (style *Fixed*; ``target_platform``
    ``"arm"`` or ``"amd64"`` as that tool takes it, default neither: no NCHWc). Nothing reaches ``path`` until
    :meth:`StagedOrt.commit`.
    """
    dest = Path(path)
    if not dest.parent.is_dir():
        raise LowRankError(f"{dest}: output folder {dest.parent} does not exist")
    if dest.is_dir():
        raise LowRankError(f"{dest}: is a directory")
    if target_platform not in (None, "arm", "amd64"):
        raise LowRankError(f"target platform must be arm or amd64, got {target_platform!r}")
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError as exc:
        raise LowRankError(f"this onnxruntime has no ORT-format converter ({exc})") from None
    from .model_io import load_model_with_layout, save_model

    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        source = staging / f"{dest.stem}.onnx"
        if isinstance(model, onnx.ModelProto):
            save_model(model, source)
        else:
            loaded, external = load_model_with_layout(model)  # one-line errors for a missing or broken file
            save_model(loaded, source, external_data=external)
            del loaded
        out = staging / "out"
        with captured_logs(), contextlib.redirect_stdout(io.StringIO()):
            try:
                convert_onnx_models_to_ort(
                    source, output_dir=out, optimization_styles=[OptimizationStyle.Fixed], target_platform=target_platform
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise LowRankError(f"{dest}: onnxruntime cannot convert the model to ORT format: {first}") from None
        staged_model, staged_config = out / f"{dest.stem}.ort", out / f"{dest.stem}.required_operators.config"
        if not staged_model.is_file() or not staged_config.is_file():
            raise LowRankError(f"{dest}: onnxruntime's converter wrote no ORT model")
        # the config names the model it was made from: the file the user gets, not the staging copy
        staged_config.write_text(staged_config.read_text().replace(str(staged_model), str(dest.resolve())))
        level = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all")
        files = OrtFiles(dest, ort_config_path(dest), f"fixed, level {level}, target {target_platform or 'any (no NCHWc)'}")
        yield StagedOrt(files, staged_model, staged_config)
    except OSError as exc:
        raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_ort(model: ModelLike, path: str | os.PathLike[str], *, target_platform: str | None = None) -> OrtFiles:
    """Write ``model`` in ORT format to ``path`` and its required-operators config beside it (:func:`staged_ort`).

    Both files appear together or not at all; a failure raises :class:`LowRankError` and leaves nothing behind.
    """
    with staged_ort(model, path, target_platform=target_platform) as staged:
        return staged.commit()


def save_with_ort(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool = False,
    inputs: tuple[str | os.PathLike[str], ...] = (),
    target_platform: str | None = None,
) -> OrtFiles:
    """``save_model(model, path)`` and :func:`save_ort` to ``path`` with the suffix ``.ort``: all files or none.

    The conversion (the step that fails when onnxruntime cannot take the model) runs first, into a staging
    folder; then the ONNX model is saved, then the ORT files are moved in. If that last step fails, the ONNX
    model just written is removed again.
    """
    from .model_io import save_model

    dest = Path(path)
    ort_path = ort_path_for(dest)
    with staged_ort(model, ort_path, target_platform=target_platform) as staged:
        save_model(model, dest, external_data=external_data, inputs=inputs)
        try:
            return staged.commit()
        except LowRankError:
            dest.unlink(missing_ok=True)
            if external_data:
                dest.with_name(dest.name + ".data").unlink(missing_ok=True)
            raise


def ort_path_for(onnx_path: Path) -> Path:
    """Where ``--ort`` writes the ORT model of ``NAME.onnx``: ``NAME.ort``."""
    if onnx_path.suffix.lower() == ".ort":
        raise LowRankError(f"{onnx_path}: the ONNX output must not end in .ort (--ort writes NAME.ort beside NAME.onnx)")
    return onnx_path.with_suffix(".ort")


# --------------------------------------------------------------------------- coverage


@dataclass
class EPCoverage:
    """What onnxruntime's mobile usability checker estimates for one execution provider."""

    partitions: int
    supported_nodes: int
    total_nodes: int
    unsupported_ops: list[str]
    # unsupported nodes with partitions on both sides: [{"node", "op", "reason"}]
    splitting_nodes: list[dict[str, str]] = field(default_factory=list)
    # nodes the EP's operator builder refuses beyond the checker's tables: [{"node", "op", "reason"}]
    refused_nodes: list[dict[str, str]] = field(default_factory=list)
    dynamic_shape_nodes: int = 0
    caveats: list[str] = field(default_factory=list)  # the tables' notes on supported ops, which no one checks
    # with dynamic input shapes: the same estimate with shapes ignored (as after fixing them)
    if_shapes_fixed: dict[str, Any] | None = None
    supported: frozenset[str] = frozenset()  # names of the supported nodes (not in the JSON)
    supported_if_fixed: frozenset[str] | None = None
    why: dict[str, str] = field(default_factory=dict)  # node name -> why it is not supported (not in the JSON)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "partitions": self.partitions,
            "supported_nodes": self.supported_nodes,
            "total_nodes": self.total_nodes,
            "unsupported_ops": list(self.unsupported_ops),
            "splitting_nodes": [dict(n) for n in self.splitting_nodes],
            "refused_nodes": [dict(n) for n in self.refused_nodes],
            "dynamic_shape_nodes": self.dynamic_shape_nodes,
            "caveats": list(self.caveats),
        }
        if self.if_shapes_fixed is not None:
            out["if_shapes_fixed"] = dict(self.if_shapes_fixed)
        return out


@dataclass
class MobileCoverage:
    """Per EP key of :data:`MOBILE_EPS`, its :class:`EPCoverage`; ``dynamic_inputs`` lists inputs of unknown shape."""

    eps: dict[str, EPCoverage]
    dynamic_inputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {key: ep.to_dict() for key, ep in self.eps.items()}


def _dims(value: onnx.ValueInfoProto) -> list[int] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _conv_refusal(ep: str, node: onnx.NodeProto, weights: Mapping[str, list[int]], dequantized: Container[str] = ()) -> str | None:
    """Why ``ep``'s Conv builder refuses ``node`` although its table lists Conv (None: it does not)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    shape = weights.get(node.input[1])
    if shape is None:
        if node.input[1] in dequantized:
            return "weight is dequantized at run time (the EP's table has no DequantizeLinear)"
        return "weight is not a constant initializer"
    if ep == "nnapi":
        if len(shape) != 4:
            return f"{len(shape) - 2}-D conv (NNAPI takes 2-D convs)"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        dilations = list(attrs.get("dilations", [1, 1]))
        group = int(attrs.get("group", 1))
        if any(d != 1 for d in dilations) and group != 1 and shape[1] != 1:
            return f"dilation {dilations} on a grouped conv (group {group}, {shape[1]} channels per group): NNAPI has none"
    elif len(shape) not in (3, 4):
        return f"{len(shape) - 2}-D conv (CoreML takes 1-D/2-D convs)"
    return None


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes their first output's name (what the reports call such a layer), so every node can be named."""
    for node in _all_nodes(model.graph):
        if not node.name:
            node.name = node.output[0] if node.output else node.op_type


def _prepared(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None, tmp: Path) -> onnx.ModelProto:
    """The model as the checker sees it: shapes fixed, optimized at level basic by onnxruntime, shapes inferred."""
    from onnxruntime.tools import onnx_model_utils

    from .model_io import load_model, save_model

    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        if Path(model).is_file() and is_ort_format(model):
            raise LowRankError(
                f"{model}: an ORT-format model; the mobile checker reads ONNX models (check the .onnx the .ort was made from)"
            )
        proto = load_model(model)
    _name_nodes(proto)
    if input_shapes:
        names = {i.name for i in proto.graph.input}
        for name, shape in input_shapes.items():
            if name not in names:
                raise LowRankError(f"--input-shape: the model has no input {name!r} (has: {', '.join(sorted(names))})")
            try:
                onnx_model_utils.make_input_shape_fixed(proto.graph, name, [int(d) for d in shape])
            except Exception as exc:
                raise LowRankError(f"--input-shape {name}: {exc}") from None
        onnx_model_utils.fix_output_shapes(proto)
    source, optimized = tmp / "model.onnx", tmp / "optimized.onnx"
    save_model(proto, source)
    del proto
    try:
        onnx_model_utils.optimize_model(source, optimized, use_external_initializers=True)
        wrapper = onnx_model_utils.ModelProtoWithShapeInfo(optimized)
    except Exception as exc:  # onnxruntime and onnx raise their own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"the mobile usability checker cannot read the model: {first}") from None
    prepared: onnx.ModelProto = wrapper.model_with_shape_info
    return prepared


def _builder_checker(
    usability_checker: Any, table: Path, ep: str, initializers: Mapping[str, list[int]], dequantized: Mapping[str, list[int]]
) -> Any:
    """onnxruntime's supported-ops lookup for ``table``, then the EP builder's Conv limits (:func:`_conv_refusal`);
    ``.refused`` collects the nodes refused by those limits, with the reason."""

    class BuilderChecker(usability_checker._SupportedOpsChecker):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(table)
            self.refused: dict[str, str] = {}
            # a weight behind DequantizeLinear of a constant is a quantized constant to an EP that takes QDQ units
            takes_qdq = "ai.onnx:DequantizeLinear" in self._ops
            self.weights = {**initializers, **dequantized} if takes_qdq else dict(initializers)

        def is_op_supported(self, node: onnx.NodeProto) -> bool:
            if not super().is_op_supported(node):
                return False
            why = _conv_refusal(ep, node, self.weights, dequantized)
            if why is not None:
                self.refused[node.name] = why
                return False
            return True

    return BuilderChecker()


def _splitting_nodes(groups: list[list[onnx.NodeProto]], producers: Any, consumers: Any, nodes: list[onnx.NodeProto]) -> list[int]:
    """Indices (in ``nodes``) of unsupported nodes with partitions on both sides, reached through unsupported nodes only."""
    group_of = {id(n): i for i, group in enumerate(groups) for n in group}

    def reach(start: onnx.NodeProto, links: Any) -> set[int]:
        found: set[int] = set()
        seen = {id(start)}
        todo = list(links.get(start, ()))
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if id(n) in group_of:
                found.add(group_of[id(n)])
            else:
                todo.extend(links.get(n, ()))
        return found

    out = []
    for i, node in enumerate(nodes):
        if id(node) in group_of:
            continue
        before, after = reach(node, producers), reach(node, consumers)
        if before and after and len(before | after) >= 2:
            out.append(i)
    return out


def coverage(model: ModelLike, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> MobileCoverage:
    """onnxruntime's mobile usability estimate for NNAPI, CoreML NeuralNetwork and CoreML MLProgram (module docstring).

    Raises :class:`LowRankError` when the checker cannot read the model (an ORT-format file, a model onnxruntime
    cannot load or whose shapes ONNX shape inference rejects).
    """
    try:
        from onnxruntime.tools import onnx_model_utils
        from onnxruntime.tools.mobile_helpers import usability_checker
    except ImportError as exc:
        raise LowRankError(f"this onnxruntime has no mobile usability checker ({exc})") from None
    with tempfile.TemporaryDirectory() as tmp, captured_logs():
        proto = _prepared(model, input_shapes, Path(tmp))
    graph = proto.graph
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    dynamic_inputs = [i.name for i in graph.input if i.name not in initializers and not onnx_model_utils.is_fixed_size_tensor(i)]
    dequantized = {
        n.output[0]: initializers[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers
    }
    tables = Path(usability_checker.__file__).parent
    nodes = list(_all_nodes(graph))
    try:
        producers, consumers = onnx_model_utils.get_producer_consumer_maps(graph)
    except ValueError as exc:
        raise LowRankError(f"the mobile usability checker cannot read the model: {exc}") from None

    eps: dict[str, EPCoverage] = {}
    for key, _name, table, max_rank in MOBILE_EPS:

        def run(require_fixed: bool, checker: Any) -> Any:
            try:
                return usability_checker.check_partitioning(graph, checker, require_fixed, max_rank)  # noqa: B023
            except ValueError as exc:  # a model without value_info where shapes are required
                raise LowRankError(f"the mobile usability checker cannot read the model: {exc}") from None

        checker = _builder_checker(usability_checker, tables / table, key, initializers, dequantized)
        refused: dict[str, str] = checker.refused
        info = run(True, checker)
        supported = frozenset(n.name for group in info.supported_groups for n in group)
        shape_info = info
        entry = EPCoverage(
            partitions=int(info.num_partitions),
            supported_nodes=int(info.num_supported_nodes),
            total_nodes=int(info.num_nodes),
            unsupported_ops=sorted(op for op in info.unsupported_ops if op not in checker._ops),
            dynamic_shape_nodes=int(info.nodes_unsupported_due_to_dynamic_input),
            caveats=list(checker.get_caveats()),
            supported=supported,
        )
        if dynamic_inputs:
            fixed = run(False, _builder_checker(usability_checker, tables / table, key, initializers, dequantized))
            entry.if_shapes_fixed = {
                "partitions": int(fixed.num_partitions),
                "supported_nodes": int(fixed.num_supported_nodes),
                "total_nodes": int(fixed.num_nodes),
                "unsupported_ops": sorted(op for op in fixed.unsupported_ops if op not in checker._ops),
            }
            entry.supported_if_fixed = frozenset(n.name for group in fixed.supported_groups for n in group)
            shape_info = fixed
        for node in nodes:
            if node.name in refused:
                entry.why[node.name] = refused[node.name]
            elif node.name not in supported:
                op = f"{node.domain or 'ai.onnx'}:{node.op_type}"
                entry.why[node.name] = f"{op} not in the EP's table" if op in info.unsupported_ops else "input of dynamic shape or rank"
        entry.refused_nodes = [{"node": n, "op": _op_of(nodes, n), "reason": r} for n, r in sorted(refused.items())]
        # nodes that split partitions, by the estimate that has partitions (shapes ignored where they are dynamic)
        split = _splitting_nodes(shape_info.supported_groups, producers, consumers, nodes)
        entry.splitting_nodes = [
            {"node": nodes[i].name, "op": nodes[i].op_type, "reason": entry.why.get(nodes[i].name, "not supported")} for i in split
        ]
        eps[key] = entry
    return MobileCoverage(eps, dynamic_inputs)


def _op_of(nodes: list[onnx.NodeProto], name: str) -> str:
    return next((n.op_type for n in nodes if n.name == name), "?")


# --------------------------------------------------------------------------- per-layer check


def layers_adding_partitions(original: MobileCoverage, candidate: MobileCoverage, pairs: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Layers whose pair an EP refuses although it supports the original node, with the reason.

    ``pairs``: layer (node name in the original) -> the names of the nodes that replaced it. Support is read from
    the estimate with shapes ignored where the model has dynamic inputs (the one with partitions).
    """
    out: dict[str, str] = {}
    for key, name, _, _ in MOBILE_EPS:
        before, after = original.eps[key], candidate.eps[key]
        had = before.supported_if_fixed if before.supported_if_fixed is not None else before.supported
        has = after.supported_if_fixed if after.supported_if_fixed is not None else after.supported
        for layer, new_nodes in pairs.items():
            if layer in out or layer not in had:
                continue
            lost = [n for n in new_nodes if n not in has]
            if lost:
                out[layer] = f"its pair would split the {name} partition ({lost[0]}: {after.why.get(lost[0], 'not supported')})"
    return out


def partitions_added(original: MobileCoverage, candidate: MobileCoverage) -> dict[str, tuple[int, int]]:
    """EPs on which the candidate has more partitions than the original: key -> (before, after)."""
    out = {}
    for key, ep in candidate.eps.items():
        before_ep = original.eps[key]
        before = before_ep.if_shapes_fixed["partitions"] if before_ep.if_shapes_fixed else before_ep.partitions
        after = ep.if_shapes_fixed["partitions"] if ep.if_shapes_fixed else ep.partitions
        if after > before:
            out[key] = (before, after)
    return out


def keep_partitions_whole(
    source: onnx.ModelProto,
    convert: Callable[[str | None], tuple[onnx.ModelProto, Report]],
    exclude: str | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> tuple[onnx.ModelProto, Report]:
    """``decompose(mobile_safe=True)``: convert, find the layers whose pair adds a partition on a mobile EP, keep
    them whole, and convert again until none does (a few rounds settle it).

    ``convert(exclude)`` converts ``source`` with ``exclude`` as the ``--exclude`` pattern (the user's own,
    ``exclude``, widened by the layers kept whole); the report names each kept layer's EP and node."""
    import re

    before = coverage(source, input_shapes=input_shapes)
    kept: dict[str, str] = {}
    for _ in range(len(MOBILE_EPS) + 2):  # each round keeps more layers whole
        pattern = exclude
        if kept:
            names = "|".join(re.escape(k) for k in kept)
            pattern = f"(?:{exclude})|^(?:{names})$" if exclude else f"^(?:{names})$"
        new, report = convert(pattern)
        after = coverage(new, input_shapes=input_shapes)
        pairs = {layer.node: [layer.vertical_node or "", layer.horizontal_node or ""] for layer in report.decomposed}
        found = layers_adding_partitions(before, after, pairs)
        if not found:
            break
        kept.update(found)
    for layer in report.layers:
        if layer.node in kept:
            layer.reason = f"kept whole by --mobile-safe: {kept[layer.node]}"
    for key, (was, now) in partitions_added(before, after).items():
        report.warnings.append(f"{EP_NAMES[key]}: {was} -> {now} partitions after decomposition, and no single layer's pair is to blame")
    report.mobile = {"original": before.to_dict(), "candidate": after.to_dict(), "kept_whole": dict(kept)}
    return new, report
