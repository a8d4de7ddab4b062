"""What exporters produce: weight forms, precisions, opsets, subgraphs, functions, external data."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import conv_model, run
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank import LowRankError, decompose, model_io

RNG = np.random.default_rng(7)


def _x(shape: tuple[int, ...] = (1, 6, 12, 12), dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _assert_same(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> None:
    scale = float(np.abs(a).max()) or 1.0
    np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol, atol=rtol * scale)


def _graph_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 17, **kwargs: object) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)  # type: ignore[arg-type]


def _weight(shape: tuple[int, ...] = (8, 6, 3, 3)) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _check_exact(model: onnx.ModelProto, **kwargs: object) -> tuple[onnx.ModelProto, onnx_lowrank.Report]:
    out, report = decompose(model, rank=10_000, force=True, **kwargs)  # type: ignore[arg-type]
    onnx.checker.check_model(out, full_check=True)
    x = _x()
    _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0])
    return out, report


# --------------------------------------------------------------------------- weight forms


def test_constant_node_weight_is_decomposed_and_removed() -> None:
    w = _weight()
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    out, report = _check_exact(_graph_model(nodes, []))
    assert report.layers[0].decomposed
    assert "Constant" not in [n.op_type for n in out.graph.node]


def test_identity_chain_weight_is_decomposed() -> None:
    nodes = [
        helper.make_node("Identity", ["W0"], ["W1"], name="id0"),
        helper.make_node("Identity", ["W1"], ["W"], name="id1"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    out, report = _check_exact(_graph_model(nodes, [numpy_helper.from_array(_weight(), "W0")]))
    assert report.layers[0].decomposed
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]  # the now-unused chain is gone
    assert not out.graph.initializer or all(t.name != "W0" for t in out.graph.initializer)


def test_shared_weight_is_factored_once() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["x", "W"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r", "b"], ["y"], name="add"),
    ]
    model = _graph_model(nodes, [numpy_helper.from_array(_weight(), "W")])
    out, report = _check_exact(model, kinds=["spatial"])
    assert all(layer.decomposed for layer in report.layers)
    assert len(out.graph.initializer) == 2  # one vertical and one horizontal tensor serve both convs
    verticals = {n.input[1] for n in out.graph.node if n.name.endswith("/vertical")}
    assert len(verticals) == 1


def test_weight_behind_cast_keeps_its_storage_dtype() -> None:
    w = _weight().astype(ml_dtypes.bfloat16)
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = _graph_model(nodes, [numpy_helper.from_array(w, "W16")])
    out, report = decompose(model, rank=10_000, force=True, kinds=["spatial"])
    onnx.checker.check_model(out, full_check=True)
    assert report.layers[0].decomposed
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    assert [n.op_type for n in out.graph.node].count("Cast") == 2
    x = _x()
    # bf16 factors: the product carries bf16 rounding (8 bits of mantissa)
    _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0], rtol=3e-2)


def test_quantized_weight_and_qlinearconv_are_skipped_with_reason() -> None:
    wq = RNG.integers(-100, 100, size=(8, 6, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="dq"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    out, report = decompose(_graph_model(nodes, inits), rank=4)
    assert not report.layers[0].decomposed
    assert "quantized" in (report.layers[0].reason or "")
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Conv"]


def test_runtime_weight_is_skipped_with_reason() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["m"], name="mean", keepdims=1),
        helper.make_node("Mul", ["W0", "m"], ["W"], name="scale"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = _graph_model(nodes, [numpy_helper.from_array(_weight(), "W0")])
    _, report = decompose(model, rank=4)
    assert not report.layers[0].decomposed
    assert "ReduceMean" in (report.layers[0].reason or "")


@pytest.mark.parametrize("opset", [11, 17])
def test_constant_expression_weight_is_folded(opset: int) -> None:
    # a TF-style kernel (kh, kw, C, N) transposed to (N, C, kh, kw) and scaled, as exporters leave it unfolded
    hwio = _weight((3, 3, 6, 8))
    nodes = [
        helper.make_node("Transpose", ["W_hwio"], ["W_t"], name="to_oihw", perm=[3, 2, 0, 1]),
        helper.make_node("Mul", ["W_t", "scale"], ["W"], name="scale_w"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(hwio, "W_hwio"), numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    model = _graph_model(nodes, inits, opset=opset)
    out, report = _check_exact(model, kinds=["spatial"])
    assert report.layers[0].decomposed
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]  # the folded chain is gone
    assert {t.name for t in out.graph.initializer} == {"conv/vertical.weight", "conv/horizontal.weight"}


def _computed_zero_bias(weight: str, like: str, out: str, constant_attr: str) -> list[onnx.NodeProto]:
    """The zero bias torch's dynamo exporter gives a bias-less Conv when its optimizer is off:
    Expand(CastLike(Constant 0, x), Expand(Shape(W, end=1), [1]))."""
    value = {"value_float": 0.0, "value_floats": [0.0], "value": numpy_helper.from_array(np.zeros((), np.float32))}[constant_attr]
    return [
        helper.make_node("Constant", [], ["zero"], name="zero", **{constant_attr: value}),
        helper.make_node("CastLike", ["zero", like], ["zero_like"], name="cast_like"),
        helper.make_node("Shape", [weight], ["w_shape"], name="shape_w", end=1),
        helper.make_node("Constant", [], ["one"], name="one", value_ints=[1]),
        helper.make_node("Expand", ["w_shape", "one"], ["n"], name="n"),
        helper.make_node("Expand", ["zero_like", "n"], [out], name="bias"),
    ]


@pytest.mark.parametrize("constant_attr", ["value_float", "value_floats", "value"])
@pytest.mark.parametrize("with_bn", [False, True])
def test_bias_computed_from_the_weight_shape(constant_attr: str, with_bn: bool) -> None:
    """A bias built from Shape(W) and CastLike(·, x) is a constant: BN folds through it, and neither it nor the
    original weight it reads survives the rewrite (it would keep the old weight in the file)."""
    w = _weight()
    conv_out = "c" if with_bn else "y"
    nodes = [
        *_computed_zero_bias("W", "x", "b", constant_attr),
        helper.make_node("Conv", ["x", "W", "b"], [conv_out], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(w, "W")]
    if with_bn:
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], name="bn"))
        for name, values in (
            ("g", RNG.uniform(0.5, 2, 8)),
            ("beta", RNG.standard_normal(8)),
            ("mean", RNG.standard_normal(8)),
            ("var", RNG.uniform(0.5, 2, 8)),
        ):
            inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    model = _graph_model(nodes, inits, opset=18)
    out, report = _check_exact(model, kinds=["spatial"])
    assert report.layers[0].decomposed and report.folded_batchnorms == (["bn"] if with_bn else []) and not report.kept_batchnorms
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]  # the bias expression and the BN are gone
    assert "W" not in {t.name for t in out.graph.initializer}
    assert report.params_after < report.params_before + 8 * 10_000  # no second copy of the weight


def test_unfolded_batchnorm_reported_with_the_reason() -> None:
    """A BN whose Conv bias is computed at run time stays, and the report says why."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["b_full"], name="mean_x", axes=[0, 2, 3], keepdims=0),
        helper.make_node("Slice", ["b_full", "s0", "s1"], ["b6"], name="slice"),
        helper.make_node("Concat", ["b6", "b6"], ["b12"], name="concat", axis=0),
        helper.make_node("Slice", ["b12", "s0", "s8"], ["b"], name="slice8"),
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    inits = [numpy_helper.from_array(_weight(), "W")]
    inits += [numpy_helper.from_array(np.array([k], np.int64), n) for n, k in (("s0", 0), ("s1", 6), ("s8", 8))]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("g", "var")]
    inits += [numpy_helper.from_array(np.zeros(8, np.float32), n) for n in ("beta", "mean")]
    model = _graph_model(nodes, inits, opset=17)
    _, report = decompose(model, rank=2)
    assert report.kept_batchnorms == {"bn": "Conv bias is computed at run time (by ReduceMean)"}
    assert not report.folded_batchnorms


