"""The distillation fine-tune: its ONNX interpreter against onnxruntime, and what a fine-tune may change.

* interpreter: one-node and small models built here (conv geometry, pooling, Gemm, recurrent layers in
  every direction, If, Resize modes, shape ops) must give onnxruntime's outputs; the node cases of ONNX's
  own backend test data must either match their stored outputs or be refused — never a wrong answer;
* fine-tune of a tiny converted CNN: only the trained initializers change (every other one byte-identical,
  nodes identical), onnxruntime on the written model computes what the trained network computes, the same
  seed gives the same bytes, fp16 factors stay fp16;
* refusals: an op without a kernel on a trained weight, a kernel that disagrees with onnxruntime, torch
  missing, options out of range, external data;
* the loss kind chosen per output and the held-back metrics.

No test depends on timing; the fine-tunes run a few steps of a model of a few hundred weights.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from builders import make_model, run, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.agreement import STRINGS, agreement, greedy_ctc
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.finetune import (
    MISSING_TORCH,
    FinetuneOptions,
    decomposed_weights,
    finetune,
    float_weights,
)
from onnx_lowrank.finetune import _torch as torch_import
from onnx_lowrank.finetune.outputs import choose_loss

torch = pytest.importorskip("torch")

from onnx_lowrank.finetune.interpreter import GraphModule  # noqa: E402
from onnx_lowrank.finetune.ops import COMPILERS, KernelFailure, Unsupported  # noqa: E402

F32 = TensorProto.FLOAT


def interpret(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    module = GraphModule(model)
    with torch.no_grad():
        return [v.numpy() for v in module({k: torch.from_numpy(v) for k, v in feeds.items()})]


def assert_matches_runtime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    expected = run(model, feeds)
    got = interpret(model, feeds)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-6)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def one_node(
    op: str,
    inputs: dict[str, np.ndarray],
    weights: dict[str, np.ndarray] | None = None,
    outputs: int = 1,
    opset: int = 17,
    **attrs: Any,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of one node reading graph inputs ``inputs`` then initializers ``weights`` ('' for an omitted input)."""
    weights = weights or {}
    names = list(inputs) + list(weights)
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)], name=op.lower(), **attrs)
    value_infos = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in inputs.items()]
    model = make_model(
        [node],
        value_infos,
        [helper.make_empty_tensor_value_info(f"y{i}") for i in range(outputs)],
        {k: v for k, v in weights.items() if k},
        opset=opset,
    )
    return model, inputs


RNG = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- interpreter: convolution and pooling


