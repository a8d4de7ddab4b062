"""Weights, constants and clean-up shared by the graph passes.

The passes edit the ``ModelProto`` in place rather than through a separate IR:
that keeps every field the user had (metadata, doc strings, value_info, node
order, functions, training info) and holds one copy of the weights. Scopes,
namespaces and attribute readers are :mod:`onnx_lowrank.graph`'s.

What a pass reads is checked where it is read: a tensor whose declared dims do
not match its data, or declare more than this machine's memory, is not a usable
weight (:func:`tensor_problem`, :func:`tensor_values`); an attribute of the wrong
type, given twice or referring to a function attribute is refused by the typed
readers (:func:`attr_int` and friends raise :class:`InvalidAttribute`). The
passes turn both into the reason a layer is left as it is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from ..data_io import format_bytes, memory_budget
from ..graph import (
    InvalidAttribute,
    Names,
    Scope,
    attr_int,
    iter_scopes,
    type_name,
)

__all__ = [
    "FOLDABLE",
    "FOLDABLE_BY_TYPE",
    "WeightSource",
    "add_constant",
    "remove_unused",
    "resolve_weight",
    "stored_dims",
    "tensor_problem",
    "tensor_values",
]


class WeightSource:
    """Where a layer's weight comes from: a constant tensor, maybe through Identity/Cast.

    ``values`` is made from the tensor each time it is read and not kept: holding
    numpy copies of every weight would double the memory of a large model.
    """

    def __init__(
        self,
        name: str,
        scope: Scope,
        tensor: onnx.TensorProto | npt.NDArray[np.generic],
        data_type: int,
        cast_to: int | None,
    ) -> None:
        self.name = name  # the constant tensor (initializer, Constant output or folded expression)
        self.scope = scope  # the scope that defines it
        self.data_type = data_type  # element type as stored
        self.cast_to = cast_to  # element type after the Cast chain, when there is one
        self._tensor = tensor
        # the value of a constant expression (not stored in the model as it is)
        self.folded = not isinstance(tensor, onnx.TensorProto)
        self.shape: tuple[int, ...] = tuple(int(d) for d in (tensor.dims if isinstance(tensor, onnx.TensorProto) else tensor.shape))

    @property
    def values(self) -> npt.NDArray[np.generic]:
        """The weight as numpy; raises ``ValueError`` naming the tensor when its data does not hold its dims."""
        if isinstance(self._tensor, onnx.TensorProto):
            return tensor_values(self._tensor)
        return self._tensor


# element bits of the types stored fewer than 8 bits an element (packed two a byte in raw_data)
_SUB_BYTE_TYPES = {
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, name)
}
# the typed field that holds each element type's values when raw_data is not used, and values per element
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    onnx.TensorProto.STRING: ("string_data", 1),
}


# element types whose raw_data numpy reads as it is (little-endian, a numpy dtype of its own)
_PLAIN_RAW_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BOOL,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
}  # fmt: skip


def _dims_text(dims: Iterable[int]) -> str:
    return "x".join(map(str, dims)) or "scalar"


def tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """Why ``tensor`` cannot be read as the array its dims declare, or None; cheap (no pass over the data).

    Negative dims, an element type ONNX does not define, a declared size beyond
    this machine's memory and a typed value list (``float_data``, …) of another
    length are found here; ``raw_data`` of the wrong length is found by
    :func:`tensor_values`, which reads it anyway.
    """
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        return f"tensor {tensor.name!r} declares negative dims {_dims_text(dims)}"
    if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == onnx.TensorProto.UNDEFINED:
        return f"tensor {tensor.name!r} has {type_name(tensor.data_type)}, not an ONNX element type"
    count = math.prod(dims)
    if tensor.data_type != onnx.TensorProto.STRING:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # a type this onnx cannot map to numpy
            return f"tensor {tensor.name!r} has {type_name(tensor.data_type)}, which cannot be read as numbers here"
        nbytes = (count + 1) // 2 if tensor.data_type in _SUB_BYTE_TYPES else count * itemsize
        if nbytes > memory_budget():
            return f"tensor {tensor.name!r} declares dims {_dims_text(dims)} ({format_bytes(nbytes)}), more than this machine's memory"
    if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None  # read and checked by the loader
    if tensor.HasField("raw_data"):
        return None
    field_name, per_element = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
    stored = len(getattr(tensor, field_name))
    expected = (count + 1) // 2 if tensor.data_type in _SUB_BYTE_TYPES else count * per_element
    if stored != expected:
        return f"tensor {tensor.name!r} declares dims {_dims_text(dims)} ({count} elements), its data holds {stored} values"
    return None


def tensor_values(tensor: onnx.TensorProto) -> npt.NDArray[np.generic]:
    """``numpy_helper.to_array``, with a ``ValueError`` that names the tensor when its data does not match its dims."""
    problem = tensor_problem(tensor)
    if problem is not None:
        raise ValueError(problem)
    if tensor.HasField("raw_data") and tensor.data_type in _PLAIN_RAW_TYPES and sys.byteorder == "little":
        raw = tensor.raw_data  # one copy of the bytes, which the array then shares
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = math.prod(tensor.dims)
        if len(raw) != count * dtype.itemsize:
            dims = _dims_text(tensor.dims)
            raise ValueError(f"tensor {tensor.name!r} declares dims {dims} ({count} elements), its data holds {len(raw)} bytes")
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"tensor {tensor.name!r} cannot be read ({type(exc).__name__}: {exc})") from None


def _tensor_of_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node: its ``value``, or one made from ``value_float(s)`` / ``value_int(s)``."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            tensor: onnx.TensorProto = attr.t
            return tensor
        scalar = {"value_float": (attr.f, np.float32), "value_int": (attr.i, np.int64)}.get(attr.name)
        if scalar is not None:
            return numpy_helper.from_array(np.array(scalar[0], dtype=scalar[1]))
        listed = {"value_floats": (attr.floats, np.float32), "value_ints": (attr.ints, np.int64)}.get(attr.name)
        if listed is not None:
            return numpy_helper.from_array(np.array(list(listed[0]), dtype=listed[1]))
    return None


# pure ops whose output is a constant when their inputs are: exporters leave such chains on weights when they
# do not fold constants (a Transpose of a TF kernel, a Reshape, a Mul by a scale)
FOLDABLE = {
    "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather", "Expand", "Tile",
    "Mul", "Div", "Add", "Sub", "Neg", "Sqrt", "Reciprocal", "Pow", "Identity", "Cast", "ConstantOfShape",
}  # fmt: skip
# also folded, by what they read of their input rather than its value: Shape (the shape of a constant or of a
# tensor whose type fixes it) and CastLike (the element type of its second input). Exporters build parameters
# this way, e.g. torch's dynamo exporter without its optimizer gives a bias-less Conv the zero bias
# Expand(CastLike(0, x), Shape(W)[:1]).
FOLDABLE_BY_TYPE = {"Shape", "CastLike"}
MAX_FOLD_DEPTH = 16


def _value_type(name: str, scope: Scope) -> onnx.TypeProto | None:
    """The declared type of ``name`` (graph input, output or value_info) in ``scope`` or an outer graph."""
    current: Scope | None = scope
    while current is not None:
        if current.graph is not None:
            for value in (*current.graph.input, *current.graph.value_info, *current.graph.output):
                if value.name == name and value.type.HasField("tensor_type"):
                    declared: onnx.TypeProto = value.type
                    return declared
        current = current.parent
    return None


def _elem_type(name: str, scope: Scope, depth: int) -> int | None:
    """The element type of ``name``: declared, or that of the constant it is; None when unknown."""
    declared = _value_type(name, scope)
    if declared is not None and declared.tensor_type.elem_type:
        return int(declared.tensor_type.elem_type)
    value = _constant_value(name, scope, depth + 1)
    if isinstance(value, str):
        return None
    try:
        return int(helper.np_dtype_to_tensor_dtype(value.dtype))
    except (KeyError, TypeError, ValueError):
        return None


def _static_dims(name: str, scope: Scope, depth: int) -> list[int] | None:
    """The shape of ``name`` when it is fixed: an initializer's dims (without reading its data), a declared
    shape of known dims, or a constant expression's shape."""
    current: Scope | None = scope
    while current is not None:
        if name in current.initializers:
            return [int(d) for d in current.initializers[name].dims]
        if name in current.producers or name in current.inputs:
            break
        current = current.parent
    declared = _value_type(name, scope)
    if declared is not None and declared.tensor_type.HasField("shape"):
        dims = declared.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            return [int(d.dim_value) for d in dims]
    value = _constant_value(name, scope, depth + 1)
    return None if isinstance(value, str) else [int(d) for d in value.shape]


