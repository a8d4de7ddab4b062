"""Trained tensors back into the converted model's initializers, by name and in each initializer's own dtype.

Only the named initializers change: each keeps its name, dims, data type, doc string and place in the
list, and gets its new values as ``raw_data`` (the fields that held the old values are cleared). Every
other initializer, every node and every other field of the model stays byte-identical. A tensor stored in
external data is refused: the model must be loaded with its data first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..errors import LowRankError

__all__ = ["check_in_memory", "write_back"]

_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_in_memory(model: onnx.ModelProto, what: str) -> None:
    """:class:`LowRankError` when a main-graph initializer of ``model`` is still in an external file."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise LowRankError(
                f"initializer {tensor.name!r} of the {what} model is stored in external data that is not loaded: "
                "load the model with its data (onnx.load(path) with load_external_data=True) first"
            )


def write_back(converted: onnx.ModelProto, arrays: Mapping[str, npt.NDArray[Any]]) -> onnx.ModelProto:
    """A copy of ``converted`` whose initializers ``arrays`` names hold the given values.

    A bfloat16 initializer takes its values as the uint16 bit patterns (numpy has no bfloat16).
    """
    out = onnx.ModelProto()
    out.CopyFrom(converted)
    tensors = {t.name: t for t in out.graph.initializer}
    for name, values in arrays.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise LowRankError(f"trained tensor {name!r} is not an initializer of the converted model")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            check_in_memory(out, "converted")
        if tuple(values.shape) != tuple(tensor.dims):
            raise LowRankError(f"trained tensor {name!r} has shape {tuple(values.shape)}, its initializer {tuple(tensor.dims)}")
        if tensor.data_type == onnx.TensorProto.BFLOAT16:
            stored = np.ascontiguousarray(values, dtype=np.uint16)
        else:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            stored = np.ascontiguousarray(values, dtype=dtype)
        for field_name in _VALUE_FIELDS:
            tensor.ClearField(field_name)
        tensor.raw_data = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
    return out
