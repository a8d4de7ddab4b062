"""Sensitivity-aware rank allocation: ranks chosen by measured damage to the model's outputs.

The data-free ``speedup`` policy spends a MAC budget on the layers whose
*kernels* lose the least relative energy. But equal kernel error does not mean
equal harm: a layer early in the network, or one whose output the next layers
amplify, hurts the prediction far more. This module measures the harm directly
and allocates ranks with it.

Measurement
-----------
For each decomposable layer ``l`` and candidate rank ``r`` the *damage* is the
relative squared change of the model's outputs when only that layer is
decomposed, on a subset ``S`` of the calibration data::

    d_l(r) = Σ_{x∈S} Σ_o ||f_o(x; l, r) − f_o(x)||² / Σ_{x∈S} Σ_o ||f_o(x)||²

(``o`` over the graph outputs, ``f`` the original model, ``f(·; l, r)`` the
model with layer ``l`` replaced by its rank-``r`` pair). With ``refit=True``
(default) the pair's horizontal factor is first refit to the layer's original
output as :mod:`onnx_lowrank.calibration` does, so the damage is that of the
pair the final refit model will hold.

Cost: the original model runs once on ``S``, caching every tensor the
*suffix* of some layer reads — the layer's input and any tensor from before it
that a later node also reads (a skip connection). Then, per layer, one
onnxruntime session holds only the suffix — the vertical and horizontal convs
and every node downstream — with the pair's kernels and bias as *graph
inputs*, so every candidate rank runs in the same session: ranks cost one
suffix pass each, plus one pass at full rank that gives the layer's vertical
output ``T`` and the layer's own output ``Y`` for the refit normal equations.
The SVD factors of lower rank are nested (the first ``r`` vertical filters and
the first ``r`` columns of every horizontal filter, per group), so the full-rank
pair yields every candidate's data-free factors by slicing, and the normal
equations accumulated once at the largest candidate rank hold every smaller
rank's as a sub-block. Total: ``1 + Σ_l (1 + |ranks_l|)`` passes over ``S``,
each only as deep as the suffix. Memory: ``|S|`` times the cached tensors, plus
one batch of the full-rank ``T``.

Candidate ranks per layer: those keeping fractions ``energies`` of the
kernel's ``Σ s²`` and those giving the layer MAC ratios ``layer_speedups``,
restricted to ranks that save MACs.

Allocation
----------
:func:`allocate_ranks` solves the multiple-choice knapsack
``min Σ_l d_l(r_l)`` subject to ``fixed + Σ_l macs_l(r_l) ≤ total / S`` with
:func:`onnx_lowrank.ranks.allocate`, each layer offering "leave as is" (damage 0)
and its measured ranks. Summing the single-layer damages assumes the errors of
different layers add — to first order they do, as independent perturbations of
the outputs whose squared norms add. The result is a ``{node: rank}`` mapping
for ``decompose(model, ranks=...)``, which then reaches the same MAC ratio
(the costs come from :func:`onnx_lowrank.decompose`'s own cost model).

Preconditions: layers in functions or control-flow subgraphs are not measured
(they are left alone, counted as fixed MACs); calibration data as
:func:`onnx_lowrank.calibration.load_calibration` accepts it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from ._threads import single_threaded_blas
from .api import decompose
from .calibration import (
    CalibrationSource,
    NormalEquations,
    horizontal_geometry,
    iter_batches,
    load_calibration,
    pack,
    prefix_model,
    subgraph_reads,
    unpack,
)
from .errors import LowRankError
from .model_io import load_model
from .ranks import Infeasible, LayerChoices, Option, allocate, energy_rank
from .run_shapes import ModelShapes, resolve_shapes
from .verify import make_session

__all__ = [
    "DEFAULT_ENERGIES",
    "DEFAULT_LAYER_SPEEDUPS",
    "LayerSensitivity",
    "Sensitivity",
    "allocate_ranks",
    "measure_sensitivity",
    "sensitivity_ranks",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]
ModelLike = str | os.PathLike[str] | onnx.ModelProto

DEFAULT_ENERGIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_LAYER_SPEEDUPS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class LayerSensitivity:
    """Measured damage of one layer: ``damage[i]`` when only this layer runs at ``ranks[i]``."""

    node: str
    macs: int  # the original layer, per inference at batch 1
    rank_macs: int  # the pair costs rank_macs · rank
    full_rank: int
    ranks: list[int] = field(default_factory=list)
    damage: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def options(self) -> LayerChoices:
        """The original layer (damage 0) and every measured rank, for :func:`onnx_lowrank.ranks.allocate`."""
        opts = [Option(self.macs, 0.0)]
        opts += [Option(self.rank_macs * r, d, "spatial", r) for r, d in zip(self.ranks, self.damage, strict=True)]
        return LayerChoices(self.node, opts)


@dataclass
class Sensitivity:
    """Per-layer damage curves and what measuring them cost."""

    layers: list[LayerSensitivity]
    total_macs: int  # every conv of the model, as decompose counts them
    fixed_macs: int  # convs not measured (ineligible, excluded, or outside the main graph)
    samples: int
    evaluations: int  # suffix passes over the subset
    seconds: float
    refit: bool
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- graph helpers


def _node_by_key(graph: onnx.GraphProto, key: str) -> onnx.NodeProto | None:
    """The main-graph node reported as ``key`` (its name, else its first output)."""
    for node in graph.node:
        if (node.name or (node.output[0] if node.output else "")) == key:
            found: onnx.NodeProto = node
            return found
    return None


def _suffix(graph: onnx.GraphProto, start: onnx.NodeProto) -> tuple[list[str], list[str]]:
    """``(frontier, outputs)`` of the nodes downstream of ``start`` (itself included).

    The frontier is what those nodes read but do not compute (initializers
    aside): the tensors a suffix model must be fed. ``outputs`` are the graph
    outputs the suffix computes; the others do not depend on ``start``.
    """
    constants = {t.name for t in graph.initializer}
    index = next(i for i, n in enumerate(graph.node) if n is start or n == start)
    tainted: set[str] = set(start.output)
    nodes = [start]
    for node in graph.node[index + 1 :]:
        reads = {*node.input, *subgraph_reads(node)}
        if reads & tainted:
            nodes.append(node)
            tainted.update(node.output)
    produced = {o for n in nodes for o in n.output}
    frontier: list[str] = []
    for node in nodes:
        for name in [*node.input, *sorted(subgraph_reads(node))]:
            if name and name not in produced and name not in constants and name not in frontier:
                frontier.append(name)
    outputs = [v.name for v in graph.output if v.name in tainted]
    return frontier, outputs


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the main graph's tensors, by ONNX type inference on a weightless copy."""
    graph = model.graph
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    listed = {v.name for v in graph.input}
    # weights become typed inputs: inference needs their types and dims, not their bytes
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name not in listed)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception:  # inference is best effort; unknown types fall back below
        inferred = skeleton
    types: dict[str, int] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    return types


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def _run(session: Any, names: list[str], feed: Mapping[str, Array]) -> list[Array]:
    try:
        return list(session.run(names, dict(feed)))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed while measuring sensitivity: {first}") from None


