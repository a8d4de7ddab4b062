"""Malformed models, data files and flag values: each known way an input once ended in an internal error,
a left-behind file or an output onnxruntime refuses, reproduced, with the behaviour it must have instead.

A layer whose attributes or weight contradict each other is left as it is with the reason (the rest of
the model still converts); a file that is not a valid model, or data that cannot be used, is refused with
one line and exit 2; sizes that cannot fit in memory are refused up front with the size named.
Every run here goes through :func:`cli_contract.run_cli` and :func:`cli_contract.violations`.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import conv_model, make_model
from cli_contract import Outcome, run_cli, snapshot, violations
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.verify import compare_outputs


def decompose_run(
    tmp_path: Path, model: onnx.ModelProto | bytes, *flags: str, report: bool = True
) -> tuple[Outcome, dict[str, Any] | None]:
    """``decompose IN OUT --report R *flags`` on ``model``; the contract is asserted, the report returned when written."""
    src = tmp_path / "in.onnx"
    src.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    (tmp_path / "out").mkdir(exist_ok=True)
    out, rep = tmp_path / "out" / "out.onnx", tmp_path / "out" / "report.json"
    argv = ["decompose", src, out, *flags, *(["--report", rep] if report else [])]
    before = snapshot(tmp_path)
    outcome = run_cli(argv)
    outputs = ["out/out.onnx", "out/out.onnx.data", "out/report.json"]
    assert violations(outcome, before, snapshot(tmp_path), outputs) == [], outcome
    if outcome.code == 0 and loads(src):
        assert loads(out), "the input loads in onnxruntime, the output does not"
    return outcome, json.loads(rep.read_text()) if outcome.code == 0 and report else None


def loads(path: Path) -> bool:
    """Whether onnxruntime loads the model at ``path``."""
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own exception types
        return False
    return True


def layer_reason(report: dict[str, Any], node: str = "conv") -> str:
    layer = next(layer for layer in report["layers"] if layer["node"] == node)
    assert not layer["decomposed"]
    assert layer["macs_before"] >= 0
    return str(layer["reason"])


def conv_bn_model(param_lengths: tuple[int, int, int, int] = (8, 8, 8, 8), weight_dims: list[int] | None = None) -> onnx.ModelProto:
    """Conv (8 channels) -> BatchNormalization, whose four parameters have the given lengths."""
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {"W": rng.standard_normal((8, 6, 3, 3)).astype(np.float32)}
    for name, length in zip(("gamma", "beta", "mean", "var"), param_lengths, strict=True):
        inits[name] = (rng.random(length) + 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12, 12])], [helper.make_tensor_value_info("y", 1, None)], inits
    )
    if weight_dims is not None:
        del model.graph.initializer[0].dims[:]
        model.graph.initializer[0].dims.extend(weight_dims)
    return model


# --------------------------------------------------------------------------- 1. conv strides / dilations / pads


@pytest.mark.parametrize(
    ("attrs", "word"),
    [
        ({"strides": [0, 1]}, "strides"),
        ({"strides": [1]}, "strides"),
        ({"strides": [1, 1, 1]}, "strides"),
        ({"dilations": [1, 1, 1]}, "dilations"),
        ({"dilations": [0, 1]}, "dilations"),
        ({"pads": [1, 1]}, "pads"),
        ({"pads": [1, 1, -2, 1]}, "pads"),
        ({"group": 0}, "group"),
        ({"group": 3}, "group"),  # 8 output channels do not split into 3 groups
        ({"group": 2}, "channels"),  # the weight (8, 6, 3, 3) in 2 groups expects 12 input channels, the input has 6
        ({"auto_pad": "SAME_MIDDLE"}, "auto_pad"),
        ({"kernel_shape": [3]}, "kernel_shape"),
        ({"pads": [9, 0, 0, 0], "strides": [1, 1], "dilations": [1, 9]}, "empty"),  # dilated kernel wider than the input
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()),
)
def test_conv_attributes_are_validated(tmp_path: Path, attrs: dict[str, Any], word: str) -> None:
    """Cause 1: an invalid conv attribute leaves the layer as it is, with a reason naming the attribute."""
    model = conv_model()
    model.graph.node[0].attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items() if k != "group")
    if "group" in attrs:
        next(a for a in model.graph.node[0].attribute if a.name == "group").i = attrs["group"]
    outcome, report = decompose_run(tmp_path, model, "--rank", "2", "--force")
    assert outcome.code == 0, outcome
    assert report is not None
    assert word in layer_reason(report), layer_reason(report)


def test_conv_attributes_of_the_wrong_type(tmp_path: Path) -> None:
    """Cause 1: ``strides`` given as floats (or a string) is refused for that layer, not read as ints."""
    model = conv_model()
    model.graph.node[0].attribute.append(helper.make_attribute("strides", [1.5, 1.0]))
    outcome, report = decompose_run(tmp_path, model, "--rank", "2")
    assert outcome.code == 0 and report is not None
    assert "strides" in layer_reason(report)


def test_conv_transpose_attributes_are_validated(tmp_path: Path) -> None:
    """Cause 1, ConvTranspose: output_padding / output_shape of the wrong length or sign are refused per layer."""
    for attrs, word in (
        ({"output_padding": [1]}, "output_padding"),
        ({"output_shape": [5]}, "output_shape"),
        ({"strides": [0, 2]}, "strides"),
    ):
        rng = np.random.default_rng(0)
        node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="conv", **attrs)
        model = make_model(
            [node],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            {"W": rng.standard_normal((6, 8, 3, 3)).astype(np.float32)},
        )
        outcome, report = decompose_run(tmp_path, model, "--rank", "2", "--force")
        assert outcome.code == 0 and report is not None, outcome
        assert word in layer_reason(report), (attrs, layer_reason(report))


# --------------------------------------------------------------------------- 2. BatchNormalization parameters


def test_batchnorm_parameter_of_the_wrong_length(tmp_path: Path) -> None:
    """Cause 2: a BN scale of 5 values after an 8-channel Conv is not folded, and says why; the Conv still converts."""
    outcome, report = decompose_run(tmp_path, conv_bn_model((5, 8, 8, 8)), "--rank", "2")
    assert outcome.code == 0 and report is not None, outcome
    assert "bn" in report["kept_batchnorms"]
    assert "5" in report["kept_batchnorms"]["bn"] and "8" in report["kept_batchnorms"]["bn"]
    assert report["layers"][0]["decomposed"]


def test_batchnorm_with_negative_variance_is_not_folded(tmp_path: Path) -> None:
    """A variance below -epsilon has no real scale: the BN is kept (no NaN weights, no numpy warning)."""
    model = conv_bn_model()
    var = next(t for t in model.graph.initializer if t.name == "var")
    var.CopyFrom(numpy_helper.from_array(np.full(8, -1.0, np.float32), "var"))
    outcome, report = decompose_run(tmp_path, model, "--rank", "2")
    assert outcome.code == 0 and report is not None
    assert "variance" in report["kept_batchnorms"]["bn"]


# --------------------------------------------------------------------------- 3. declared dims vs data


@pytest.mark.parametrize("index", [0, 1, 4], ids=["conv-weight", "bn-scale", "bn-variance"])
def test_weight_dims_that_do_not_match_the_data(tmp_path: Path, index: int) -> None:
    """Cause 3: a tensor declaring 2^40 elements over 432 (or 8) values is refused where it is read, never reshaped."""
    model = conv_bn_model()
    model.graph.initializer[index].dims[0] = 2**40
    outcome, report = decompose_run(tmp_path, model, "--rank", "2")
    assert outcome.code == 0 and report is not None, outcome
    assert "1099511627776" in report["kept_batchnorms"]["bn"]
    if index == 0:
        assert "memory" in layer_reason(report)
        assert report["macs_before"] >= 0


def test_weight_dims_that_do_not_match_the_data_inspect(tmp_path: Path) -> None:
    """Cause 3, ``inspect``: the layer is listed with the reason, its MACs are not negative."""
    model = conv_model()
    model.graph.initializer[0].dims[2] = 2**40
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    outcome = run_cli(["inspect", path, "--json"])
    assert outcome.code == 0, outcome
    (layer,) = json.loads(outcome.stdout)
    assert not layer["eligible"] and "memory" in layer["reason"] and layer["macs"] >= 0


# --------------------------------------------------------------------------- 4. corrupt strings


def test_corrupt_string_field(tmp_path: Path) -> None:
    """Cause 4: a text field that is not UTF-8 makes the file an invalid model: one line, exit 2."""
    model = conv_model()
    model.producer_name = "PRODUCER"
    data = model.SerializeToString().replace(b"PRODUCER", b"\xff\xfe\xfdDUCER")
    outcome, _ = decompose_run(tmp_path, data, "--rank", "2")
    assert outcome.code == 2 and "utf-8" in outcome.error.lower(), outcome
    for command in (["inspect"], ["verify"]):
        src = tmp_path / "in.onnx"
        out = run_cli([*command, src, *([src] if command == ["verify"] else [])])
        assert out.code == 2 and "utf-8" in out.error.lower(), out


def test_corrupt_string_in_a_node_attribute(tmp_path: Path) -> None:
    """Cause 4: the same for a node name deep in the graph."""
    model = conv_model(name="CONVNAME")
    data = model.SerializeToString().replace(b"CONVNAME", b"CONV\xc3\x28ME")
    outcome, _ = decompose_run(tmp_path, data, "--rank", "2")
    assert outcome.code == 2 and "utf-8" in outcome.error.lower(), outcome


# --------------------------------------------------------------------------- 5. a file that starts like a zip


def test_calibration_file_that_starts_like_a_zip(tmp_path: Path) -> None:
    """Cause 5: ``--calibration`` on a file beginning ``PK`` that is no zip archive."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    outcome, _ = decompose_run(tmp_path, conv_model(input_shape=("n", 6, 12, 12)), "--calibration", str(bad))
    assert outcome.code == 2 and "npz" in outcome.error, outcome