# --------------------------------------------------------------------------- precisions


@pytest.mark.parametrize("rank", [2, 5, 10_000])
def test_fp16_model_factors_in_fp16_with_optimal_error(rank: int) -> None:
    model = conv_model(dtype=TensorProto.FLOAT16, attrs={"pads": [1, 1, 1, 1]})
    out, report = decompose(model, rank=rank, force=True, kinds=["spatial"])
    onnx.checker.check_model(out, full_check=True)
    layer = report.layers[0]
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    # fp16 storage rounds each factor by ~2^-11: the stored error sits at the optimum plus that rounding
    assert layer.relative_error is not None and layer.optimal_error is not None
    assert abs(layer.relative_error - layer.optimal_error) < 2e-3
    if rank == 10_000:
        x = _x(dtype=np.float16)
        _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0], rtol=1e-2)


def test_double_model() -> None:
    # onnxruntime's CPU Conv has no float64 kernel; onnx's reference evaluator does
    from onnx.reference import ReferenceEvaluator

    model = conv_model(dtype=TensorProto.DOUBLE, attrs={"pads": [1, 1, 1, 1]})
    out, report = decompose(model, rank=10_000, force=True)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.DOUBLE}
    x = _x(dtype=np.float64)
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, {"x": x})[0], expected, rtol=1e-10, atol=1e-10)
    assert report.layers[0].relative_error < 1e-12


