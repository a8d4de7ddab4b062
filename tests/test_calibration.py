"""Data-aware refit (onnx_lowrank.calibration) and sensitivity allocation (onnx_lowrank.sensitivity).

The references are onnxruntime runs of the original model: the refit must
lower the layer's output error on the calibration data, reproduce the layer
exactly where the pair can (full rank, from deliberately spoilt horizontal
kernels, for every width geometry), and report the errors it reaches.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import conv_model, run
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.api import decompose
from onnx_lowrank.calibration import load_calibration, refit, refit_layers
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.sensitivity import allocate_ranks, measure_sensitivity

FULL = 10**6  # a rank every layer clips to its full rank


def smooth_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Spatially correlated inputs (random walks along both axes): unlike white noise,
    they make the data-aware fit differ from the kernel-space optimum."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x = np.cumsum(np.cumsum(x, axis=-1), axis=-2)
    x /= x.std()
    # channels mixed unevenly, so some input directions dominate
    mix = rng.standard_normal((shape[1], shape[1])) * np.linspace(2.0, 0.1, shape[1])
    return np.einsum("dc,bc...->bd...", mix, x).astype(np.float32)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def horizontal_weight(model: onnx.ModelProto, node_name: str) -> onnx.TensorProto:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(t for t in model.graph.initializer if t.name == node.input[1])


# --------------------------------------------------------------------------- refit


def test_refit_lowers_the_layer_error_on_calibration_data() -> None:
    model = conv_model(n=12, c=8, input_shape=("n", 8, 14, 14), attrs={"pads": [1, 1, 1, 1]}, seed=1)
    data = {"x": smooth_inputs((40, 8, 14, 14), seed=2)}
    decomposed, report = decompose(model, rank=3)
    result = refit_layers(model, decomposed, report, data, batch_size=16)
    (reference,) = run(model, data)
    (free,) = run(decomposed, data)
    (fitted,) = run(result.model, data)
    before, after = rel_error(free, reference), rel_error(fitted, reference)
    assert after < before
    assert after < 0.9 * before  # correlated inputs: a real gain, not rounding
    (layer,) = result.layers
    assert layer.refit and layer.reason is None
    # the errors reported from the normal equations are the ones onnxruntime measures
    assert layer.error_before == pytest.approx(before, rel=1e-3)
    assert layer.error_after == pytest.approx(after, rel=1e-3)
    assert result.samples == 40
    # the input model is not changed
    assert horizontal_weight(decomposed, layer_name(report)).raw_data != horizontal_weight(result.model, layer_name(report)).raw_data


def layer_name(report: Any) -> str:
    return str(report.decomposed[0].horizontal_node)


def test_refit_never_worse_than_data_free_even_on_white_noise() -> None:
    model = conv_model(n=6, c=4, input_shape=("n", 4, 9, 9), seed=3)
    data = {"x": np.random.default_rng(4).standard_normal((5, 4, 9, 9)).astype(np.float32)}
    decomposed, report = decompose(model, rank=2)
    (reference,) = run(model, data)
    (free,) = run(decomposed, data)
    (fitted,) = run(refit(model, decomposed, report, data, batch_size=1), data)
    assert rel_error(fitted, reference) <= rel_error(free, reference) + 1e-6


def test_full_rank_refit_keeps_outputs() -> None:
    model = conv_model(n=8, c=6, input_shape=("n", 6, 10, 10), attrs={"pads": [1, 1, 1, 1]}, seed=5)
    data = {"x": smooth_inputs((12, 6, 10, 10), seed=6)}
    decomposed, report = decompose(model, rank=FULL, force=True)
    (reference,) = run(model, data)
    (fitted,) = run(refit(model, decomposed, report, data), data)
    assert rel_error(fitted, reference) < 1e-5


GEOMETRIES = [
    pytest.param({"pads": [1, 1, 1, 1]}, 1, (12, 13), id="pads"),
    pytest.param({"pads": [0, 2, 1, 0], "strides": [1, 2]}, 1, (11, 14), id="asymmetric-pads-stride"),
    pytest.param({"pads": [1, 2, 1, 2], "dilations": [1, 2], "strides": [2, 3]}, 1, (12, 17), id="dilation-strides"),
    pytest.param({"pads": [1, 0, 1, 1]}, 2, (10, 11), id="groups"),
    pytest.param({"auto_pad": "SAME_UPPER", "strides": [1, 2]}, 2, (9, 12), id="same-upper-groups"),
    pytest.param({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, 1, (10, 12), id="same-lower"),
    pytest.param({"auto_pad": "VALID", "dilations": [2, 2]}, 1, (11, 12), id="valid-dilation"),
]


@pytest.mark.parametrize(("attrs", "group", "size"), GEOMETRIES)
@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
def test_refit_recovers_spoilt_horizontal_kernels(attrs: dict[str, Any], group: int, size: tuple[int, int], symbolic: bool) -> None:
    """At full rank the pair can reproduce the conv exactly; from a horizontal kernel and bias replaced by noise the
    least-squares fit must find that again, which it can only do if its im2col matches the conv's geometry exactly.
    Symbolic input sizes keep ``auto_pad`` on the horizontal conv, so the fit resolves the pads itself."""
    shape: tuple[Any, ...] = ("n", 6, "h", "w") if symbolic else (1, 6, *size)
    model = conv_model(n=8, c=6, group=group, input_shape=shape, attrs=attrs, seed=7)
    decomposed, report = decompose(model, rank=FULL, force=True)
    layer = report.decomposed[0]
    weight = horizontal_weight(decomposed, str(layer.horizontal_node))
    spoilt = np.random.default_rng(8).standard_normal(tuple(weight.dims)).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(spoilt, weight.name))
    data = {"x": smooth_inputs((6, 6, *size), seed=9)}
    batch = 6 if symbolic else 1
    result = refit_layers(model, decomposed, report, data, ridge=1e-10, batch_size=batch)
    (reference,) = run(model, data) if symbolic else (np.concatenate([run(model, {"x": data["x"][i : i + 1]})[0] for i in range(6)]),)
    fitted = np.concatenate([run(result.model, {"x": data["x"][i : i + batch]})[0] for i in range(0, 6, batch)])
    assert rel_error(fitted, reference) < 1e-4
    assert result.layers[0].error_after is not None and result.layers[0].error_after < 1e-4


def test_refit_3d_conv() -> None:
    model = conv_model(n=6, c=4, kernel=(2, 3, 3), input_shape=(1, 4, 5, 6, 7), attrs={"pads": [0, 1, 1, 1, 1, 0]}, seed=10)
    decomposed, report = decompose(model, rank=FULL, force=True)
    weight = horizontal_weight(decomposed, str(report.decomposed[0].horizontal_node))
    weight.CopyFrom(numpy_helper.from_array(np.ones(tuple(weight.dims), np.float32), weight.name))
    data = {"x": smooth_inputs((3, 4, 5, 6, 7), seed=11)}
    fitted = np.concatenate([run(refit(model, decomposed, report, data, ridge=1e-10), {"x": data["x"][i : i + 1]})[0] for i in range(3)])
    reference = np.concatenate([run(model, {"x": data["x"][i : i + 1]})[0] for i in range(3)])
    assert rel_error(fitted, reference) < 1e-4


def test_refit_adds_a_bias_to_a_conv_without_one() -> None:
    model = conv_model(n=8, c=5, bias=False, input_shape=("n", 5, 9, 9), seed=12)
    data = {"x": smooth_inputs((10, 5, 9, 9), seed=13) + 3.0}  # a mean offset a bias can absorb
    decomposed, report = decompose(model, rank=2)
    fitted = refit(model, decomposed, report, data)
    node = next(n for n in fitted.graph.node if n.name == report.decomposed[0].horizontal_node)
    assert len(node.input) == 3
    (reference,) = run(model, data)
    assert rel_error(run(fitted, data)[0], reference) < rel_error(run(decomposed, data)[0], reference)


def chain_model(widths: list[int], size: int = 12, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu layers, 3x3 with pads 1, then a global average pool and Flatten to ``logits``."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i, (c, n) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((n, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["logits"], name="flatten"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", widths[0], size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_asymmetric_refit_of_a_chain_beats_data_free() -> None:
    model = chain_model([3, 12, 12, 12], seed=14)
    data = {"input": smooth_inputs((24, 3, 12, 12), seed=15)}
    decomposed, report = decompose(model, rank=3)
    result = refit_layers(model, decomposed, report, data)
    assert [layer.refit for layer in result.layers] == [True, True, True]
    assert all(layer.error_after < layer.error_before for layer in result.layers)  # type: ignore[operator]
    (reference,) = run(model, data)
    assert rel_error(run(result.model, data)[0], reference) < rel_error(run(decomposed, data)[0], reference)


def twin_model(shared_weight: bool) -> onnx.ModelProto:
    """Two convs on one input sharing their bias (and, if asked, their weight), each a graph output."""
    rng = np.random.default_rng(22)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 5, 3, 3)).astype(np.float32), name) for name in ("W1", "W2")]
    inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"))
    second = "W1" if shared_weight else "W2"
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B"], ["y1"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", second, "B"], ["y2"], name="b", pads=[0, 1, 0, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "twins",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 9, 9])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shared_bias_gets_one_bias_per_refit_conv() -> None:
    model = twin_model(shared_weight=False)
    data = {"x": smooth_inputs((10, 5, 9, 9), seed=23) + 1.0}
    decomposed, report = decompose(model, rank=2)
    result = refit_layers(model, decomposed, report, data)
    assert [layer.refit for layer in result.layers] == [True, True]
    biases = {n.input[2] for n in result.model.graph.node if n.name in {layer.horizontal_node for layer in report.decomposed}}
    assert len(biases) == 2  # the first gets a bias of its own; the second then owns "B" alone
    reference, free, fitted = run(model, data), run(decomposed, data), run(result.model, data)
    for i in range(2):
        assert rel_error(fitted[i], reference[i]) < rel_error(free[i], reference[i])


def test_shared_horizontal_kernel_is_left_data_free() -> None:
    model = twin_model(shared_weight=True)
    decomposed, report = decompose(model, rank=2)
    result = refit_layers(model, decomposed, report, {"x": smooth_inputs((4, 5, 9, 9))})
    assert [layer.refit for layer in result.layers] == [False, False]
    assert all("shared" in str(layer.reason) for layer in result.layers)


def test_refit_fits_to_the_batchnorm_output_when_decompose_folds_it() -> None:
    rng = np.random.default_rng(24)
    model = conv_model(n=8, c=5, input_shape=("n", 5, 9, 9), attrs={"pads": [1, 1, 1, 1]}, seed=24)
    model.graph.node[0].output[0] = "conv_out"
    stats = [rng.uniform(0.5, 2.0, 8), rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.5, 2.0, 8)]
    names = ["gamma", "beta", "mean", "var"]
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(stats, names, strict=True))
    model.graph.node.append(helper.make_node("BatchNormalization", ["conv_out", *names], ["y"], name="bn"))
    data = {"x": smooth_inputs((12, 5, 9, 9), seed=25)}
    decomposed, report = decompose(model, rank=2)
    result = refit_layers(model, decomposed, report, data)
    assert result.layers[0].refit
    (reference,) = run(model, data)
    assert rel_error(run(result.model, data)[0], reference) < rel_error(run(decomposed, data)[0], reference)


def test_fixed_batch_model_is_fed_in_its_batch() -> None:
    model = conv_model(n=6, c=4, input_shape=(2, 4, 8, 8), seed=16)
    decomposed, report = decompose(model, rank=2)
    result = refit_layers(model, decomposed, report, {"x": smooth_inputs((7, 4, 8, 8), seed=17)})
    assert result.samples == 6  # the seventh sample does not fill a batch of 2
    with pytest.raises(LowRankError, match="fixed at 2"):
        refit(model, decomposed, report, {"x": smooth_inputs((1, 4, 8, 8))})


def test_refit_arguments_are_checked() -> None:
    model = conv_model(input_shape=(1, 6, 8, 8))
    decomposed, report = decompose(model, rank=2)
    data = {"x": smooth_inputs((2, 6, 8, 8))}
    with pytest.raises(LowRankError, match="ridge"):
        refit(model, decomposed, report, data, ridge=-1.0)
    with pytest.raises(LowRankError, match="batch size"):
        refit(model, decomposed, report, data, batch_size=0)


# --------------------------------------------------------------------------- load_calibration


@pytest.fixture
def model() -> onnx.ModelProto:
    return conv_model(c=3, input_shape=("n", 3, 8, 8))


def test_load_npz_folder_arrays_iterator(tmp_path: Path, model: onnx.ModelProto) -> None:
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8))
    np.savez(tmp_path / "calib.npz", x=x, labels=np.arange(5))
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "x.npy", x)
    batches = iter([{"x": x[:2]}, {"x": x[2:]}])
    for source in (tmp_path / "calib.npz", str(tmp_path / "calib.npz"), folder, {"x": x}, batches):
        data = load_calibration(source, model)
        assert list(data) == ["x"]  # extra keys (labels) dropped
        assert data["x"].dtype == np.float32  # cast to the input's type
        np.testing.assert_allclose(data["x"], x.astype(np.float32))
    raw = load_calibration(tmp_path / "calib.npz")  # without a model: everything, as stored
    assert set(raw) == {"x", "labels"} and raw["x"].dtype == np.float64


def one_line(exc: pytest.ExceptionInfo[LowRankError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_bad_calibration_sources(tmp_path: Path, model: onnx.ModelProto) -> None:
    x = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "missing.npz", model)
    assert "no such calibration file" in one_line(exc)

    np.savez(tmp_path / "other.npz", y=x)
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "other.npz", model)
    assert "lacks model input 'x'" in one_line(exc)

    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 3, 9, 8), np.float32))
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "shape.npz", model)
    assert "has shape (4, 3, 9, 8)" in one_line(exc) and "(n, 3, 8, 8)" in str(exc.value)

    np.savez(tmp_path / "rank.npz", x=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "rank.npz", model)
    assert "has shape" in one_line(exc)

    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "garbage.npz", model)
    assert "not a readable .npz" in one_line(exc)

    np.save(tmp_path / "single.npy", x)
    with pytest.raises(LowRankError) as exc:
        load_calibration(tmp_path / "single.npy", model)
    one_line(exc)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LowRankError) as exc:
        load_calibration(empty, model)
    assert "no .npy files" in one_line(exc)

    with pytest.raises(LowRankError) as exc:
        load_calibration({"x": np.zeros((0, 3, 8, 8), np.float32)}, model)
    assert "no samples" in one_line(exc)

    with pytest.raises(LowRankError) as exc:
        load_calibration(iter([{"x": x}, {"y": x}]), model)
    one_line(exc)

    with pytest.raises(LowRankError) as exc:
        load_calibration({"x": np.array(["a", "b"])}, model)
    one_line(exc)


def test_bad_calibration_reaches_refit_as_one_line_error(tmp_path: Path) -> None:
    model = conv_model(c=3, input_shape=("n", 3, 8, 8))
    decomposed, report = decompose(model, rank=2)
    with pytest.raises(LowRankError) as exc:
        refit(model, decomposed, report, tmp_path / "nope.npz")
    one_line(exc)


# --------------------------------------------------------------------------- sensitivity


def test_sensitivity_allocation_meets_the_budget() -> None:
    model = chain_model([3, 16, 16, 16], size=10, seed=18)
    data = {"input": smooth_inputs((16, 3, 10, 10), seed=19)}
    sens = measure_sensitivity(model, data, samples=16, batch_size=8)
    assert [layer.node for layer in sens.layers] == ["conv0", "conv1", "conv2"] and not sens.skipped
    assert sens.fixed_macs == 0 and sens.total_macs == sum(layer.macs for layer in sens.layers)
    for layer in sens.layers:
        assert layer.ranks == sorted(layer.ranks) and len(layer.ranks) == len(layer.damage)
        assert all(d >= 0 for d in layer.damage)
        # more rank, less damage (broadly: the largest rank hurts less than the smallest)
        assert layer.damage[-1] < layer.damage[0]
    assert sens.samples == 16 and sens.evaluations > len(sens.layers)
    ranks = allocate_ranks(sens, 2.0)
    _, report = decompose(model, ranks=ranks)
    assert report.mac_ratio >= 2.0 - 1e-9
    assert {layer.node: layer.rank for layer in report.decomposed} == ranks
    with pytest.raises(LowRankError, match="cannot be reached"):
        allocate_ranks(sens, 1000.0)


def residual_model() -> onnx.ModelProto:
    """conv0 → relu → conv1 → (+ relu output) → conv2: the suffix of conv1 reads a tensor from before it."""
    model = chain_model([3, 8, 8, 8], size=8, seed=20)
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == "relu1")
    graph.node.insert(index + 1, helper.make_node("Add", ["r1", "r0"], ["skip"], name="add"))
    conv2 = next(n for n in graph.node if n.name == "conv2")
    conv2.input[0] = "skip"
    return model


@pytest.mark.parametrize("build", [lambda: chain_model([3, 8, 8], size=8, seed=20), residual_model], ids=["chain", "residual"])
def test_sensitivity_damage_matches_a_full_run(build: Any) -> None:
    """The suffix-only measurement equals running the whole model with that one layer decomposed."""
    model = build()
    data = {"input": smooth_inputs((8, 3, 8, 8), seed=21)}
    sens = measure_sensitivity(model, data, refit=False, layer_speedups=(2.0,), energies=())
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [layer.node for layer in sens.layers] == convs and not sens.skipped
    (reference,) = run(model, data)
    for layer in sens.layers:
        for rank, damage in zip(layer.ranks, layer.damage, strict=True):
            decomposed, _ = decompose(model, ranks={layer.node: rank})
            (out,) = run(decomposed, data)
            assert damage == pytest.approx(rel_error(out, reference) ** 2, rel=1e-3)
