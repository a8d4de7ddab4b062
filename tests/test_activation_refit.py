"""The activation-aware refit: a decomposed layer read only by an activation is fit to the activation's output.

References are independent of the code under test: the activations' outputs measured in onnxruntime on the
calibration data, the Z-step against a brute-force search over a fine grid, and the linear refit itself
(bit for bit where no activation applies).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from builders import make_model, run
from onnx import TensorProto, helper

from onnx_lowrank.api import decompose
from onnx_lowrank.calibration import CalibrationOptions, refit_layers
from onnx_lowrank.calibration.activation import Activation
from onnx_lowrank.errors import LowRankError

ACTIVATED = ("relu", "leaky", "clip", "clip-attributes")
# the activation-aware error at most this share of the linear refit's on the test's model (measured: 0.966,
# 0.978, 0.892, 0.911); a LeakyRelu hides least of the linear error, a Clip cut on both sides most
GAIN = {"relu": 0.98, "leaky": 0.99, "clip": 0.95, "clip-attributes": 0.95}


def smooth_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Spatially correlated inputs with a mean offset: the layer's outputs have both signs in quantity."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(np.cumsum(rng.standard_normal(shape), axis=-1), axis=-2)
    x /= x.std()
    mix = rng.standard_normal((shape[1], shape[1])) * np.linspace(2.0, 0.2, shape[1])
    return (np.einsum("dc,bc...->bd...", mix, x) + 0.5).astype(np.float32)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def layer_then(tail: str, seed: int = 0) -> onnx.ModelProto:
    """``x (n, 6, 10, 10) → Conv "conv" (10 channels, 3×3, pads 1) → tail → y``."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {
        "W": (rng.standard_normal((10, 6, 3, 3)) / 6).astype(np.float32),
        "B": (rng.standard_normal(10) * 0.3).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    outputs = ["y"]
    opset = 17
    if tail == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="act"))
    elif tail == "leaky":
        nodes.append(helper.make_node("LeakyRelu", ["c"], ["y"], name="act", alpha=0.2))
    elif tail == "clip":
        inits |= {"lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32)}
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="act"))
    elif tail == "clip-attributes":
        opset = 10
        nodes.append(helper.make_node("Clip", ["c"], ["y"], name="act", min=-0.5, max=1.0))
    elif tail == "clip-computed":
        nodes.append(helper.make_node("ReduceMax", ["x"], ["top"], name="top", keepdims=0))
        nodes.append(helper.make_node("Clip", ["c", "", "top"], ["y"], name="act"))
    elif tail == "maxpool-relu":
        nodes.append(helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", ["p"], ["y"], name="act"))
    elif tail == "maxpool-indices":
        nodes.append(helper.make_node("MaxPool", ["c"], ["p", "i"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", ["p"], ["y"], name="act"))
        outputs.append("i")
    elif tail == "maxpool-negative-leaky":
        nodes.append(helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("LeakyRelu", ["p"], ["y"], name="act", alpha=-0.5))
    elif tail == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["y"], name="act"))
    elif tail == "relu-and-add":
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="act"))
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"], name="residual"))
    elif tail == "output":
        nodes.append(helper.make_node("Identity", ["c"], ["y"], name="copy"))
        outputs.append("c")
    else:
        raise AssertionError(tail)
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 10, 10])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT if name != "i" else TensorProto.INT64, None) for name in outputs],
        inits,
        opset=opset,
    )


def both_refits(model: onnx.ModelProto, data: dict[str, np.ndarray], rank: int = 2, **options: Any) -> tuple[Any, Any]:
    """The linear refit and the activation-aware one of the same decomposition, every output position used."""
    decomposed, report = decompose(model, rank=rank)
    common = {"positions": None, **options}
    return (
        refit_layers(model, decomposed, report, data, activations=False, **common),
        refit_layers(model, decomposed, report, data, activations=True, **common),
    )