# --------------------------------------------------------------------------- measurement


def _candidate_ranks(
    s: FloatArray, full: int, macs: int, rank_macs: int, energies: Sequence[float], speedups: Sequence[float]
) -> list[int]:
    ranks = {min(energy_rank(s, e), full) for e in energies}
    ranks |= {max(1, math.floor(macs / (sp * rank_macs))) for sp in speedups if sp > 0}
    return sorted(r for r in ranks if 1 <= r < full and rank_macs * r < macs)


def _slice_vertical(v: Array, groups: int, full: int, r: int) -> Array:
    """The first ``r`` vertical filters of every group: ``(g·R, C, ...)`` → ``(g·r, C, ...)``."""
    return np.ascontiguousarray(v.reshape(groups, full, *v.shape[1:])[:, :r].reshape(groups * r, *v.shape[1:]))


def _slice_channels(t: Array, groups: int, full: int, r: int) -> Array:
    """The first ``r`` channels of every group of an activation ``(B, g·R, ...)``."""
    return t.reshape(t.shape[0], groups, full, *t.shape[2:])[:, :, :r].reshape(t.shape[0], groups * r, *t.shape[2:])


def _measure_layer(
    model: onnx.ModelProto,
    key: str,
    cache: list[dict[str, Array]],
    reference_norm: float,
    spec: LayerSensitivity,
    *,
    refit: bool,
    ridge: float,
    energies: Sequence[float],
    layer_speedups: Sequence[float],
    threads: int | None,
    shapes: ModelShapes,
) -> tuple[int, str | None]:
    """Fill ``spec.ranks``/``spec.damage``; return the number of suffix passes and a reason when the layer is skipped."""
    decomposed, report = decompose(model, ranks={key: spec.full_rank}, force=True, shapes=shapes)
    layer = next(lay for lay in report.layers if lay.node == key)
    graph = decomposed.graph
    nodes = {n.name: n for n in graph.node}
    vertical, horizontal = nodes.get(layer.vertical_node or ""), nodes.get(layer.horizontal_node or "")
    if not layer.decomposed or vertical is None or horizontal is None:
        return 0, layer.reason or "not decomposed in the main graph"
    v_init = _initializer(graph, vertical.input[1])
    h_init = _initializer(graph, horizontal.input[1])
    if v_init is None or h_init is None:
        return 0, "the pair's kernels are not plain initializers"
    if len(horizontal.input) < 3 or not horizontal.input[2]:
        # a conv without bias gets a zero one, as the refit gives it a bias of its own
        dtype = helper.tensor_dtype_to_np_dtype(h_init.data_type)
        zero = numpy_helper.from_array(np.zeros(h_init.dims[0], dtype), f"{horizontal.name}.bias")
        graph.initializer.append(zero)
        del horizontal.input[2:]
        horizontal.input.append(zero.name)
    b_init = _initializer(graph, horizontal.input[2])
    if b_init is None:
        return 0, "the pair's bias is not a plain initializer"
    v_full, h_full = numpy_helper.to_array(v_init), numpy_helper.to_array(h_init)
    b_dtype = helper.tensor_dtype_to_np_dtype(b_init.data_type)
    b0 = numpy_helper.to_array(b_init).astype(np.float64).reshape(-1)
    geometry = horizontal_geometry(horizontal, h_full.shape)
    if isinstance(geometry, str):
        return 0, geometry
    groups, full = geometry.groups, int(h_full.shape[1])
    # singular values: V_k = √s_k·u_k with ||u_k|| = 1, so s_k = ||V_k||²
    s = np.square(v_full.astype(np.float64).reshape(groups, full, -1)).sum(axis=2)
    ranks = _candidate_ranks(s, full, spec.macs, spec.rank_macs, energies, layer_speedups)
    if not ranks:
        return 0, "no rank saves MACs"
    frontier, outputs = _suffix(graph, vertical)
    missing = [name for name in frontier if name not in cache[0]]
    if missing:
        return 0, f"suffix reads {missing[0]!r}, which the original model does not compute"
    types = _elem_types(decomposed)
    t_name, y_name = vertical.output[0], horizontal.output[0]
    weights = {v_init.name: v_init.data_type, h_init.name: h_init.data_type, b_init.name: b_init.data_type}
    cut = {name: helper.np_dtype_to_tensor_dtype(cache[0][name].dtype) for name in frontier}
    wanted = {name: types.get(name, v_init.data_type) for name in [*outputs, t_name, y_name]}
    suffix = prefix_model(decomposed, wanted, {**cut, **weights})
    session = make_session(suffix, threads=threads)
    names = list(wanted)
    r_max = max(ranks)

    def feed(batch: Mapping[str, Array], v: Array, h: Array, b: FloatArray) -> dict[str, Array]:
        f = {name: batch[name] for name in frontier}
        f[v_init.name] = v
        f[h_init.name] = h.astype(h_full.dtype)
        f[b_init.name] = b.astype(b_dtype)
        return f

    passes = 0
    equations = NormalEquations(geometry, r_max, int(h_full.shape[0])) if refit else None
    if equations is not None:
        for batch in cache:
            # the full-rank pair reproduces the layer: its horizontal output is the target Y
            out = dict(zip(names, _run(session, names, feed(batch, v_full, h_full, b0)), strict=True))
            equations.add(_slice_channels(out[t_name], groups, full, r_max), out[y_name])
        passes += 1
    for r in ranks:
        v_r = _slice_vertical(v_full, groups, full, r)
        h_r = np.ascontiguousarray(h_full[:, :r]).astype(np.float64)
        b_r = b0
        if equations is not None:
            theta = equations.solve(pack(h_r, b0, groups), ridge, rank=r)
            h_r, b_r = unpack(theta, h_r.shape)
        change = 0.0
        for batch in cache:
            got = dict(zip(names, _run(session, names, feed(batch, v_r, h_r, b_r)), strict=True))
            change += sum(float(np.sum(np.square(got[o].astype(np.float64) - batch[o].astype(np.float64)))) for o in outputs)
        passes += 1
        spec.ranks.append(r)
        spec.damage.append(change / reference_norm if reference_norm else change)
    return passes, None


