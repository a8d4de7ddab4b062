"""Beyond the spatial split: channel low-rank convs, fully connected layers, the parameter budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_model, run
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.factorization import relative_error, singular_values

RNG = np.random.default_rng(11)
FULL = 1 << 20


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> None:
    scale = float(np.abs(a).max()) or 1.0
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- channel split of convs


@pytest.mark.parametrize(
    ("kernel", "group", "attrs"),
    [
        ((1, 1), 1, {}),
        ((1, 1), 2, {"strides": [2, 2]}),
        ((3, 3), 1, {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
        ((3, 1), 2, {"auto_pad": "SAME_UPPER"}),
        ((5,), 1, {"pads": [2, 1]}),
    ],
    ids=["1x1", "1x1-grouped-strided", "3x3-geometry", "3x1-grouped-same", "1d"],
)
@pytest.mark.parametrize("rank", [1, 3, FULL])
def test_channel_split_is_exact_at_full_rank_and_optimal_below(kernel: tuple[int, ...], group: int, attrs: dict, rank: int) -> None:
    shape = (2, 8, 10, 9)[: 2 + len(kernel)]
    model = conv_model(n=12, c=8, kernel=kernel, group=group, input_shape=shape, attrs=attrs)
    out, report = decompose(model, rank=rank, force=True, kinds=["channel"], check_runs=0)
    onnx.checker.check_model(out, full_check=True)
    (layer,) = report.layers
    assert layer.decomposed and layer.kind == "channel"
    w = numpy_helper.to_array(model.graph.initializer[0])
    s = singular_values(w, group, "channel")
    assert layer.rank == min(rank, s.shape[1])
    assert layer.optimal_error == pytest.approx(relative_error(s, layer.rank), abs=1e-9)
    assert abs(layer.relative_error - layer.optimal_error) < 1e-5  # fp32 storage of the factors
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Conv", "Conv"]
    second = out.graph.node[1]
    assert list(next(a.ints for a in second.attribute if a.name == "kernel_shape")) == [1] * len(kernel)
    if rank == FULL:
        x = RNG.standard_normal(shape).astype(np.float32)
        _close(run(model, {"x": x})[0], run(out, {"x": x})[0])


# --------------------------------------------------------------------------- fully connected layers


def _fc_model(
    op: str, trans_a: int = 0, trans_b: int = 0, alpha: float | None = None, beta: float | None = None, bias: tuple | None = (7,)
):
    w = RNG.standard_normal((7, 5) if trans_b else (5, 7)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    attrs: dict[str, float | int] = {}
    if op == "Gemm":
        attrs = {"transA": trans_a, "transB": trans_b}
        if alpha is not None:
            attrs["alpha"] = alpha
        if beta is not None:
            attrs["beta"] = beta
        if bias is not None:
            inits.append(numpy_helper.from_array(RNG.standard_normal(bias).astype(np.float32), "C"))
            inputs.append("C")
        x_shape = [5, 3] if trans_a else [3, 5]
    else:
        x_shape = [2, 3, 5]
    node = helper.make_node(op, inputs, ["y"], name="fc", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a"] * (3 if op == "MatMul" else 2))], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x_shape, w


@pytest.mark.parametrize(
    "case",
    [
        {"op": "Gemm"},
        {"op": "Gemm", "trans_b": 1},
        {"op": "Gemm", "trans_a": 1, "alpha": 0.5, "beta": 2.0},
        {"op": "Gemm", "trans_b": 1, "bias": (3, 7)},
        {"op": "Gemm", "bias": None},
        {"op": "MatMul"},
    ],
    ids=["plain", "transB", "transA-alpha-beta", "bias-matrix", "no-bias", "matmul"],
)
@pytest.mark.parametrize("rank", [2, FULL])
def test_fully_connected_split(case: dict, rank: int) -> None:
    model, x_shape, w = _fc_model(**case)
    out, report = decompose(model, rank=rank, force=True, check_runs=0)
    onnx.checker.check_model(out, full_check=True)
    (layer,) = report.layers
    assert layer.decomposed and layer.kind == "channel"
    assert [n.op_type for n in out.graph.node] == [case["op"]] * 2
    matrix = w if case.get("trans_b") else w.T  # out x in
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    assert layer.optimal_error == pytest.approx(float(np.sqrt((s[layer.rank :] ** 2).sum() / (s**2).sum())), abs=1e-9)
    assert abs(layer.relative_error - layer.optimal_error) < 1e-5
    if case["op"] == "Gemm" and case.get("bias", (7,)) is not None:
        assert out.graph.node[1].input[2] == "C"  # the bias stays, on the second node
    x = RNG.standard_normal(x_shape).astype(np.float32)
    if rank == FULL:
        _close(run(model, {"x": x})[0], run(out, {"x": x})[0])


def test_params_ratio_budget_holds_and_combines_with_speedup() -> None:
    model = conv_model(n=32, c=32, input_shape=(1, 32, 16, 16), attrs={"pads": [1, 1, 1, 1]})
    _, report = decompose(model, params_ratio=0.3, check_runs=0)
    assert report.params_after / report.params_before <= 0.3
    _, both = decompose(model, params_ratio=0.5, speedup=2.5, check_runs=0)
    assert both.params_after / both.params_before <= 0.5 and both.mac_ratio >= 2.5
    with pytest.raises(LowRankError, match=r"--params-ratio 0\.001 cannot be reached: the least reachable is"):
        decompose(model, params_ratio=0.001)


# --------------------------------------------------------------------------- zoo models (need torch)


@pytest.fixture(scope="module")
def zoo() -> object:
    pytest.importorskip("torch", reason="building the model zoo needs torch: pip install -e '.[models]'")
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from models import make_zoo

    return make_zoo


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_resnet50_reaches_its_speedup_with_the_channel_split(zoo: object, speedup: float) -> None:
    path = zoo.cached("resnet50-bnfolded")  # type: ignore[attr-defined]
    out, report = decompose(path, speedup=speedup, by="macs", check_runs=0)
    assert report.mac_ratio >= speedup
    assert "channel" in {layer.kind for layer in report.decomposed}  # the spatial split alone stops at 1.9x
    onnx.checker.check_model(out)
    with np.load(zoo.reference_path(path)) as reference:  # type: ignore[attr-defined]
        x = reference["input"]
    assert np.isfinite(run(out, {"input": x})[0]).all()
    for layer in report.decomposed:
        assert abs(layer.relative_error - layer.optimal_error) < 1e-5


def test_vgg16_params_ratio_quarter() -> None:
    # the shipped small VGG-16 (its fc6 holds most parameters, as in the full one; the full one's 4096x25088 SVD
    # alone takes half a minute, which benchmarks/conversion.py times)
    out, report = decompose(Path(__file__).resolve().parents[1] / "models" / "vgg16_small.onnx", params_ratio=0.25, check_runs=0)
    assert report.params_after <= 0.25 * report.params_before
    assert any(layer.op_type == "Gemm" for layer in report.decomposed)
    onnx.checker.check_model(out)


def test_unreachable_target_is_refused_in_one_line(zoo: object, tmp_path: Path) -> None:
    path = zoo.cached("mobilenetv2-bnfolded")  # type: ignore[attr-defined]
    done = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "decompose", str(path), str(tmp_path / "out.onnx"), "--speedup", "50", "--by", "macs"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--speedup 50 cannot be reached: the most any allocation gives is" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_layout_shape_matches_the_kernel_without_reading_it() -> None:
    from onnx_lowrank.passes import find_sites
    from onnx_lowrank.run_shapes import resolve_shapes

    models = [_fc_model("Gemm")[0], _fc_model("Gemm", trans_b=1)[0], _fc_model("MatMul")[0], conv_model(group=2)]
    w = RNG.standard_normal((4, 3, 3, 2)).astype(np.float32)  # ConvTranspose (C, N/g, kh, kw), 2 groups
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="ct", group=2)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])], [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for model in models:
        (site,) = find_sites(model, resolve_shapes(model))
        assert site.layout_shape() == tuple(site.kernel().shape)