@pytest.mark.parametrize("tail", ACTIVATED)
def test_the_activation_output_is_fit_closer_than_by_the_linear_refit(tail: str) -> None:
    model = layer_then(tail, seed=1)
    data = {"x": smooth_inputs((24, 6, 10, 10), seed=2)}
    linear, aware = both_refits(model, data)
    (reference,) = run(model, data)
    (by_linear,) = run(linear.model, data)
    (by_aware,) = run(aware.model, data)
    (layer,) = aware.layers
    assert layer.refit and layer.objective == Activation(*_expected(tail)).label
    assert linear.layers[0].objective == "output" and linear.layers[0].activation_reason is None
    # every row is kept: the errors reported are those onnxruntime measures on the activation's output
    assert layer.activation_rows == 24 * 100
    assert layer.activation_error_linear == pytest.approx(rel_error(by_linear, reference), rel=1e-3)
    assert layer.activation_error_after == pytest.approx(rel_error(by_aware, reference), rel=1e-3)
    # and strictly closer: these outputs are cut by the activation in quantity
    assert rel_error(by_aware, reference) < GAIN[tail] * rel_error(by_linear, reference)
    assert layer.activation_error_before is not None and layer.activation_error_after < layer.activation_error_before
    # the linear output, not the objective any more, is reported too (and fits worse than the linear refit's)
    assert layer.error_after is not None and linear.layers[0].error_after is not None
    assert layer.error_after >= linear.layers[0].error_after - 1e-9
    assert aware.activations and not linear.activations


def _expected(tail: str) -> tuple[str, float, float, float]:
    return {
        "relu": ("Relu", 0.0, -np.inf, np.inf),
        "leaky": ("LeakyRelu", 0.2, -np.inf, np.inf),
        "clip": ("Clip", 0.0, 0.0, 1.0),
        "clip-attributes": ("Clip", 0.0, -0.5, 1.0),
    }[tail]


def test_never_worse_than_the_linear_refit_on_its_rows_even_on_white_noise() -> None:
    for seed in range(3):
        model = layer_then("relu", seed=seed)
        data = {"x": np.random.default_rng(seed + 10).standard_normal((4, 6, 10, 10)).astype(np.float32)}
        _, aware = both_refits(model, data, rank=3, activation_iterations=3)
        (layer,) = aware.layers
        assert layer.activation_error_after is not None and layer.activation_error_linear is not None
        assert layer.activation_error_after <= layer.activation_error_linear + 1e-7


def test_through_a_maxpool_the_activation_before_it_is_fit() -> None:
    model = layer_then("maxpool-relu", seed=3)
    data = {"x": smooth_inputs((16, 6, 10, 10), seed=4)}
    linear, aware = both_refits(model, data)
    (layer,) = aware.layers
    assert layer.objective == "Relu after MaxPool"
    assert layer.activation_error_after is not None and layer.activation_error_linear is not None
    assert layer.activation_error_after < layer.activation_error_linear
    # Relu(MaxPool(u)) = MaxPool(Relu(u)): the model's output follows the fit of Relu(u)
    (reference,) = run(model, data)
    assert rel_error(run(aware.model, data)[0], reference) < rel_error(run(linear.model, data)[0], reference)


REFUSED = [
    ("sigmoid", "read by a Sigmoid"),
    ("relu-and-add", "read by 2 nodes (Add, Relu)"),
    ("output", "an output of the graph"),
    ("clip-computed", "Clip's max bound is not a constant"),
    ("maxpool-indices", "MaxPool whose indices are read"),
    ("maxpool-negative-leaky", "alpha < 0"),
]


@pytest.mark.parametrize(("tail", "why"), REFUSED)
def test_without_an_activation_it_applies_to_the_linear_refit_is_bit_identical(tail: str, why: str) -> None:
    model = layer_then(tail, seed=5)
    data = {"x": smooth_inputs((8, 6, 10, 10), seed=6)}
    linear, aware = both_refits(model, data)
    (layer,) = aware.layers
    assert layer.refit and layer.objective == "output"
    assert why in str(layer.activation_reason)
    assert layer.activation_rows is None and layer.activation_error_after is None
    assert aware.model.SerializeToString() == linear.model.SerializeToString()
    assert (layer.error_before, layer.error_after) == (linear.layers[0].error_before, linear.layers[0].error_after)


