"""A seeded fuzzer of the command line: mutated models, malformed data files and flag values.

Each case is made from one integer seed (so any failure is replayed with
``benchmarks/fuzz.py --case SEED``): a base model — small models built here
and the shipped ``models/digits_cnn.onnx`` / ``models/vgg16_small.onnx`` (read,
never modified) — is mutated, then run through ``decompose``, ``inspect`` or
``verify`` with flags and data files drawn at random. Mutations:

* bytes: flipped, zeroed, inserted or duplicated spans, a truncation, and a text
  field made invalid UTF-8;
* structure: every attribute the tool reads (Conv/ConvTranspose ``strides``,
  ``dilations``, ``pads``, ``group``, ``kernel_shape``, ``auto_pad``,
  ``output_padding``, ``output_shape``; BatchNormalization ``epsilon``,
  ``training_mode``, ``spatial``; Gemm ``transA``/``transB``/``alpha``/``beta``)
  set to wrong lengths, signs, sizes and types, given twice, removed or made a
  function-attribute reference; weights with dims that contradict their data,
  other element types, NaN/Inf, empty or huge dims; BatchNormalization
  parameters of other lengths or negative variance; MatMul weights of other
  shapes; node names, inputs, domains and op types; opset imports, IR versions,
  graph input shapes and value_info;
* data files (``--calibration``, ``--verify-inputs``, ``verify --inputs``): zero
  samples, scalars, wrong dtype/shape/rank, NaN, files that start like a zip and
  are not, truncated archives, headers declaring huge arrays, pickled objects;
* samples (``--sample``, one input set without a sample axis): missing inputs,
  extra arrays, a sample axis the model does not have, wrong dtypes and shapes,
  NaN, a scalar for a tensor, headers declaring huge arrays, files that are not
  archives; with ``--branches all`` at times. The ``rate-if`` base (an int64
  scalar ``sr`` whose value picks an If branch) is fuzzed on its own slice
  (:data:`SAMPLE_BUILDERS`), so the seeds of the other slices keep their cases;
* flags: policies, ranks files, regexes, ``--input-shape`` values (absent
  inputs, wrong ranks, sizes beyond memory), report paths, output folders.

:func:`run_case` runs one case in a fresh folder and returns the outcome class
and the contract violations (:mod:`cli_contract`), plus one check the contract
adds for ``decompose``: an output written with exit 0 loads in onnxruntime
whenever the input did.
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from builders import conv_model, make_model
from cli_contract import Outcome, run_cli, snapshot, violations
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"digits": ROOT / "models" / "digits_cnn.onnx", "vgg": ROOT / "models" / "vgg16_small.onnx"}

Mutation = Callable[[random.Random, onnx.ModelProto], str]


# --------------------------------------------------------------------------- base models


def _vi(name: str, shape: list[Any] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {
        "W": rng.standard_normal((8, 6, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(8).astype(np.float32),
        "gamma": (rng.random(8) + 0.5).astype(np.float32),
        "beta": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": (rng.random(8) + 0.5).astype(np.float32),
        "W2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn_out"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2", strides=[2, 2], dilations=[1, 1], pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [_vi("x", ["n", 6, 12, 12])], [_vi("y", ["n", 8, 6, 6])], inits)


def _conv_transpose() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    node = helper.make_node(
        "ConvTranspose", ["x", "W", "B"], ["y"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]
    )
    inits = {"W": rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "B": rng.standard_normal(4).astype(np.float32)}
    return make_model([node], [_vi("x", [1, 6, 8, 8])], [_vi("y", None)], inits)


def _gemm() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="fc1", transB=1, alpha=1.0, beta=1.0),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "M"], ["y"], name="fc2"),
    ]
    inits = {
        "W": rng.standard_normal((24, 32)).astype(np.float32),
        "C": rng.standard_normal(24).astype(np.float32),
        "M": rng.standard_normal((24, 16)).astype(np.float32),
    }
    return make_model(nodes, [_vi("x", ["n", 32])], [_vi("y", ["n", 16])], inits)


def _constant_weight() -> onnx.ModelProto:
    """A conv whose weight is a Constant node behind a Cast (as TF exports write it)."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float16), "w16")
    nodes = [
        helper.make_node("Constant", [], ["w16"], name="const", value=w),
        helper.make_node("Cast", ["w16"], ["w32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w32"], ["y"], name="conv", auto_pad="SAME_UPPER"),
    ]
    return make_model(nodes, [_vi("x", [1, 4, 10, 10])], [_vi("y", None)])


def _conv_in_if() -> onnx.ModelProto:
    """A conv inside each branch of an If (audio models have these)."""

    def branch(name: str, seed: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((4, 4, 3, 3)).astype(np.float32), f"{name}_W")
        node = helper.make_node("Conv", ["x", f"{name}_W"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1])
        return helper.make_graph([node], name, [], [_vi(f"{name}_y", None)], [w])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 6), else_branch=branch("else", 7)),
    ]
    return make_model(nodes, [_vi("x", [1, 4, 9, 9])], [_vi("y", None)], {"zero": np.array(0.0, np.float32)})