# --------------------------------------------------------------------------- 6. verify inputs without samples


@pytest.mark.parametrize(
    ("array", "word"),
    [
        (np.zeros((0, 6, 12, 12), np.float32), "no samples"),
        (np.float32(1.0), "scalar"),
        (np.zeros((1, 6, 12), np.float32), "shape"),
        (np.full((1, 6, 12, 12), "a"), "dtype"),
    ],
    ids=["zero-samples", "scalar", "wrong-rank", "strings"],
)
def test_verify_inputs_without_samples(tmp_path: Path, array: np.ndarray, word: str) -> None:
    """Cause 6: ``--verify-inputs``/``verify --inputs`` of zero samples, a scalar, a wrong rank or strings: one line, nothing written."""
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=array)
    model = conv_model(input_shape=("n", 6, 12, 12))
    outcome, _ = decompose_run(tmp_path, model, "--rank", "2", "--verify-inputs", str(inputs))
    assert outcome.code == 2 and word in outcome.error, outcome
    src = tmp_path / "in.onnx"
    outcome = run_cli(["verify", src, src, "--runs", "0", "--inputs", inputs])
    assert outcome.code == 2 and word in outcome.error, outcome


# --------------------------------------------------------------------------- 7. sizes that cannot fit


def test_input_shape_too_big_to_allocate(tmp_path: Path) -> None:
    """Cause 7: ``--input-shape x=1,6,2^31,2^31 --verify`` is refused up front, the size named."""
    model = conv_model(input_shape=("n", 6, "h", "w"))
    outcome, _ = decompose_run(tmp_path, model, "--rank", "2", "--verify", "--input-shape", "x=1,6,2147483648,2147483648")
    assert outcome.code == 2 and "bytes" in outcome.error and "memory" in outcome.error, outcome


