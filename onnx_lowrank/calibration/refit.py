"""Asymmetric refit of the second factor of every decomposed layer, stage by stage, in a few passes.

The data-aware factors of :mod:`onnx_lowrank.calibration.data_aware` are fit to the *original* model's
inputs. In the converted network each layer's input already carries the error of every decomposed layer
before it. Following the asymmetric reconstruction of Zhang et al. ("Accelerating very deep convolutional
networks for classification and detection", TPAMI 2016, arXiv 1505.06798, Sec. 3.3), each pair keeps its
first factor and its second factor and bias are re-solved so that the pair, fed what it really receives,
reproduces the original layer's output.

Math
----
For one decomposed layer let ``T`` be the output of its first node in the converted model (upstream layers
already decomposed and refit) and ``Y`` the output of the original layer in the original model, both on the
same calibration inputs. The second node is linear in its weight and bias: a ``1 × kw`` conv (spatial
split; width stride, dilation and pads, ``g`` groups), a pointwise conv (channel split), the same as a
``ConvTranspose``, or a ``Gemm``/``MatMul`` (fully connected). Cut ``T`` into the patches each output
position reads (:func:`~onnx_lowrank.calibration.statistics.gather_patches`, ``K·kw`` features per group),
append a column of ones for the bias, and per group the weights ``θ = [vec H; b]`` solve the ridge problem

    min_θ ||A θ − Y||² + (θ − θ₀)ᵀ Λ (θ − θ₀)   ⇔   (AᵀA + Λ) θ = AᵀY + Λ θ₀,

with the current factor and bias as prior ``θ₀`` and ``Λ = diag(λ_w, …, λ_w, λ_b)``,
``λ_w = ridge · tr(A_wᵀA_w)/(K·kw)``, ``λ_b = ridge · rows`` (scale free). Shrinking towards the current
factor keeps directions the data never excites where they were, and the fit is never worse than ``θ₀`` on
the calibration data. ``AᵀA``, ``AᵀY``, ``||Y||²`` are accumulated in float64 batch by batch (at most
``positions`` output positions per sample, at random), so memory is the ``(K·kw + 1)²`` sums per group.
The residuals before and after come from the same sums. A ``Gemm`` second node computes
``α·T Qᵀ + β·C``: ``θ`` holds ``α·Qᵀ`` and ``β·C``. A ``MatMul`` has no bias: its ``θ`` is the weight alone.

Stages
------
Refitting layer by layer in topological order costs two passes per layer. Instead the decomposed layers are
grouped by depth into ``stages`` consecutive groups; per stage ONE streamed run of the converted model
(pruned to what the stage reads) and one of the original model (pruned to the stage's targets) accumulate
the sums of every layer in the stage, every layer of the stage is re-solved, and the next stage sees them
refit. Total: ``stages`` runs of each model's prefixes, about ``(1 + 1/S)·(stages + 1)/2`` plain passes.
Within a stage a layer sees its upstream stage-mates before their refit; the stages bound that.

Activations
-----------
With ``activations`` (:attr:`~onnx_lowrank.calibration.plan.CalibrationOptions.activation_refit`), a layer
whose output only a ``Relu``, ``LeakyRelu`` or ``Clip`` reads (maybe through a ``MaxPool``) is fit to that
activation's output instead: ``min_θ ||r(Aθ) − r(Y)||²`` with the same ridge, started from the linear
solution above and solved on the rows the stage's pass gives it, kept in memory
(:mod:`onnx_lowrank.calibration.activation`). Every layer reports the objective it was fit to
(``objective``: ``"output"`` or the activation) and, where the activation could not be used, why.

Preconditions (a layer that fails one keeps its factors and the result says why):

* its second node is a ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul`` whose weight (and bias) are
  constants — an initializer or a ``Constant``, maybe behind ``Identity``/``Cast``; a second factor shared
  by several nodes (a shared weight, factored once) is fit to all of them jointly;
* it is in the main graph, a model-local function or an ``If`` branch (not a loop body; see
  :mod:`onnx_lowrank.calibration.collect`);
* the second node writes the original layer's output name (as :func:`onnx_lowrank.decompose` does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from ..config import is_whole
from ..errors import LowRankError
from ..graph import Scope, attrs, iter_scopes, namespace_names
from ..passes import add_constant, resolve_weight
from ..report import Report
from .activation import (
    DEFAULT_ACTIVATION_ROWS,
    DEFAULT_ITERATIONS,
    DEFAULT_ROW_MEMORY,
    LAMBDA_END,
    LAMBDA_START,
    MIN_ROWS_PER_UNKNOWN,
    Activation,
    KeptRows,
    activation_after,
    fit_activation,
)
from .collect import TensorRequest, prepare, stream_together, subgraph_reads
from .data import Batches, CalibrationSource, batch_size_of, load_calibration, sample_count
from .layers import DEFAULT_POSITIONS
from .statistics import PatchGeometry, gather_patches, output_size, sample_grid, sample_rows

__all__ = [
    "DEFAULT_ACTIVATIONS",
    "DEFAULT_RIDGE",
    "DEFAULT_STAGES",
    "LayerRefit",
    "RefitOptions",
    "RefitResult",
    "refit",
    "refit_layers",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]

DEFAULT_STAGES = 3
DEFAULT_RIDGE = 1e-4
DEFAULT_ACTIVATIONS = True
_ROWS_PER_BLOCK = 65536


@dataclass(frozen=True)
class RefitOptions:
    """How the refit runs, checked once here (the defaults are the measured choices).

    ``ridge``, ``batch_size``, ``stages`` and ``positions`` are those of the math above; ``threads`` are
    onnxruntime's per pass; ``every_layer`` refits a layer downstream of a stage-mate too (by default it keeps
    its data-aware factors). ``activations``: fit a layer read only by a ``Relu``/``LeakyRelu``/``Clip`` to that
    activation's output (:mod:`onnx_lowrank.calibration.activation`), in ``activation_iterations``
    alternations whose penalty weight runs from ``activation_lambdas[0]`` to ``[1]``, on at most
    ``activation_rows`` rows per layer (None: no limit) and ``row_memory`` bytes of rows per stage.
    """

    ridge: float = DEFAULT_RIDGE
    batch_size: int = 64
    stages: int = DEFAULT_STAGES
    positions: int | None = DEFAULT_POSITIONS
    threads: int | None = None
    every_layer: bool = False
    activations: bool = DEFAULT_ACTIVATIONS
    activation_iterations: int = DEFAULT_ITERATIONS
    activation_lambdas: tuple[float, float] = (LAMBDA_START, LAMBDA_END)
    row_memory: int = DEFAULT_ROW_MEMORY
    activation_rows: int | None = DEFAULT_ACTIVATION_ROWS

    def __post_init__(self) -> None:
        ridge, lambdas = self.ridge, self.activation_lambdas
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise LowRankError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if not is_whole(self.batch_size, 1):
            raise LowRankError(f"batch size must be a whole number >= 1, got {self.batch_size!r}")
        if not is_whole(self.stages, 1):
            raise LowRankError(f"stages must be a whole number >= 1, got {self.stages!r}")
        if not is_whole(self.activation_iterations, 0):
            raise LowRankError(f"activation iterations must be a whole number >= 0, got {self.activation_iterations!r}")
        if len(lambdas) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in lambdas):
            raise LowRankError(f"activation lambdas must be two finite numbers > 0, got {lambdas!r}")
        if not is_whole(self.row_memory, 1):
            raise LowRankError(f"row memory must be a whole number of bytes >= 1, got {self.row_memory!r}")
        if self.activation_rows is not None and not is_whole(self.activation_rows, 1):
            raise LowRankError(f"activation rows must be a whole number >= 1 or None, got {self.activation_rows!r}")
        object.__setattr__(self, "ridge", float(ridge))
        object.__setattr__(self, "activation_lambdas", (float(lambdas[0]), float(lambdas[1])))


@dataclass
class LayerRefit:
    """What the refit did to one decomposed layer.

    ``error_before``/``error_after``: ``||pair(T) − Y|| / ||Y||`` on the calibration data with the second
    factor before and after the refit, ``T`` the first node's output in the converted model, whatever the
    objective. ``objective``: what the refit factors were fit to, ``"output"`` (the linear output) or the
    activation that reads it (e.g. ``"Relu"``); ``None`` when the layer was not refit. ``activation_reason``:
    why the activation was not fit where it was asked for. ``activation_error_before``/``_linear``/``_after``:
    ``||r(pair(T)) − r(Y)|| / ||r(Y)||`` on the kept rows (``activation_rows`` of them) with the factors
    before the refit, after the linear refit, and as written.
    """

    node: str
    rank: int | None
    refit: bool
    reason: str | None = None
    error_before: float | None = None
    error_after: float | None = None
    stage: int | None = None
    objective: str | None = None
    activation_reason: str | None = None
    activation_error_before: float | None = None
    activation_error_linear: float | None = None
    activation_error_after: float | None = None
    activation_rows: int | None = None


@dataclass
class RefitResult:
    model: onnx.ModelProto
    layers: list[LayerRefit] = field(default_factory=list)
    samples: int = 0
    stages: int = 0
    passes: float = 0.0  # streamed runs of a model over the calibration set (prefixes counted whole)
    seconds: float = 0.0
    activations: bool = False
    activation_seconds: float = 0.0  # of ``seconds``: the activation-aware fits (no pass of their own)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "stages": self.stages,
            "passes": self.passes,
            "seconds": self.seconds,
            "activations": self.activations,
            "activation_seconds": self.activation_seconds,
            "layers": [asdict(layer) for layer in self.layers],
        }


# --------------------------------------------------------------------------- normal equations


class NormalEquations:
    """Sums of ``[A 1]ᵀ[A 1]``, ``[A 1]ᵀY`` and ``||Y||²`` per group (float64); no ones column without a bias."""

    def __init__(self, groups: int, features: int, outputs: int, bias: bool) -> None:
        self.groups, self.features, self.outputs, self.bias = groups, features, outputs, bias
        size = features + (1 if bias else 0)
        self.gram = np.zeros((groups, size, size))
        self.cross = np.zeros((groups, size, outputs))
        self.target = np.zeros(groups)
        self.rows = 0

    def add(self, a: FloatArray, y: FloatArray) -> None:
        """``a``: ``(g, P, F)`` features, ``y``: ``(g, P, N_g)`` targets of the same P output positions."""
        for start in range(0, a.shape[1], _ROWS_PER_BLOCK):
            block, target = a[:, start : start + _ROWS_PER_BLOCK], y[:, start : start + _ROWS_PER_BLOCK]
            n = block.shape[1]
            for g in range(self.groups):
                x = block[g].astype(np.float64)
                t = target[g].astype(np.float64)
                f = self.features
                self.gram[g, :f, :f] += x.T @ x
                self.cross[g, :f] += x.T @ t
                if self.bias:
                    column = x.sum(axis=0)
                    self.gram[g, :f, f] += column
                    self.gram[g, f, :f] += column
                    self.gram[g, f, f] += n
                    self.cross[g, f] += t.sum(axis=0)
                self.target[g] += float(np.einsum("ij,ij->", t, t))
            self.rows += n

    def residual(self, theta: FloatArray) -> float:
        """``Σ_g ||A θ_g − Y_g||²`` for ``theta`` of shape ``(g, F(+1), N_g)``."""
        total = float(self.target.sum())
        for g in range(self.groups):
            th = theta[g]
            total += float(np.einsum("ij,ik,kj->", th, self.gram[g], th)) - 2.0 * float(np.einsum("ij,ij->", th, self.cross[g]))
        return max(total, 0.0)

    def solve(self, prior: FloatArray, ridge: float) -> FloatArray:
        """``θ`` per group, ridge-shrunk towards ``prior`` (see the module docstring)."""
        out = np.empty_like(prior)
        for g in range(self.groups):
            gram = self.gram[g]
            lam = _penalty(gram, self.features, self.bias, ridge)
            system = gram + np.diag(lam)
            rhs = self.cross[g] + lam[:, None] * prior[g]
            try:
                out[g] = scipy.linalg.solve(system, rhs, assume_a="pos", check_finite=False)
            except (np.linalg.LinAlgError, ValueError):
                out[g] = scipy.linalg.lstsq(system, rhs, check_finite=False)[0]
        return out


def _penalty(gram: FloatArray, features: int, bias: bool, ridge: float) -> FloatArray:
    """The diagonal of ``Λ`` for one group's ``[A 1]ᵀ[A 1]``: ``ridge · tr(A_wᵀA_w)/F`` per weight,
    ``ridge · rows`` for the bias."""
    f = features
    trace = float(np.trace(gram[:f, :f]))
    lam = np.full(gram.shape[0], ridge * trace / f if trace > 0 and f else 1.0)
    if bias:
        lam[f] = ridge * max(float(gram[f, f]), 1.0)
    return lam


# --------------------------------------------------------------------------- graph side


@dataclass
class _Stored:
    """A constant a node reads: where its tensor is stored (edited in place) and the type the node sees."""

    tensor: onnx.TensorProto
    name: str
    scope: Scope
    node_type: int


def _stored(name: str, scope: Scope) -> _Stored | None:
    source = resolve_weight(name, scope)
    if isinstance(source, str) or source.folded:
        return None
    owner = source.scope
    tensor = owner.initializers.get(source.name)
    if tensor is None:
        producer = owner.producers.get(source.name)
        if producer is None or producer.op_type != "Constant":
            return None
        tensor = next((a.t for a in producer.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if tensor is None:
            return None
    return _Stored(tensor, source.name, owner, int(source.cast_to or source.data_type))


def _geometry(node: onnx.NodeProto, weight_dims: Sequence[int]) -> PatchGeometry | str:
    """The patch geometry of a second node, or why it is not one the refit handles."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"second node is a {op} in domain {node.domain!r}"
    if op in ("Gemm", "MatMul"):
        return PatchGeometry()
    if op not in ("Conv", "ConvTranspose"):
        return f"second node is a {op}; the refit handles Conv, ConvTranspose, Gemm and MatMul"
    a: dict[str, Any] = attrs(node)
    r = len(weight_dims) - 2
    kernel = tuple(int(k) for k in a.get("kernel_shape", list(weight_dims[2:])))
    strides = tuple(int(s) for s in a.get("strides", [1] * r))
    dilations = tuple(int(d) for d in a.get("dilations", [1] * r))
    pads = a.get("pads")
    value = a.get("auto_pad", b"NOTSET")
    auto = (value.decode() if isinstance(value, bytes) else str(value)) or "NOTSET"
    groups = int(a.get("group", 1))
    if op == "ConvTranspose":
        output_shape = a.get("output_shape")
        return PatchGeometry(
            kernel,
            strides,
            dilations,
            tuple(int(p) for p in pads) if pads is not None else None,
            auto,
            groups,
            transposed=True,
            output_padding=tuple(int(p) for p in a.get("output_padding", [0] * r)),
            output_shape=tuple(int(d) for d in output_shape[-r:]) if output_shape is not None else None,
        )
    return PatchGeometry(kernel, strides, dilations, tuple(int(p) for p in pads) if pads is not None else None, auto, groups)