def _conv_in_function() -> onnx.ModelProto:
    """A conv inside a model-local function whose strides come from the call (a function-attribute reference)."""
    rng = np.random.default_rng(8)
    strides = onnx.AttributeProto(name="strides", ref_attr_name="s", type=onnx.AttributeProto.INTS)
    body = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32))),
        helper.make_node("Conv", ["x", "w"], ["y"], name="fconv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y", "w"], ["z"], name="fconv_ref", pads=[1, 1, 1, 1]),
    ]
    body[2].attribute.append(strides)
    function = helper.make_function("local", "Block", ["x"], ["z"], body, [helper.make_opsetid("", 17)], attributes=["s"])
    call = helper.make_node("Block", ["x"], ["z"], name="call", domain="local", s=[1, 1])
    model = make_model([call], [_vi("x", [1, 4, 8, 8])], [_vi("z", None)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    return model


def _rate_if() -> onnx.ModelProto:
    """A conv per branch of an If on ``sr == 16000``, ``sr`` an int64 scalar input (as voice-activity models take the
    sample rate), a float input ``x`` and a float ``state`` added after the If."""
    rng = np.random.default_rng(9)

    def branch(name: str, kernel: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((4, 4, kernel, kernel)).astype(np.float32), f"{name}_W")
        node = helper.make_node("Conv", ["x", f"{name}_W"], [f"{name}_y"], name=f"{name}_conv", pads=[kernel // 2] * 4)
        return helper.make_graph([node], name, [], [_vi(f"{name}_y", None)], [w])

    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="equal"),
        helper.make_node("If", ["is16k"], ["f"], name="if", then_branch=branch("then", 3), else_branch=branch("else", 5)),
        helper.make_node("Add", ["f", "state"], ["y"], name="add"),
    ]
    inputs = [_vi("x", ["n", 4, 9, 9]), _vi("state", [1, 4, 9, 9]), _vi("sr", [], TensorProto.INT64)]
    return make_model(nodes, inputs, [_vi("y", None)], {"rate": np.array(16000, np.int64)})


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv-in-function": _conv_in_function,
    "conv": lambda: conv_model(input_shape=("n", 6, 12, 12)),
    "group-conv": lambda: conv_model(n=8, c=6, group=2, input_shape=(1, 6, 10, 10), attrs={"pads": [1, 1, 1, 1]}),
    "conv1d": lambda: conv_model(kernel=(3,), input_shape=(1, 6, 16)),
    "conv3d": lambda: conv_model(kernel=(3, 3, 3), input_shape=(1, 6, 6, 6, 6)),
    "conv-bn": _conv_bn,
    "conv-transpose": _conv_transpose,
    "gemm-matmul": _gemm,
    "constant-weight": _constant_weight,
    "conv-in-if": _conv_in_if,
}


# bases fuzzed on a slice of their own (test_fuzz.py), with a --sample in most cases
SAMPLE_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {"rate-if": _rate_if}


@functools.cache
def base_bytes(name: str) -> bytes:
    if name in SHIPPED:
        return SHIPPED[name].read_bytes()
    return {**BUILDERS, **SAMPLE_BUILDERS}[name]().SerializeToString()


# --------------------------------------------------------------------------- structure-aware mutations


def _pick_node(rng: random.Random, model: onnx.ModelProto, ops: tuple[str, ...]) -> onnx.NodeProto | None:
    nodes = [n for g in _graphs(model.graph) for n in g.node if n.op_type in ops]
    return rng.choice(nodes) if nodes else None


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _graphs(attr.g)
    return out


def _int_values(rng: random.Random) -> list[int]:
    length = rng.choice([0, 1, 2, 3, 4, 5, 6])
    pool = [0, 1, 1, 2, 3, -1, -5, 2**31, 2**62, 7]
    return [rng.choice(pool) for _ in range(length)]


def _set_attr(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == attr.name:
            del node.attribute[i]
            break
    node.attribute.append(attr)


CONV_ATTRS = ("strides", "dilations", "pads", "group", "kernel_shape", "auto_pad", "output_padding", "output_shape")


def mutate_conv_attribute(rng: random.Random, model: onnx.ModelProto) -> str:
    node = _pick_node(rng, model, ("Conv", "ConvTranspose"))
    if node is None:
        return "no conv"
    name = rng.choice(CONV_ATTRS)
    how = rng.choice(["ints", "ints", "ints", "int", "float", "string", "remove", "twice", "ref", "near"])
    if how == "remove":
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
    elif how == "twice":
        node.attribute.append(helper.make_attribute(name, [1, 1]))
        node.attribute.append(helper.make_attribute(name, [2, 2]))
    elif how == "ref":
        attr = onnx.AttributeProto(name=name, ref_attr_name="outer", type=onnx.AttributeProto.INTS)
        _set_attr(node, attr)
    elif how == "float":
        _set_attr(node, helper.make_attribute(name, [rng.choice([0.5, 1.0, 2.0, float("nan")]) for _ in range(2)]))
    elif how == "string":
        _set_attr(node, helper.make_attribute(name, rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "", "SAME", "valid"])))
    elif how == "int":
        _set_attr(node, helper.make_attribute(name, rng.choice([0, 1, 2, 3, 4, 8, -1, 2**40])))
    elif how == "near":  # a plausible value: the right length, small numbers
        rank = 2 if name != "pads" else 4
        _set_attr(node, helper.make_attribute(name, [rng.choice([0, 1, 2, 3]) for _ in range(rank)]))
    else:
        _set_attr(node, helper.make_attribute(name, _int_values(rng), attr_type=onnx.AttributeProto.INTS))
    return f"{node.op_type}.{name}:{how}"