CONV_CASES = [
    {"group": 1},
    {"group": 2},
    {"group": 4, "dilations": [2, 1]},
    {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID", "strides": [3, 2]},
]


@pytest.mark.parametrize("attrs", CONV_CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_conv_geometry_matches_onnxruntime(attrs: dict[str, Any]) -> None:
    group = attrs.get("group", 1)
    model, feeds = one_node("Conv", {"x": randn(2, 8, 11, 13)}, {"w": randn(12, 8 // group, 3, 3), "b": randn(12)}, **attrs)
    assert_matches_runtime(model, feeds)


@pytest.mark.parametrize("rank", [1, 3])
def test_conv_1d_and_3d(rank: int) -> None:
    spatial = (9, 7, 6)[:rank]
    model, feeds = one_node("Conv", {"x": randn(1, 4, *spatial)}, {"w": randn(6, 4, *([3] * rank))}, pads=[1] * rank + [0] * rank)
    assert_matches_runtime(model, feeds)


TRANSPOSE_CASES = [
    {},
    {"strides": [2, 2], "pads": [1, 0, 0, 1]},
    {"strides": [2, 3], "output_padding": [1, 2]},
    {"strides": [2, 2], "dilations": [2, 1], "group": 2},
    {"strides": [2, 2], "output_shape": [12, 11]},
    {"strides": [2, 2], "output_shape": [10, 12]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [3, 2], "auto_pad": "SAME_LOWER", "kernel_shape": [4, 3]},
]


@pytest.mark.parametrize("attrs", TRANSPOSE_CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
def test_conv_transpose_matches_onnxruntime(attrs: dict[str, Any]) -> None:
    group = attrs.get("group", 1)
    kernel = attrs.get("kernel_shape", [3, 3])
    model, feeds = one_node("ConvTranspose", {"x": randn(2, 4, 5, 6)}, {"w": randn(4, 6 // group, *kernel), "b": randn(6)}, **attrs)
    assert_matches_runtime(model, feeds)


POOL_CASES = [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 3], "pads": [1, 0, 0, 1], "dilations": [2, 1]}),
    ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1}),
]


@pytest.mark.parametrize(("op", "attrs"), POOL_CASES, ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_pooling_matches_onnxruntime(op: str, attrs: dict[str, Any]) -> None:
    model, feeds = one_node(op, {"x": randn(2, 3, 10, 9)}, **attrs)
    assert_matches_runtime(model, feeds)


# --------------------------------------------------------------------------- interpreter: layers and element-wise ops


def test_gemm_transposes_and_scales() -> None:
    model, feeds = one_node("Gemm", {"a": randn(5, 4)}, {"b": randn(6, 5), "c": randn(6)}, transA=1, transB=1, alpha=0.5, beta=2.0)
    assert_matches_runtime(model, feeds)


def test_batchnorm_has_inference_semantics_in_train_mode() -> None:
    weights = {"s": randn(3), "b": randn(3), "m": randn(3), "v": np.abs(randn(3)) + 0.5}
    model, feeds = one_node("BatchNormalization", {"x": randn(4, 3, 5, 5)}, weights, epsilon=1e-3)
    module = GraphModule(model, trainable=["s", "b"]).train()
    with torch.no_grad():
        got = module({"x": torch.from_numpy(feeds["x"])})[0].numpy()
    np.testing.assert_allclose(got, run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("Relu", {}),
        ("LeakyRelu", {"alpha": 0.2}),
        ("Sigmoid", {}),
        ("Tanh", {}),
        ("HardSwish", {}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("Elu", {"alpha": 0.7}),
        ("Selu", {}),
        ("Softplus", {}),
        ("Softmax", {"axis": 1}),
        ("LogSoftmax", {}),
        ("Erf", {}),
    ],
)
def test_activations(op: str, attrs: dict[str, Any]) -> None:
    model, feeds = one_node(op, {"x": randn(2, 5, 3) * 4}, **attrs)
    assert_matches_runtime(model, feeds)


def test_mish_opset18() -> None:
    model, feeds = one_node("Mish", {"x": randn(3, 4) * 4}, opset=18)
    assert_matches_runtime(model, feeds)


def test_legacy_softmax_flattens_from_axis() -> None:
    model, feeds = one_node("Softmax", {"x": randn(2, 3, 4)}, opset=11, axis=1)
    assert_matches_runtime(model, feeds)


def test_clip_lrn_prelu_pad_reduce() -> None:
    x = randn(2, 6, 5, 4)
    for op, weights, attrs in [
        ("Clip", {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, {}),
        ("LRN", {}, {"size": 5, "alpha": 0.01, "beta": 0.6, "bias": 1.5}),
        ("PRelu", {"slope": randn(6, 1, 1)}, {}),
        ("Pad", {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, {"mode": "reflect"}),
        ("Pad", {"pads": np.array([0, 1, 1, 0, 0, 0, 2, 3], np.int64)}, {"mode": "edge"}),
        ("Pad", {"pads": np.array([0, 0, -1, 2, 0, 0, 2, -1], np.int64), "value": np.array(1.5, np.float32)}, {}),
        ("ReduceMean", {"axes": np.array([1, -1], np.int64)}, {"keepdims": 0}),
    ]:
        opset = 18 if op == "ReduceMean" else 17
        model, feeds = one_node(op, {"x": x}, weights, opset=opset, **attrs)
        assert_matches_runtime(model, feeds)


def test_shape_ops_chain() -> None:
    """Shape → Gather → Unsqueeze → Concat → Reshape, Slice with a negative step, Expand, Tile, Split, Range."""
    i64 = np.int64
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["sliced"]),
        helper.make_node("Transpose", ["sliced"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Expand", ["row", "eshape"], ["expanded"]),
        helper.make_node("Tile", ["row", "reps"], ["tiled"]),
        helper.make_node("Split", ["x", "parts"], ["p0", "p1"], axis=1),
        helper.make_node("Range", ["r0", "r1", "r2"], ["range"]),
        helper.make_node("Flatten", ["t"], ["flat2"], axis=2),
        helper.make_node("Squeeze", ["expanded", "one1"], ["squeezed"]),
    ]
    weights = {
        "zero": np.array(0, i64),
        "zero1": np.array([0], i64),
        "one1": np.array([1], i64),
        "minus1": np.array([-1], i64),
        "starts": np.array([-1, 1], i64),
        "ends": np.array([-100, 4], i64),
        "axes": np.array([2, 1], i64),
        "steps": np.array([-2, 2], i64),
        "row": randn(1, 4),
        "eshape": np.array([3, 1, 4], i64),
        "reps": np.array([2, 3], i64),
        "parts": np.array([2, 3], i64),
        "r0": np.array(1.0, np.float32),
        "r1": np.array(4.0, np.float32),
        "r2": np.array(0.7, np.float32),
    }
    outs = ["flat", "t", "expanded", "tiled", "p0", "p1", "range", "flat2", "squeezed"]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", F32, [2, 5, 7, 3])], [helper.make_empty_tensor_value_info(o) for o in outs], weights
    )
    assert_matches_runtime(model, {"x": randn(2, 5, 7, 3)})


# --------------------------------------------------------------------------- interpreter: recurrent layers, If, Resize


def lstm_model(direction: str, layout: int, peepholes: bool = True, states: bool = True, bias: bool = True) -> onnx.ModelProto:
    """One LSTM over (6 steps, batch 2, 3 features), hidden 5; without peepholes it runs torch's fused kernel."""
    steps, batch, dirs, hidden, size = 6, 2, (2 if direction == "bidirectional" else 1), 5, 3
    x_shape = [batch, steps, size] if layout else [steps, batch, size]
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    rng = np.random.default_rng(1)
    weights = {
        "w": rng.standard_normal((dirs, 4 * hidden, size)).astype(np.float32),
        "r": rng.standard_normal((dirs, 4 * hidden, hidden)).astype(np.float32),
        "b": rng.standard_normal((dirs, 8 * hidden)).astype(np.float32),
        "h0": rng.standard_normal(state_shape).astype(np.float32),
        "c0": rng.standard_normal(state_shape).astype(np.float32),
        "p": rng.standard_normal((dirs, 3 * hidden)).astype(np.float32),
    }
    inputs = ["x", "w", "r", "b" if bias else "", "", "h0" if states else "", "c0" if states else "", "p" if peepholes else ""]
    while not inputs[-1]:
        inputs.pop()
    node = helper.make_node("LSTM", inputs, ["y", "yh", "yc"], hidden_size=hidden, direction=direction, layout=layout)
    used = {k: v for k, v in weights.items() if k in inputs}
    outputs = [helper.make_empty_tensor_value_info(n) for n in ("y", "yh", "yc")]
    return make_model([node], [helper.make_tensor_value_info("x", F32, x_shape)], outputs, used)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peepholes", [True, False], ids=["looped", "fused"])
def test_lstm_matches_onnxruntime(direction: str, peepholes: bool) -> None:
    assert_matches_runtime(lstm_model(direction, 0, peepholes), {"x": randn(6, 2, 3)})


def test_lstm_without_bias_or_states() -> None:
    for peepholes in (True, False):
        assert_matches_runtime(lstm_model("bidirectional", 0, peepholes, states=False, bias=False), {"x": randn(6, 2, 3)})


def test_lstm_gradients_of_both_paths_agree() -> None:
    """The fused kernel and the step loop compute the same function and the same gradients."""
    x = torch.from_numpy(randn(6, 2, 3))
    grads = []
    for peepholes in (True, False):
        model = lstm_model("bidirectional", 0, peepholes)
        if peepholes:  # zero peepholes: the same equations as without
            tensor = next(t for t in model.graph.initializer if t.name == "p")
            tensor.CopyFrom(numpy_helper.from_array(np.zeros((2, 15), np.float32), "p"))
        module = GraphModule(model, trainable=["w", "r", "b"])
        y = module({"x": x})[0]
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([p.grad.clone() for p in module.weights])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lstm_batch_first_layout() -> None:
    """layout=1 (onnxruntime has no kernel for it): the same numbers as layout 0 with the axes swapped."""
    x = randn(6, 2, 3)
    seq_first = interpret(lstm_model("bidirectional", 0, peepholes=False), {"x": x})
    model = lstm_model("bidirectional", 1, peepholes=False)
    # the same initial states, stored batch-first
    reference = lstm_model("bidirectional", 0, peepholes=False)
    states = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    for tensor in model.graph.initializer:
        if tensor.name in ("h0", "c0"):
            tensor.CopyFrom(numpy_helper.from_array(states[tensor.name].transpose(1, 0, 2).copy(), tensor.name))
    y, yh, yc = interpret(model, {"x": x.transpose(1, 0, 2).copy()})
    np.testing.assert_allclose(y, seq_first[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yh, seq_first[1].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yc, seq_first[2].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("before_reset", [0, 1])
def test_gru_and_rnn_bidirectional(before_reset: int) -> None:
    hidden, size = 4, 3
    x = randn(5, 2, size)
    gru = helper.make_node(
        "GRU", ["x", "w", "r", "b"], ["y", "yh"], hidden_size=hidden, direction="bidirectional", linear_before_reset=before_reset
    )
    rnn = helper.make_node("RNN", ["x", "wr", "rr", "br"], ["z", "zh"], hidden_size=hidden, direction="bidirectional")
    weights = {
        "w": randn(2, 3 * hidden, size), "r": randn(2, 3 * hidden, hidden), "b": randn(2, 6 * hidden),
        "wr": randn(2, hidden, size), "rr": randn(2, hidden, hidden), "br": randn(2, 2 * hidden),
    }  # fmt: skip
    model = make_model(
        [gru, rnn],
        [helper.make_tensor_value_info("x", F32, list(x.shape))],
        [helper.make_empty_tensor_value_info(n) for n in ["y", "yh", "z", "zh"]],
        weights,
    )
    assert_matches_runtime(model, {"x": x})


def test_if_evaluates_the_branch_its_condition_picks() -> None:
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], [f"{name}_c"], pads=[1, 1, 1, 1]), helper.make_node(op, [f"{name}_c"], [f"{name}_out"])],
            name,
            [],
            [helper.make_empty_tensor_value_info(f"{name}_out")],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Sigmoid")),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", F32, [1, 2, 4, 4])], [helper.make_empty_tensor_value_info("y")],
        {"w": randn(3, 2, 3, 3), "zero": np.array(0.0, np.float32)},
    )  # fmt: skip
    for sign in (1.0, -1.0):
        x = np.abs(randn(1, 2, 4, 4)) * sign
        assert_matches_runtime(model, {"x": x})


RESIZE_CASES = [
    ("nearest", "asymmetric", "floor", [1, 1, 2, 2], None),
    ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 1.5, 0.6], None),
    ("nearest", "align_corners", "round_prefer_ceil", None, [1, 3, 7, 5]),
    ("nearest", "tf_half_pixel_for_nn", "ceil", [1, 1, 2.5, 1.7], None),
    ("linear", "half_pixel", "round_prefer_floor", [1, 1, 2, 2], None),
    ("linear", "pytorch_half_pixel", "round_prefer_floor", None, [1, 3, 9, 1]),
    ("linear", "align_corners", "round_prefer_floor", [1, 1, 0.7, 1.6], None),
    ("linear", "asymmetric", "round_prefer_floor", None, [1, 3, 4, 13]),
]


