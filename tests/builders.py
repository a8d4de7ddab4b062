"""Small ONNX models for the tests, built with onnx.helper and seeded numpy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def conv_model(
    *,
    n: int = 8,
    c: int = 6,
    kernel: Sequence[int] = (3, 3),
    group: int = 1,
    bias: bool = True,
    input_shape: Sequence[Any] = (1, 6, 12, 12),
    attrs: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: int = TensorProto.FLOAT,
    opset: int = 17,
    name: str = "conv",
) -> onnx.ModelProto:
    """One Conv from input ``x`` to output ``y`` with an initializer weight (and bias)."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w = rng.standard_normal((n, c // group, *kernel)).astype(np_dtype)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np_dtype), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name=name, group=group, **(attrs or {}))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", dtype, list(input_shape))],
        [helper.make_tensor_value_info("y", dtype, ["n", "c", "h", "w"][: len(input_shape)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    return model


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
) -> onnx.ModelProto:
    """A model from nodes, graph inputs/outputs and named numpy initializers (IR version <= 8)."""
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    return model


def conv_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's Conv nodes, in graph order."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime on CPU (no graph optimizations: the graph as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def tiny_cnn(cast_weights: bool = False, extra_output: bool = False) -> onnx.ModelProto:
    """x (N, 3, 8, 8) → Conv 3→8 → Relu → Conv 8→8 → Relu → GlobalAveragePool → Flatten → Gemm → logits (N, 5).

    ``cast_weights``: the conv weights stored as fp16 initializers behind a Cast to float (mixed precision).
    ``extra_output``: the second Relu's output is a graph output too (a feature map: MSE).
    """
    f32 = TensorProto.FLOAT
    rng = np.random.default_rng(7)
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.4,
        "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
        "fc": rng.standard_normal((5, 8)).astype(np.float32),
        "fcb": rng.standard_normal(5).astype(np.float32) * 0.1,
    }
    nodes = []
    if cast_weights:
        for key in ("w1", "w2"):
            weights[f"{key}_half"] = weights.pop(key).astype(np.float16)
            nodes.append(helper.make_node("Cast", [f"{key}_half"], [key], to=f32, name=f"cast_{key}"))
    nodes += [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["n", 5])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r2", f32, ["n", 8, 8, 8]))
    return make_model(nodes, [helper.make_tensor_value_info("x", f32, ["n", 3, 8, 8])], outputs, weights)