def _pick_initializer(rng: random.Random, model: onnx.ModelProto) -> onnx.TensorProto | None:
    tensors = [t for g in _graphs(model.graph) for t in g.initializer]
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type == "Constant":
                tensors += [a.t for a in n.attribute if a.name == "value"]
    return rng.choice(tensors) if tensors else None


def mutate_weight(rng: random.Random, model: onnx.ModelProto) -> str:
    tensor = _pick_initializer(rng, model)
    if tensor is None:
        return "no weight"
    how = rng.choice(["dim", "dim", "add-dim", "drop-dim", "dtype", "truncate-raw", "typed", "nan", "inf", "empty", "scale"])
    if how == "dim" and tensor.dims:
        i = rng.randrange(len(tensor.dims))
        tensor.dims[i] = rng.choice([0, -1, 1, tensor.dims[i] + 1, 2**31, 2**40, 2**62])
    elif how == "add-dim":
        tensor.dims.insert(rng.randrange(len(tensor.dims) + 1), rng.choice([1, 2, 3]))
    elif how == "drop-dim" and tensor.dims:
        del tensor.dims[rng.randrange(len(tensor.dims))]
    elif how == "dtype":
        tensor.data_type = rng.choice(
            [0, TensorProto.INT64, TensorProto.INT8, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.STRING, 99]
        )
    elif how == "truncate-raw" and tensor.HasField("raw_data"):
        tensor.raw_data = tensor.raw_data[: rng.randrange(len(tensor.raw_data) + 1)]
    elif how == "typed":  # values moved to float_data, one too many or too few
        values = numpy_helper.to_array(tensor).astype(np.float32).reshape(-1).tolist() if tensor.HasField("raw_data") else []
        tensor.ClearField("raw_data")
        tensor.float_data.extend(values[: len(values) + rng.choice([-1, 0, 1])] or [1.0])
    elif how in ("nan", "inf", "scale") and tensor.HasField("raw_data") and tensor.data_type == TensorProto.FLOAT:
        values = numpy_helper.to_array(tensor).copy()
        if values.size:
            flat = values.reshape(-1)
            if how == "scale":
                flat *= np.float32(rng.choice([0.0, 1e30, -1e-30]))
            else:
                idx = rng.sample(range(flat.size), min(flat.size, rng.choice([1, 3, flat.size])))
                flat[idx] = np.nan if how == "nan" else rng.choice([np.inf, -np.inf])
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    elif how == "empty":
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    return f"weight:{how}"


def mutate_batchnorm(rng: random.Random, model: onnx.ModelProto) -> str:
    bn = _pick_node(rng, model, ("BatchNormalization",))
    if bn is None:
        return "no bn"
    how = rng.choice(["length", "negative-var", "epsilon", "epsilon-type", "training", "spatial", "drop-input", "extra-output"])
    inits = {t.name: t for t in model.graph.initializer}
    if how == "length":
        name = rng.choice(list(bn.input[1:5]))
        if name in inits:
            length = rng.choice([0, 1, 5, 9, 16])
            inits[name].CopyFrom(numpy_helper.from_array(np.ones(length, np.float32), name))
    elif how == "negative-var" and bn.input[4] in inits:
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(np.full(8, rng.choice([-1.0, -1e-5, 0.0]), np.float32), bn.input[4]))
    elif how == "epsilon":
        _set_attr(bn, helper.make_attribute("epsilon", rng.choice([-1.0, 0.0, float("nan"), float("inf"), 1e30])))
    elif how == "epsilon-type":
        _set_attr(bn, helper.make_attribute("epsilon", rng.choice([1, "eps", [1.0, 2.0]])))
    elif how == "training":
        _set_attr(bn, helper.make_attribute("training_mode", rng.choice([1, 2, -1])))
    elif how == "spatial":
        _set_attr(bn, helper.make_attribute("spatial", 0))
    elif how == "drop-input":
        del bn.input[rng.randrange(1, len(bn.input)) :]
    else:
        bn.output.extend(["running_mean", "running_var"])
    return f"bn:{how}"


