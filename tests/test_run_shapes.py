"""Sizes that really run (issue: plan on the shapes that run): the report's MACs against an independent count.

Models with dynamic axes exported from torch (``dynamic_models.py``) are converted at ``--speedup 2`` with the
reference input size given; their MACs before and after must equal the count onnxruntime's profiler gives for
that input (``mac_count.py``) within 1%, and the count must show the 2x. The If model is sized with an input
taking each branch, and the Loop model by its trip count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, run
from dynamic_models import MODELS, export
from mac_count import profiled_macs, random_input
from onnx import TensorProto, helper

from onnx_lowrank import LowRankError, decompose, inspect
from onnx_lowrank.cli import main
from onnx_lowrank.run_shapes import resolve_shapes

CASES = [(name, MODELS[name][2]) for name in MODELS] + [("branchy", (1, 3, 32, 32))]  # 32 wide: the else branch


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("dynamic")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = export(name, folder / f"{name}.onnx")
        return cache[name]

    return get


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_report_macs_equal_the_macs_that_run(exported: Callable[[str], Path], name: str, shape: tuple[int, ...]) -> None:
    path = exported(name)
    model = onnx.load(path)
    input_name = MODELS[name][1]
    new, report = decompose(model, speedup=2, input_shapes={input_name: shape}, by="macs")
    feeds = {input_name: random_input(shape)}
    before, after = profiled_macs(model, feeds), profiled_macs(new, feeds)
    assert report.shapes["source"] == "run" and report.macs_exact
    assert report.macs_before == pytest.approx(before, rel=0.01)
    assert report.macs_after == pytest.approx(after, rel=0.01)
    assert before / after >= 1.99
    # dynamic axes stay dynamic: the converted model runs at another size, with the original's output shape
    dynamic = set(MODELS[name][3]) - {0}
    other = tuple(d * 2 if i in dynamic else d for i, d in enumerate(shape))
    x = {input_name: random_input(other, seed=1)}
    assert run(new, x)[0].shape == run(model, x)[0].shape


def test_per_time_step_classifier_counts_every_step(exported: Callable[[str], Path]) -> None:
    """The CRNN's Linear after the run-time Reshape multiplies T = W/4 rows, not one; its LSTM counts too."""
    _, report = decompose(onnx.load(exported("crnn")), rank=8, input_shapes={"image": [1, 1, 32, 256]})
    layers = {layer.op_type: layer for layer in report.layers}
    assert layers["MatMul"].macs_before == 64 * 256 * 37 and layers["MatMul"].shape_known
    assert layers["LSTM"].macs_before == 64 * 2 * 4 * 128 * (256 + 128) and not layers["LSTM"].decomposed


@pytest.mark.parametrize(("shape", "taken"), [((1, 3, 64, 64), "then_branch"), ((1, 3, 32, 32), "else_branch")])
def test_if_counts_the_branch_that_runs(exported: Callable[[str], Path], shape: tuple[int, ...], taken: str) -> None:
    model = onnx.load(exported("branchy"))
    new, report = decompose(model, speedup=2, input_shapes={"x": shape}, by="macs")
    (flow,) = report.control_flow
    assert flow["op_type"] == "If" and flow["runs"][taken] == 1 and sum(flow["runs"].values()) == 1
    idle = next(label for label in flow["subgraphs"] if label != taken)
    assert flow["subgraphs"][taken]["ran"] and not flow["subgraphs"][idle]["ran"]
    for layer in report.layers:
        if idle in layer.scope:
            assert layer.ran is False and not layer.counted and not layer.decomposed and "does not run" in str(layer.reason)
    # the other branch still works, left as it was
    other = (1, 3, 32, 32) if taken == "then_branch" else (1, 3, 64, 64)
    x = {"x": random_input(other)}
    assert run(new, x)[0].shape == run(model, x)[0].shape


def test_per_layer_policies_decompose_both_branches(exported: Callable[[str], Path]) -> None:
    """A rank policy needs no sizes: layers of the branch that did not run are decomposed too, their MACs uncounted."""
    model = onnx.load(exported("branchy"))
    new, report = decompose(model, rank=10_000, force=True, input_shapes={"x": [1, 3, 64, 64]})
    assert all(layer.decomposed for layer in report.layers)
    for shape in ((1, 3, 64, 64), (1, 3, 32, 32)):
        x = {"x": random_input(shape)}
        np.testing.assert_allclose(run(new, x)[0], run(model, x)[0], rtol=1e-3, atol=1e-3)


def _loop_model(trips: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["s_in", "W"], ["s_out"], name="body_conv", pads=[1, 1, 1, 1]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 16, 10, 10]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Loop", ["M", "cond", "x"], ["y"], name="loop", body=body),
        helper.make_node("Conv", ["y", "W2"], ["z"], name="after", pads=[1, 1, 1, 1]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        {
            "M": np.array(trips, np.int64),
            "cond": np.array(True),
            "W": (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32),
            "W2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32),
        },
    )