# --------------------------------------------------------------------------- opsets


def _supported_opsets() -> list[int]:
    return list(range(7, onnx.defs.onnx_opset_version() + 1))  # 7 .. the newest the installed onnx knows


@pytest.mark.parametrize("opset", _supported_opsets())
def test_every_opset_keeps_its_opset(opset: int) -> None:
    model = conv_model(opset=opset, attrs={"pads": [1, 0, 2, 1], "strides": [1, 2]})
    if opset < 9:  # IR 3 era: initializers are listed as graph inputs
        model.ir_version = 3
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer)
    out, report = decompose(model, rank=10_000, force=True, kinds=["spatial"])
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert out.ir_version == model.ir_version
    onnx.checker.check_model(out)
    assert report.layers[0].decomposed
    if opset < 9:
        initializer_names = {t.name for t in out.graph.initializer}
        assert initializer_names <= {v.name for v in out.graph.input}
        assert "W" not in {v.name for v in out.graph.input}
    x = _x()
    _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0])


# --------------------------------------------------------------------------- subgraphs and functions


def _conv_node(x: str, w: str, y: str, name: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def test_conv_in_if_branches() -> None:
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8, 12, 12])
    # then-branch reads the outer-scope weight, else-branch has its own initializer
    then_g = helper.make_graph([_conv_node("x", "W", "b", "then_conv")], "then", [], [branch_out])
    else_g = helper.make_graph(
        [_conv_node("x", "We", "b", "else_conv")], "else", [], [branch_out], [numpy_helper.from_array(_weight(), "We")]
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12, 12]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array(_weight(), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = decompose(model, rank=10_000, force=True)
    onnx.checker.check_model(out, full_check=True)
    assert {layer.node for layer in report.decomposed} == {"then_conv", "else_conv"}
    x = _x()
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        _assert_same(run(model, feeds)[0], run(out, feeds)[0])


def test_conv_in_loop_and_scan_bodies() -> None:
    state = [1, 8, 12, 12]
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["s_in", "Wl"], ["s_out"], name="loop_conv", pads=[1, 1, 1, 1]),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, state),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, state)],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Conv", ["c_in", "Wl"], ["c_conv"], name="scan_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c_conv", "k"], ["c_out"]),
            helper.make_node("Identity", ["k"], ["k_out"]),
        ],
        "scan_body",
        [helper.make_tensor_value_info("c_in", TensorProto.FLOAT, state), helper.make_tensor_value_info("k", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, state), helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Loop", ["trips", "", "h"], ["l"], name="loop", body=loop_body),
        helper.make_node("Scan", ["l", "ks"], ["y", "kk"], name="scan", body=scan_body, num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12, 12]),
            helper.make_tensor_value_info("ks", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, state), helper.make_tensor_value_info("kk", TensorProto.FLOAT, [2])],
        [
            numpy_helper.from_array(_weight(), "W"),
            numpy_helper.from_array(_weight((8, 8, 3, 3)) * 0.2, "Wl"),
            numpy_helper.from_array(np.array(2, np.int64), "trips"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = decompose(model, rank=10_000, force=True, kinds=["spatial"])
    onnx.checker.check_model(out, full_check=True)
    assert {layer.node for layer in report.decomposed} == {"stem", "loop_conv", "scan_conv"}
    feeds = {"x": _x(), "ks": np.array([0.5, -1.5], np.float32)}
    _assert_same(run(model, feeds)[0], run(out, feeds)[0])


def test_conv_in_model_local_function() -> None:
    w = _weight()
    body = [
        helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(w, "fw")),
        helper.make_node("Conv", ["fx", "fw"], ["fy"], name="fconv", pads=[1, 1, 1, 1]),
    ]
    function = helper.make_function("local", "Block", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Block", ["x"], ["y"], name="block", domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[function])
    out, report = decompose(model, rank=10_000, force=True, kinds=["spatial"])
    onnx.checker.check_model(out, full_check=True)
    assert [layer.node for layer in report.decomposed] == ["Block::fconv"]
    ops = [n.op_type for n in out.functions[0].node]
    assert ops == ["Constant", "Constant", "Conv", "Conv"]  # factors as Constant nodes: functions have no initializers
    x = _x()
    _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0])