@pytest.mark.parametrize(("mode", "transform", "nearest", "scales", "sizes"), RESIZE_CASES)
def test_resize_matches_onnxruntime(
    mode: str, transform: str, nearest: str, scales: Sequence[float] | None, sizes: Sequence[int] | None
) -> None:
    weights = {"": np.zeros(0)}
    inputs = ["x", ""]
    initializers: dict[str, np.ndarray] = {}
    if scales is not None:
        initializers["scales"] = np.array(scales, np.float32)
        inputs.append("scales")
    else:
        initializers["sizes"] = np.array(sizes, np.int64)
        inputs += ["", "sizes"]
    del weights
    node = helper.make_node("Resize", inputs, ["y"], mode=mode, coordinate_transformation_mode=transform, nearest_mode=nearest)
    model = make_model(
        [node], [helper.make_tensor_value_info("x", F32, [1, 3, 6, 8])], [helper.make_empty_tensor_value_info("y")], initializers
    )
    assert_matches_runtime(model, {"x": randn(1, 3, 6, 8)})


def test_upsample_opset9() -> None:
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")
    model = make_model(
        [node], [helper.make_tensor_value_info("x", F32, [1, 2, 3, 4])], [helper.make_empty_tensor_value_info("y")],
        {"scales": np.array([1, 1, 2, 3], np.float32)}, opset=9,
    )  # fmt: skip
    assert_matches_runtime(model, {"x": randn(1, 2, 3, 4)})


