"""An independent count of the MACs a model runs: the shapes onnxruntime's profiler records for every executed node.

The profiler logs each node that runs — in If branches and Loop bodies too, once per execution — with the
shapes of its activations. Weights it may leave out are read from the model. Graph optimizations are off, so
the nodes are the model's own. Counted: Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN, at batch 1 as
the input gives it.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def _constant_dims(graph: onnx.GraphProto, out: dict[str, list[int]]) -> dict[str, list[int]]:
    for tensor in graph.initializer:
        out[tensor.name] = list(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = list(attr.t.dims)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _constant_dims(attr.g, out)
            for g in attr.graphs:
                _constant_dims(g, out)
    return out


def profiled_macs(model: onnx.ModelProto, feeds: Mapping[str, Any]) -> int:
    """MACs of one inference of ``model`` on ``feeds``, from the shapes onnxruntime saw."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = {}
    for i, node in enumerate(_nodes(copy.graph)):
        node.name = f"counted_{i}"  # unique names, so every profiler event maps to one node
        nodes[node.name] = node
    dims = _constant_dims(copy.graph, {})
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    total = 0
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = nodes.get(event["name"].removesuffix("_kernel_time"))
        if node is None:
            continue
        args = event["args"]
        inputs = [next(iter(x.values())) for x in args.get("input_type_shape", [])]
        outputs = [next(iter(x.values())) for x in args.get("output_type_shape", [])]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = dims.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv":
            total += math.prod(weight) * math.prod(outputs[0][2:]) * outputs[0][0]  # type: ignore[arg-type]
        elif node.op_type == "ConvTranspose":
            total += math.prod(weight) * math.prod(inputs[0][2:]) * inputs[0][0]  # type: ignore[arg-type]
        elif node.op_type == "MatMul":
            total += math.prod(outputs[0]) * inputs[0][-1]
        elif node.op_type == "Gemm":
            total += math.prod(outputs[0]) * (inputs[0][0] if attrs.get("transA", 0) else inputs[0][1])
        elif node.op_type in ("LSTM", "GRU", "RNN"):
            gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type]
            hidden = int(attrs["hidden_size"])
            steps, batch, features = inputs[0]
            directions = 2 if attrs.get("direction", b"forward") == b"bidirectional" else 1
            total += steps * batch * directions * gates * hidden * (features + hidden)
    return int(total)


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