def test_verify_model_declaring_a_huge_dim(tmp_path: Path) -> None:
    """Cause 7: ``verify`` of a model whose input declares a 2^31 dim: exit 2 naming the size, not out of memory."""
    path = tmp_path / "big.onnx"
    path.write_bytes(conv_model(input_shape=(1, 6, 2**31, 12)).SerializeToString())
    before = snapshot(tmp_path)
    outcome = run_cli(["verify", path, path, "--runs", "0"])
    assert violations(outcome, before, snapshot(tmp_path)) == [], outcome
    assert outcome.code == 2 and "memory" in outcome.error and "GiB" in outcome.error, outcome


def test_npz_declaring_a_huge_array(tmp_path: Path) -> None:
    """Cause 7: an .npz member whose header declares 2^40 elements is refused before anything is allocated."""
    inputs = tmp_path / "huge.npz"
    np.savez(inputs, x=np.zeros((1, 6, 12, 12), np.float32))
    import zipfile

    with zipfile.ZipFile(inputs) as z:
        payload = z.read("x.npy")
    header = payload.replace(b"(1, 6, 12, 12)", b"(1099511627776, 6, 12, 12)")
    with zipfile.ZipFile(inputs, "w") as z:
        z.writestr("x.npy", header)
    model = conv_model(input_shape=("n", 6, 12, 12))
    outcome, _ = decompose_run(tmp_path, model, "--rank", "2", "--verify-inputs", str(inputs))
    assert outcome.code == 2 and "x" in outcome.error, outcome
    outcome, _ = decompose_run(tmp_path, model, "--calibration", str(inputs))
    assert outcome.code == 2 and "x" in outcome.error, outcome