def test_unsupported_attribute_is_refused_with_its_reason() -> None:
    model, _ = one_node("Resize", {"x": randn(1, 1, 4, 4)}, {"": np.zeros(0), "scales": np.array([1, 1, 2, 2], np.float32)}, mode="cubic")
    with pytest.raises(Unsupported, match="Resize mode 'cubic'"):
        GraphModule(model)


# --------------------------------------------------------------------------- interpreter: ONNX's stored backend cases

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
STORED_CASES = sorted(
    glob.glob(os.path.join(DATA, "pytorch-converted", "test_*")) + glob.glob(os.path.join(DATA, "pytorch-operator", "test_*"))
)


def _load_case(folder: str) -> tuple[onnx.ModelProto, list[tuple[dict[str, np.ndarray], list[np.ndarray]]]]:
    model = onnx.load(os.path.join(folder, "model.onnx"))
    inputs = [v.name for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    sets = []
    for data_dir in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
        feeds = {name: numpy_helper.to_array(onnx.load_tensor(os.path.join(data_dir, f"input_{i}.pb"))) for i, name in enumerate(inputs)}
        expected = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(os.path.join(data_dir, "output_*.pb")))]
        sets.append((feeds, expected))
    return model, sets


def test_stored_backend_cases_match_or_are_refused() -> None:
    """The PyTorch-exported cases shipped with onnx: their stored outputs, or a refusal — never a wrong answer.

    (The full set of generated node cases takes a minute to build; benchmarks/finetune_converters.py runs it.)
    """
    assert len(STORED_CASES) > 80
    matched, refused, wrong = [], [], []
    for folder in STORED_CASES:
        name = os.path.basename(folder)
        model, sets = _load_case(folder)
        try:
            module = GraphModule(model)
            for feeds, expected in sets:
                with torch.no_grad():
                    got = module({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()})
                for a, b in zip(got, expected, strict=True):
                    ok = a.shape == b.shape and np.allclose(
                        a.numpy().astype(np.float64), b.astype(np.float64), rtol=1e-3, atol=1e-4, equal_nan=True
                    )
                    if not ok:
                        wrong.append(name)
            matched.append(name)
        except KernelFailure as exc:
            wrong.append(f"{name}: {exc}")
        except Unsupported:
            refused.append(name)
    assert not wrong, f"wrong answers: {wrong}"
    assert len(matched) > 0.8 * len(STORED_CASES), f"refused: {refused}"