def chain_model(seed: int) -> onnx.ModelProto:
    """conv0 → Relu → conv1 → Sigmoid → conv2 → Relu → y: three stages, two activations the refit fits."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = {}, [], "x"
    for i, act in enumerate(("Relu", "Sigmoid", "Relu")):
        inits[f"W{i}"] = (rng.standard_normal((8, 8 if i else 6, 3, 3)) / 6).astype(np.float32)
        inits[f"B{i}"] = (rng.standard_normal(8) * 0.3).astype(np.float32)
        nodes.append(helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node(act, [f"c{i}"], [f"a{i}"], name=f"act{i}"))
        x = f"a{i}"
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 10, 10])],
        [helper.make_tensor_value_info("a2", TensorProto.FLOAT, None)],
        inits,
    )


def test_each_layer_reports_its_objective() -> None:
    model = chain_model(seed=7)
    data = {"x": smooth_inputs((12, 6, 10, 10), seed=8)}
    _, aware = both_refits(model, data, rank=3, stages=3)
    by_node = {layer.node: layer for layer in aware.layers}
    assert [by_node[f"conv{i}"].objective for i in range(3)] == ["Relu", "output", "Relu"]
    assert "read by a Sigmoid" in str(by_node["conv1"].activation_reason)
    assert by_node["conv0"].activation_reason is None and by_node["conv2"].activation_reason is None
    record = aware.to_dict()
    assert record["activations"] is True and [layer["objective"] for layer in record["layers"]] == ["Relu", "output", "Relu"]


def test_fully_connected_layer_before_a_relu() -> None:
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    inits = {"W": (rng.standard_normal((16, 12)) / 3).astype(np.float32), "B": (rng.standard_normal(16) * 0.3).astype(np.float32)}
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    x = rng.standard_normal((300, 12)) @ (rng.standard_normal((12, 12)) * np.linspace(2, 0.1, 12))
    data = {"x": x.astype(np.float32)}
    linear, aware = both_refits(model, data, rank=3)
    (layer,) = aware.layers
    assert layer.objective == "Relu" and layer.activation_rows == 300
    (reference,) = run(model, data)
    assert rel_error(run(aware.model, data)[0], reference) < rel_error(run(linear.model, data)[0], reference)


@pytest.mark.parametrize(
    "activation",
    [Activation("Relu"), Activation("LeakyRelu", alpha=0.1), Activation("LeakyRelu", alpha=-0.3), Activation("Clip", low=-0.5, high=0.7)],
    ids=lambda a: a.label,
)
@pytest.mark.parametrize("lam", [0.01, 0.3, 5.0])
def test_the_z_step_is_the_minimiser_a_grid_search_finds(activation: Activation, lam: float) -> None:
    rng = np.random.default_rng(11)
    t = activation.apply(rng.standard_normal(400).astype(np.float32) * 1.5)
    u = rng.standard_normal(400).astype(np.float32) * 1.5
    z = activation.closest(t, u, lam)
    grid = np.linspace(-40, 40, 16001, dtype=np.float32)  # steps of 0.005
    cost = np.square(activation.apply(grid)[None] - t[:, None]) + lam * np.square(grid[None] - u[:, None])
    searched = cost.min(axis=1)
    found = np.square(activation.apply(z) - t) + lam * np.square(z - u)
    assert np.all(found <= searched + 1e-5)  # never worse than the best grid point
    assert np.all(found >= searched - 2e-3 * (1 + lam))  # and the grid comes within its step of it


def test_activation_options_are_checked() -> None:
    model = layer_then("relu")
    decomposed, report = decompose(model, rank=2)
    data = {"x": smooth_inputs((2, 6, 10, 10))}
    for options, word in (
        ({"activation_iterations": -1}, "iterations"),
        ({"row_memory": 0}, "row memory"),
        ({"activation_rows": 0}, "rows"),
        ({"activation_lambdas": (0.0, 1.0)}, "lambdas"),
    ):
        with pytest.raises(LowRankError, match=word):
            refit_layers(model, decomposed, report, data, activations=True, **options)


def test_kept_rows_are_bounded_and_the_fit_still_improves() -> None:
    model = layer_then("relu", seed=12)
    data = {"x": smooth_inputs((24, 6, 10, 10), seed=13)}
    _, aware = both_refits(model, data, activation_rows=500)
    (layer,) = aware.layers
    assert layer.activation_rows is not None and 0 < layer.activation_rows <= 500
    assert layer.activation_error_after is not None and layer.activation_error_linear is not None
    assert layer.activation_error_after < layer.activation_error_linear


def test_the_default_is_the_same_for_the_options_and_the_refit() -> None:
    model = layer_then("relu", seed=14)
    data = {"x": smooth_inputs((4, 6, 10, 10), seed=15)}
    decomposed, report = decompose(model, rank=2)
    (layer,) = refit_layers(model, decomposed, report, data).layers
    assert layer.objective == ("Relu" if CalibrationOptions().activation_refit else "output")


def test_too_few_rows_for_the_activation_fit_leave_the_linear_refit_and_say_so() -> None:
    model = layer_then("relu", seed=16)
    data = {"x": smooth_inputs((8, 6, 10, 10), seed=17)}
    linear, aware = both_refits(model, data, activation_rows=20)  # rank 2, 3 taps: 7 unknowns, 28 rows needed
    (layer,) = aware.layers
    assert layer.refit and layer.objective == "output"
    assert "fewer than the 28 its activation fit needs" in str(layer.activation_reason)
    assert aware.model.SerializeToString() == linear.model.SerializeToString()
