"""Tensor shapes known before running a model, and the inputs a run is made on.

:func:`infer_shapes` gives static shapes without copying the weights.

ONNX shape inference needs only the dims of large tensors, never their bytes.
So large initializers and Constant values are swapped for data-less stand-ins
(marked as external data that is never read) while a skeleton copy of the model
is taken, and put back at once; the skeleton, a few kilobytes, is what
shape inference sees. Symbolic batch dims (the first dim of a graph input) are
set to 1; other symbolic dims stay unknown unless ``overrides`` gives a shape
(a name in ``overrides`` that is not an input of the model is an error).

:func:`input_specs`, :func:`concrete_input_shapes` and :func:`random_feed`
build the concrete inputs every run of the tool uses (the reference run that
sizes the layers, ``--measure`` timing, ``verify``'s random inputs): the shape
``--input-shape`` gives, else the declared one with a symbolic first (batch)
dim set to 1. Any other symbolic dim has no size to guess, and the input is
named as needing ``--input-shape``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from .data_io import InputSpec, check_allocation
from .errors import LowRankError
from .model_io import copy_fields

__all__ = [
    "Shape",
    "check_input_shapes",
    "concrete_input_shapes",
    "infer_shapes",
    "needs_input_shape_message",
    "random_feed",
    "session_input_specs",
]

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


# --------------------------------------------------------------------------- inputs of a run

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session_input_specs(session: Any) -> list[InputSpec]:
    """:class:`InputSpec` s of an onnxruntime session's inputs (for models given as files)."""
    specs = []
    for value in session.get_inputs():
        dtype = _ORT_TYPES.get(value.type)
        dims = None if value.shape is None else tuple(d if isinstance(d, int) and d > 0 else (d or None) for d in value.shape)
        type_name = str(value.type).removeprefix("tensor(").removesuffix(")")
        specs.append(InputSpec(value.name, np.dtype(dtype) if dtype is not None else None, dims, type_name))
    return specs


def check_input_shapes(specs: Sequence[InputSpec], input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values checked against the model's inputs: a known input, its rank, its fixed dims."""
    given: dict[str, tuple[int, ...]] = {}
    by_name = {spec.name: spec for spec in specs}
    for name, shape in (input_shapes or {}).items():
        dims = tuple(int(d) for d in shape)
        spec = by_name.get(name)
        if spec is None:
            names = ", ".join(by_name) or "none"
            raise LowRankError(f"--input-shape {name}=...: the model has no input {name!r} (its inputs: {names})")
        text = f"--input-shape {name}={','.join(map(str, dims))}"
        if any(d < 1 for d in dims):
            raise LowRankError(f"{text}: dims must be whole numbers >= 1")
        if spec.dims is not None:
            if len(dims) != len(spec.dims):
                raise LowRankError(f"{text}: input {name!r} has {len(spec.dims)} dims {spec.show()}, not {len(dims)}")
            for axis, (want, got) in enumerate(zip(spec.dims, dims, strict=True)):
                if isinstance(want, int) and want != got:
                    raise LowRankError(f"{text}: dim {axis} of input {name!r} is fixed at {want} by the model {spec.show()}")
        given[name] = dims
    return given


def concrete_input_shapes(
    specs: Sequence[InputSpec], input_shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The shape of every input for a run, and the inputs that have none (name → what is symbolic).

    ``--input-shape`` wins; else the declared dims, a symbolic first dim taken as ``batch``.
    """
    given = check_input_shapes(specs, input_shapes)
    shapes: dict[str, tuple[int, ...]] = {}
    missing: dict[str, str] = {}
    for spec in specs:
        if spec.name in given:
            shapes[spec.name] = given[spec.name]
            continue
        if spec.dims is None:
            missing[spec.name] = f"its rank is not declared: give --input-shape {spec.name}=D0,D1,..."
            continue
        dims: list[int] = []
        symbolic: list[str] = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            else:
                symbolic.append(f"{d or '?'} (dim {axis})")
        if symbolic:
            template = ",".join(
                str(d) if isinstance(d, int) else "1" if i == 0 else str(d or f"D{i}").upper() for i, d in enumerate(spec.dims)
            )
            missing[spec.name] = f"dims {', '.join(symbolic)} of {spec.show()} are symbolic: give --input-shape {spec.name}={template}"
        else:
            shapes[spec.name] = tuple(dims)
    return shapes, missing


def needs_input_shape_message(missing: Mapping[str, str]) -> str:
    """One line naming the inputs that need ``--input-shape`` (``missing`` from :func:`concrete_input_shapes`)."""
    return "; ".join(f"input {name!r}: {why}" for name, why in missing.items()) + " (or give calibration data)"


def random_feed(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Seeded random values of the given shapes: standard normal floats, small non-negative integers, fair booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, npt.NDArray[Any]] = {}
    for spec in specs:
        shape = [int(d) for d in shapes[spec.name]]
        if spec.dtype is None:
            kind = f"type {spec.type_name}" if spec.type_name else "a type"
            raise LowRankError(f"input {spec.name!r} has {kind}, which the tool cannot make random values of; give inputs from a file")
        # the values are drawn in float64, then cast: both copies live at once
        check_allocation(math.prod(shape) * (8 + spec.dtype.itemsize), f"random input {spec.name!r} of shape {tuple(shape)}")
        if np.issubdtype(spec.dtype, np.floating):
            value = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            value = np.asarray(rng.random(shape) < 0.5)
        else:
            value = rng.integers(0, 10, size=shape).astype(spec.dtype)
        feeds[spec.name] = np.asarray(value)  # a 0-d input is an array too, never a numpy scalar
    return feeds