# --------------------------------------------------------------------------- external data and size


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> None:
    model = onnx.ModelProto.FromString(model.SerializeToString())  # save_model moves the caller's tensors out
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnx_lowrank", *args], capture_output=True, text=True, timeout=300)


def test_external_data_in_external_data_out(tmp_path: Path) -> None:
    # weights large enough to pass onnx's 1 KiB threshold for external storage
    model = conv_model(n=32, c=32, input_shape=(1, 32, 12, 12), attrs={"pads": [1, 1, 1, 1]})
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.onnx"
    _save_external(model, src)
    before = (_sha(src), _sha(src_dir / "weights.bin"))
    result = _cli("decompose", str(src), str(out_dir / "lowrank.onnx"), "--rank", "100", "--force")
    assert result.returncode == 0, result.stderr
    assert (_sha(src), _sha(src_dir / "weights.bin")) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["lowrank.onnx", "lowrank.onnx.data"]
    umask = os.umask(0)
    os.umask(umask)
    # both files as any new file would be (onnx itself writes the data file 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out_dir.iterdir()} == {0o666 & ~umask}
    out = onnx.load(str(out_dir / "lowrank.onnx"))
    onnx.checker.check_model(str(out_dir / "lowrank.onnx"), full_check=True)
    x = _x((1, 32, 12, 12))
    _assert_same(run(model, {"x": x})[0], run(out, {"x": x})[0])


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    model = conv_model()
    (tmp_path / "m").mkdir()
    src = tmp_path / "m" / "model.onnx"
    _save_external(model, src)
    # point the weight somewhere it must not be read from
    proto = onnx.load(str(src), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(src))
    (tmp_path / "outside.bin").write_bytes((tmp_path / "m" / "weights.bin").read_bytes())
    with pytest.raises(LowRankError, match=r"outside|relative"):
        model_io.load_model(src)
    result = _cli("decompose", str(src), str(tmp_path / "out.onnx"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_external_data_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    _save_external(conv_model(), src)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(LowRankError, match="truncated"):
        model_io.load_model(src)


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real >2 GiB model takes minutes to build; the limit is what decides, so lower it
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    model = conv_model(n=32, c=32, input_shape=(1, 32, 12, 12))
    out, _ = decompose(model, rank=8)
    model_io.save_model(out, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    loaded = model_io.load_model(tmp_path / "big.onnx")
    session = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    x = _x((1, 32, 12, 12))
    _assert_same(run(loaded, {"x": x})[0], session.run(None, {"x": x})[0])


def test_repeated_node_names_are_reported_apart() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W2"], ["b"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    model = _graph_model(nodes, [numpy_helper.from_array(_weight(), "W"), numpy_helper.from_array(_weight(), "W2")])
    out, report = decompose(model, rank=10_000, force=True, kinds=["spatial"])
    onnx.checker.check_model(out, full_check=True)
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    reference.graph.node[1].name = "conv_b"  # onnxruntime refuses the repeated name the exporter left
    x = _x()
    _assert_same(run(reference, {"x": x})[0], run(out, {"x": x})[0])
    assert [layer.node for layer in report.layers] == ["conv", "conv#2"]
    assert all(layer.decomposed for layer in report.layers)
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("policy", [{"rank": 3}, {"speedup": 1.2, "by": "macs"}])
def test_non_finite_weight_is_skipped_with_reason(policy: dict[str, float]) -> None:
    w = _weight()
    w[0, 0, 0, 0] = np.nan
    nodes = [
        helper.make_node("Conv", ["x", "Wbad"], ["a"], name="bad", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W"], ["b"], name="good", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    model = _graph_model(nodes, [numpy_helper.from_array(w, "Wbad"), numpy_helper.from_array(_weight(), "W")])
    out, report = decompose(model, kinds=["spatial"], **policy)  # type: ignore[arg-type]
    bad, good = report.layers
    assert not bad.decomposed and "non-finite" in (bad.reason or "")
    assert good.decomposed
    assert out.graph.node[0].name == "bad"
    layers = onnx_lowrank.inspect(model)
    assert not layers[0].eligible and "non-finite" in (layers[0].reason or "")