# --------------------------------------------------------------------------- 8. nothing left behind


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_failed_verify_leaves_nothing(tmp_path: Path, external: bool) -> None:
    """Cause 8: when ``--verify-inputs`` cannot be used, neither the model, its data file nor the report is left."""
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, image=np.zeros((1, 6, 12, 12), np.float32))  # the model's input is x
    flags = ["--rank", "2", "--verify-inputs", str(inputs), *(["--external-data"] if external else [])]
    outcome, _ = decompose_run(tmp_path, conv_model(input_shape=("n", 6, 12, 12)), *flags)
    assert outcome.code == 2 and "x" in outcome.error, outcome


def test_verify_failing_at_run_time_leaves_nothing(tmp_path: Path) -> None:
    """Cause 8: inputs that onnxruntime refuses at run time (after the model was converted) leave nothing either."""
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((1, 6, 2, 2), np.float32))  # smaller than the 3x3 kernel: onnxruntime fails
    outcome, _ = decompose_run(tmp_path, conv_model(input_shape=("n", 6, "h", "w")), "--rank", "2", "--verify-inputs", str(inputs))
    assert outcome.code == 2, outcome


def test_outputs_replace_old_ones_together(tmp_path: Path) -> None:
    """A failing run leaves an earlier run's outputs exactly as they were; a successful one replaces them all."""
    model = conv_model(input_shape=("n", 6, 12, 12))
    outcome, report = decompose_run(tmp_path, model, "--rank", "2")
    assert outcome.code == 0 and report is not None
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((0, 6, 12, 12), np.float32))
    outcome, _ = decompose_run(tmp_path, model, "--rank", "3", "--verify-inputs", str(inputs))  # the contract: nothing changed
    assert outcome.code == 2
    outcome, report = decompose_run(tmp_path, model, "--rank", "3")
    assert outcome.code == 0 and report is not None and report["layers"][0]["rank"] == 3


# --------------------------------------------------------------------------- 9. weight rank vs kernel_shape


def test_weight_rank_contradicting_kernel_shape(tmp_path: Path) -> None:
    """Cause 9: a 6-D weight on a 4-D input with kernel_shape [3, 3] is left as it is (the output loads in onnxruntime)."""
    model = conv_model(kernel=(3, 3, 3, 3), attrs={"kernel_shape": [3, 3]})
    outcome, report = decompose_run(tmp_path, model, "--rank", "2", "--force")
    assert outcome.code == 0 and report is not None, outcome
    assert "kernel_shape" in layer_reason(report), layer_reason(report)


def test_weight_rank_contradicting_the_input_rank(tmp_path: Path) -> None:
    """Cause 9: a 5-D weight on a 4-D input (no kernel_shape) is left as it is."""
    model = conv_model(kernel=(3, 3, 3))
    outcome, report = decompose_run(tmp_path, model, "--rank", "2", "--force")
    assert outcome.code == 0 and report is not None, outcome
    assert "input" in layer_reason(report), layer_reason(report)