def _conv_layout(op: str, weight: FloatArray, groups: int, trans_b: bool) -> FloatArray:
    """The second node's weight as ``(N, K, *spatial)`` (conv layout; fully connected: ``(out, K, 1)``)."""
    if op == "ConvTranspose":
        c, n_g = weight.shape[:2]
        return (
            weight.reshape(groups, c // groups, n_g, *weight.shape[2:]).swapaxes(1, 2).reshape(groups * n_g, c // groups, *weight.shape[2:])
        )
    if op in ("Gemm", "MatMul"):
        matrix = weight if trans_b else weight.T  # (out, K)
        return matrix[:, :, None]
    return weight


def _stored_layout(op: str, kernel: FloatArray, groups: int, trans_b: bool) -> FloatArray:
    """Inverse of :func:`_conv_layout`."""
    if op == "ConvTranspose":
        n, k = kernel.shape[:2]
        return kernel.reshape(groups, n // groups, k, *kernel.shape[2:]).swapaxes(1, 2).reshape(groups * k, n // groups, *kernel.shape[2:])
    if op in ("Gemm", "MatMul"):
        matrix = kernel[:, :, 0]
        return matrix if trans_b else matrix.T
    return kernel


@dataclass(eq=False)
class _Unit:
    """Second nodes sharing one second factor: refit jointly."""

    layers: list[LayerRefit]
    nodes: list[tuple[onnx.NodeProto, Scope]]
    targets: list[tuple[onnx.NodeProto, Scope] | None]
    weight: _Stored
    op: str
    geometry: PatchGeometry
    trans_b: bool
    alpha: float
    beta: float
    position: int
    first_position: int = 0  # main-graph index of the node holding the first node (itself, an If, or a function call: last)
    equations: NormalEquations | None = None
    rng: np.random.Generator | None = None
    activation: Activation | None = None  # fit to this activation's output (activations asked for, and it applies)
    kept: KeptRows | None = None


def _scopes_by_node(model: onnx.ModelProto) -> dict[tuple[int, str], tuple[onnx.NodeProto, Scope]]:
    found: dict[tuple[int, str], tuple[onnx.NodeProto, Scope]] = {}
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.name:
                found.setdefault((scope.namespace, node.name), (node, scope))
    return found


def _producers(model: onnx.ModelProto) -> dict[tuple[int, str], tuple[onnx.NodeProto, Scope]]:
    found: dict[tuple[int, str], tuple[onnx.NodeProto, Scope]] = {}
    for scope in iter_scopes(model):
        for node in scope.nodes:
            for out in node.output:
                if out:
                    found.setdefault((scope.namespace, out), (node, scope))
    return found


def _namespace(model: onnx.ModelProto, key: str) -> int:
    """The namespace of a reported layer: 0 for the main graph tree, i+1 for ``model.functions[i]``."""
    function, sep, _ = key.partition("::")
    if not sep:
        return 0
    for i, f in enumerate(model.functions):
        if f.name == function:
            return i + 1
    return -1


def _descendants(model: onnx.ModelProto, units: Sequence[_Unit]) -> list[set[int]]:
    """For each unit, the main-graph node indices that read (transitively) what its second nodes write."""
    graph = model.graph
    reads = [{*n.input, *subgraph_reads(n)} for n in graph.node]
    out: list[set[int]] = []
    for unit in units:
        start = unit.position
        if start >= len(graph.node):  # in a function: its calls are not traced; assume it feeds everything after
            out.append(set(range(len(graph.node))))
            continue
        tainted = set(graph.node[start].output)
        below: set[int] = set()
        for i in range(start + 1, len(graph.node)):
            if reads[i] & tainted:
                below.add(i)
                tainted.update(graph.node[i].output)
        out.append(below)
    return out


def _top_position(model: onnx.ModelProto, scope: Scope, node: onnx.NodeProto) -> int:
    """The index of the main-graph node holding ``node`` (itself, or the If around it); functions last."""
    current, inner = scope, node
    while current.parent is not None:
        owner = next(
            (
                n
                for n in current.parent.nodes
                for a in n.attribute
                if (a.type == onnx.AttributeProto.GRAPH and (a.g is current.graph or a.g == current.graph))
            ),
            None,
        )
        if owner is None:
            break
        current, inner = current.parent, owner
    if current.function is not None:
        return len(model.graph.node) + 1
    for i, n in enumerate(model.graph.node):
        if n is inner or n == inner:
            return i
    return len(model.graph.node)


def _units(original: onnx.ModelProto, model: onnx.ModelProto, report: Report) -> tuple[list[_Unit], list[LayerRefit]]:
    nodes = _scopes_by_node(model)
    targets = _producers(original)
    units: dict[tuple[int, str], _Unit] = {}
    refused: list[LayerRefit] = []
    for layer in report.decomposed:
        result = LayerRefit(layer.node, layer.rank, False)
        ns = _namespace(model, layer.node)
        found = nodes.get((ns, layer.horizontal_node or ""))
        if found is None or not layer.vertical_node:
            result.reason = "its decomposed nodes were not found"
            refused.append(result)
            continue
        node, scope = found
        if len(node.input) < 2 or not node.input[1]:
            result.reason = "second node has no weight input"
            refused.append(result)
            continue
        weight = _stored(node.input[1], scope)
        if weight is None:
            result.reason = "second factor is not a constant"
            refused.append(result)
            continue
        dims = tuple(int(d) for d in weight.tensor.dims)
        geometry = _geometry(node, dims)
        if isinstance(geometry, str):
            result.reason = geometry
            refused.append(result)
            continue
        a = attrs(node)
        op = node.op_type
        target = targets.get((ns, node.output[0]))
        first = nodes.get((ns, layer.vertical_node))
        key = (weight.scope.namespace, weight.name)
        unit = units.get(key)
        if unit is None:
            unit = _Unit(
                [],
                [],
                [],
                weight,
                op,
                geometry,
                bool(a.get("transB", 0)) if op == "Gemm" else False,
                float(a.get("alpha", 1.0)) if op == "Gemm" else 1.0,  # type: ignore[arg-type]
                float(a.get("beta", 1.0)) if op == "Gemm" else 1.0,  # type: ignore[arg-type]
                _top_position(model, scope, node),
                _top_position(model, first[1], first[0]) if first is not None else 0,
            )
            units[key] = unit
        elif unit.op != op or unit.geometry != geometry:
            result.reason = "second factor is shared by nodes of different geometry"
            refused.append(result)
            continue
        unit.layers.append(result)
        unit.nodes.append((node, scope))
        unit.targets.append(target)
    return sorted(units.values(), key=lambda u: u.position), refused


def _bias_prior(unit: _Unit, out_channels: int) -> tuple[FloatArray | None, bool]:
    """The current bias (zeros when none) and whether the unit can have one at all."""
    if unit.op == "MatMul" or (unit.op == "Gemm" and unit.beta == 0.0):
        return None, False
    node, scope = unit.nodes[0]
    if len(node.input) > 2 and node.input[2]:
        stored = _stored(node.input[2], scope)
        if stored is not None:
            values = numpy_helper.to_array(stored.tensor).astype(np.float64)
            return np.broadcast_to(values.reshape(-1) if values.size == out_channels else values, (out_channels,)).copy(), True
        return None, False  # a computed bias: cannot be rewritten
    return np.zeros(out_channels), True


def _features(unit: _Unit, t: Array, y: Array, positions: int | None, batch: int) -> tuple[FloatArray, FloatArray] | str:
    """Patches of ``t`` (tap-major, ``(g, P, kw·K)``) and the targets at the same output positions ``(g, P, N_g)``."""
    geometry = unit.geometry
    assert unit.rng is not None
    if geometry.fully_connected:
        rows = t.reshape(-1, t.shape[-1]) if unit.op == "MatMul" else t
        if unit.op == "Gemm" and any(a.name == "transA" and a.i for a in unit.nodes[0][0].attribute):
            rows = rows.T
        target = y.reshape(-1, y.shape[-1])
        if rows.shape[0] != target.shape[0]:
            return f"the second node's input has {rows.shape[0]} rows, the target {target.shape[0]}"
        limit = None if positions is None else positions * max(1, rows.shape[0] // max(1, batch))
        chosen = sample_rows(rows.shape[0], limit, unit.rng)
        features: FloatArray = rows[chosen].astype(np.float64)[None]
        targets: FloatArray = target[chosen].astype(np.float64)[None]
        return features, targets
    out = output_size(geometry, t.shape[2:])
    if tuple(y.shape[2:]) != out or y.shape[0] != t.shape[0]:
        return f"the second node's output {tuple(out)} differs from the original layer's {tuple(y.shape[2:])}"
    grid = sample_grid(out, positions, unit.rng)
    patches = gather_patches(t, geometry, grid)  # (g, B·P, kw, K)
    g = geometry.groups
    a: FloatArray = patches.reshape(g, patches.shape[1], -1).astype(np.float64)
    picked: Array = y
    for axis, index in enumerate(grid):
        picked = np.take(picked, index, axis=2 + axis)
    target_rows: FloatArray = picked.reshape(y.shape[0], g, y.shape[1] // g, -1).transpose(1, 0, 3, 2).reshape(g, -1, y.shape[1] // g)
    return a, target_rows


def _flat(kernel: FloatArray, groups: int) -> FloatArray:
    """A second factor ``(N, K, 1.., kw)`` as per-group weight columns ``(g, kw·K, N_g)`` (tap-major rows)."""
    n, k, kw = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    return kernel.reshape(groups, n // groups, k, kw).transpose(0, 3, 2, 1).reshape(groups, kw * k, n // groups)


def _unflat(theta: FloatArray, shape: tuple[int, ...]) -> FloatArray:
    """Inverse of :func:`_flat`."""
    g = theta.shape[0]
    n, k, kw = shape[0], shape[1], shape[-1]
    return theta.reshape(g, kw, k, n // g).transpose(0, 3, 2, 1).reshape(shape)


def _write(tensor: onnx.TensorProto, values: FloatArray) -> None:
    """Replace a stored tensor's values in its own dtype, keeping its name."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(dtype).reshape(tuple(tensor.dims)), tensor.name))


def _readers(model: onnx.ModelProto) -> dict[tuple[int, str], int]:
    count: dict[tuple[int, str], int] = {}
    for scope in iter_scopes(model):
        for node in scope.nodes:
            for name in set(node.input):
                count[(scope.namespace, name)] = count.get((scope.namespace, name), 0) + 1
        if scope.graph is not None:
            for value in scope.graph.output:
                count[(scope.namespace, value.name)] = count.get((scope.namespace, value.name), 0) + 1
    return count


def _finish(model: onnx.ModelProto, unit: _Unit, ridge: float, stage: int, iterations: int, lambdas: tuple[float, float]) -> None:
    eq = unit.equations
    for layer in unit.layers:
        layer.stage = stage
    if eq is None or eq.rows == 0:
        for layer in unit.layers:
            layer.reason = layer.reason or "no calibration input reached it"
        return
    stored = numpy_helper.to_array(unit.weight.tensor).astype(np.float64)
    kernel = _conv_layout(unit.op, stored, unit.geometry.groups, unit.trans_b)  # (N, K, 1.., kw)
    n_out, g = kernel.shape[0], eq.groups
    flat = _flat(kernel, g) * unit.alpha  # (g, F, N_g)
    bias, with_bias = _bias_prior(unit, n_out)
    prior = flat
    if eq.bias:
        b = (bias if bias is not None else np.zeros(n_out)) * unit.beta
        prior = np.concatenate([flat, b.reshape(g, 1, n_out // g)], axis=1)
    theta = eq.solve(prior, ridge)
    fitted = None
    if unit.activation is not None and unit.kept is not None:
        features, ones = eq.features, eq.bias
        needed = MIN_ROWS_PER_UNKNOWN * (features + (1 if ones else 0))
        if unit.kept.rows >= needed:
            fitted = fit_activation(
                unit.kept, ones, prior, theta, lambda gram: _penalty(gram, features, ones, ridge), iterations=iterations, lambdas=lambdas
            )
            theta = fitted.theta
        else:
            for layer in unit.layers:
                layer.activation_reason = (
                    f"{unit.kept.rows} of its rows kept (at most {unit.kept.limit}), fewer than the {needed} "
                    f"its activation fit needs ({MIN_ROWS_PER_UNKNOWN} per unknown)"
                )
    f = eq.features
    new_kernel = _unflat(theta[:, :f], kernel.shape) / unit.alpha
    new_bias = theta[:, f].reshape(n_out) / unit.beta if eq.bias else None
    # score the factors as they will be stored (rounded to the model's dtypes)
    w_dtype = helper.tensor_dtype_to_np_dtype(unit.weight.tensor.data_type)
    rounded = new_kernel.astype(w_dtype).astype(np.float64)
    check = _flat(rounded, g) * unit.alpha
    if eq.bias:
        assert new_bias is not None
        b_dtype = helper.tensor_dtype_to_np_dtype(unit.weight.node_type)
        check = np.concatenate([check, (new_bias.astype(b_dtype).astype(np.float64) * unit.beta).reshape(g, 1, n_out // g)], axis=1)
    norm = float(eq.target.sum())
    before, after = eq.residual(prior), eq.residual(check)
    for layer in unit.layers:
        layer.error_before = math.sqrt(before / norm) if norm else 0.0
        layer.error_after = math.sqrt(after / norm) if norm else 0.0
    worse = after > before
    if fitted is not None:
        assert unit.activation is not None and unit.kept is not None
        # the objective is the activation's output: the guard and the report measure that on the kept rows
        scored = unit.kept.residual(check, eq.bias)
        worse = scored > fitted.before
        scale = fitted.target
        for layer in unit.layers:
            layer.activation_rows = fitted.rows
            layer.activation_error_before = math.sqrt(fitted.before / scale) if scale else 0.0
            layer.activation_error_linear = math.sqrt(fitted.linear / scale) if scale else 0.0
            layer.activation_error_after = math.sqrt((fitted.before if worse else scored) / scale) if scale else 0.0
    if worse:  # rounding to a low-precision dtype can undo a tiny gain: keep the factors
        for layer in unit.layers:
            layer.reason = "the refit factors, rounded to the model's dtype, fit no better; kept the factors as they were"
            layer.error_after = layer.error_before
        return
    _write(unit.weight.tensor, _stored_layout(unit.op, new_kernel, unit.geometry.groups, unit.trans_b))
    if new_bias is not None and with_bias:
        _write_bias(model, unit, new_bias)
    for layer in unit.layers:
        layer.refit = True
        layer.objective = unit.activation.label if fitted is not None and unit.activation is not None else "output"


def _write_bias(model: onnx.ModelProto, unit: _Unit, values: FloatArray) -> None:
    """The unit's bias: rewritten where this unit alone reads it, else a new constant read by its nodes."""
    readers = _readers(model)
    node, scope = unit.nodes[0]
    current = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    stored = _stored(current, scope) if current else None
    own = {id(n) for n, _ in unit.nodes}
    mine = current and all(len(n.input) > 2 and n.input[2] == current for n, _ in unit.nodes)
    if stored is not None and mine and readers.get((stored.scope.namespace, stored.name), 0) <= len(unit.nodes):
        shape = tuple(int(d) for d in stored.tensor.dims)
        if int(np.prod(shape)) == values.size:
            _write(stored.tensor, values.reshape(shape))
            return
    names = namespace_names(model)[scope.namespace]
    index = next(i for i, n in enumerate(scope.nodes) if id(n) in own)
    dtype = helper.tensor_dtype_to_np_dtype(unit.weight.node_type)
    name, _ = add_constant(model, names, scope, scope, index, f"{node.name or node.output[0]}.bias", values.astype(dtype))
    for n, _ in unit.nodes:
        if len(n.input) > 2:
            n.input[2] = name
        else:
            n.input.append(name)


def _find_activation(unit: _Unit) -> None:
    """Set ``unit.activation`` where one activation alone reads each of its second nodes, else say why not."""
    found = [activation_after(node, scope) for node, scope in unit.nodes]
    first = found[0]
    why: list[str | None] = [f if isinstance(f, str) else None for f in found]
    if isinstance(first, Activation) and all(isinstance(f, Activation) and f.same_function(first) for f in found):
        unit.activation = first
        return
    if not any(why):  # every node has an activation, not the same one
        why = ["the nodes sharing its second factor are followed by different activations"] * len(found)
    for layer, reason in zip(unit.layers, why, strict=True):
        layer.activation_reason = reason or "it shares its second factor with a layer whose output the activation does not alone read"


def _refit_stage(
    original: onnx.ModelProto,
    model: onnx.ModelProto,
    members: Sequence[_Unit],
    stage_of: tuple[int, int],
    batches: Batches,
    options: RefitOptions,
    progress: Callable[[int, int, str], None] | None,
) -> float:
    """One stage: a streamed run of the converted and the original model, then each member re-solved;
    returns the seconds the activation-aware fits took. ``stage_of`` is (this stage, of how many)."""
    stage, stages = stage_of
    requests_in, requests_out = [], []
    for u, unit in enumerate(members):
        for i, ((node, scope), target) in enumerate(zip(unit.nodes, unit.targets, strict=True)):
            if target is None:
                continue
            elem = unit.weight.node_type
            requests_in.append(TensorRequest(f"{u}/{i}", node, scope, "input", 0, elem))
            requests_out.append(TensorRequest(f"{u}/{i}", target[0], target[1], "output", 0, elem))
    converted = prepare(model, requests_in)
    reference = prepare(original, requests_out)
    for u, unit in enumerate(members):
        keys = [f"{u}/{i}" for i in range(len(unit.nodes))]
        why = next((c.refused[key] for c in (converted, reference) for key in keys if key in c.refused), None)
        if all(t is None for t in unit.targets):
            why = "the original model has no tensor of its output's name to fit to"
        for layer in unit.layers:
            layer.stage = stage
            layer.reason = why
        if why is not None:
            continue
        stored = numpy_helper.to_array(unit.weight.tensor)
        kernel_shape = _conv_layout(unit.op, stored.astype(np.float64), unit.geometry.groups, unit.trans_b).shape
        n_out, g = kernel_shape[0], unit.geometry.groups
        _, with_bias = _bias_prior(unit, n_out)
        unit.equations = NormalEquations(g, int(np.prod(kernel_shape[1:])), n_out // g, with_bias)
        unit.rng = np.random.default_rng([stage, u])
    fitting = [unit for unit in members if unit.equations is not None and unit.activation is not None]
    for unit in fitting:
        eq = unit.equations
        assert eq is not None
        # the stage's row memory, shared evenly; a row is F features and N_g targets per group, float32
        limit = options.row_memory // (len(fitting) * 4 * eq.groups * (eq.features + eq.outputs))
        if options.activation_rows is not None:
            limit = min(limit, options.activation_rows)
        assert unit.activation is not None
        unit.kept = KeptRows(unit.activation, limit, batches.count, np.random.default_rng([stage, members.index(unit), 1]))
    failures: dict[int, str] = {}

    def consume(values: list[dict[str, Array]], batch: int) -> None:
        got, want = values
        for u, unit in enumerate(members):
            if unit.equations is None or u in failures:
                continue
            for i in range(len(unit.nodes)):
                pairs = zip(converted.names.get(f"{u}/{i}", []), reference.names.get(f"{u}/{i}", []), strict=False)
                for t_name, y_name in pairs:
                    t, y = got.get(t_name), want.get(y_name)
                    if t is None or y is None or t.size == 0 or y.size == 0:  # an If branch not taken
                        continue
                    pair = _features(unit, t, y, options.positions, batch)
                    if isinstance(pair, str):
                        failures[u] = pair
                        break
                    unit.equations.add(*pair)
                    if unit.kept is not None:
                        unit.kept.add(*pair, batch)

    phase = f"refit stage {stage}/{stages}"
    stream_together(
        [converted, reference],
        batches,
        consume,
        threads=options.threads,
        progress=(lambda done, total: progress(done, total, phase)) if progress is not None else None,
    )
    seconds = 0.0
    for u, unit in enumerate(members):
        if u in failures:
            for layer in unit.layers:
                layer.reason = failures[u]
        elif unit.equations is not None:
            start = time.perf_counter()
            _finish(model, unit, options.ridge, stage, options.activation_iterations, options.activation_lambdas)
            if unit.kept is not None:
                seconds += time.perf_counter() - start
        unit.kept = None  # the rows go with the stage
    return seconds


def refit_layers(
    original: onnx.ModelProto,
    decomposed: onnx.ModelProto,
    report: Report,
    calibration: CalibrationSource,
    options: RefitOptions | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    inplace: bool = False,
    **keywords: Any,
) -> RefitResult:
    """Refit every decomposed layer's second factor and bias (see the module docstring).

    ``original`` is the model given to :func:`onnx_lowrank.decompose`, ``decomposed`` and ``report`` what
    it returned; ``decomposed`` is copied unless ``inplace``. ``options`` (:class:`RefitOptions`) say how;
    ``keywords`` name single options (``refit_layers(..., stages=1)``) and override ``options``'.
    ``progress(done, total, phase)`` is called per batch of each stage.
    """
    # an unknown keyword is a TypeError, as for any Python function (and for decompose)
    options = replace(options, **keywords) if options is not None else RefitOptions(**keywords)
    start = time.perf_counter()
    model = decomposed
    if not inplace:
        model = onnx.ModelProto()
        model.CopyFrom(decomposed)
    data = load_calibration(calibration, model)
    count = sample_count(data)
    fixed = batch_size_of(model)
    used = count - count % fixed if fixed else count
    result = RefitResult(model, activations=bool(options.activations))
    units, refused = _units(original, model, report)
    result.layers.extend(refused)
    if options.activations:
        for unit in units:
            _find_activation(unit)
    if not units:
        result.samples = count
        result.seconds = time.perf_counter() - start
        return result
    stages = min(options.stages, len(units))
    bounds = [round(i * len(units) / stages) for i in range(stages + 1)]
    below = _descendants(model, units)
    for s in range(stages):
        members = units[bounds[s] : bounds[s + 1]]
        if not options.every_layer:
            # only the stage's sources absorb upstream error: a unit downstream of a stage-mate would absorb error
            # the stage-mate's refit then removes (counted twice, the fit goes stale)
            offset = bounds[s]
            sources = [
                unit
                for j, unit in enumerate(members)
                if not any(unit.first_position in below[offset + i] for i in range(len(members)) if i != j)
            ]
            for unit in members:
                if unit not in sources:
                    for layer in unit.layers:
                        layer.stage = s + 1
                        layer.reason = "kept its data-aware factors: downstream of a layer refit in the same stage"
            members = sources
        stage_batches = Batches(model, data, options.batch_size)
        result.activation_seconds += _refit_stage(original, model, members, (s + 1, stages), stage_batches, options, progress)
        result.passes += 2
    for unit in units:
        result.layers.extend(unit.layers)
    order = {layer.node: i for i, layer in enumerate(report.layers)}
    result.layers.sort(key=lambda layer: order.get(layer.node, len(order)))
    result.samples = used
    result.stages = stages
    result.seconds = time.perf_counter() - start
    return result


def refit(
    original: onnx.ModelProto,
    decomposed: onnx.ModelProto,
    report: Report,
    calibration: CalibrationSource,
    **options: Any,
) -> onnx.ModelProto:
    """The decomposed model with every decomposed layer's second factor and bias refit on ``calibration``
    (:func:`refit_layers` with the same options; ``decomposed`` is left unchanged)."""
    return refit_layers(original, decomposed, report, calibration, **options).model