def mutate_fc(rng: random.Random, model: onnx.ModelProto) -> str:
    node = _pick_node(rng, model, ("Gemm", "MatMul"))
    if node is None:
        return "no fc"
    how = rng.choice(["transA", "transB", "alpha", "beta", "weight-shape", "input-shape"])
    if how in ("transA", "transB"):
        _set_attr(node, helper.make_attribute(how, rng.choice([0, 1, 2, -1])))
    elif how in ("alpha", "beta"):
        _set_attr(node, helper.make_attribute(how, rng.choice([0.0, float("nan"), 2.0, 3, "x"])))
    elif how == "weight-shape":
        inits = {t.name: t for t in model.graph.initializer}
        if len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            shape = rng.choice([(16, 24), (24,), (2, 24, 16), (24, 0), (1, 1)])
            t.CopyFrom(numpy_helper.from_array(np.ones(shape, np.float32), t.name))
    else:
        value = model.graph.input[0]
        value.type.tensor_type.shape.ClearField("dim")
        for d in rng.choice([[1, 32], [32], [2, 3, 32], [1, 31], [1, 0]]):
            value.type.tensor_type.shape.dim.add(dim_value=d)
    return f"fc:{how}"


def mutate_graph(rng: random.Random, model: onnx.ModelProto) -> str:
    how = rng.choice(
        [
            "opset-remove",
            "opset-version",
            "opset-duplicate",
            "ir-version",
            "input-shape",
            "input-type",
            "value-info",
            "domain",
            "op-type",
            "drop-node-input",
            "clear-node-inputs",
            "clear-node-outputs",
            "rename-input",
            "empty-name",
            "duplicate-output",
            "drop-graph-output",
        ]
    )
    graph = model.graph
    nodes = list(graph.node)
    node = rng.choice(nodes) if nodes else None
    if how == "opset-remove":
        del model.opset_import[:]
    elif how == "opset-version":
        model.opset_import[0].version = rng.choice([0, 1, 6, 9, 11, 13, 22, 1000])
    elif how == "opset-duplicate":
        model.opset_import.add(domain="", version=rng.choice([9, 17]))
    elif how == "ir-version":
        model.ir_version = rng.choice([1, 3, 4, 11, 1000])
    elif how == "input-shape" and graph.input:
        shape = graph.input[0].type.tensor_type.shape
        shape.ClearField("dim")
        for _ in range(rng.choice([0, 1, 2, 3, 4, 5])):
            choice = rng.choice([0, 1, 2, 3, 6, 12, -1, 2**31, "sym"])
            if choice == "sym":
                shape.dim.add(dim_param="d")
            else:
                shape.dim.add(dim_value=int(choice))
    elif how == "input-type" and graph.input:
        graph.input[0].type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.FLOAT16, TensorProto.STRING, 0, 77])
    elif how == "value-info" and node is not None and node.output:
        graph.value_info.append(_vi(node.output[0], [rng.choice([1, 2, 7]) for _ in range(rng.choice([1, 2, 4]))], rng.choice([1, 7, 10])))
    elif how == "domain" and node is not None:
        node.domain = rng.choice(["com.custom", "ai.onnx", "ai.onnx.ml", "com.microsoft"])
    elif how == "op-type" and node is not None:
        node.op_type = rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "NoSuchOp", "QLinearConv", "Identity"])
    elif how == "drop-node-input" and node is not None and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif how == "clear-node-inputs" and node is not None:
        del node.input[:]
    elif how == "clear-node-outputs" and node is not None:
        del node.output[:]
    elif how == "rename-input" and node is not None and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "missing", "x"])
    elif how == "empty-name" and node is not None:
        node.name = ""
    elif how == "duplicate-output" and len(nodes) > 1:
        nodes[0].output[0] = nodes[-1].output[0]
    elif how == "drop-graph-output":
        del graph.output[:]
    return f"graph:{how}"


STRUCTURAL: list[tuple[Mutation, int]] = [
    (mutate_conv_attribute, 5),
    (mutate_weight, 4),
    (mutate_batchnorm, 2),
    (mutate_fc, 2),
    (mutate_graph, 4),
]


# --------------------------------------------------------------------------- byte-level mutations


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    how = rng.choice(["flip", "flip", "zero", "insert", "duplicate", "truncate", "text"])
    if how == "flip":
        for _ in range(rng.choice([1, 2, 8, 32])):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif how == "zero":
        start = rng.randrange(len(buf))
        buf[start : start + rng.choice([1, 4, 64])] = bytes(len(buf[start : start + 64]))[: rng.choice([1, 4, 64])]
    elif how == "insert":
        pos = rng.randrange(len(buf) + 1)
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 16])))
    elif how == "duplicate":
        start = rng.randrange(len(buf))
        buf[start:start] = buf[start : start + rng.choice([2, 16, 256])]
    elif how == "truncate":
        del buf[rng.randrange(len(buf)) :]
    else:  # a text field made invalid UTF-8, same length: the wire format stays valid
        names = sorted(set(re.findall(rb"[A-Za-z_][A-Za-z0-9_./:]{2,}", bytes(buf))))
        if names:
            name = rng.choice(names)
            positions = [m.start() for m in re.finditer(re.escape(name), bytes(buf))]
            pos = rng.choice(positions)
            buf[pos] = rng.choice([0xFF, 0xC3, 0x80, 0xED])
    return bytes(buf), f"bytes:{how}"