# --------------------------------------------------------------------------- fine-tune of a tiny converted CNN


def converted_cnn(**kwargs: Any) -> tuple[onnx.ModelProto, onnx.ModelProto, tuple[str, ...], list[tuple[str, str]]]:
    from onnx_lowrank.api import decompose

    original = tiny_cnn(**kwargs)
    converted, report = decompose(original, rank=1, include="conv", kinds=["spatial"])
    pairs = [(layer.vertical_node, layer.horizontal_node) for layer in report.layers if layer.decomposed]
    assert len(pairs) == 2
    return original, converted, decomposed_weights(converted, pairs).initializers, pairs  # type: ignore[return-value]


def samples(count: int = 24, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


FAST = FinetuneOptions(steps=6, minutes=None, lr=1e-2, batch_size=8, eval_every=2, threads=1, warmup=0)


def tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def test_decomposed_weights_are_the_factors_and_biases() -> None:
    _, converted, names, pairs = converted_cnn()
    nodes = {n.name: n for n in converted.graph.node}
    expected = {name for pair in pairs for node in pair for name in list(nodes[node].input)[1:] if name}
    assert set(names) == expected and {"b1", "b2"} <= expected
    found = decomposed_weights(converted, [*pairs, ("missing/vertical", "missing/horizontal")])
    assert set(found.initializers) == expected
    assert [node for node, _ in found.skipped] == ["missing/vertical", "missing/horizontal"]
    assert found.features == tuple((nodes[h].output[0], nodes[h].output[0]) for _, h in pairs)
    with pytest.raises(LowRankError, match="no initializer to fine-tune"):
        decomposed_weights(converted, [("missing/vertical", "missing/horizontal")])


def test_finetune_changes_only_the_trained_initializers() -> None:
    original, converted, names, _ = converted_cnn()
    before = converted.SerializeToString()
    calls: list[tuple[int, int, str]] = []
    written, result = finetune(original, converted, samples(), trainable=names, options=FAST, progress=lambda *a: calls.append(a))
    assert converted.SerializeToString() == before  # the input model is not edited
    assert [(step, total) for step, total, _ in calls] == [(step, 6) for step in range(1, 7)]
    assert calls[1][2].startswith("loss ") and " held-back agree " in calls[1][2] and calls[1][2].endswith("%")
    old, new = tensors(converted), tensors(written)
    assert list(old) == list(new)
    changed = {name for name in old if old[name] != new[name]}
    assert changed and changed <= set(names)
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in converted.graph.node]
    for field in ("input", "output", "value_info"):
        assert getattr(written.graph, field) == getattr(converted.graph, field)
    assert written.opset_import == converted.opset_import and written.ir_version == converted.ir_version
    assert result.steps == 6 and result.trained == list(names) and result.mode == "whole graph"
    assert result.loss_kinds == {"logits": "KL over the last axis (logits)"}
    assert result.metric is not None and result.metric.name == "top-1 agreement"
    assert result.samples_held_back == 4 and result.samples_train == 20
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["trained_count"] == len(names) and as_json["write_back"]["tolerance"] == FAST.tolerance
    assert as_json["stop_reason"] == "step budget reached" and not as_json["stopped_early"] and as_json["seed"] == 0
    (logits,) = as_json["output_losses"].items()
    assert logits[0] == "logits" and logits[1]["kind"] == "kl" and logits[1]["before"] >= 0 and logits[1]["after"] >= 0


