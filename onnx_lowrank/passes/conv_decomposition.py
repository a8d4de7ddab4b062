"""Graph pass: replace Conv nodes by two low-rank convs.

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

Preconditions (a layer that fails one is reported with the reason and left as is):

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from ..cost import ConvCost
from ..factorization import Factors, Kind
from ..shapes import Shape

__all__ = ["ConvSite", "Scope", "apply_factors", "find_conv_sites"]

QUANTIZED_CONVS = {"QLinearConv", "ConvInteger"}
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(eq=False)
class Scope:
    """A graph or function body, with the outer scopes its nodes can see."""

    nodes: "onnx.RepeatedCompositeFieldContainer[onnx.NodeProto]"  # type: ignore[name-defined]
    graph: onnx.GraphProto | None
    function: onnx.FunctionProto | None
    parent: Scope | None
    namespace: int  # 0: the main graph tree; i+1: model.functions[i] and its subgraphs
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)

    @classmethod
    def of_graph(cls, graph: onnx.GraphProto, parent: Scope | None, namespace: int) -> Scope:
        scope = cls(graph.node, graph, None, parent, namespace)
        scope.initializers = {t.name: t for t in graph.initializer}
        scope.inputs = {v.name for v in graph.input}
        scope.producers = {o: n for n in graph.node for o in n.output if o}
        return scope

    @classmethod
    def of_function(cls, function: onnx.FunctionProto, namespace: int) -> Scope:
        scope = cls(function.node, None, function, None, namespace)
        scope.inputs = set(function.input)
        scope.producers = {o: n for n in function.node for o in n.output if o}
        return scope


def iter_scopes(model: onnx.ModelProto) -> Iterator[Scope]:
    """Every graph and function body of the model, outer scopes first."""

    def walk(scope: Scope) -> Iterator[Scope]:
        yield scope
        for node in list(scope.nodes):
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for g in subgraphs:
                    yield from walk(Scope.of_graph(g, scope, scope.namespace))

    yield from walk(Scope.of_graph(model.graph, None, 0))
    for i, function in enumerate(model.functions):
        yield from walk(Scope.of_function(function, i + 1))


@dataclass
class WeightSource:
    """Where a conv's weight comes from: a constant tensor, maybe through Identity/Cast."""

    name: str  # the constant tensor (initializer or Constant output) holding the values
    scope: Scope  # the scope that defines it
    values: npt.NDArray[np.generic]
    data_type: int  # element type as stored
    cast_to: int | None  # element type after the Cast chain, when there is one


@dataclass
class ConvSite:
    """One conv-like node with everything the planner needs."""

    key: str
    node: onnx.NodeProto
    scope: Scope
    reason: str | None = None
    weight: WeightSource | None = None
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None  # resolved explicit pads, or None when auto_pad is kept
    auto_pad: str = "NOTSET"
    cost: ConvCost | None = None
    shape_known: bool = False

    @property
    def weight_key(self) -> tuple[int, str] | None:
        return (self.weight.scope.namespace, self.weight.name) if self.weight else None


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor_of_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def resolve_weight(name: str, scope: Scope) -> WeightSource | str:
    """The constant behind ``name`` or the reason it is not one."""
    cast_to: int | None = None
    current: Scope | None = scope
    hops = 0
    while current is not None and hops < 64:
        hops += 1
        if name in current.initializers:
            # an initializer listed as a graph input too is taken as the constant it is in practice
            # (IR < 4 requires the listing; exporters' keep_initializers_as_inputs produces it)
            tensor = current.initializers[name]
            return WeightSource(name, current, numpy_helper.to_array(tensor), tensor.data_type, cast_to)
        if name in current.inputs:
            return "weight is an input of its graph or function, not a constant"
        producer = current.producers.get(name)
        if producer is None:
            current = current.parent
            continue
        op = producer.op_type
        if op == "Constant":
            tensor = _tensor_of_constant(producer)
            if tensor is None:
                return "weight Constant has no tensor value"
            return WeightSource(name, current, numpy_helper.to_array(tensor), tensor.data_type, cast_to)
        if op == "Identity":
            name = producer.input[0]
            continue
        if op == "Cast":
            if cast_to is None:
                cast_to = int(_attrs(producer)["to"])  # type: ignore[call-overload]
            name = producer.input[0]
            continue
        if op == "DequantizeLinear":
            return "weight is quantized (DequantizeLinear)"
        return f"weight is computed at run time (by {op})"
    return "weight is not a constant (produced outside any known scope)"


