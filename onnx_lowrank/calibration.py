"""Data-aware refit of decomposed convs: the horizontal kernels solved in closed form on calibration data.

The data-free decomposition keeps the pair ``V, H`` closest to the kernel ``W``
in the Frobenius norm. What matters for accuracy is the layer's *output* on real
inputs, and the input a decomposed layer sees in the converted network already
carries the approximation errors of every decomposed layer before it. This
post-pass keeps each layer's vertical filters ``V`` and re-solves its horizontal
kernel ``H`` and bias ``b`` so that the pair reproduces the original layer's
output, layer by layer in topological order — the *asymmetric* reconstruction of
Zhang et al., "Accelerating very deep convolutional networks for classification
and detection" (TPAMI 2016, arXiv 1505.06798), Sec. 3.3, applied to the
horizontal factor of the spatial split of Tai et al. (ICLR 2016).

Math
----
For a decomposed layer let ``T`` be the output of its vertical conv in the
*already refit* decomposed model (so upstream errors are seen) and ``Y`` the
output of the original conv in the *original* model, both on the same
calibration inputs. The horizontal conv is a ``1 × kw`` conv with width stride
``s``, dilation ``d``, pads ``p₀, p₁`` and ``g`` groups (the leading spatial
axes have kernel 1, stride 1, no pads), so with ``T̃`` the width-padded ``T``::

    Y'[b, n, h, o] = b_n + Σ_{k, j} H[n, k, j] · T̃[b, gᵢ·K + k, h, o·s + j·d]

for output channel ``n`` of group ``gᵢ``. Each output pixel ``(b, h, o)`` gives
one row of the im2col matrix ``A_gᵢ`` with ``K·kw`` columns
``T̃[b, gᵢ·K + k, h, o·s + j·d]`` (column ``k·kw + j``) plus a column of ones for
the bias, and one row of ``Y_gᵢ`` (its ``N/g`` channels). Per group the weights
``θ = [vec H; b]`` (``(K·kw + 1) × N/g``) solve the ridge problem

    min_θ ||A θ − Y||² + (θ − θ₀)ᵀ Λ (θ − θ₀)
    ⇔  (AᵀA + Λ) θ = AᵀY + Λ θ₀

whose prior ``θ₀`` is the data-free ``H`` and the original bias, and
``Λ = diag(λ_w, …, λ_w, λ_b)`` with ``λ_w = ridge · tr(A_wᵀA_w) / (K·kw)``
(``ridge`` times the mean eigenvalue of the Gram matrix of the weight columns,
so the term is scale free) and ``λ_b = ridge · rows``. Shrinking towards the
data-free solution rather than towards zero keeps directions the calibration
data never excites (a channel of ``T`` that is always zero, a set smaller than
``K·kw``) at their data-free values, and makes the fit never worse than the
data-free factors on the calibration data: the objective at the optimum is at
most its value at ``θ₀``, which is the data-free residual.

``AᵀA``, ``AᵀY``, ``1ᵀA``, ``1ᵀY`` and ``||Y||²`` are accumulated in float64
batch by batch (and in row chunks within a batch), so memory is bounded by one
batch of activations plus the ``(K·kw + 1)²`` Gram matrix per group, however
large the calibration set. The residuals before and after,
``||Aθ − Y||² = θᵀAᵀAθ − 2θᵀAᵀY + ||Y||²``, come from the same sums.

Intermediate tensors come from onnxruntime: a copy of the model, pruned to the
nodes the tensor depends on, lists it as a graph output (a ValueInfo with the
element type only — shapes are not needed).

Preconditions (a layer that fails one keeps its data-free factors and the
result says why):

* the layer is in the main graph (not in a function or a control-flow subgraph);
* its horizontal kernel and bias are constants (initializers or Constant
  nodes, maybe behind Identity/Cast) and the kernel is read by this conv only
  (a kernel the pass shared between layers would need a joint fit);
* the output of the horizontal conv has the name of a tensor of the original
  model — true for :func:`onnx_lowrank.decompose`, which keeps output names.

Every model input must be in the calibration data with its samples on axis 0
and the other dims as the model declares them; a model with a fixed batch size
is fed in batches of that size (left-over samples are dropped).

Usage::

    decomposed, report = decompose(model, speedup=2)
    data = load_calibration("calibration.npz", model)      # or a folder of <input>.npy, arrays, batches
    refit_model = refit(model, decomposed, report, data)   # or refit_layers(...) for per-layer errors and time

Cost: per decomposed layer, one pass of the original model's prefix (up to
the layer) and one of the decomposed model's prefix over the calibration set.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from ._threads import single_threaded_blas
from .data_io import check_samples, load_npy, load_npz, model_input_specs
from .errors import LowRankError
from .model_io import load_model
from .report import Report
from .verify import make_session

__all__ = [
    "CalibrationSource",
    "LayerRefit",
    "RefitResult",
    "load_calibration",
    "refit",
    "refit_layers",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]
CalibrationSource = str | os.PathLike[str] | Mapping[str, npt.ArrayLike] | Iterable[Mapping[str, npt.ArrayLike]]
ModelLike = str | os.PathLike[str] | onnx.ModelProto

# elements of one im2col chunk (rows × columns); ~32 MB of float64
_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------- calibration data


def _model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed (initializers listed as inputs, as IR 3 requires, are not)."""
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    return [v for v in model.graph.input if v.name not in constants]