def test_written_model_computes_what_the_trained_network_computes() -> None:
    original, converted, names, _ = converted_cnn()
    written, result = finetune(original, converted, samples(), trainable=names, options=FAST)
    check = result.write_back
    assert check is not None and check.max_relative <= check.tolerance == FAST.tolerance
    assert result.equivalence is not None and result.equivalence.max_relative <= FAST.tolerance
    # independently: onnxruntime on the written file against the network of its own weights, on new inputs
    feeds = samples(6, seed=11)
    (ours,) = interpret(written, feeds)
    (theirs,) = run(written, feeds)
    assert float(np.max(np.abs(ours - theirs))) <= check.tolerance * float(np.max(np.abs(theirs)))


def test_same_seed_same_bytes() -> None:
    original, converted, names, _ = converted_cnn()
    first, _ = finetune(original, converted, samples(), trainable=names, options=FAST)
    second, _ = finetune(original, converted, samples(), trainable=names, options=FAST)
    assert first.SerializeToString() == second.SerializeToString()
    other, _ = finetune(original, converted, samples(), trainable=names, options=FinetuneOptions(**{**FAST.to_dict(), "seed": 1}))
    assert other.SerializeToString() != first.SerializeToString()


def test_every_float_weight_and_mixup() -> None:
    original, converted, _, _ = converted_cnn()
    options = FinetuneOptions(**{**FAST.to_dict(), "mixup": 0.4})
    written, result = finetune(original, converted, samples(), trainable=None, options=options)
    assert set(result.trained) == set(float_weights(converted)) and "fc" in result.trained
    assert tensors(written)["fc"] != tensors(converted)["fc"]