def _resolve_pads(
    attrs: dict[str, object],
    in_spatial: Shape | None,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[tuple[int, ...] | None, str]:
    """Explicit ``pads`` (begins then ends), or ``None`` with the auto_pad both convs keep."""
    rank = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto in ("NOTSET", ""):
        pads = tuple(int(p) for p in attrs.get("pads", [0] * (2 * rank)))  # type: ignore[attr-defined]
        return pads, "NOTSET"
    if auto == "VALID":
        return (0,) * (2 * rank), "NOTSET"
    if in_spatial is None or any(d is None for d in in_spatial):
        return None, auto
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        assert size is not None
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return (*begins, *ends), "NOTSET"


def _out_size(size: int, k: int, s: int, d: int, pad_total: int) -> int:
    return (size + pad_total - ((k - 1) * d + 1)) // s + 1


def _site(node: onnx.NodeProto, scope: Scope, shapes: dict[str, Shape], key: str) -> ConvSite:
    site = ConvSite(key, node, scope)
    if node.op_type in QUANTIZED_CONVS:
        site.reason = f"quantized conv ({node.op_type})"
        return site
    if node.domain not in ("", "ai.onnx"):
        site.reason = f"Conv in custom domain {node.domain!r}"
        return site
    if len(node.input) < 2 or not node.input[1]:
        site.reason = "Conv has no weight input"
        return site
    weight = resolve_weight(node.input[1], scope)
    if isinstance(weight, str):
        site.reason = weight
        return site
    site.weight = weight
    w = weight.values
    if weight.data_type not in FLOAT_TYPES or (weight.cast_to is not None and weight.cast_to not in FLOAT_TYPES):
        site.reason = f"weight type {onnx.TensorProto.DataType.Name(weight.data_type)} is not floating point"
        return site
    if w.ndim < 3:
        site.reason = f"weight of shape {tuple(w.shape)} is not a conv kernel"
        return site
    attrs = _attrs(node)
    spatial_rank = w.ndim - 2
    site.groups = int(attrs.get("group", 1))  # type: ignore[call-overload]
    site.kernel = tuple(int(k) for k in w.shape[2:])
    site.strides = tuple(int(s) for s in attrs.get("strides", [1] * spatial_rank))  # type: ignore[attr-defined]
    site.dilations = tuple(int(d) for d in attrs.get("dilations", [1] * spatial_rank))  # type: ignore[attr-defined]
    in_shape = shapes.get(node.input[0])
    in_spatial = in_shape[2:] if in_shape is not None and len(in_shape) == w.ndim else None
    site.pads, site.auto_pad = _resolve_pads(attrs, in_spatial, site.kernel, site.strides, site.dilations)
    if site.groups < 1 or w.shape[0] % site.groups:
        site.reason = f"{w.shape[0]} output channels do not split into {site.groups} groups"
        return site
    # the cost model: real sizes when known, else per output pixel (input width = width stride)
    if in_spatial is not None and all(d is not None for d in in_spatial):
        sizes = tuple(int(d) for d in in_spatial)  # type: ignore[arg-type]
        if site.pads is not None:
            out = tuple(
                _out_size(n, k, s, d, site.pads[i] + site.pads[i + spatial_rank])
                for i, (n, k, s, d) in enumerate(zip(sizes, site.kernel, site.strides, site.dilations))
            )
        else:
            out = tuple(-(-n // s) for n, s in zip(sizes, site.strides))
        site.shape_known = True
    else:
        out = (1,) * spatial_rank
        sizes = (*out[:-1], site.strides[-1])
    site.cost = ConvCost(
        out_channels=int(w.shape[0]),
        in_channels_per_group=int(w.shape[1]),
        kernel=site.kernel,
        groups=site.groups,
        in_spatial=sizes,
        out_spatial=out,
        has_bias=len(node.input) > 2 and bool(node.input[2]),
    )
    if not np.all(np.isfinite(w.astype(np.float64))):
        site.reason = "weight has non-finite values"
    elif spatial_rank < 2:
        site.reason = "1-D conv: no vertical/horizontal split"
    elif site.kernel[-1] < 2 or math.prod(site.kernel[:-1]) < 2:
        site.reason = f"kernel {'x'.join(map(str, site.kernel))} is 1 in a spatial dim: nothing to split"
    return site


CONV_OPS = {"Conv", *QUANTIZED_CONVS}


def node_key(node: onnx.NodeProto, function: onnx.FunctionProto | None = None) -> str:
    """The name a layer is reported and selected by: its node name, else its first output."""
    base = node.name or (node.output[0] if node.output else node.op_type)
    return f"{function.name}::{base}" if function is not None else base


def find_conv_sites(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[ConvSite]:
    sites = []
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.op_type in CONV_OPS:
                sites.append(_site(node, scope, shapes, node_key(node, scope.function)))
    return sites


# --------------------------------------------------------------------------- rewrite


class _Names:
    """Unique names within one namespace (a graph tree or a function)."""

    def __init__(self, used: set[str]) -> None:
        self.used = used

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def _namespace_names(model: onnx.ModelProto) -> dict[int, _Names]:
    used: dict[int, set[str]] = {}
    for scope in iter_scopes(model):
        names = used.setdefault(scope.namespace, set())
        for node in scope.nodes:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
        if scope.graph is not None:
            names.update(t.name for t in scope.graph.initializer)
            names.update(v.name for v in scope.graph.input)
            names.update(v.name for v in scope.graph.output)
        if scope.function is not None:
            names.update(scope.function.input)
            names.update(scope.function.output)
    return {ns: _Names(names) for ns, names in used.items()}


def _cast_values(values: npt.NDArray[np.float64], data_type: int) -> npt.NDArray[np.generic]:
    return values.astype(helper.tensor_dtype_to_np_dtype(data_type))


@dataclass
class NewNodes:
    """Names of what the rewrite made for one site."""

    first: str
    second: str


def _geometry(site: ConvSite, kind: Kind) -> tuple[dict[str, object], dict[str, object]]:
    """Attributes of the first and second conv."""
    r = len(site.kernel)
    ones = [1] * (r - 1)
    first: dict[str, object] = {"group": site.groups}
    second: dict[str, object] = {"group": site.groups}
    if kind == "spatial":
        first.update(
            kernel_shape=[*site.kernel[:-1], 1], strides=[*site.strides[:-1], 1], dilations=[*site.dilations[:-1], 1]
        )
        second.update(kernel_shape=[*ones, site.kernel[-1]], strides=[*ones, site.strides[-1]], dilations=[*ones, site.dilations[-1]])
        if site.pads is None:
            first["auto_pad"] = second["auto_pad"] = site.auto_pad
        else:
            begins, ends = site.pads[:r], site.pads[r:]
            first["pads"] = [*begins[:-1], 0, *ends[:-1], 0]
            second["pads"] = [*([0] * (r - 1)), begins[-1], *([0] * (r - 1)), ends[-1]]
    else:  # channel: the full geometry on the first conv, a pointwise second conv
        first.update(kernel_shape=list(site.kernel), strides=list(site.strides), dilations=list(site.dilations))
        if site.pads is None:
            first["auto_pad"] = site.auto_pad
        else:
            first["pads"] = list(site.pads)
        second.update(kernel_shape=[1] * r)
    return first, second


class Rewriter:
    """Applies factors to sites; one instance per model so shared weights are written once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.names = _namespace_names(model)
        self.written: dict[tuple[int, str, Kind, int], tuple[str, str]] = {}
        self.touched: set[tuple[int, str]] = set()

    def _add_tensor(self, site: ConvSite, base: str, values: npt.NDArray[np.float64], before: int) -> tuple[str, int]:
        """Store a factor in the weight's own scope; return the name the conv reads and the inserts made."""
        assert site.weight is not None
        source = site.weight
        names = self.names[site.scope.namespace]
        stored = names.fresh(base)
        tensor = numpy_helper.from_array(_cast_values(values, source.data_type), stored)
        inserted = 0
        owner = source.scope
        if owner.graph is not None:
            owner.graph.initializer.append(tensor)
            if owner.parent is None and self.model.ir_version < 4:  # IR 3 lists every initializer as an input
                owner.graph.input.append(helper.make_tensor_value_info(stored, tensor.data_type, list(tensor.dims)))
        else:
            node = helper.make_node("Constant", [], [stored], name=names.fresh(stored + "/constant"), value=tensor)
            site.scope.nodes.insert(before, node)
            inserted += 1
        if source.cast_to is None:
            return stored, inserted
        cast_out = names.fresh(stored + "/cast")
        cast = helper.make_node("Cast", [stored], [cast_out], name=names.fresh(stored + "/Cast"), to=source.cast_to)
        site.scope.nodes.insert(before + inserted, cast)
        return cast_out, inserted + 1

    def apply(self, site: ConvSite, factors: Factors) -> NewNodes:
        assert site.weight is not None
        node, scope = site.node, site.scope
        names = self.names[scope.namespace]
        index = next(i for i, n in enumerate(scope.nodes) if n is node or n == node)
        kind = factors.kind
        labels = ("vertical", "horizontal") if kind == "spatial" else ("channel_reduce", "channel_expand")
        base = node.name or node.output[0]
        cache_key = (site.weight.scope.namespace, site.weight.name, kind, factors.rank)
        cached = self.written.get(cache_key)
        # shared weights: a Constant-node factor must precede every consumer, so only initializers are reused
        if cached is not None and site.weight.scope.graph is not None:
            first_w, second_w = cached
        else:
            first_w, n1 = self._add_tensor(site, f"{base}/{labels[0]}.weight", factors.first, index)
            index += n1
            second_w, n2 = self._add_tensor(site, f"{base}/{labels[1]}.weight", factors.second, index)
            index += n2
            self.written[cache_key] = (first_w, second_w)
        first_attrs, second_attrs = _geometry(site, kind)
        middle = names.fresh(f"{base}/{labels[0]}_output")
        first = helper.make_node(
            "Conv", [node.input[0], first_w], [middle], name=names.fresh(f"{base}/{labels[0]}"), domain=node.domain, **first_attrs
        )
        second_inputs = [middle, second_w, *([node.input[2]] if len(node.input) > 2 and node.input[2] else [])]
        second = helper.make_node(
            "Conv", second_inputs, list(node.output), name=names.fresh(f"{base}/{labels[1]}"), domain=node.domain, **second_attrs
        )
        for new in (first, second):
            new.doc_string = node.doc_string
            if hasattr(node, "metadata_props"):
                new.metadata_props.extend(node.metadata_props)
        del scope.nodes[index]
        scope.nodes.insert(index, second)
        scope.nodes.insert(index, first)
        scope.producers[middle] = first
        for out in node.output:
            scope.producers[out] = second
        self.touched.add((scope.namespace, node.input[1]))
        return NewNodes(first.name, second.name)

    def remove_unused(self) -> None:
        """Drop the constants (and Identity/Cast chains) the rewrite left without a consumer."""
        pending = set(self.touched)
        while pending:
            uses: dict[tuple[int, str], int] = {}
            for scope in iter_scopes(self.model):
                for node in scope.nodes:
                    for name in node.input:
                        uses[(scope.namespace, name)] = uses.get((scope.namespace, name), 0) + 1
                    for attr in node.attribute:  # function-attribute references are rare; be safe
                        if attr.ref_attr_name:
                            uses[(scope.namespace, attr.ref_attr_name)] = 1
                if scope.graph is not None:
                    for value in scope.graph.output:
                        uses[(scope.namespace, value.name)] = uses.get((scope.namespace, value.name), 0) + 1
                if scope.function is not None:
                    for name in scope.function.output:
                        uses[(scope.namespace, name)] = uses.get((scope.namespace, name), 0) + 1
            next_pending: set[tuple[int, str]] = set()
            for scope in iter_scopes(self.model):
                for ns, name in pending:
                    if ns != scope.namespace or uses.get((ns, name), 0):
                        continue
                    if scope.graph is not None:
                        for i, t in enumerate(scope.graph.initializer):
                            if t.name == name:
                                del scope.graph.initializer[i]
                                for j, v in enumerate(scope.graph.input):
                                    if v.name == name:
                                        del scope.graph.input[j]
                                        break
                                break
                    for i, n in enumerate(scope.nodes):
                        if name in n.output and n.op_type in ("Constant", "Identity", "Cast") and len(n.output) == 1:
                            next_pending.update((ns, x) for x in n.input if x)
                            del scope.nodes[i]
                            break
            pending = next_pending


def apply_factors(model: onnx.ModelProto, plan: list[tuple[ConvSite, Factors]]) -> tuple[onnx.ModelProto, dict[str, NewNodes]]:
    """Rewrite ``model`` in place; return it and the new node names per site key."""
    rewriter = Rewriter(model)
    made = {site.key: rewriter.apply(site, factors) for site, factors in plan}
    rewriter.remove_unused()
    return model, made
