"""Static tensor shapes for the cost model, without copying the weights.

ONNX shape inference needs only the dims of large tensors, never their bytes.
So large initializers and Constant values are swapped for data-less stand-ins
(marked as external data that is never read) while a skeleton copy of the model
is taken, and put back at once; the skeleton, a few kilobytes, is what
shape inference sees. Symbolic batch dims (the first dim of a graph input) are
set to 1; other symbolic dims stay unknown unless ``overrides`` gives a shape
(a name in ``overrides`` that is not an input of the model is an error).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import onnx
from onnx import helper

from .errors import LowRankError
from .model_io import copy_fields

__all__ = ["Shape", "infer_shapes"]

Shape = tuple[int | None, ...]

_SMALL = 4096  # bytes; smaller tensors keep their data (Reshape targets, pads, ...)


def _is_large(tensor: onnx.TensorProto) -> bool:
    # element count, not ByteSize(): sizing a large message costs a pass over it
    return bool(math.prod(tensor.dims) * 2 > _SMALL)


def _stand_in(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's name, type and dims, its data marked as external data that is never read."""
    stand_in = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stand_in.data_location = onnx.TensorProto.EXTERNAL
    stand_in.external_data.add(key="location", value="__shape_only__")
    return stand_in


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers and Constant values are data-less stand-ins.

    Built field by field, so no weight byte is copied (a protobuf arena does not
    give back the memory of a cleared field, so swapping data out and back in
    would cost a copy of the weights that stays).
    """
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip=("graph",))
    graph = skeleton.graph
    copy_fields(model.graph, graph, skip=("initializer", "node"))
    for tensor in model.graph.initializer:
        graph.initializer.append(_stand_in(tensor) if _is_large(tensor) else tensor)
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and _is_large(value):
            graph.node.append(helper.make_node("Constant", [], list(node.output), name=node.name, value=_stand_in(value)))
        else:
            graph.node.append(node)
    return skeleton


def _dims(type_proto: onnx.TypeProto) -> Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def infer_shapes(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, Shape]:
    """Known shapes of tensors by name (dims that stay symbolic are ``None``)."""
    skeleton = _skeleton(model)
    overrides = dict(overrides or {})
    initializer_names = {t.name for t in skeleton.graph.initializer}
    feedable = [v.name for v in skeleton.graph.input if v.name not in initializer_names]
    unknown = sorted(set(overrides) - set(feedable))
    if unknown:
        raise LowRankError(f"--input-shape: the model has no input {unknown[0]!r} (its inputs: {', '.join(feedable) or 'none'})")
    for value in skeleton.graph.input:
        if value.name in initializer_names or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if value.name in overrides:
            wanted = list(overrides[value.name])
            shape.ClearField("dim")
            for d in wanted:
                shape.dim.add(dim_value=int(d))
        elif shape.dim and not shape.dim[0].HasField("dim_value"):
            shape.dim[0].Clear()
            shape.dim[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is an aid to the cost model; a model it cannot handle still converts
        inferred = skeleton
    shapes: dict[str, Shape] = {}
    for graph in _graphs(inferred.graph):
        for value in [*graph.input, *graph.value_info, *graph.output]:
            dims = _dims(value.type)
            if dims is not None:
                shapes.setdefault(value.name, dims)
        for tensor in graph.initializer:
            shapes.setdefault(tensor.name, tuple(tensor.dims))
    return shapes