# --------------------------------------------------------------------------- NaN / Inf


def nan_model() -> onnx.ModelProto:
    model = conv_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    w[1, 0, 0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    return model


def test_verify_self_with_nan_weights_passes(tmp_path: Path) -> None:
    """``verify IN IN`` on a model with NaN/Inf weights: same NaN pattern, outputs match; the non-finite values are reported."""
    path = tmp_path / "nan.onnx"
    path.write_bytes(nan_model().SerializeToString())
    before = snapshot(tmp_path)
    outcome = run_cli(["verify", path, path, "--runs", "0"])
    assert violations(outcome, before, snapshot(tmp_path)) == [], outcome
    assert outcome.code == 0 and "outputs match" in outcome.stdout, outcome
    assert "non-finite" in outcome.stdout
    outcome = run_cli(["verify", path, path, "--runs", "0", "--json"])
    data = json.loads(outcome.stdout)
    (out,) = data["outputs"]
    assert out["passed"] and out["nonfinite_original"] == out["nonfinite_candidate"] > 0
    assert all(math.isfinite(out[k]) for k in ("max_abs", "mean_abs", "relative_l2", "cosine"))


def test_compare_outputs_non_finite_patterns() -> None:
    """Same NaN/Inf positions (and signs) count as equal; a NaN where the other has a number, or -inf vs inf, fails."""
    a = np.array([[1.0, np.nan, np.inf, -np.inf]])
    assert compare_outputs(["y"], [a], [a.copy()], 1e-3, 1e-4)[0].passed
    for b in ([[1.0, 2.0, np.inf, -np.inf]], [[1.0, np.nan, -np.inf, -np.inf]], [[np.nan, np.nan, np.inf, -np.inf]]):
        stats = compare_outputs(["y"], [a], [np.array(b)], 1e-3, 1e-4)[0]
        assert not stats.passed
        assert stats.nonfinite_mismatch > 0


def test_decompose_model_with_nan_weights(tmp_path: Path) -> None:
    """A NaN weight leaves that layer alone with the reason; no numpy warning reaches the terminal."""
    outcome, report = decompose_run(tmp_path, nan_model(), "--rank", "2", "--verify")
    assert outcome.code == 0 and report is not None, outcome
    assert "finite" in layer_reason(report) or "NaN" in layer_reason(report)


# --------------------------------------------------------------------------- the library raises LowRankError too


def test_library_raises_lowrank_error_for_huge_random_inputs() -> None:
    """The same checks hold for the Python API: a huge --input-shape is a LowRankError, not a MemoryError."""
    model = conv_model(input_shape=("n", 6, "h", "w"))
    with pytest.raises(LowRankError, match="memory"):
        onnx_lowrank.verify(model, model, runs=0, input_shapes={"x": [1, 6, 2**31, 2**31]})


# --------------------------------------------------------------------------- found by the fuzz suite


def test_external_data_without_length(tmp_path: Path) -> None:
    """An external tensor whose ``length`` is 0 is read by its dims, as onnxruntime reads it (onnx's loader would read
    to the end of the file); an explicit length that contradicts the dims makes the model invalid."""
    model = conv_model(input_shape=("n", 6, 12, 12))
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    proto = onnx.load(str(src), load_external_data=False)
    for tensor in proto.graph.initializer:
        next(e for e in tensor.external_data if e.key == "length").value = "0"
    src.write_bytes(proto.SerializeToString())
    assert loads(src)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.onnx"
    before = snapshot(tmp_path)
    outcome = run_cli(["decompose", src, out, "--rank", "2"])
    assert violations(outcome, before, snapshot(tmp_path), ["out/out.onnx", "out/out.onnx.data"]) == [], outcome
    assert outcome.code == 0 and loads(out)
    next(e for e in proto.graph.initializer[0].external_data if e.key == "length").value = "7"
    src.write_bytes(proto.SerializeToString())
    outcome = run_cli(["inspect", src])
    assert outcome.code == 2 and "does not match its dims" in outcome.error, outcome


def test_calibration_data_with_nan(tmp_path: Path) -> None:
    """NaN calibration data would make every refit factor NaN: refused with one line."""
    data = tmp_path / "calibration.npz"
    x = np.random.default_rng(0).standard_normal((4, 6, 12, 12)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(data, x=x)
    outcome, _ = decompose_run(tmp_path, conv_model(input_shape=("n", 6, 12, 12)), "--calibration", str(data))
    assert outcome.code == 2 and "NaN" in outcome.error, outcome


def test_input_shape_for_an_input_the_model_lacks(tmp_path: Path) -> None:
    """``--input-shape`` naming no input of the model is an error, not silently ignored."""
    outcome, _ = decompose_run(tmp_path, conv_model(), "--rank", "2", "--input-shape", "image=1,6,12,12")
    assert outcome.code == 2 and "no input 'image'" in outcome.error, outcome
    src = tmp_path / "in.onnx"
    for argv in (["inspect", src], ["verify", src, src, "--runs", "0"]):
        outcome = run_cli([*argv, "--input-shape", "image=1,6,12,12"])
        assert outcome.code == 2 and "no input 'image'" in outcome.error, outcome


def test_conv_without_inputs(tmp_path: Path) -> None:
    """A Conv node with no inputs at all is listed with a reason, not a crash."""
    model = conv_model()
    del model.graph.node[0].input[:]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    outcome = run_cli(["inspect", path])
    assert outcome.code == 0 and "no weight input" in outcome.stdout, outcome


def test_strides_from_a_function_attribute(tmp_path: Path) -> None:
    """A conv in a model-local function whose strides refer to the call's attribute is left alone, with the reason."""
    rng = np.random.default_rng(0)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="fconv", pads=[1, 1, 1, 1])
    conv.attribute.append(onnx.AttributeProto(name="strides", ref_attr_name="s", type=onnx.AttributeProto.INTS))
    weight = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32)))
    function = helper.make_function("local", "Block", ["x"], ["y"], [weight, conv], [helper.make_opsetid("", 17)], attributes=["s"])
    call = helper.make_node("Block", ["x"], ["y"], name="call", domain="local", s=[2, 2])
    model = make_model(
        [call], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])], [helper.make_tensor_value_info("y", 1, None)]
    )
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    outcome, report = decompose_run(tmp_path, model, "--rank", "2", "--force")
    assert outcome.code == 0 and report is not None, outcome
    assert "function attribute 's'" in layer_reason(report, "Block::fconv")