def test_fp16_factors_stay_fp16() -> None:
    original, converted, names, _ = converted_cnn(cast_weights=True)
    halves = [t.name for t in converted.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves and set(halves) <= set(names)
    written, result = finetune(original, converted, samples(), trainable=names, options=FAST)
    stored = {t.name: t for t in written.graph.initializer}
    assert all(stored[name].data_type == TensorProto.FLOAT16 for name in halves)
    assert any(tensors(written)[name] != tensors(converted)[name] for name in halves)
    assert result.write_back is not None and result.write_back.max_relative <= result.write_back.tolerance


def test_feature_term_and_loss_kind_per_output() -> None:
    original, converted, names, pairs = converted_cnn(extra_output=True)
    features = decomposed_weights(converted, pairs).features
    options = FinetuneOptions(**{**FAST.to_dict(), "feature_weight": 0.5, "features": features})
    _, result = finetune(original, converted, samples(), trainable=names, options=options)
    assert result.loss_kinds == {"logits": "KL over the last axis (logits)", "r2": "MSE / teacher variance"}
    assert [m.name for m in result.metrics] == ["top-1 agreement", "relative L2"]
    assert result.metric is not None and result.metric.output == "logits"
    assert result.features == [list(p) for p in features]
    forced = FinetuneOptions(**{**FAST.to_dict(), "loss_kinds": {"logits": "mse"}})
    _, result = finetune(original, converted, samples(), trainable=names, options=forced)
    assert result.loss_kinds["logits"] == "MSE / teacher variance"


def test_choose_loss_reads_the_teacher_values() -> None:
    logits = np.random.default_rng(0).standard_normal((10, 7, 6)).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert choose_loss("a", log_probs).scores == "log-probabilities"
    assert choose_loss("a", np.exp(log_probs[:, 0])).scores == "probabilities"
    assert choose_loss("a", logits[:, 0]).description == "KL over the last axis (logits)"
    assert choose_loss("a", logits[:, 0]).metric == "top-1 agreement"
    assert choose_loss("a", logits).kind == "mse"  # rank 3 raw scores with no linear layer behind them
    assert choose_loss("a", log_probs).metric == "string agreement (greedy CTC, blank 0)"
    assert choose_loss("a", logits[..., None]).kind == "mse"
    assert choose_loss("a", np.arange(10)).kind == "none"
    with pytest.raises(LowRankError, match="no class axis"):
        choose_loss("a", logits[:, 0, 0], override="kl")


def test_greedy_ctc_and_agreement() -> None:
    def one_hot(path: list[int]) -> np.ndarray:
        return np.eye(4, dtype=np.float32)[path]

    scores = np.stack([one_hot([1, 1, 0, 1, 2, 2]), one_hot([0, 3, 3, 0, 0, 3])])
    assert greedy_ctc(scores) == [(1, 1, 2), (3, 3)]
    loss = choose_loss("s", np.log(np.clip(scores, 1e-6, 1)) - 0.0, override="kl")
    other = np.stack([one_hot([1, 0, 1, 1, 2, 0]), one_hot([3, 3, 3, 3, 3, 3])])
    assert loss.metric == STRINGS and agreement(loss.metric, other, scores) == 0.5


# --------------------------------------------------------------------------- refusals


def test_op_without_kernel_on_a_trained_weight_is_refused_naming_it() -> None:
    nodes = [helper.make_node("Trilu", ["w"], ["wt"], name="tri"), helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", F32, ["n", 4])], [helper.make_tensor_value_info("y", F32, ["n", 4])], {"w": randn(4, 4)}
    )
    with pytest.raises(LowRankError, match="Trilu 'tri': no kernel for Trilu"):
        finetune(model, model, {"x": randn(12, 4)}, trainable=["w"], options=FAST)


def test_segment_before_an_op_without_kernel() -> None:
    """Trilu after the decomposed convs: the segment up to it trains, against the original's tensor at the cut."""
    original, converted, names, _ = converted_cnn()
    for model in (original, converted):
        graph = model.graph
        graph.node.append(helper.make_node("Trilu", ["r2"], ["upper"], name="tri"))
        graph.output.append(helper.make_tensor_value_info("upper", F32, ["n", 8, 8, 8]))
    written, result = finetune(original, converted, samples(), trainable=names, options=FAST)
    assert result.mode.startswith("segment: ") and "no kernel for Trilu" in result.mode
    assert set(result.loss_kinds) == {"logits", "r2"} and result.loss_kinds["r2"] == "MSE / teacher variance"
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in converted.graph.node]
    assert result.write_back is not None and result.write_back.max_relative <= result.write_back.tolerance


def test_kernel_that_disagrees_with_onnxruntime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    original, converted, names, _ = converted_cnn()

    def leaky(spec: Any) -> Any:
        return lambda inputs: [torch.nn.functional.leaky_relu(inputs[0], 0.1)]

    monkeypatch.setitem(COMPILERS, "Relu", leaky)
    with pytest.raises(LowRankError, match=r"equivalence check .* refusing rather than train or write a different function"):
        finetune(original, converted, samples(), trainable=names, options=FAST)


def test_without_torch_one_line_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_torch(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(torch_import, "import_module", no_torch)
    original, converted, names, _ = converted_cnn()
    with pytest.raises(LowRankError) as caught:
        finetune(original, converted, samples(), trainable=names, options=FAST)
    assert str(caught.value) == MISSING_TORCH
    assert "\n" not in MISSING_TORCH and "pip install 'onnx-lowrank[finetune]'" in MISSING_TORCH


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": None, "minutes": None},
        {"steps": 0},
        {"lr": -1.0},
        {"held_back": 1.0},
        {"batch_size": 0},
        {"feature_weight": 1.0},
        {"loss_kinds": {"logits": "hinge"}},
        {"schedule": "linear"},
        {"patience": 0},
        {"mixup": -0.1},
    ],
)
def test_options_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(LowRankError):
        FinetuneOptions(**bad)