# --------------------------------------------------------------------------- data files and flags


def _npz(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _huge_header(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz whose first member's header declares 2^40 rows (the data stays small)."""
    data = _npz(arrays)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            match = re.search(rb"'shape': \((\d+)", payload)
            if match:
                payload = payload[: match.start(1)] + b"1099511627776" + payload[match.end(1) :]
            dst.writestr(info.filename, payload)
    return out.getvalue()


def data_file(rng: random.Random, model_bytes: bytes, pick: Picker) -> tuple[bytes, str]:
    """An .npz for the model's inputs (from the unmutated base), valid or malformed."""
    try:
        model = onnx.load_from_string(model_bytes)
        inits = {t.name for t in model.graph.initializer}
        inputs = [v for v in model.graph.input if v.name not in inits]
    except Exception:
        inputs = []
    arrays: dict[str, np.ndarray] = {}
    for value in inputs:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        arrays[value.name] = (
            np.random.default_rng(rng.randrange(1000)).standard_normal((rng.choice([1, 2, 3]), *dims[1:])).astype(np.float32)
        )
    how = pick(
        ["valid", "nan", "float64", "int", "labels"],
        [
            "zero-samples",
            "scalar",
            "wrong-dtype",
            "wrong-shape",
            "wrong-rank",
            "complex",
            "bad-zip",
            "truncated",
            "empty",
            "npy",
            "huge-header",
            "missing-input",
            "pickle",
            "bad-labels",
        ],
    )
    name = next(iter(arrays), "x")
    first = arrays.get(name, np.zeros((1, 1), np.float32))
    if how == "zero-samples":
        arrays[name] = first[:0]
    elif how == "scalar":
        arrays[name] = np.float32(1.0)
    elif how == "wrong-dtype":
        arrays[name] = np.full(first.shape, "a")
    elif how == "wrong-shape":
        arrays[name] = np.zeros((*first.shape[:-1], first.shape[-1] + 1), np.float32)
    elif how == "wrong-rank":
        arrays[name] = first.reshape(-1)
    elif how == "nan":
        arrays[name] = np.where(np.random.default_rng(0).random(first.shape) < 0.3, np.nan, first).astype(np.float32)
    elif how == "float64":
        arrays[name] = first.astype(np.float64)
    elif how == "int":
        arrays[name] = (first * 100).astype(np.int64)
    elif how == "complex":
        arrays[name] = first.astype(np.complex64)
    elif how == "missing-input":
        arrays = {"not_an_input": first}
    elif how == "labels":
        arrays["labels"] = np.arange(rng.choice([0, 1, 5]))
    elif how == "bad-labels":
        arrays["labels"] = rng.choice([np.int64(3), np.zeros((1, 2)), np.array(["cat"])])
    if how == "bad-zip":
        return b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(64)), how
    if how == "empty":
        return b"", how
    if how == "npy":
        buf = io.BytesIO()
        np.save(buf, first)
        return buf.getvalue(), how
    if how == "huge-header":
        return _huge_header(arrays), how
    if how == "pickle":
        buf = io.BytesIO()
        np.savez(buf, **{name: np.array([{"a": 1}], dtype=object)})
        return buf.getvalue(), how
    data = _npz(arrays)
    if how == "truncated":
        data = data[: rng.randrange(len(data))]
    return data, how


def _specs(model_bytes: bytes) -> list[tuple[str, int, list[int]]]:
    """(name, element type, dims with symbolic ones as 1) of the model's inputs; empty when it does not parse."""
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:
        return []
    inits = {t.name for t in model.graph.initializer}
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim])
        for v in model.graph.input
        if v.name not in inits
    ]