def stored_dims(name: str, scope: Scope) -> list[int] | None:
    """The dims of the constant behind ``name`` — through Identity, Cast and DequantizeLinear, which keep
    them — without reading its data; None when it is not a constant of fixed shape."""
    current: Scope | None = scope
    for _ in range(64):
        if current is None:
            return None
        producer = current.producers.get(name)
        if producer is not None and producer.op_type in ("Identity", "Cast", "DequantizeLinear") and producer.input:
            name = producer.input[0]
            continue
        if name in current.initializers or producer is not None:
            return _static_dims(name, current, 0)
        if name in current.inputs:
            return None
        current = current.parent
    return None


def _fold_by_type(node: onnx.NodeProto, scope: Scope, depth: int) -> npt.NDArray[np.generic] | str:
    """Shape and CastLike, which need only the shape or the element type of one input."""
    if node.op_type == "Shape":
        dims = _static_dims(node.input[0], scope, depth)
        if dims is None:
            return "computed at run time (by Shape of a tensor whose shape is not fixed)"
        try:
            start, end = attr_int(node, "start", 0), attr_int(node, "end", None)
        except InvalidAttribute as exc:
            return f"computed by a Shape whose {exc}"
        # ONNX clamps start/end into [0, rank] after adding the rank to negative values: Python slicing does the same
        return np.array(dims[start:end], dtype=np.int64)
    value = _constant_value(node.input[0], scope, depth + 1)
    if isinstance(value, str):
        return value
    target = _elem_type(node.input[1], scope, depth)
    if target is None:
        return "computed at run time (by CastLike to a type not known before run time)"
    return value.astype(helper.tensor_dtype_to_np_dtype(target))