def _declared(value: onnx.ValueInfoProto) -> tuple[int | None, list[int | str | None] | None]:
    """Element type and dims (int, symbolic name or None) of a graph input."""
    t = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if t is None:
        return None, None
    if not t.HasField("shape"):
        return t.elem_type, None
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return t.elem_type, dims


def _read_folder(path: Path) -> dict[str, Array]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise LowRankError(f"{path}: folder holds no .npy files (one per model input, named after the input)")
    return {f.stem: load_npy(f) for f in files}


def _concat_batches(batches: Iterable[Mapping[str, npt.ArrayLike]]) -> dict[str, Array]:
    parts: dict[str, list[Array]] = {}
    keys: set[str] | None = None
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise LowRankError(f"calibration batch {i} is a {type(batch).__name__}, not a mapping of input name to array")
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:
            raise LowRankError(f"calibration batch {i} has inputs {sorted(batch)}, batch 0 has {sorted(keys)}")
        for name, value in batch.items():
            parts.setdefault(name, []).append(np.asarray(value))
    if not parts:
        raise LowRankError("calibration data is empty (the iterator gave no batches)")
    out = {}
    for name, arrays in parts.items():
        try:
            out[name] = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        except ValueError as exc:
            raise LowRankError(f"calibration input {name!r}: batches do not stack along axis 0 ({exc})") from None
    return out


