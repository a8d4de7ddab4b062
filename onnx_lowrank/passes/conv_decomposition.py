"""Graph pass: replace Conv and ConvTranspose nodes by two low-rank convs.

Math: :mod:`onnx_lowrank.factorization` (Tai et al. 2016, Theorem 1).

Spatial split of ``Y = Conv(X, W, B)`` with ``W`` of shape ``(N, C/g, *S, kw)``::

    T = Conv(X, V)   # "<name>/vertical":   kernel (*S, 1), strides/dilations/pads of the leading axes
    Y = Conv(T, H, B)  # "<name>/horizontal": kernel (1.., kw), width stride/dilation/pads, the bias

Zero padding, striding and dilation act on each spatial axis independently, so
giving the leading axes' geometry to the vertical conv and the width's to the
horizontal conv computes exactly ``Conv(X, V∗H)``. ``auto_pad`` SAME_UPPER/LOWER
pads each axis from that axis' own size, kernel, stride and dilation only; where
the input size is known the pads are made explicit, otherwise both convs keep
the same ``auto_pad`` and stay exactly equivalent for every input size.
Both convs keep ``group``; the vertical conv's channels are grouped the same way
(``g·K`` outputs), so each group is decomposed on its own.

Channel split: ``T = Conv(X, A)`` with ``A`` ``(g·K, C/g, *S, kw)`` and the full
geometry, then ``Y = Conv(T, P, B)`` with ``P`` ``(N, K, 1..)`` pointwise.

ConvTranspose (weight ``(C, N/g, *S, kw)``) splits the same way, per axis:
``ConvTranspose`` with kernel ``(*S, 1)`` and the leading axes' strides,
dilations, pads and output_padding, then ``ConvTranspose`` with kernel
``(1.., kw)`` and the width's. ``output_shape`` is split per axis too, which
needs the input width; SAME_* stays on both nodes. The factorization sees the
kernel in conv layout (``W[c, n] → W[n, c]`` per group), so the same theorem gives
the optimum.

Preconditions (a layer that fails one is reported with the reason and left as is):

* the attributes agree with the weight, the input and each other
  (:func:`conv_geometry`): ``kernel_shape`` (when given) is the weight's spatial
  dims, the weight's rank is the input's, ``strides``/``dilations`` have one
  value ≥ 1 per spatial axis, ``pads`` two values ≥ 0 per axis,
  ``output_padding``/``output_shape`` one per axis, ``auto_pad`` is an ONNX
  value, ``group`` ≥ 1 divides the channels, the input has the channels the
  weight expects and, where the input size is known, the output is not empty —
  an attribute the layer cannot be rewritten with is never guessed at;
* ``Conv`` in the default domain; ``QLinearConv``/``ConvInteger`` and convs fed
  by ``DequantizeLinear`` are quantized and refused.
* the weight is a constant: an initializer (also one listed as a graph input,
  as IR 3 requires) or a Constant node, possibly behind Identity or Cast nodes (a Cast is repeated on
  each factor so mixed-precision models keep their form);
* the weight is floating point and finite;
* the kernel is at least 2 in the width and in the product of the other spatial
  dims (a 1-wide kernel has nothing to split).

The pass rewrites in place: new nodes take the original's position (node order
is otherwise kept), the horizontal conv writes the original output name (so
value_info, graph outputs and consumers are untouched), new tensor and node
names are made unique, and a weight no longer used by anything is removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..cost import conv_cost, conv_transpose_cost
from ..factorization import Factors, Kind
from ..graph import InvalidAttribute, Scope, attr_int, attr_ints, attr_string, iter_scopes, type_name
from ..run_shapes import ModelShapes
from ..shapes import Shape
from ._graph import resolve_weight, stored_dims
from ._rewrite import FLOAT_TYPES, Site, node_key

__all__ = ["ConvGeometry", "ConvSite", "ConvTransposeSite", "conv_geometry", "find_conv_sites"]

QUANTIZED_CONVS = {"QLinearConv", "ConvInteger"}
CONV_OPS = {"Conv", "ConvTranspose", *QUANTIZED_CONVS}


def _resolve_pads(
    auto: str,
    pads_attr: list[int] | None,
    in_spatial: Shape | None,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[tuple[int, ...] | None, str]:
    """Conv: explicit ``pads`` (begins then ends), or ``None`` with the auto_pad both convs keep."""
    rank = len(kernel)
    if auto == "NOTSET":
        return tuple(int(p) for p in (pads_attr or [0] * (2 * rank))), "NOTSET"
    if auto == "VALID":
        return (0,) * (2 * rank), "NOTSET"
    if in_spatial is None or any(d is None for d in in_spatial):
        return None, auto
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations, strict=True):
        assert size is not None
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return (*begins, *ends), "NOTSET"


def _known(shape: Shape | None, rank: int) -> tuple[int, ...] | None:
    if shape is None or len(shape) != rank + 2 or any(d is None for d in shape[2:]):
        return None
    return tuple(int(d) for d in shape[2:])  # type: ignore[arg-type]


def _weight_site(site: Site, node: onnx.NodeProto, scope: Scope) -> tuple[int, ...] | None:
    """Resolve the weight of a conv-like node and return its shape; sets ``site.reason`` and returns None when unusable."""
    if node.op_type in QUANTIZED_CONVS:
        site.reason = f"quantized conv ({node.op_type})"
        return None
    if node.domain not in ("", "ai.onnx"):
        site.reason = f"{node.op_type} in custom domain {node.domain!r}"
        return None
    if len(node.input) < 2 or not node.input[1]:
        site.reason = f"{node.op_type} has no weight input"
        return None
    weight = resolve_weight(node.input[1], scope)
    if isinstance(weight, str):
        site.reason = weight
        return None
    site.weight = weight
    if weight.data_type not in FLOAT_TYPES or (weight.cast_to is not None and weight.cast_to not in FLOAT_TYPES):
        bad = weight.data_type if weight.data_type not in FLOAT_TYPES else weight.cast_to
        site.reason = f"weight type {type_name(bad)} is not floating point"  # type: ignore[arg-type]
        return None
    if len(weight.shape) < 3:
        site.reason = f"weight of shape {weight.shape} is not a conv kernel"
        return None
    if any(d < 1 for d in weight.shape):
        site.reason = f"weight of shape {weight.shape} is empty"
        return None
    # non-finite values are found when the kernel is factored (reading every weight here would cost a pass)
    return weight.shape


AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a Conv or ConvTranspose, with the ONNX defaults filled in and checked."""

    group: int
    kernel: tuple[int, ...]  # the weight's spatial dims
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as given (zeros when absent)
    auto_pad: str
    output_padding: tuple[int, ...]  # ConvTranspose only (zeros for Conv)
    output_shape: tuple[int, ...] | None  # ConvTranspose only: the spatial target, when given