def _constant_value(name: str, scope: Scope, depth: int = 0) -> npt.NDArray[np.generic] | str:
    """The value of ``name`` when it is a constant expression, else the reason it is not."""
    current: Scope | None = scope
    while current is not None:
        if name in current.initializers:
            return _read(current.initializers[name])
        if name in current.inputs:
            return f"computed at run time (from input {name!r})"
        producer = current.producers.get(name)
        if producer is None:
            current = current.parent
            continue
        if producer.op_type == "Constant":
            tensor = _tensor_of_constant(producer)
            return _read(tensor) if tensor is not None else "a Constant without a tensor value"
        if producer.op_type == "DequantizeLinear":
            return "quantized (DequantizeLinear)"
        if producer.op_type in FOLDABLE_BY_TYPE and producer.domain in ("", "ai.onnx") and depth < MAX_FOLD_DEPTH:
            return _fold_by_type(producer, current, depth)
        if producer.op_type not in FOLDABLE or producer.domain not in ("", "ai.onnx") or depth >= MAX_FOLD_DEPTH:
            return f"computed at run time (by {producer.op_type})"
        values = []
        for item in producer.input:
            value = _constant_value(item, current, depth + 1) if item else None
            if isinstance(value, str):
                return value
            values.append(value)
        return _evaluate(producer, values, current.opset)
    return "not a constant (produced outside any known scope)"


def _read(tensor: onnx.TensorProto) -> npt.NDArray[np.generic] | str:
    try:
        return tensor_values(tensor)
    except ValueError as exc:
        return str(exc)