def load_calibration(source: CalibrationSource, model: ModelLike | None = None) -> dict[str, Array]:
    """Calibration inputs as ``{input name: array}``, samples on axis 0.

    ``source`` is an ``.npz`` file keyed by input name, a folder of ``<input>.npy``
    files, a mapping of arrays, or an iterable of such mappings (batches, joined
    along axis 0). With ``model`` the data is checked against the model's inputs —
    every input present, the declared rank and fixed dims (axis 0, the samples,
    excepted), a numeric dtype — cast to each input's element type and reduced to
    the model's inputs (extra keys such as ``labels`` are dropped).

    Raises :class:`LowRankError` with a one-line message for a missing or
    unreadable file, a missing input, a wrong shape or an empty set.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise LowRankError(f"{path}: no such calibration file or folder")
        arrays = _read_folder(path) if path.is_dir() else load_npz(path, "calibration file")
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
    elif isinstance(source, Iterable):
        arrays = _concat_batches(source)
    else:
        raise LowRankError(f"calibration data must be a path, a mapping or an iterable of mappings, got {type(source).__name__}")
    if not arrays:
        raise LowRankError("calibration data holds no arrays")
    for name, value in arrays.items():
        if value.ndim == 0:
            raise LowRankError(f"calibration input {name!r} is a scalar; samples must be on axis 0")
    if model is None:
        counts = {name: len(v) for name, v in arrays.items()}
        if len(set(counts.values())) > 1:
            raise LowRankError(f"calibration inputs differ in sample count: {counts}")
        if min(counts.values()) == 0:
            raise LowRankError("calibration data has no samples")
        return arrays
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    checked = check_samples(arrays, model_input_specs(proto), "calibration input", "calibration data")
    for name, values in checked.items():
        # a NaN would spread through every sum the refit and the sensitivity measure are made of
        if np.issubdtype(values.dtype, np.inexact) and not np.all(np.isfinite(values)):
            raise LowRankError(f"calibration input {name!r} holds NaN or infinite values")
    return checked


def iter_batches(
    model: onnx.ModelProto, data: Mapping[str, Array], batch_size: int, limit: int | None = None
) -> Iterator[dict[str, Array]]:
    """Feeds of at most ``batch_size`` samples (exactly the model's batch when it is fixed)."""
    inputs = _model_inputs(model)
    count = min(len(data[v.name]) for v in inputs) if inputs else 0
    if limit is not None:
        count = min(count, limit)
    fixed = {d[0] for v in inputs if (d := _declared(v)[1]) and isinstance(d[0], int) and d[0] > 0}
    step = batch_size
    if fixed:
        step = min(fixed)
        if count < step:
            raise LowRankError(f"the model's batch size is fixed at {step}, but the calibration data has only {count} samples")
        count -= count % step
    for start in range(0, count, step):
        yield {v.name: data[v.name][start : start + step] for v in inputs}


# --------------------------------------------------------------------------- graph helpers


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside the node's subgraphs (outer-scope reads among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_reads(inner)
    return names


def prefix_model(model: onnx.ModelProto, outputs: Mapping[str, int], inputs: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A model computing only ``outputs`` (name → element type) of ``model``'s main graph.

    Nodes the outputs do not depend on are dropped, and so are the initializers
    they read; only the kept tensors are copied. ``inputs`` (name → element
    type) turns tensors into graph inputs, cutting the graph there: the result
    then computes the outputs from those tensors (used for suffix models).
    """
    graph = model.graph
    cut = dict(inputs or {})
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed and o not in cut for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_reads(node)
    keep.reverse()
    result = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
    )
    result.opset_import.extend(model.opset_import)
    result.functions.extend(model.functions)
    g = result.graph
    g.name = graph.name
    g.node.extend(keep)
    g.initializer.extend(t for t in graph.initializer if t.name in needed and t.name not in cut)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed and t.values.name not in cut)
    g.input.extend(v for v in graph.input if v.name in needed and v.name not in cut)
    g.input.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in cut.items())
    g.value_info.extend(v for v in graph.value_info if v.name in needed and v.name not in outputs and v.name not in cut)
    g.output.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in outputs.items())
    return result


@dataclass
class _Constant:
    """A constant tensor a node reads, where it is stored, and how many nodes read it."""

    tensor: onnx.TensorProto  # the stored proto (initializer or the Constant's value), edited in place
    readers: int  # consumers along the whole Identity/Cast chain
    data_type: int  # element type the conv sees (after Casts)


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in graph.node:
        for name in {*node.input, *subgraph_reads(node)}:
            count[name] = count.get(name, 0) + 1
    for value in graph.output:
        count[value.name] = count.get(value.name, 0) + 1
    return count


def _constant(graph: onnx.GraphProto, name: str, readers: Mapping[str, int]) -> _Constant | None:
    """Follow Identity/Cast from ``name`` to an initializer or Constant node; ``None`` when not constant."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    inputs = {v.name for v in graph.input}
    total, seen_type = readers.get(name, 0), None
    for _ in range(64):
        if name in initializers:
            tensor = initializers[name]
            return _Constant(tensor, max(total, readers.get(name, 0)), seen_type or tensor.data_type)
        if name in inputs:
            return None
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return _Constant(attr.t, max(total, readers.get(name, 0)), seen_type or attr.t.data_type)
            return None
        if node.op_type not in ("Identity", "Cast") or not node.input:
            return None
        if node.op_type == "Cast" and seen_type is None:
            seen_type = next(int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "to")
        total = max(total, readers.get(name, 0))
        name = node.input[0]
    return None


# --------------------------------------------------------------------------- normal equations


@dataclass(frozen=True)
class HorizontalGeometry:
    """The width geometry of a ``1 × kw`` conv (leading axes: kernel 1, stride 1, no pads)."""

    kw: int
    stride: int
    dilation: int
    groups: int
    pads: tuple[int, int] | None  # width pads (begin, end); None: computed from auto_pad per input width
    auto_pad: str = "NOTSET"

    def width_pads(self, width: int) -> tuple[int, int]:
        if self.pads is not None:
            return self.pads
        if self.auto_pad == "VALID":
            return 0, 0
        out = -(-width // self.stride)
        total = max(0, (out - 1) * self.stride + (self.kw - 1) * self.dilation + 1 - width)
        small, large = total // 2, total - total // 2
        return (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return [int(v) for v in helper.get_attribute_value(attr)]
    return default


def horizontal_geometry(node: onnx.NodeProto, kernel_dims: Sequence[int]) -> HorizontalGeometry | str:
    """The geometry of a horizontal conv node, or why it is not a pure ``1 × kw`` conv."""
    r = len(kernel_dims) - 2
    kernel = _ints(node, "kernel_shape", list(kernel_dims[2:]))
    strides = _ints(node, "strides", [1] * r)
    dilations = _ints(node, "dilations", [1] * r)
    pads = _ints(node, "pads", [0] * (2 * r))
    groups, auto = 1, "NOTSET"
    for attr in node.attribute:
        if attr.name == "group":
            groups = int(helper.get_attribute_value(attr))
        elif attr.name == "auto_pad":
            value = helper.get_attribute_value(attr)
            auto = value.decode() if isinstance(value, bytes) else str(value)
    if r < 1 or any(k != 1 for k in kernel[:-1]) or any(s != 1 for s in strides[:-1]):
        return f"horizontal conv has kernel {kernel} / strides {strides}, not 1 on the leading axes"
    if auto in ("NOTSET", "") and (any(pads[: r - 1]) or any(pads[r : 2 * r - 1])):
        return "horizontal conv pads a leading axis"
    explicit = (pads[r - 1], pads[2 * r - 1]) if auto in ("NOTSET", "") else None
    return HorizontalGeometry(int(kernel[-1]), int(strides[-1]), int(dilations[-1]), groups, explicit, auto or "NOTSET")


def width_patches(t: Array, geometry: HorizontalGeometry) -> Array:
    """im2col along the width: ``(P, C, W)`` → ``(P, C, W_out, kw)`` with zero padding."""
    begin, end = geometry.width_pads(t.shape[-1])
    padded = np.pad(t, ((0, 0), (0, 0), (begin, end))) if begin or end else t
    span = (geometry.kw - 1) * geometry.dilation + 1
    w_out = (padded.shape[-1] - span) // geometry.stride + 1
    if w_out < 1:
        raise LowRankError(f"horizontal conv: input width {t.shape[-1]} is smaller than its kernel span {span}")
    index = np.arange(w_out)[:, None] * geometry.stride + np.arange(geometry.kw)[None, :] * geometry.dilation
    return padded[:, :, index]


class NormalEquations:
    """Sums of ``[A 1]ᵀ[A 1]``, ``[A 1]ᵀY`` and ``||Y||²`` per group of a horizontal conv (float64)."""

    def __init__(self, geometry: HorizontalGeometry, rank: int, out_channels: int) -> None:
        self.geometry = geometry
        self.rank = rank  # K: vertical channels per group
        self.out_per_group = out_channels // geometry.groups
        g, f = geometry.groups, rank * geometry.kw
        self.gram = np.zeros((g, f + 1, f + 1))
        self.cross = np.zeros((g, f + 1, self.out_per_group))
        self.target = np.zeros(g)
        self.rows = 0

    @property
    def features(self) -> int:
        return self.rank * self.geometry.kw

    def add(self, t: Array, y: Array) -> None:
        """Accumulate one batch: ``t`` is the vertical output ``(B, g·K, *lead, W)``, ``y`` the target ``(B, N, *lead, W_out)``."""
        g, k, n_g, kw = self.geometry.groups, self.rank, self.out_per_group, self.geometry.kw
        if t.shape[1] != g * k or y.shape[1] != g * n_g:
            raise LowRankError(f"activation channels {t.shape[1]}/{y.shape[1]} do not match the kernel ({g}·{k} / {g * n_g})")
        # leading spatial axes behave like batch axes for a 1 × kw conv: fold them into P
        t3 = np.moveaxis(t, 1, -2).reshape(-1, t.shape[1], t.shape[-1])
        y3 = np.moveaxis(y, 1, -2).reshape(-1, y.shape[1], y.shape[-1])
        w_out = y3.shape[-1]
        step = max(1, _CHUNK_ELEMENTS // max(1, w_out * (k * kw + 1) * g))
        for start in range(0, t3.shape[0], step):
            patches = width_patches(t3[start : start + step], self.geometry)  # (p, gK, Wo, kw)
            if patches.shape[2] != w_out:
                raise LowRankError(f"horizontal conv output width {patches.shape[2]} differs from the target's {w_out}")
            target = y3[start : start + step]
            p = patches.shape[0]
            for gi in range(g):
                a = patches[:, gi * k : (gi + 1) * k].transpose(0, 2, 1, 3).reshape(p * w_out, k * kw).astype(np.float64)
                yg = target[:, gi * n_g : (gi + 1) * n_g].transpose(0, 2, 1).reshape(p * w_out, n_g).astype(np.float64)
                f = k * kw
                col = a.sum(axis=0)
                self.gram[gi, :f, :f] += a.T @ a
                self.gram[gi, :f, f] += col
                self.gram[gi, f, :f] += col
                self.gram[gi, f, f] += a.shape[0]
                self.cross[gi, :f] += a.T @ yg
                self.cross[gi, f] += yg.sum(axis=0)
                self.target[gi] += float(np.einsum("ij,ij->", yg, yg))
            self.rows += p * w_out

    def _columns(self, rank: int | None) -> npt.NDArray[np.intp]:
        """Indices of the weight columns of the first ``rank`` vertical channels, then the bias column."""
        r = self.rank if rank is None else rank
        return np.concatenate([np.arange(r * self.geometry.kw), [self.features]]).astype(np.intp)

    def residual(self, theta: FloatArray, rank: int | None = None) -> float:
        """``Σ_g ||A θ − Y||²`` for ``theta`` of shape ``(g, r·kw + 1, N/g)``."""
        idx = self._columns(rank)
        total = float(self.target.sum())
        for gi in range(self.geometry.groups):
            gram = self.gram[gi][np.ix_(idx, idx)]
            cross = self.cross[gi][idx]
            th = theta[gi]
            total += float(np.einsum("ij,ik,kj->", th, gram, th)) - 2.0 * float(np.einsum("ij,ij->", th, cross))
        return max(total, 0.0)

    def solve(self, prior: FloatArray, ridge: float, rank: int | None = None) -> FloatArray:
        """``θ`` per group (shape of ``prior``: ``(g, r·kw + 1, N/g)``), ridge-shrunk towards ``prior``.

        ``rank`` < K fits only the first ``rank`` vertical channels of each group
        (a sub-block of the same sums: the SVD factors of lower rank are nested).
        """
        idx = self._columns(rank)
        f = idx.size - 1
        out = np.empty_like(prior)
        for gi in range(self.geometry.groups):
            gram = self.gram[gi][np.ix_(idx, idx)]
            rhs = self.cross[gi][idx]
            trace = float(np.trace(gram[:f, :f]))
            lam_w = ridge * trace / f if trace > 0 and f else 1.0  # no signal at all: stay at the prior
            lam_b = ridge * max(float(gram[f, f]), 1.0)
            lam = np.full(f + 1, lam_w)
            lam[f] = lam_b
            system = gram + np.diag(lam)
            rhs = rhs + lam[:, None] * prior[gi]
            try:
                # Cholesky, as solve(assume_a="pos") does, without its warning on ill-conditioned systems: the ridge
                # keeps them well posed, and a result that is not finite is refused by the caller
                out[gi] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(system, check_finite=False), rhs, check_finite=False)
            except (np.linalg.LinAlgError, ValueError):
                out[gi] = scipy.linalg.lstsq(system, rhs, check_finite=False)[0]
        return out


def pack(h: FloatArray, bias: FloatArray | None, groups: int) -> FloatArray:
    """``H (N, K, 1.., kw)`` and ``b (N,)`` → ``θ (g, K·kw + 1, N/g)``."""
    n, k, kw = h.shape[0], h.shape[1], h.shape[-1]
    flat = h.reshape(groups, n // groups, k * kw)
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    theta = np.concatenate([flat, b.reshape(groups, n // groups, 1)], axis=2)
    return np.ascontiguousarray(theta.transpose(0, 2, 1))


def unpack(theta: FloatArray, kernel_dims: Sequence[int]) -> tuple[FloatArray, FloatArray]:
    """Inverse of :func:`pack`: ``(H, b)`` with ``H`` of shape ``kernel_dims``."""
    g, f1, n_g = theta.shape
    flat = theta.transpose(0, 2, 1)  # (g, N/g, K·kw + 1)
    h = flat[:, :, : f1 - 1].reshape(tuple(kernel_dims))
    return np.ascontiguousarray(h), flat[:, :, f1 - 1].reshape(g * n_g)


# --------------------------------------------------------------------------- the refit pass


@dataclass
class LayerRefit:
    """What the refit did to one decomposed layer.

    ``error_before``/``error_after``: ``||conv_h(T) − Y|| / ||Y||`` on the
    calibration data with the data-free and the refit horizontal factors, ``T``
    the vertical output in the refit model (upstream layers already refit).
    """

    node: str
    rank: int | None
    refit: bool
    reason: str | None = None
    error_before: float | None = None
    error_after: float | None = None
    seconds: float = 0.0


@dataclass
class RefitResult:
    model: onnx.ModelProto
    layers: list[LayerRefit] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"samples": self.samples, "seconds": self.seconds, "layers": [asdict(layer) for layer in self.layers]}


def _as_proto(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _np_dtype(data_type: int) -> np.dtype[Any]:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def _write(tensor: onnx.TensorProto, values: FloatArray) -> None:
    """Replace a stored tensor's values in its own dtype, keeping its name."""
    new = numpy_helper.from_array(values.astype(_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims)), tensor.name)
    tensor.CopyFrom(new)


def _fresh(graph: onnx.GraphProto, base: str) -> str:
    used = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    used |= {i for n in graph.node for i in n.input}
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    return name


def _run(session: Any, names: list[str], feed: Mapping[str, Array]) -> list[Array]:
    wanted = {i.name for i in session.get_inputs()}
    try:
        return list(session.run(names, {k: v for k, v in feed.items() if k in wanted}))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed on the calibration data: {first}") from None


def _refit_one(
    original: onnx.ModelProto,
    model: onnx.ModelProto,
    layer: Any,
    data: Mapping[str, Array],
    ridge: float,
    batch_size: int,
    threads: int | None,
) -> LayerRefit:
    start = time.perf_counter()
    result = LayerRefit(layer.node, layer.rank, False)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    vertical, horizontal = nodes.get(layer.vertical_node or ""), nodes.get(layer.horizontal_node or "")
    if vertical is None or horizontal is None:
        result.reason = "not in the main graph (functions and subgraphs keep the data-free factors)"
        return result
    if horizontal.op_type != "Conv" or horizontal.domain not in ("", "ai.onnx"):
        result.reason = f"second node is a {horizontal.op_type}; the refit handles conv pairs only"
        return result
    readers = _readers(graph)
    weight = _constant(graph, horizontal.input[1], readers)
    if weight is None:
        result.reason = "horizontal kernel is not a constant"
        return result
    if weight.readers > 1:
        result.reason = "horizontal kernel is shared with another node (a joint fit is not implemented)"
        return result
    has_bias = len(horizontal.input) > 2 and bool(horizontal.input[2])
    bias = _constant(graph, horizontal.input[2], readers) if has_bias else None
    if has_bias and bias is None:
        result.reason = "bias is not a constant"
        return result
    h0 = numpy_helper.to_array(weight.tensor).astype(np.float64)
    geometry = horizontal_geometry(horizontal, h0.shape)
    if isinstance(geometry, str):
        result.reason = geometry
        return result
    t_name, y_name = horizontal.input[0], horizontal.output[0]
    original_names = {o for n in original.graph.node for o in n.output}
    if y_name not in original_names:
        result.reason = f"the original model has no tensor {y_name!r} to fit to"
        return result
    n_out, k = h0.shape[0], h0.shape[1]
    eq = NormalEquations(geometry, k, n_out)
    elem = weight.data_type
    src = make_session(prefix_model(original, {y_name: elem}), threads=threads)
    dst = make_session(prefix_model(model, {t_name: elem}), threads=threads)
    for feed in iter_batches(model, data, batch_size):
        (y,) = _run(src, [y_name], feed)
        (t,) = _run(dst, [t_name], feed)
        eq.add(t, y)
    del src, dst
    b0 = numpy_helper.to_array(bias.tensor).astype(np.float64).reshape(-1) if bias is not None else None
    prior = pack(h0, b0, geometry.groups)
    theta = eq.solve(prior, ridge)
    h, b = unpack(theta, h0.shape)
    # score the factors as they will be stored (rounded to the model's dtype)
    with np.errstate(all="ignore"):  # overflow in the cast shows as a non-finite factor, refused below
        stored_h = h.astype(_np_dtype(weight.tensor.data_type)).astype(np.float64)
    in_place = bias is not None and bias.readers <= 1
    # a bias of the conv's own is written where it is stored; a new one is read by the conv directly,
    # so it takes the type the conv computes in (after any Cast)
    bias_type = bias.tensor.data_type if bias is not None and in_place else weight.data_type
    with np.errstate(all="ignore"):
        stored_b = b.astype(_np_dtype(bias_type)).astype(np.float64)
    if not (np.all(np.isfinite(stored_h)) and np.all(np.isfinite(stored_b))):
        result.reason = "the refit factors are not finite in the model's dtype; kept the data-free factors"
        result.seconds = time.perf_counter() - start
        return result
    norm = float(eq.target.sum())
    before = eq.residual(prior)
    after = eq.residual(pack(stored_h, stored_b, geometry.groups))
    result.error_before = math.sqrt(before / norm) if norm else 0.0
    result.error_after = math.sqrt(after / norm) if norm else 0.0
    if after > before:  # rounding to a low-precision dtype can undo a tiny gain: keep the data-free factors
        result.reason = "the refit factors, rounded to the model's dtype, fit no better; kept the data-free factors"
        result.error_after = result.error_before
        result.seconds = time.perf_counter() - start
        return result
    _write(weight.tensor, h)
    if bias is not None and in_place:
        _write(bias.tensor, b)
    else:
        # no bias, or one shared with other nodes: give this conv a bias of its own
        name = _fresh(graph, f"{horizontal.name}.bias")
        graph.initializer.append(numpy_helper.from_array(b.astype(_np_dtype(bias_type)), name))
        if model.ir_version < 4:
            graph.input.append(helper.make_tensor_value_info(name, bias_type, [n_out]))
        if has_bias:
            horizontal.input[2] = name
        else:
            horizontal.input.append(name)
    result.refit = True
    result.seconds = time.perf_counter() - start
    return result


def refit_layers(
    original: ModelLike,
    decomposed: onnx.ModelProto,
    report: Report,
    calibration: CalibrationSource,
    *,
    ridge: float = 1e-4,
    batch_size: int = 64,
    threads: int | None = None,
) -> RefitResult:
    """Refit every decomposed layer's horizontal factors (see the module docstring); return the new model and per-layer errors.

    ``decomposed`` is not changed; the refit model is a copy. ``threads`` caps
    onnxruntime's intra-op threads (default: onnxruntime's choice).
    """
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise LowRankError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LowRankError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    start = time.perf_counter()
    source = _as_proto(original)
    model = onnx.ModelProto()
    model.CopyFrom(decomposed)
    data = load_calibration(calibration, model)
    samples = sum(len(next(iter(f.values()))) for f in iter_batches(model, data, batch_size)) if data else 0
    result = RefitResult(model, samples=samples)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    # topological order: the graph's node order (ONNX requires main-graph nodes to be sorted)
    layers = sorted(report.decomposed, key=lambda layer: order.get(layer.horizontal_node or "", len(order)))
    with single_threaded_blas():
        for layer in layers:
            result.layers.append(_refit_one(source, model, layer, data, float(ridge), batch_size, threads))
    result.seconds = time.perf_counter() - start
    return result


def refit(
    original: ModelLike,
    decomposed: onnx.ModelProto,
    report: Report,
    calibration: CalibrationSource,
    *,
    ridge: float = 1e-4,
    batch_size: int = 64,
) -> onnx.ModelProto:
    """The decomposed model with every decomposed layer's horizontal kernel and bias refit on ``calibration``.

    ``original`` is the model given to :func:`onnx_lowrank.decompose` (a path or
    a ``ModelProto``), ``decomposed`` and ``report`` what it returned,
    ``calibration`` anything :func:`load_calibration` accepts. ``ridge`` is the
    relative ridge weight, ``batch_size`` the samples per onnxruntime run.
    ``decomposed`` is left unchanged. See :func:`refit_layers` for per-layer errors and timing.
    """
    return refit_layers(original, decomposed, report, calibration, ridge=ridge, batch_size=batch_size).model