def _per_axis(node: onnx.NodeProto, name: str, count: int, least: int, default: int) -> tuple[int, ...]:
    values = attr_ints(node, name)
    if values is None:
        return (default,) * count
    if len(values) != count:
        raise InvalidAttribute(f"{name} {list(values)} has {len(values)} values for {count // (2 if name == 'pads' else 1)} spatial axes")
    if any(v < least for v in values):
        raise InvalidAttribute(f"{name} {list(values)} has a value below {least}")
    return values


def conv_geometry(node: onnx.NodeProto, weight_shape: tuple[int, ...], input_shape: Shape | None) -> ConvGeometry | str:
    """The geometry of a Conv/ConvTranspose checked against its weight, its input and itself, or why it cannot be used.

    ``weight_shape`` is ``(N, C/g, *S)`` for Conv and ``(C, N/g, *S)`` for
    ConvTranspose (at least 3-D, no empty dim); ``input_shape`` the inferred
    shape of the input, when known.
    """
    transpose = node.op_type == "ConvTranspose"
    r = len(weight_shape) - 2
    kernel = tuple(int(k) for k in weight_shape[2:])
    try:
        declared = attr_ints(node, "kernel_shape")
        if declared is not None and tuple(declared) != kernel:
            return f"kernel_shape {list(declared)} does not match the weight's spatial dims {list(kernel)}"
        if input_shape is not None and len(input_shape) > 0 and len(input_shape) != len(weight_shape):
            return f"weight of rank {len(weight_shape)} on an input of rank {len(input_shape)}"
        group = attr_int(node, "group", 1)
        assert group is not None
        strides = _per_axis(node, "strides", r, 1, 1)
        dilations = _per_axis(node, "dilations", r, 1, 1)
        pads = _per_axis(node, "pads", 2 * r, 0, 0)
        auto_pad = attr_string(node, "auto_pad", "NOTSET") or "NOTSET"
        output_padding = _per_axis(node, "output_padding", r, 0, 0) if transpose else (0,) * r
        output_shape = attr_ints(node, "output_shape") if transpose else None
    except InvalidAttribute as exc:
        return str(exc)
    if auto_pad not in AUTO_PADS:
        return f"auto_pad {auto_pad!r} is not one of {', '.join(AUTO_PADS)}"
    if group < 1:
        return f"group {group} is below 1"
    channels = "input" if transpose else "output"
    if weight_shape[0] % group:
        return f"{weight_shape[0]} {channels} channels do not split into {group} groups"
    if output_shape is not None:
        if len(output_shape) not in (r, r + 2) or any(d < 1 for d in output_shape):
            return f"output_shape {list(output_shape)} is not {r} spatial dims >= 1"
        output_shape = output_shape[-r:]
    in_channels = weight_shape[0] if transpose else weight_shape[1] * group
    if input_shape is not None and len(input_shape) > 1 and input_shape[1] is not None and input_shape[1] != in_channels:
        return f"input has {input_shape[1]} channels, the weight expects {in_channels}"
    spatial = _known(input_shape, r)
    if spatial is not None:
        if any(n < 1 for n in spatial):
            return f"input spatial dims {list(spatial)} are empty"
        if not transpose and auto_pad in ("NOTSET", "VALID"):
            given = pads if auto_pad == "NOTSET" else (0,) * (2 * r)
            for i, (n, k, d) in enumerate(zip(spatial, kernel, dilations, strict=True)):
                if n + given[i] + given[i + r] < (k - 1) * d + 1:
                    return f"output would be empty: axis {i} holds {n} (+ pads) for a dilated kernel of {(k - 1) * d + 1}"
        if transpose and output_shape is None and auto_pad in ("NOTSET", "VALID"):
            given = pads if auto_pad == "NOTSET" else (0,) * (2 * r)
            for i, (n, k, s, d, op) in enumerate(zip(spatial, kernel, strides, dilations, output_padding, strict=True)):
                if s * (n - 1) + op + (k - 1) * d + 1 - given[i] - given[i + r] < 1:
                    return f"output would be empty: pads {list(given)} remove all of axis {i}"
    return ConvGeometry(group, kernel, strides, dilations, pads, auto_pad, output_padding, output_shape)