def sample_file(rng: random.Random, model_bytes: bytes, pick: Picker) -> tuple[bytes, str]:
    """A ``--sample`` for the model's inputs (from the unmutated base): one input set, valid or malformed."""
    arrays: dict[str, np.ndarray] = {}
    values = np.random.default_rng(rng.randrange(1000))
    for name, elem, dims in _specs(model_bytes):
        if elem == TensorProto.INT64:
            arrays[name] = np.full(dims, rng.choice([16000, 8000, 16000, 3]), np.int64)
        elif elem == TensorProto.BOOL:
            arrays[name] = np.full(dims, rng.random() < 0.5)
        else:
            arrays[name] = values.standard_normal(dims).astype(np.float32)
    how = pick(
        ["valid", "valid", "float64"],
        [
            "missing-input",
            "extra-array",
            "batch-axis",
            "wrong-dtype",
            "float-for-int",
            "wrong-shape",
            "scalar-for-tensor",
            "nan",
            "complex",
            "huge-header",
            "not-npz",
            "npy",
            "empty",
        ],
    )
    name = next(iter(arrays), "x")
    first = arrays.get(name, np.zeros((1, 1), np.float32))
    ints = [n for n, v in arrays.items() if v.dtype == np.int64]
    if how == "missing-input":
        arrays.pop(name, None)
    elif how == "extra-array":
        arrays["labels"] = np.arange(3)
    elif how == "batch-axis":
        target = rng.choice(ints or [name])
        arrays[target] = arrays.get(target, first)[None]
    elif how == "wrong-dtype":
        arrays[name] = np.full(first.shape, "a")
    elif how == "float-for-int":
        target = rng.choice(ints or [name])
        arrays[target] = arrays.get(target, first).astype(np.float32) + 0.5
    elif how == "wrong-shape":
        arrays[name] = np.zeros((*first.shape[:-1], first.shape[-1] + 1) if first.ndim else (2,), np.float32)
    elif how == "scalar-for-tensor":
        arrays[name] = np.float32(1.0)
    elif how == "nan":
        arrays[name] = np.full(first.shape, np.nan, np.float32)
    elif how == "complex":
        arrays[name] = first.astype(np.complex64)
    elif how == "float64":
        arrays = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in arrays.items()}
    if how == "huge-header":
        return _huge_header({k: np.atleast_1d(v) for k, v in arrays.items()}), how
    if how == "not-npz":
        return b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(64)), how
    if how == "npy":
        buf = io.BytesIO()
        np.save(buf, first)
        return buf.getvalue(), how
    if how == "empty":
        return b"", how
    return _npz(arrays), how


def _sample_flags(rng: random.Random, model_bytes: bytes, files: dict[str, bytes], pick: Picker, branches: bool) -> list[str]:
    files["sample.npz"], _ = sample_file(rng, model_bytes, pick)
    flags = ["--sample", "{in}/sample.npz"]
    if branches and rng.random() < 0.4:
        flags += ["--branches", "all"]
    return flags


class Picker:
    """Chooses flag values: valid ones, and at most ``budget`` malformed ones per case (a case whose every flag
    is malformed stops at the first, and tests nothing else)."""

    def __init__(self, rng: random.Random, budget: int) -> None:
        self.rng = rng
        self.budget = budget

    def __call__(self, good: Sequence[str], bad: Sequence[str] = ()) -> str:
        if bad and self.budget and self.rng.random() < 0.3:
            self.budget -= 1
            return self.rng.choice(list(bad))
        return self.rng.choice(good)


def _input_shape_flag(pick: Picker, model_bytes: bytes) -> list[str]:
    try:
        model = onnx.load_from_string(model_bytes)
        name = model.graph.input[0].name
        dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    except Exception:
        name, dims = "x", [1, 6, 12, 12]
    good = [",".join(map(str, dims)), ",".join(map(str, [2, *dims[1:]])), ",".join(map(str, [*dims[:2], *(d + 4 for d in dims[2:])]))]
    bad = [",".join(map(str, [*dims[:2], *([2147483648] * len(dims[2:]))])), "1,6", "0,6,12,12", "1,6,12,12,12", "abc"]
    return ["--input-shape", f"{pick([name], ['no_such_input'])}={pick(good, bad)}"]