def _output_elements(node: onnx.NodeProto, values: list[npt.NDArray[np.generic] | None]) -> int | None:
    """Elements of the result of the ops that can make a large tensor from small inputs, before running them."""
    try:
        if node.op_type == "ConstantOfShape" and values and values[0] is not None:
            return math.prod(int(d) for d in np.asarray(values[0]).reshape(-1))
        if node.op_type == "Expand" and len(values) > 1 and values[0] is not None and values[1] is not None:
            target = [int(d) for d in np.asarray(values[1]).reshape(-1)]
            shape = list(values[0].shape)
            width = max(len(target), len(shape))
            padded = [1] * (width - len(shape)) + shape
            target = [1] * (width - len(target)) + target
            return math.prod(max(a, b) for a, b in zip(padded, target, strict=True))
        if node.op_type == "Tile" and len(values) > 1 and values[0] is not None and values[1] is not None:
            return values[0].size * math.prod(int(r) for r in np.asarray(values[1]).reshape(-1))
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def _evaluate(node: onnx.NodeProto, values: list[npt.NDArray[np.generic] | None], opset: int) -> npt.NDArray[np.generic] | str:
    """Run one node of a constant expression with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    elements = _output_elements(node, values)
    if elements is not None and elements * 8 > memory_budget():
        return f"computed by a {node.op_type} of {elements:,} elements, more than this machine's memory"

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    copy = helper.make_node(node.op_type, names, ["out"], domain=node.domain)
    copy.attribute.extend(node.attribute)
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values, strict=True) if v is not None]
    graph = helper.make_graph([copy], "fold", [], [helper.make_empty_tensor_value_info("out")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or onnx.defs.onnx_opset_version())])
    try:
        with np.errstate(all="ignore"):  # a NaN in a constant expression is reported where the weight is used
            outputs: Any = ReferenceEvaluator(model).run(None, {})
        return np.asarray(outputs[0])
    except Exception as exc:  # the reference evaluator's errors have no common base
        return f"computed by a {node.op_type} that could not be evaluated ({type(exc).__name__})"


def resolve_weight(name: str, scope: Scope) -> WeightSource | str:
    """The constant behind ``name`` or the reason it is not one.

    Identity and Cast nodes are followed (the Cast is remembered so factors are
    stored before it); a pure expression of constants (:data:`FOLDABLE`) is
    evaluated and stands for a weight of its own.
    """
    cast_to: int | None = None
    current: Scope | None = scope
    hops = 0
    while current is not None and hops < 64:
        hops += 1
        if name in current.initializers:
            # an initializer listed as a graph input too is taken as the constant it is in practice
            # (IR < 4 requires the listing; exporters' keep_initializers_as_inputs produces it)
            tensor = current.initializers[name]
            problem = tensor_problem(tensor)
            if problem is not None:
                return f"weight {problem}"
            return WeightSource(name, current, tensor, tensor.data_type, cast_to)
        if name in current.inputs:
            return "weight is an input of its graph or function, not a constant"
        producer = current.producers.get(name)
        if producer is None:
            current = current.parent
            continue
        op = producer.op_type
        if op == "Constant":
            constant = _tensor_of_constant(producer)
            if constant is None:
                return "weight Constant has no tensor value"
            problem = tensor_problem(constant)
            if problem is not None:
                return f"weight {problem}"
            return WeightSource(name, current, constant, constant.data_type, cast_to)
        if op in ("Identity", "Cast") and (not producer.input or not producer.input[0]):
            return f"weight is produced by an {op} without an input"
        if op == "Identity":
            name = producer.input[0]
            continue
        if op == "Cast":
            try:
                to = attr_int(producer, "to", None)
            except InvalidAttribute as exc:
                return f"weight Cast: {exc}"
            if to is None:
                return "weight Cast has no 'to' attribute"
            if cast_to is None:
                cast_to = to
            name = producer.input[0]
            continue
        value = _constant_value(name, current)
        if isinstance(value, str):
            return f"weight is {value}"
        try:
            data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        except (KeyError, TypeError, ValueError):
            return f"weight has dtype {value.dtype}"
        return WeightSource(name, current, value, data_type, cast_to)
    return "weight is not a constant (produced outside any known scope)"


def remove_unused(model: onnx.ModelProto, touched: set[tuple[int, str]]) -> None:
    """Drop the constants (and the constant expressions feeding them) the rewrite left without a consumer."""
    pending = set(touched)
    while pending:
        uses: dict[tuple[int, str], int] = {}
        for scope in iter_scopes(model):
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
        for scope in iter_scopes(model):
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
                    removable = n.op_type == "Constant" or n.op_type in FOLDABLE or n.op_type in FOLDABLE_BY_TYPE
                    if name in n.output and removable and len(n.output) == 1:
                        next_pending.update((ns, x) for x in n.input if x)
                        del scope.nodes[i]
                        break
        pending = next_pending


def add_constant(
    model: onnx.ModelProto,
    names: Names,
    owner: Scope,
    user: Scope,
    before: int,
    base: str,
    tensor_values: npt.NDArray[np.generic],
    cast_to: int | None = None,
) -> tuple[str, int]:
    """Store a constant where ``user``'s node at index ``before`` can read it.

    In a graph it becomes an initializer of ``owner`` (the scope that held the
    original weight); in a function body, a Constant node inserted before the
    user. With ``cast_to`` a Cast node follows. Returns the name to read and how
    many nodes were inserted into ``user`` before ``before``.
    """
    stored = names.fresh(base)
    tensor = numpy_helper.from_array(tensor_values, stored)
    inserted = 0
    if owner.graph is not None:
        owner.graph.initializer.append(tensor)
        owner.initializers[stored] = tensor
        if owner.parent is None and model.ir_version < 4:  # IR 3 lists every initializer as an input
            owner.graph.input.append(helper.make_tensor_value_info(stored, tensor.data_type, list(tensor.dims)))
    else:
        node = helper.make_node("Constant", [], [stored], name=names.fresh(stored + "/constant"), value=tensor)
        user.nodes.insert(before, node)
        inserted += 1
    if cast_to is None:
        return stored, inserted
    cast_out = names.fresh(stored + "/cast")
    cast = helper.make_node("Cast", [stored], [cast_out], name=names.fresh(stored + "/Cast"), to=cast_to)
    user.nodes.insert(before + inserted, cast)
    return cast_out, inserted + 1