def _conv_output(
    in_spatial: tuple[int, ...],
    pads: tuple[int, ...] | None,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[int, ...]:
    """Output size of a conv; ``pads=None`` is SAME_* (``ceil(n / s)`` per axis)."""
    r = len(kernel)
    if pads is None:
        return tuple(-(-n // s) for n, s in zip(in_spatial, strides, strict=True))
    return tuple(
        (n + pads[i] + pads[i + r] - ((k - 1) * d + 1)) // s + 1
        for i, (n, k, s, d) in enumerate(zip(in_spatial, kernel, strides, dilations, strict=True))
    )


def _refused_weight_dims(node: onnx.NodeProto, scope: Scope) -> tuple[int, ...] | None:
    """The kernel dims of a conv that is not decomposed (quantized, say), for its MACs; None when unknown."""
    index = 3 if node.op_type == "QLinearConv" else 1
    if len(node.input) <= index or not node.input[index]:
        return None
    dims = stored_dims(node.input[index], scope)
    return tuple(dims) if dims is not None and len(dims) >= 3 and all(d > 0 for d in dims) else None


def _spatial_reason(kernel: tuple[int, ...]) -> str | None:
    if len(kernel) < 2:
        return "1-D kernel: no vertical/horizontal split"
    if kernel[-1] < 2 or math.prod(kernel[:-1]) < 2:
        return f"kernel {'x'.join(map(str, kernel))} is 1 in a spatial dim: nothing to split spatially"
    return None


class ConvSite(Site):
    """A ``Conv`` node (weight ``(N, C/g, *S, kw)``)."""

    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None  # explicit pads, or None when auto_pad is kept
    auto_pad: str = "NOTSET"

    @classmethod
    def build(cls, node: onnx.NodeProto, scope: Scope, shapes: ModelShapes, key: str) -> ConvSite:
        site = cls(key, node, scope)
        w = _weight_site(site, node, scope)
        refused = w is None
        if w is None:  # not decomposable; its MACs still count when the weight's dims are known
            w = _refused_weight_dims(node, scope)
            if w is None:
                return site
        runs = site.sizes(shapes, node.input[0])
        geometry = conv_geometry(node, w, runs[0] if runs else shapes.planning.get(node.input[0]))
        if isinstance(geometry, str):
            if not refused:
                site.reason = geometry
            return site
        r = len(w) - 2
        site.groups, site.kernel_shape, site.strides, site.dilations = geometry.group, geometry.kernel, geometry.strides, geometry.dilations
        # explicit pads only from sizes that hold for every input: a model with dynamic axes stays dynamic
        fixed = _known(shapes.static.get(node.input[0]), r)
        site.pads, site.auto_pad = _resolve_pads(
            geometry.auto_pad, list(geometry.pads), fixed, site.kernel_shape, site.strides, site.dilations
        )
        bias = len(node.input) > 2 and bool(node.input[2])
        costs = []
        for run_shape in runs or []:
            in_spatial = _known(run_shape, r)
            if in_spatial is None:
                continue
            pads, _ = _resolve_pads(geometry.auto_pad, list(geometry.pads), in_spatial, site.kernel_shape, site.strides, site.dilations)
            out = _conv_output(in_spatial, pads, site.kernel_shape, site.strides, site.dilations)
            costs.append(conv_cost(int(w[0]), int(w[1]), site.kernel_shape, site.groups, in_spatial, out, bias))
        if not costs:  # unknown size, or did not run: count per output pixel, the input width being the width stride
            out = (1,) * r
            costs = [conv_cost(int(w[0]), int(w[1]), site.kernel_shape, site.groups, (*out[:-1], site.strides[-1]), out, bias)]
        site.cost = site.costed(costs)
        if site.reason is None:
            site.kinds = {"spatial": _spatial_reason(site.kernel_shape), "channel": None}
        return site

    def kernel(self) -> npt.NDArray[np.generic]:
        assert self.weight is not None
        return self.weight.values

    def layout_shape(self) -> tuple[int, ...]:
        assert self.weight is not None
        return self.weight.shape

    def _geometry(self, kind: Kind) -> tuple[dict[str, Any], dict[str, Any]]:
        r = len(self.kernel_shape)
        ones = [1] * (r - 1)
        first: dict[str, Any] = {"group": self.groups}
        second: dict[str, Any] = {"group": self.groups}
        if kind == "spatial":
            first.update(kernel_shape=[*self.kernel_shape[:-1], 1], strides=[*self.strides[:-1], 1], dilations=[*self.dilations[:-1], 1])
            second.update(
                kernel_shape=[*ones, self.kernel_shape[-1]], strides=[*ones, self.strides[-1]], dilations=[*ones, self.dilations[-1]]
            )
            if self.pads is None:
                first["auto_pad"] = second["auto_pad"] = self.auto_pad
            else:
                begins, ends = self.pads[:r], self.pads[r:]
                first["pads"] = [*begins[:-1], 0, *ends[:-1], 0]
                second["pads"] = [*([0] * (r - 1)), begins[-1], *([0] * (r - 1)), ends[-1]]
        else:  # channel: the whole geometry on the first conv, a pointwise second conv
            first.update(kernel_shape=list(self.kernel_shape), strides=list(self.strides), dilations=list(self.dilations))
            if self.pads is None:
                first["auto_pad"] = self.auto_pad
            else:
                first["pads"] = list(self.pads)
            second.update(kernel_shape=[1] * r)
        return first, second

    def emit(self, kind: Kind, first_w: str, second_w: str, middle: str, names: tuple[str, str]) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        node = self.node
        first_attrs, second_attrs = self._geometry(kind)
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        first = helper.make_node("Conv", [node.input[0], first_w], [middle], name=names[0], domain=node.domain, **first_attrs)
        second = helper.make_node("Conv", [middle, second_w, *bias], list(node.output), name=names[1], domain=node.domain, **second_attrs)
        return first, second


class ConvTransposeSite(Site):
    """A ``ConvTranspose`` node (weight ``(C, N/g, *S, kw)``); spatial split only."""

    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] | None = None  # the spatial target, when the node gives one
    in_width: int | None = None
    in_spatial: tuple[int, ...] | None = None

    @classmethod
    def build(cls, node: onnx.NodeProto, scope: Scope, shapes: ModelShapes, key: str) -> ConvTransposeSite:
        site = cls(key, node, scope)
        w = _weight_site(site, node, scope)
        if w is None:
            return site
        runs = site.sizes(shapes, node.input[0])
        geometry = conv_geometry(node, w, runs[0] if runs else shapes.planning.get(node.input[0]))
        if isinstance(geometry, str):
            site.reason = geometry
            return site
        r = len(w) - 2
        site.groups, site.kernel_shape, site.strides, site.dilations = geometry.group, geometry.kernel, geometry.strides, geometry.dilations
        site.output_padding = geometry.output_padding
        site.auto_pad = "NOTSET" if geometry.auto_pad == "VALID" else geometry.auto_pad
        site.pads = (0,) * (2 * r) if geometry.auto_pad == "VALID" else geometry.pads
        site.output_shape = geometry.output_shape
        # splitting output_shape per axis writes the input width into the model: only from a size every input has
        fixed = _known(shapes.static.get(node.input[0]), r)
        spatial_reason = _spatial_reason(site.kernel_shape)
        if spatial_reason is None and site.output_shape is not None and fixed is None:
            spatial_reason = "output_shape with an input width that is not fixed: cannot split it per axis"
        if fixed is not None:
            site.in_width = fixed[-1]
            site.in_spatial = fixed
        bias = len(node.input) > 2 and bool(node.input[2])
        costs = []
        for run_shape in runs or []:
            in_spatial = _known(run_shape, r)
            if in_spatial is not None:
                costs.append(
                    conv_transpose_cost(int(w[0]), int(w[1]), site.kernel_shape, site.groups, in_spatial, site._output(in_spatial), bias)
                )
        if not costs:
            costs = [conv_transpose_cost(int(w[0]), int(w[1]), site.kernel_shape, site.groups, (1,) * r, tuple(site.strides), bias)]
        site.cost = site.costed(costs)
        if site.reason is None:
            site.kinds = {"spatial": spatial_reason, "channel": "channel split is not offered for ConvTranspose"}
        return site

    def _output(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        r = len(self.kernel_shape)
        if self.output_shape is not None:
            return self.output_shape
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return tuple(n * s for n, s in zip(in_spatial, self.strides, strict=True))
        return tuple(
            s * (n - 1) + op + (k - 1) * d + 1 - self.pads[i] - self.pads[i + r]
            for i, (n, k, s, d, op) in enumerate(
                zip(in_spatial, self.kernel_shape, self.strides, self.dilations, self.output_padding, strict=True)
            )
        )

    def layout_shape(self) -> tuple[int, ...]:
        assert self.weight is not None
        c, n_g, *spatial = self.weight.shape
        return (self.groups * n_g, c // self.groups, *spatial)

    def kernel(self) -> npt.NDArray[np.generic]:
        """``W[c, n, ...]`` per group as ``W[n, c, ...]``: the conv layout the theorem is stated in."""
        assert self.weight is not None
        w = self.weight.values
        g = self.groups
        c, n_g = w.shape[:2]
        return w.reshape(g, c // g, n_g, *w.shape[2:]).swapaxes(1, 2).reshape(g * n_g, c // g, *w.shape[2:])

    def storage(self, factors: Factors) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        g, k = self.groups, factors.rank
        first, second = factors.first, factors.second  # (g·K, C_g, *S, 1), (N, K, 1.., kw)
        c_g, n_g = first.shape[1], second.shape[0] // g
        first_t = first.reshape(g, k, c_g, *first.shape[2:]).swapaxes(1, 2).reshape(g * c_g, k, *first.shape[2:])
        second_t = second.reshape(g, n_g, k, *second.shape[2:]).swapaxes(1, 2).reshape(g * k, n_g, *second.shape[2:])
        return first_t, second_t

    def _output_shape_pads(self) -> tuple[int, ...] | None:
        """The pads the spec derives from ``output_shape`` (NOTSET: the odd pixel at the start), or None if one is negative."""
        assert self.output_shape is not None and self.in_spatial is not None
        begins, ends = [], []
        for n, k, s, d, op, out in zip(
            self.in_spatial, self.kernel_shape, self.strides, self.dilations, self.output_padding, self.output_shape, strict=True
        ):
            total = s * (n - 1) + op + (k - 1) * d + 1 - out
            if total < 0:
                return None
            begins.append(total - total // 2)
            ends.append(total // 2)
        return (*begins, *ends)

    def emit(self, kind: Kind, first_w: str, second_w: str, middle: str, names: tuple[str, str]) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        node = self.node
        r = len(self.kernel_shape)
        ones, zeros = [1] * (r - 1), [0] * (r - 1)
        first: dict[str, Any] = {
            "group": self.groups,
            "kernel_shape": [*self.kernel_shape[:-1], 1],
            "strides": [*self.strides[:-1], 1],
            "dilations": [*self.dilations[:-1], 1],
            "output_padding": [*self.output_padding[:-1], 0],
        }
        second: dict[str, Any] = {
            "group": self.groups,
            "kernel_shape": [*ones, self.kernel_shape[-1]],
            "strides": [*ones, self.strides[-1]],
            "dilations": [*ones, self.dilations[-1]],
            "output_padding": [*zeros, self.output_padding[-1]],
        }
        # output_shape as the explicit pads it implies: onnx shape inference drops the spatial dims of a
        # ConvTranspose whose output_shape is below its input size, and the second node then fails to load
        explicit = self._output_shape_pads() if self.output_shape is not None and self.auto_pad == "NOTSET" else None
        if self.output_shape is not None and explicit is None:
            assert self.in_width is not None
            first["output_shape"] = [*self.output_shape[:-1], self.in_width]
            second["output_shape"] = list(self.output_shape)
        if self.auto_pad != "NOTSET":
            first["auto_pad"] = second["auto_pad"] = self.auto_pad
        else:
            pads = explicit if explicit is not None else self.pads
            begins, ends = pads[:r], pads[r:]
            first["pads"] = [*begins[:-1], 0, *ends[:-1], 0]
            second["pads"] = [*zeros, begins[-1], *zeros, ends[-1]]
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        op = "ConvTranspose"
        return (
            helper.make_node(op, [node.input[0], first_w], [middle], name=names[0], domain=node.domain, **first),
            helper.make_node(op, [middle, second_w, *bias], list(node.output), name=names[1], domain=node.domain, **second),
        )


def find_conv_sites(model: onnx.ModelProto, shapes: ModelShapes) -> list[Site]:
    """Every Conv, ConvTranspose, QLinearConv and ConvInteger node, in graph order, functions last."""
    sites: list[Site] = []
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.op_type not in CONV_OPS:
                continue
            key = node_key(node, scope.function)
            builder = ConvTransposeSite if node.op_type == "ConvTranspose" else ConvSite
            sites.append(builder.build(node, scope, shapes, key))
    return sites