def measure_sensitivity(
    model: ModelLike,
    calibration: CalibrationSource,
    *,
    samples: int = 128,
    batch_size: int = 64,
    refit: bool = True,
    ridge: float = 1e-4,
    energies: Sequence[float] = DEFAULT_ENERGIES,
    layer_speedups: Sequence[float] = DEFAULT_LAYER_SPEEDUPS,
    include: str | None = None,
    exclude: str | None = None,
    threads: int | None = None,
    shapes: ModelShapes | None = None,
) -> Sensitivity:
    """Damage to the outputs of every decomposable main-graph conv at a few ranks each (see the module docstring).

    ``samples`` caps the calibration subset (the first samples); ``include``/``exclude``
    restrict the layers as in :func:`onnx_lowrank.decompose`. ``shapes``: the sizes to cost the layers by
    (default: those of the first calibration sample).
    """
    start = time.perf_counter()
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise LowRankError(f"samples must be a whole number >= 1, got {samples!r}")
    data = load_calibration(calibration, proto)
    if shapes is None:
        shapes = resolve_shapes(proto, reference={name: values[:1] for name, values in data.items()})
    # the library's own cost model: at rank 1 every eligible layer's pair costs rank_macs
    _, base = decompose(proto, rank=1, force=True, include=include, exclude=exclude, shapes=shapes)
    graph = proto.graph
    specs: list[LayerSensitivity] = []
    skipped: dict[str, str] = {}
    for layer in base.layers:
        if not layer.decomposed or layer.full_rank is None or layer.op_type != "Conv" or layer.kind != "spatial" or not layer.counted:
            continue  # counted in the fixed MACs: fully connected layers and ineligible convs are left alone
        if _node_by_key(graph, layer.node) is None:
            skipped[layer.node] = "not in the main graph"
            continue
        specs.append(LayerSensitivity(layer.node, layer.macs_before, layer.macs_after, layer.full_rank))

    # one run of the original model caches what every suffix reads, and the outputs
    needed: list[str] = []
    for spec in specs:
        node = _node_by_key(graph, spec.node)
        assert node is not None
        for name in _suffix(graph, node)[0]:
            if name not in needed:
                needed.append(name)
    outputs = [v.name for v in graph.output]
    types = _elem_types(proto)
    produced = {o for n in graph.node for o in n.output}
    fetch = [n for n in [*needed, *outputs] if n in produced]
    session = make_session(prefix_model(proto, {n: types.get(n, onnx.TensorProto.FLOAT) for n in dict.fromkeys(fetch)}), threads=threads)
    fetch = list(dict.fromkeys(fetch))
    cache: list[dict[str, Array]] = []
    count = 0
    fed = {i.name for i in session.get_inputs()}
    for batch in iter_batches(proto, data, batch_size, limit=samples):
        values = dict(zip(fetch, _run(session, fetch, {k: v for k, v in batch.items() if k in fed}), strict=True))
        values.update({k: v for k, v in batch.items() if k not in values})  # graph inputs read directly by a suffix
        cache.append(values)
        count += len(next(iter(batch.values())))
    del session
    reference = sum(float(np.sum(np.square(b[o].astype(np.float64)))) for b in cache for o in outputs)

    evaluations = 1
    measured: list[LayerSensitivity] = []
    for spec in specs:
        t0 = time.perf_counter()
        with single_threaded_blas():
            passes, reason = _measure_layer(
                proto,
                spec.node,
                cache,
                reference,
                spec,
                refit=refit,
                ridge=ridge,
                energies=energies,
                layer_speedups=layer_speedups,
                threads=threads,
                shapes=shapes,
            )
        spec.seconds = time.perf_counter() - t0
        evaluations += passes
        if reason is not None:
            skipped[spec.node] = reason
        else:
            measured.append(spec)
    return Sensitivity(
        layers=measured,
        total_macs=base.macs_before,
        fixed_macs=base.macs_before - sum(s.macs for s in measured),
        samples=count,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        refit=refit,
        skipped=skipped,
    )


def allocate_ranks(sensitivity: Sensitivity, speedup: float) -> dict[str, int]:
    """``{node: rank}`` reaching total conv MACs before/after ≥ ``speedup`` with the least summed damage.

    Layers left as they are do not appear; pass the mapping to
    ``decompose(model, ranks=...)``.
    """
    if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup >= 1.0):
        raise LowRankError(f"speedup must be a number >= 1, got {speedup!r}")
    budget = sensitivity.total_macs / float(speedup)
    try:
        picks = allocate([layer.options() for layer in sensitivity.layers], budget, fixed=sensitivity.fixed_macs)
    except Infeasible as exc:
        best = sensitivity.total_macs / exc.best if exc.best else float("inf")
        raise LowRankError(f"speedup {speedup:g} cannot be reached with the measured ranks: the most they give is {best:.3g}x") from None
    return {key: option.rank for key, option in picks.items() if option.kind is not None}


def sensitivity_ranks(model: ModelLike, calibration: CalibrationSource, speedup: float, **options: Any) -> dict[str, int]:
    """:func:`measure_sensitivity` then :func:`allocate_ranks`; ``options`` go to the former."""
    return allocate_ranks(measure_sensitivity(model, calibration, **options), speedup)