# a 2-d array is a class sequence per sample (padded with -1), for per-position class scores
@pytest.mark.parametrize("labels", [np.int64(3), np.zeros((1, 2, 2)), np.array(["cat"])], ids=["scalar", "3-d", "strings"])
def test_verify_labels_that_are_not_class_indices(tmp_path: Path, labels: np.ndarray) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(conv_model(input_shape=("n", 6, 12, 12)).SerializeToString())
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((1, 6, 12, 12), np.float32), labels=labels)
    outcome = run_cli(["verify", src, src, "--runs", "0", "--inputs", inputs])
    assert outcome.code == 2 and "labels" in outcome.error, outcome


# --------------------------------------------------------------------------- --sample: one input set as the model takes it


def rate_model() -> onnx.ModelProto:
    """A conv per branch of an If on ``sr == 16000`` (``sr`` an int64 scalar), after which a float ``state`` is added."""
    rng = np.random.default_rng(0)

    def branch(name: str, kernel: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((4, 4, kernel, kernel)).astype(np.float32), f"{name}_W")
        conv = helper.make_node("Conv", ["x", f"{name}_W"], [f"{name}_y"], name=f"{name}_conv", pads=[kernel // 2] * 4)
        return helper.make_graph([conv], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])

    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["f"], name="if", then_branch=branch("then", 3), else_branch=branch("else", 5)),
        helper.make_node("Add", ["f", "state"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, 9]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4, 9, 9]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"rate": np.array(16000, np.int64)})