def decompose_flags(rng: random.Random, model_bytes: bytes, files: dict[str, bytes], measure: bool, sample: float = 0.0) -> list[str]:
    pick = Picker(rng, 1 if rng.random() < 0.35 else 0)
    flags: list[str] = []
    policy = pick(["default", "rank", "energy", "speedup", "params", "speedup-params", "ranks"], ["two"])
    if policy == "rank":
        flags += ["--rank", pick(["1", "2", "4", "100000"], ["0", "-1"])]
    elif policy == "energy":
        flags += ["--energy", pick(["0.5", "0.9", "1"], ["1.5", "nan"])]
    elif policy == "speedup":
        flags += ["--speedup", pick(["1", "1.2", "2", "4"], ["1000", "0.5"])]
        if measure and rng.random() < 0.1:  # timed in onnxruntime: small models only
            flags += ["--by", "latency", "--threads", pick(["1"], ["0"])]
    elif policy == "params":
        flags += ["--params-ratio", pick(["0.3", "0.8", "1"], ["0", "2"])]
    elif policy == "speedup-params":
        flags += ["--speedup", "1.5", "--params-ratio", "0.7"]
    elif policy == "ranks":
        files["ranks.json"] = pick(
            ['{"conv": 2}', '{"fc1": 4, "fc2": 3}', '{"conv2": 3}', '{"conv": {"rank": 2, "kind": "channel"}}', '{"conv": 100000}'],
            ["[]", "{", '{"conv": 0}', "\udcff", '{"conv": {"rank": 2, "kind": "diagonal"}}'],
        ).encode(errors="surrogateescape")
        flags += ["--ranks", "{in}/ranks.json"]
    elif policy == "two":
        flags += ["--rank", "2", "--energy", "0.9"]
    for flag, p in (("--force", 0.2), ("--no-fold-bn", 0.15), ("--external-data", 0.2), ("--quiet", 0.3)):
        if rng.random() < p:
            flags.append(flag)
    if rng.random() < 0.15:
        flags += ["--kinds", pick(["spatial", "channel", "spatial,channel"], ["bogus", ""])]
    if rng.random() < 0.1:
        flags += [rng.choice(["--include", "--exclude"]), pick(["conv", "fc.*", "then_conv"], ["("])]
    if rng.random() < 0.1:
        flags += ["--rank-multiple", pick(["1", "8"], ["0"])]
    if rng.random() < 0.2:
        flags += _input_shape_flag(pick, model_bytes)
    if rng.random() < 0.5:
        flags += ["--report", pick(["{out}/report.json"], ["{out}/absent/report.json", "{in}/model.onnx", "{out}", "{out}/out.onnx"])]
    if rng.random() < 0.15:
        files["calibration.npz"], _ = data_file(rng, model_bytes, pick)
        flags += ["--calibration", "{in}/calibration.npz"]
    roll = rng.random()
    if roll < 0.2:
        flags.append("--verify")
    elif roll < 0.35:
        files["verify.npz"], _ = data_file(rng, model_bytes, pick)
        flags += ["--verify-inputs", "{in}/verify.npz"]
    if sample and rng.random() < sample:  # drawn last: the other flags of a seed stay as they were
        flags += _sample_flags(rng, model_bytes, files, pick, branches=True)
    return flags


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One run: the input files, the command line (``{in}``/``{out}`` stand for the folders) and what it may write."""

    seed: int
    base: str
    mutation: str
    files: dict[str, bytes]
    argv: list[str]
    outputs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"seed {self.seed}: {self.base} {self.mutation}: {' '.join(self.argv)}"


MUTATIONS = (1, 2, 8, 1)  # weights of no mutation, bytes, structure, both


def make_case(seed: int, bases: list[str] | None = None, mutations_weights: tuple[int, ...] = MUTATIONS) -> Case:
    """The case of ``seed`` (the same every time); ``mutations_weights``: how often the model is left whole, its
    bytes mutated, its structure, both."""
    rng = random.Random(seed)
    base = rng.choice(bases or [*BUILDERS, "digits"])
    original = base_bytes(base)
    data = original
    mutations = []
    kind = rng.choices(["none", "bytes", "structure", "both"], weights=list(mutations_weights))[0]
    if kind in ("structure", "both"):
        model = onnx.load_from_string(original)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutation = rng.choices([m for m, _ in STRUCTURAL], weights=[w for _, w in STRUCTURAL])[0]
            try:
                mutations.append(mutation(rng, model))
            except (ValueError, TypeError, IndexError):  # a mutation that does not apply to what earlier ones made
                mutations.append(f"{mutation.__name__}:not applicable")
        data = model.SerializeToString()
    if kind in ("bytes", "both"):
        data, how = mutate_bytes(rng, data)
        mutations.append(how)
    files = {"model.onnx": data}
    if kind != "bytes" and rng.random() < 0.12:
        files, how = _external_layout(rng, data)
        mutations.append(f"external:{how}")
    command = rng.choices(["decompose", "inspect", "verify-self", "verify-original"], weights=[10, 2, 2, 2])[0]
    pick = Picker(rng, 1 if rng.random() < 0.35 else 0)
    outputs: list[str] = []
    sample = 0.85 if base in SAMPLE_BUILDERS else 0.0
    if command == "decompose":
        target = pick(["{out}/out.onnx"], ["{in}/model.onnx", "{in}/model.onnx.data", "{out}", "{out}/absent/out.onnx", "{in}"])
        argv = ["decompose", "{in}/model.onnx", target, *decompose_flags(rng, original, files, base != "vgg", sample)]
        written = target.replace("{in}", "in").replace("{out}", "out")
        outputs = [written, f"{written}.data", "out/report.json"]
    elif command == "inspect":
        argv = ["inspect", "{in}/model.onnx", *(["--json"] if rng.random() < 0.5 else [])]
        if rng.random() < 0.2:
            argv += _input_shape_flag(pick, original)
        if sample and rng.random() < sample:
            argv += _sample_flags(rng, original, files, pick, branches=True)
    else:
        files["original.onnx"] = original
        first = "{in}/model.onnx" if command == "verify-self" else "{in}/original.onnx"
        argv = ["verify", first, "{in}/model.onnx", "--runs", pick(["0", "0", "0", "1"], ["-1"])]
        if rng.random() < 0.3:
            files["inputs.npz"], how = data_file(rng, original, pick)
            argv += ["--inputs", "{in}/inputs.npz"]
            mutations.append(f"inputs:{how}")
        if rng.random() < 0.15:
            argv += _input_shape_flag(pick, original)
        if rng.random() < 0.1:
            argv += [rng.choice(["--rtol", "--atol"]), pick(["0", "1e-3", "10"], ["nan", "-1", "inf"])]
        if rng.random() < 0.05:
            argv += ["--providers", pick(["CPUExecutionProvider"], ["NoSuchProvider", ","])]
        if sample and rng.random() < sample and "--inputs" not in argv:
            argv += _sample_flags(rng, original, files, pick, branches=False)
    return Case(seed, base, ",".join(mutations) or "none", files, argv, outputs)


def _external_layout(rng: random.Random, data: bytes) -> tuple[dict[str, bytes], str]:
    """The model with its weights in ``model.onnx.data``, that file or its references maybe broken."""
    try:
        model = onnx.load_from_string(data)
    except Exception:  # a mutation made it unparseable: keep the single file
        return {"model.onnx": data}, "not applicable"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx.save_model(model, f"{tmp}/model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
        except Exception:  # onnx cannot write what a mutation made (a name that is not text, say)
            return {"model.onnx": data}, "not applicable"
        model = onnx.load(f"{tmp}/model.onnx", load_external_data=False)
        weights = Path(f"{tmp}/model.onnx.data").read_bytes() if Path(f"{tmp}/model.onnx.data").exists() else b""
    how = rng.choice(["valid", "valid", "truncated", "missing", "location", "offset", "length"])
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    entry = rng.choice(external).external_data if external else None
    if entry is not None and how in ("location", "offset", "length"):
        key = {"location": "location", "offset": "offset", "length": "length"}[how]
        value = rng.choice(
            {"location": ["../model.onnx.data", "/etc/hostname", "absent.data", "", "model.onnx"], "offset": ["-4", "abc", "99999999"]}.get(
                key, ["-1", "1e3", "99999999", "0"]
            )
        )
        item = next((e for e in entry if e.key == key), None)
        if item is None:
            item = entry.add(key=key)
        item.value = value
    files = {"model.onnx": model.SerializeToString()}
    if how == "truncated":
        files["model.onnx.data"] = weights[: rng.randrange(len(weights) + 1)]
    elif how != "missing":
        files["model.onnx.data"] = weights
    return files, how


def _loads(path: Path) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own exception types
        return False
    return True


def outcome_class(outcome: Outcome) -> str:
    """The kind of ending, with paths, numbers and quoted names taken out of the message."""
    if outcome.code != 2:
        return f"exit {outcome.code}"
    message = outcome.error or outcome.stderr.strip().splitlines()[0] if outcome.stderr.strip() else ""
    message = re.sub(r"(?<![\w.])/\S+", "<path>", message)
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "<name>", message)
    message = re.sub(r"\[[^\]]*\]|\([^)]*\)", "(…)", message)
    message = re.sub(r"-?\d[\d,.]*(e[+-]?\d+)?", "N", message)
    return "exit 2: " + " ".join(message.split()[:9])


@dataclass
class Result:
    case: Case
    outcome: Outcome
    klass: str
    problems: list[str]


def run_case(case: Case) -> Result:
    """Run ``case`` in a fresh folder; the outcome class and every violation of the contract."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        (root / "in").mkdir()
        (root / "out").mkdir()
        for name, data in case.files.items():
            (root / "in" / name).write_bytes(data)
        argv = [a.replace("{in}", str(root / "in")).replace("{out}", str(root / "out")) for a in case.argv]
        before = snapshot(root)
        outcome = run_cli(argv)
        after = snapshot(root)
        problems = violations(outcome, before, after, case.outputs)
        if case.argv[0] == "verify" and case.argv[1] == case.argv[2] and outcome.code == 1:
            problems.append("a model verified against itself differs")
        out = root / case.outputs[0] if case.outputs else root / "out" / "out.onnx"
        if case.argv[0] == "decompose" and outcome.code == 0:
            if not out.is_file():
                problems.append("exit 0 without the output model")
            elif _loads(root / "in" / "model.onnx") and not _loads(out):
                problems.append("the input loads in onnxruntime, the output does not")
            if "--report" in case.argv and not (root / "out" / "report.json").is_file():
                problems.append("exit 0 without the report")
        return Result(case, outcome, outcome_class(outcome), problems)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summary(results: list[Result]) -> dict[str, Any]:
    """Counts of outcome classes and the failing seeds."""
    classes: dict[str, int] = {}
    for r in results:
        classes[r.klass] = classes.get(r.klass, 0) + 1
    return {
        "runs": len(results),
        "violations": [{"seed": r.case.seed, "case": r.case.describe(), "problems": r.problems} for r in results if r.problems],
        "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
    }


def dump(results: list[Result]) -> str:
    return json.dumps(summary(results), indent=2)