@pytest.mark.parametrize("trips", [0, 1, 3])
def test_loop_body_counts_once_per_iteration(trips: int) -> None:
    model = _loop_model(trips)
    _, report = decompose(model, rank=4)
    layers = {layer.node: layer for layer in report.layers}
    per_run = 16 * 16 * 9 * 100
    assert layers["after"].macs_before == per_run and layers["body_conv"].executions == trips
    assert report.control_flow[0]["runs"] == {"body": trips}
    if trips:
        assert layers["body_conv"].macs_before == trips * per_run and layers["body_conv"].counted
    else:
        assert layers["body_conv"].ran is False and not layers["body_conv"].counted
    assert report.macs_before == profiled_macs(model, {"x": random_input((1, 16, 10, 10))})


def test_symbolic_input_refuses_a_budget_and_names_the_input(exported: Callable[[str], Path]) -> None:
    model = onnx.load(exported("crnn"))
    with pytest.raises(LowRankError, match=r"input 'image'.*--input-shape image=1,1,32,WIDTH.*--allow-unknown-shapes"):
        decompose(model, speedup=2)
    _, guessed = decompose(model, speedup=2, allow_unknown_shapes=True)
    assert not guessed.macs_exact and any("one output pixel" in w for w in guessed.warnings)
    (warned,) = {layer.size_note for layer in inspect(model) if not layer.shape_known}
    assert warned is not None and "--input-shape image=1,1,32,WIDTH" in warned


def test_calibration_sizes_the_plan_and_the_sensitivity(exported: Callable[[str], Path]) -> None:
    """With calibration data and no --input-shape, the first sample is the reference input: the sensitivity
    allocation and the report count the MACs that run at its size."""
    model = onnx.load(exported("crnn"))
    data = {"image": np.random.default_rng(0).random((4, 1, 32, 128), dtype=np.float32)}
    new, report = decompose(model, speedup=2, calibration=data, refit=False, by="macs")
    assert report.policy["allocation"].startswith("damage to the outputs")
    feeds = {"image": data["image"][:1]}
    before, after = profiled_macs(model, feeds), profiled_macs(new, feeds)
    assert report.macs_before == pytest.approx(before, rel=0.01) and report.macs_after == pytest.approx(after, rel=0.01)
    assert before / after >= 1.99


def test_shapes_come_from_static_inference_when_it_knows_them() -> None:
    """A model of fixed sizes and no control flow needs no run."""
    model = _loop_model(2)
    assert resolve_shapes(model).source == "run"  # a layer in a Loop body
    static = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="c")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"W": np.ones((4, 4, 3, 3), np.float32)},
    )
    assert resolve_shapes(static).source == "static"


# --------------------------------------------------------------------------- the command line


def _cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("nope=1,3,320,320", "the model has no input 'nope' (its inputs: images)"),
        ("images=1,3,320", "input 'images' has 4 dims"),
        ("images=1,4,320,320", "dim 1 of input 'images' is fixed at 3"),
        ("images=1,3,321,321", "onnxruntime cannot run the model on a random input (images=1,3,321,321)"),
    ],
)
def test_bad_input_shape(
    exported: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, message: str
) -> None:
    src = exported("yolo")
    digest = src.read_bytes()
    code, _, err = _cli(capsys, "decompose", src, tmp_path / "out.onnx", "--input-shape", flag)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert src.read_bytes() == digest and not list(tmp_path.iterdir())


def test_cli_prints_sizes_and_branches(exported: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    code, out, err = _cli(
        capsys, "decompose", exported("branchy"), tmp_path / "out.onnx", "--input-shape", "x=1,3,64,64", "--by", "macs", "--report", report
    )
    assert code == 0 and err == ""
    assert "sizes: from one onnxruntime run on a random input x=1x3x64x64" in out
    assert "If '/If' (then_branch 1x, else_branch 0x on the reference input; per-subgraph figures)" in out
    assert "else_branch: did not run (3 layer(s) left as they are)" in out
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask  # a text file of the normal mode, not a temporary file's 0600


def _quantized_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ConvInteger", ["x", "W1"], ["a"], name="q1", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["a"], ["af"], to=TensorProto.UINT8),
        helper.make_node("ConvInteger", ["af", "W2"], ["y"], name="q2", pads=[1, 1, 1, 1]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        {"W1": rng.integers(0, 3, (8, 4, 3, 3)).astype(np.uint8), "W2": rng.integers(0, 3, (8, 8, 3, 3)).astype(np.uint8)},
    )


def test_nothing_to_decompose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "quantized.onnx"
    onnx.save(_quantized_model(), src)
    code, out, err = _cli(capsys, "decompose", src, tmp_path / "out.onnx", "--rank", "2")
    assert code == 0 and out.splitlines()[-2] == "nothing to decompose: 2 ConvInteger layers: quantized conv (ConvInteger)"
    assert "0.00" not in out and "nan" not in out.lower()
    code, out, err = _cli(capsys, "decompose", src, tmp_path / "out2.onnx", "--speedup", "2")
    assert code == 2 and err.strip() == (
        "onnx-lowrank: error: --speedup 2 cannot be reached: nothing to decompose: 2 ConvInteger layers: quantized conv (ConvInteger)"
    )
    _, report = decompose(_quantized_model(), rank=2)
    assert report.macs_before == report.macs_after == (8 * 4 + 8 * 8) * 9 * 64  # their MACs still count
    assert math.isclose(report.mac_ratio, 1.0)