def _rate_sample(**changes: Any) -> dict[str, Any]:
    arrays: dict[str, Any] = {
        "x": np.ones((1, 4, 9, 9), np.float32),
        "state": np.zeros((1, 4, 9, 9), np.float32),
        "sr": np.array(16000, np.int64),
    }
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_rate_sample(sr=None), "lacks model input 'sr' (has: state, x)"),
        (_rate_sample(labels=np.arange(2)), "holds 'labels', not an input of the model (its inputs: x, state, sr)"),
        (_rate_sample(sr=np.array([16000])), "'sr' has shape (1,), one axis more than the model's () (a scalar: a 0-d array)"),
        (
            _rate_sample(x=np.ones((1, 1, 4, 9, 9), np.float32)),
            "'x' has shape (1, 1, 4, 9, 9), one axis more than the model's (n, 4, 9, 9)",
        ),
        (_rate_sample(state=np.ones((4, 9, 9), np.float32)), "'state' has shape (4, 9, 9); the model expects (1, 4, 9, 9)"),
        (_rate_sample(sr=np.array(16000.0)), "'sr' has floating dtype float64; the model's input is int64 (integers)"),
        (
            _rate_sample(sr=np.array(2**63, np.uint64)),
            "'sr' has values 9223372036854775808..9223372036854775808, outside the model's int64",
        ),
        (_rate_sample(sr=np.array("16k")), "'sr' has dtype <U3"),
        (_rate_sample(x=np.full((1, 4, 9, 9), np.inf, np.float32)), "'x' holds NaN or infinite values"),
    ],
    ids=["missing", "extra", "sr-sample-axis", "x-sample-axis", "state-rank", "sr-float", "sr-range", "sr-text", "x-inf"],
)
def test_bad_samples(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    """Every bad --sample is one line naming the input, exit 2, nothing written, the sample file untouched."""
    sample = tmp_path / "sample.npz"
    np.savez(sample, **arrays)
    outcome, _ = decompose_run(tmp_path, rate_model(), "--speedup", "1.5", "--by", "macs", "--sample", str(sample))
    assert outcome.code == 2 and message in outcome.error, outcome


def test_sample_declaring_a_huge_array(tmp_path: Path) -> None:
    """A sample whose header declares 2^40 elements is refused with the size, never allocated."""
    member = io.BytesIO()
    np.save(member, np.zeros((1, 4, 9, 9), np.float32))
    sample = tmp_path / "sample.npz"
    with zipfile.ZipFile(sample, "w") as archive:
        archive.writestr("x.npy", member.getvalue().replace(b"(1, 4, 9, 9)", b"(1099511627776, 4, 9, 9)"))
        archive.writestr("state.npy", _npy(np.zeros((1, 4, 9, 9), np.float32)))
        archive.writestr("sr.npy", _npy(np.array(16000, np.int64)))
    outcome, _ = decompose_run(tmp_path, rate_model(), "--sample", str(sample))
    assert outcome.code == 2 and "array 'x': declares shape (1099511627776, 4, 9, 9)" in outcome.error, outcome


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_random_rate_is_said_and_the_sample_fixes_it(tmp_path: Path) -> None:
    """Without --sample the random ``sr`` takes the else branch and the report says a random value chose it; with
    --sample at 16 kHz the then branch is planned and nothing is said."""
    outcome, report = decompose_run(tmp_path, rate_model(), "--speedup", "1.5", "--by", "macs", "--check-runs", "0")
    assert outcome.code == 0 and report is not None, outcome
    assert "the branch of If 'if' (else_branch ran) was chosen by a random value of input 'sr'" in outcome.stdout
    assert report["control_flow"][0]["runs"] == {"then_branch": 0, "else_branch": 1}
    sample = tmp_path / "sample.npz"
    np.savez(sample, **_rate_sample())
    outcome, report = decompose_run(
        tmp_path, rate_model(), "--speedup", "1.5", "--by", "macs", "--check-runs", "0", "--sample", str(sample)
    )
    assert outcome.code == 0 and report is not None and "a random value" not in outcome.stdout, outcome
    assert report["control_flow"][0]["runs"] == {"then_branch": 1, "else_branch": 0}