def test_bad_inputs_are_refused() -> None:
    original, converted, names, _ = converted_cnn()
    with pytest.raises(LowRankError, match="not initializers"):
        finetune(original, converted, samples(), trainable=["nope"], options=FAST)
    with pytest.raises(LowRankError, match="lacks model input 'x'"):
        finetune(original, converted, {"y": samples()["x"]}, trainable=names, options=FAST)
    with pytest.raises(LowRankError, match="needs more samples"):
        finetune(original, converted, samples(4), trainable=names, options=FAST)
    with pytest.raises(LowRankError, match="not an output of the model"):
        finetune(original, converted, samples(), trainable=names, options=FinetuneOptions(**{**FAST.to_dict(), "loss_kinds": {"zz": "kl"}}))
    external = onnx.ModelProto()
    external.CopyFrom(converted)
    tensor = external.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    with pytest.raises(LowRankError, match="external data that is not loaded"):
        finetune(original, external, samples(), trainable=names, options=FAST)


def test_float_weights_leave_statistics_and_bounds_out() -> None:
    weights = {
        "s": randn(3),
        "b": randn(3),
        "m": randn(3),
        "v": np.abs(randn(3)),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
        helper.make_node("Clip", ["n", "lo", "hi"], ["y"]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, [1, 3, 2, 2])], [helper.make_empty_tensor_value_info("y")], weights)
    assert float_weights(model) == ("s", "b")


def test_sequence_scores_get_string_agreement_and_a_ctc_term() -> None:
    """[N, T, C] scores from a linear layer: KL per position, the greedy-CTC string metric, and the CTC term."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["scores"], name="bias")]
    weights = {"w": rng.standard_normal((6, 5)).astype(np.float32) * 2, "b": rng.standard_normal(5).astype(np.float32)}
    original = make_model(
        nodes, [helper.make_tensor_value_info("x", F32, ["n", 7, 6])], [helper.make_empty_tensor_value_info("scores")], weights
    )
    converted = onnx.ModelProto()
    converted.CopyFrom(original)
    perturbed = numpy_helper.from_array(weights["w"] + rng.standard_normal((6, 5)).astype(np.float32), "w")
    next(t for t in converted.graph.initializer if t.name == "w").CopyFrom(perturbed)
    data = {"x": rng.standard_normal((30, 7, 6)).astype(np.float32)}
    options = FinetuneOptions(**{**FAST.to_dict(), "sequence_weight": 0.5, "steps": 20, "eval_every": 10})
    _, result = finetune(original, converted, data, trainable=["w", "b"], options=options)
    assert result.loss_kinds == {"scores": "KL over the last axis (logits)"}
    assert result.metric is not None and result.metric.name == "string agreement (greedy CTC, blank 0)"
    assert [h["step"] for h in result.history] == [0, 10, 20]
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # the held-back loss (KL + CTC) comes down


def test_held_back_selection_treats_one_sample_as_noise() -> None:
    from onnx_lowrank.finetune.training import _better

    agreement_loss = choose_loss("s", np.eye(3, dtype=np.float32)[None].repeat(4, 0))
    assert agreement_loss.higher_is_better
    # 77 held-back samples at 96.1 %: one more sample agreeing is within the noise, so the loss decides
    assert not _better(74 / 77, 0.5, 73 / 77, 0.4, 73 / 77, agreement_loss, 77)
    assert _better(74 / 77, 0.3, 73 / 77, 0.4, 73 / 77, agreement_loss, 77)
    assert _better(77 / 77, 0.9, 73 / 77, 0.4, 73 / 77, agreement_loss, 77)  # four more: a real gain
    assert not _better(71 / 77, 0.1, 74 / 77, 0.4, 75 / 77, agreement_loss, 77)  # below the best kept agreement
    l2 = choose_loss("r", np.ones((4, 3, 5, 5), np.float32))
    assert _better(0.1, 9.0, 0.2, 0.0, 0.2, l2, 77) and not _better(0.2, 0.1, 0.1, 9.0, 0.1, l2, 77)
