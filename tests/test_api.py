"""The Python API: :func:`onnx_lowrank.decompose`, :func:`~onnx_lowrank.inspect`, :func:`~onnx_lowrank.verify`.

Small graphs built with onnx.helper exercise what the rewrite must keep (model
fields, node order, shared and non-initializer weights) and what it must
refuse (computed, graph-input and quantized weights), each with a reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import conv_model, conv_names, make_model, run
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank import InspectLayer, LayerReport, LowRankError, OutputStats, Report, VerifyResult, decompose, inspect, verify
from onnx_lowrank.timing import CONV_OPS, FC_OPS, kernel_times

FULL = 10_000  # a rank above every full rank here: clipped to the full rank


def vi(name: str, shape: Sequence[int | str], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A tensor value info."""
    return helper.make_tensor_value_info(name, dtype, list(shape))


def kernel(seed: int, n: int, c: int, kh: int = 3, kw: int = 3) -> np.ndarray:
    """A seeded random float32 conv kernel."""
    return np.random.default_rng(seed).standard_normal((n, c, kh, kw)).astype(np.float32)


def conv(name: str, x: str, w: str, y: str, b: str | None = None) -> onnx.NodeProto:
    """A 3x3 'same' Conv."""
    return helper.make_node("Conv", [x, w, *([b] if b else [])], [y], name=name, pads=[1, 1, 1, 1])


def chain_model(names: Sequence[str] = ("c1", "c2", "c3"), channels: int = 6, size: int = 10) -> onnx.ModelProto:
    """``x -> Relu -> [Conv -> Relu]* -> Sigmoid -> y``, one weight and bias per Conv, outputs ``t{i}``."""
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="pre")]
    inits: dict[str, np.ndarray] = {}
    current = "r0"
    for i, name in enumerate(names):
        inits[f"W{i}"] = kernel(i, channels, channels)
        inits[f"B{i}"] = np.random.default_rng(100 + i).standard_normal(channels).astype(np.float32)
        nodes.append(conv(name, current, f"W{i}", f"t{i}", f"B{i}"))
        nodes.append(helper.make_node("Relu", [f"t{i}"], [f"r{i + 1}"], name=f"relu{i}"))
        current = f"r{i + 1}"
    nodes.append(helper.make_node("Sigmoid", [current], ["y"], name="post"))
    return make_model(nodes, [vi("x", [1, channels, size, size])], [vi("y", [1, channels, size, size])], inits)


def shared_weight_model() -> onnx.ModelProto:
    """Two Convs reading the same weight ``W``."""
    nodes = [
        conv("a", "x", "W", "ya", "B"),
        helper.make_node("Relu", ["ya"], ["ra"], name="relu"),
        conv("b", "ra", "W", "y"),
    ]
    inits = {"W": kernel(1, 8, 8), "B": np.zeros(8, np.float32)}
    return make_model(nodes, [vi("x", [1, 8, 9, 9])], [vi("y", [1, 8, 9, 9])], inits)


def constant_identity_model() -> onnx.ModelProto:
    """A Conv whose weight is a Constant node seen through an Identity node."""
    w = numpy_helper.from_array(kernel(2, 8, 6), "Wc")
    nodes = [
        helper.make_node("Constant", [], ["Wc"], name="weight_const", value=w),
        helper.make_node("Identity", ["Wc"], ["Wi"], name="weight_id"),
        conv("c", "x", "Wi", "y"),
    ]
    return make_model(nodes, [vi("x", [1, 6, 10, 10])], [vi("y", [1, 8, 10, 10])])


def computed_weight_model() -> onnx.ModelProto:
    """A Conv whose weight is ``Add`` of an initializer and a graph input (a tensor computed at run time)."""
    nodes = [helper.make_node("Add", ["Wa", "Wb"], ["W"], name="add"), conv("c", "x", "W", "y")]
    inputs = [vi("x", [1, 6, 10, 10]), vi("Wb", [8, 6, 3, 3])]
    return make_model(nodes, inputs, [vi("y", [1, 8, 10, 10])], {"Wa": kernel(3, 8, 6)})


def input_weight_model() -> onnx.ModelProto:
    """A Conv whose weight is a graph input (no initializer behind it)."""
    return make_model([conv("c", "x", "W", "y")], [vi("x", [1, 6, 10, 10]), vi("W", [8, 6, 3, 3])], [vi("y", [1, 8, 10, 10])])


def qlinear_model(op: str = "QLinearConv") -> onnx.ModelProto:
    """A quantized conv: QLinearConv (uint8) or ConvInteger."""
    w = np.random.default_rng(5).integers(0, 255, (8, 6, 3, 3)).astype(np.uint8)
    if op == "QLinearConv":
        inits = {
            "xs": np.array(0.1, np.float32),
            "xz": np.array(128, np.uint8),
            "w": w,
            "ws": np.array(0.05, np.float32),
            "wz": np.array(128, np.uint8),
            "ys": np.array(0.2, np.float32),
            "yz": np.array(128, np.uint8),
        }
        node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qconv", pads=[1, 1, 1, 1])
        out = vi("y", [1, 8, 10, 10], TensorProto.UINT8)
    else:
        inits = {"w": w}
        node = helper.make_node(op, ["x", "w"], ["y"], name="qconv", pads=[1, 1, 1, 1])
        out = vi("y", [1, 8, 10, 10], TensorProto.INT32)
    return make_model([node], [vi("x", [1, 6, 10, 10], TensorProto.UINT8)], [out], inits)


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float inputs for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    return {
        v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
        for v in model.graph.input
        if v.name not in inits
    }


def layers_by_node(report: Report) -> dict[str, LayerReport]:
    """The report's layers keyed by node."""
    return {layer.node: layer for layer in report.layers}


def initializer_names(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's initializers."""
    return {t.name for t in model.graph.initializer}


def without_seconds(report: Report) -> dict[str, Any]:
    """The report as a dict, minus the timing (the conversion's seconds, the result's measured milliseconds)."""
    data = report.to_dict()
    data.pop("seconds")
    data["shapes"].pop("seconds")
    data["latency"] = {
        k: v
        for k, v in data["latency"].items()
        if k not in ("original_ms", "candidate_ms", "measured_speedup", "speedup_low", "speedup_high", "runs")
    }
    if "check" in data["latency"]:
        data["latency"]["check"].pop("seconds")
    return data


# --------------------------------------------------------------------------- decompose: inputs and outputs


def test_decompose_accepts_path_and_proto(tmp_path: Path) -> None:
    """A path and a ModelProto give the same model and report; the result is (ModelProto, Report)."""
    model = chain_model()
    path = tmp_path / "chain.onnx"
    onnx.save_model(model, path)
    from_proto = decompose(model, rank=2)
    from_path = decompose(path, rank=2)
    from_str = decompose(str(path), rank=2)
    for result in (from_proto, from_path, from_str):
        assert isinstance(result, tuple) and len(result) == 2
        assert isinstance(result[0], onnx.ModelProto) and isinstance(result[1], Report)
    assert from_path[0].SerializeToString() == from_proto[0].SerializeToString() == from_str[0].SerializeToString()
    assert without_seconds(from_path[1]) == without_seconds(from_proto[1])
    onnx.checker.check_model(from_proto[0], full_check=True)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "chain": chain_model,
    "shared-weight": shared_weight_model,
    "constant-identity": constant_identity_model,
    "computed-weight": computed_weight_model,
}


@pytest.mark.parametrize("make", MODELS.values(), ids=list(MODELS))
@pytest.mark.parametrize(
    "policy", [{"rank": 2}, {"rank": FULL, "force": True}, {"speedup": 1.5}, {"speedup": 1.5, "by": "macs"}, {"energy": 0.8}], ids=str
)
def test_decompose_does_not_mutate_given_model(make: Callable[[], onnx.ModelProto], policy: dict[str, Any]) -> None:
    """The caller's ModelProto is byte-identical afterwards, whatever the policy."""
    model = make()
    before = model.SerializeToString()
    try:
        new, _ = decompose(model, **policy)
    except LowRankError as exc:  # a speedup no layer can give is refused, which is fine here
        assert "--speedup" in str(exc)
    else:
        assert new is not model
    assert model.SerializeToString() == before


def test_report_to_dict_fields() -> None:
    """Report.to_dict() has the totals, the policy and one entry per conv with the documented fields."""
    _, report = decompose(chain_model(), rank=2, exclude="c3")
    data = report.to_dict()
    assert {"macs_before", "macs_after", "params_before", "params_after", "layers", "policy", "seconds", "mac_ratio"} <= set(data)
    assert data["policy"]["name"] == "rank" and 2 in data["policy"].values()
    assert data["macs_before"] == sum(layer["macs_before"] for layer in data["layers"]) > data["macs_after"] > 0
    assert data["mac_ratio"] == pytest.approx(data["macs_before"] / data["macs_after"])
    assert data["params_after"] < data["params_before"]
    fields = {f.name for f in dataclasses.fields(LayerReport)}
    assert {
        "node",
        "decomposed",
        "reason",
        "rank",
        "full_rank",
        "relative_error",
        "macs_before",
        "macs_after",
        "vertical_node",
        "horizontal_node",
    } <= fields
    for layer in data["layers"]:
        assert set(layer) == fields | {"mac_ratio"}
        assert layer["mac_ratio"] == pytest.approx(layer["macs_before"] / layer["macs_after"])
    c1, _, c3 = data["layers"]
    assert c1["decomposed"] and c1["rank"] == 2 and c1["full_rank"] == 18 and 0 < c1["relative_error"] < 1
    assert not c3["decomposed"] and c3["reason"] == "matched by --exclude" and c3["rank"] is None
    assert report.to_json() and [layer.node for layer in report.decomposed] == ["c1", "c2"]


# --------------------------------------------------------------------------- decompose: what the rewrite keeps


def test_model_fields_kept() -> None:
    """Inputs, outputs, value_info, opsets, IR version, producer, metadata and doc strings survive."""
    model = chain_model()
    model.ir_version = 7
    model.producer_name, model.producer_version = "trainer", "3.1"
    model.domain, model.model_version, model.doc_string = "org.example", 12, "a chain of convs"
    model.graph.doc_string = "the main graph"
    model.opset_import.append(helper.make_opsetid("com.example", 2))
    helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    model.graph.value_info.extend([vi("t0", [1, 6, 10, 10]), vi("r1", [1, 6, 10, 10])])
    before = model.SerializeToString()
    new, report = decompose(model, rank=2)
    assert len(report.decomposed) == 3
    assert model.SerializeToString() == before
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(new, field) == getattr(model, field), field
    assert new.graph.doc_string == "the main graph"
    assert list(new.opset_import) == list(model.opset_import)
    assert list(new.metadata_props) == list(model.metadata_props)
    assert list(new.graph.input) == list(model.graph.input)
    assert list(new.graph.output) == list(model.graph.output)
    for value in model.graph.value_info:
        assert value in new.graph.value_info


def test_node_order_and_wiring() -> None:
    """Other nodes keep their order; each Conv becomes vertical then horizontal, in its place."""
    model = chain_model()
    new, report = decompose(model, rank=2)
    layers = layers_by_node(report)
    expected = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            expected += [layers[node.name].vertical_node, layers[node.name].horizontal_node]
        else:
            expected.append(node.name)
    assert [n.name for n in new.graph.node] == expected
    nodes = {n.name: n for n in new.graph.node}
    shapes = {t.name: list(t.dims) for t in new.graph.initializer}
    for old in model.graph.node:
        if old.op_type != "Conv":
            continue
        v, h = nodes[layers[old.name].vertical_node], nodes[layers[old.name].horizontal_node]
        assert v.input[0] == old.input[0] and h.input[0] == v.output[0] and list(h.output) == list(old.output)
        assert h.input[2] == old.input[2]  # the bias goes to the second conv
        assert shapes[v.input[1]] == [2, 6, 3, 1] and shapes[h.input[1]] == [6, 2, 1, 3]
    onnx.checker.check_model(new, full_check=True)


def test_full_rank_is_exact() -> None:
    """At full rank (forced) the pair computes the original function."""
    model = chain_model()
    new, report = decompose(model, rank=FULL, force=True)
    assert all(layer.decomposed and layer.rank == layer.full_rank for layer in report.layers)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(new, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_unused_weight_removed() -> None:
    """The original weights go once nothing reads them; the biases stay (the horizontal conv reads them)."""
    new, _ = decompose(chain_model(), rank=2)
    names = initializer_names(new)
    assert not names & {"W0", "W1", "W2"}
    assert {"B0", "B1", "B2"} <= names
    assert len(names) == 3 + 2 * 3


def test_weight_kept_when_still_used() -> None:
    """A weight another node still reads stays, and so does that node."""
    model = chain_model(("c1",))
    model.graph.node.append(helper.make_node("Shape", ["W0"], ["wshape"], name="shape_of_weight"))
    model.graph.output.append(vi("wshape", [4], TensorProto.INT64))
    new, report = decompose(model, rank=2)
    assert report.layers[0].decomposed
    assert "W0" in initializer_names(new)
    assert [n.input[0] for n in new.graph.node if n.name == "shape_of_weight"] == ["W0"]
    assert "c1" not in conv_names(new)
    (_, wshape) = run(new, feeds_for(model))
    assert list(wshape) == [6, 6, 3, 3]


def test_shared_weight_factored_once() -> None:
    """Two Convs sharing a weight use one pair of factor tensors, written once."""
    model = shared_weight_model()
    new, report = decompose(model, rank=3)
    a, b = report.layers
    assert a.decomposed and b.decomposed and a.rank == b.rank == 3
    nodes = {n.name: n for n in new.graph.node}
    assert nodes[a.vertical_node].input[1] == nodes[b.vertical_node].input[1]
    assert nodes[a.horizontal_node].input[1] == nodes[b.horizontal_node].input[1]
    assert initializer_names(new) == {"B", nodes[a.vertical_node].input[1], nodes[a.horizontal_node].input[1]}
    assert report.params_after == 8 + 2 * (3 * 8 * 3)
    full, _ = decompose(model, rank=FULL, force=True)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(full, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- decompose: choosing layers


def test_include_exclude() -> None:
    """--include/--exclude regexes pick layers; the others are reported with the reason."""
    model = chain_model(("block1.conv", "block2.conv", "head.conv"))
    new, report = decompose(model, rank=2, include=r"^block", exclude=r"2\.")
    layers = layers_by_node(report)
    assert [k for k, v in layers.items() if v.decomposed] == ["block1.conv"]
    assert layers["block2.conv"].reason == "matched by --exclude"
    assert layers["head.conv"].reason == "not matched by --include"
    assert {"block2.conv", "head.conv"} <= set(conv_names(new))
    assert "block1.conv" not in conv_names(new)


def test_ranks_by_node_name() -> None:
    """A ranks dict decomposes just the named layers, at their ranks; unknown names are refused."""
    model = chain_model()
    _, report = decompose(model, ranks={"c2": 2, "c3": 5})
    layers = layers_by_node(report)
    assert (layers["c2"].rank, layers["c3"].rank) == (2, 5)
    assert not layers["c1"].decomposed and layers["c1"].reason and "ranks" in layers["c1"].reason
    with pytest.raises(LowRankError, match="c7"):
        decompose(model, ranks={"c2": 2, "c7": 2})


def test_unnamed_conv_reported_by_output() -> None:
    """A Conv without a name is reported, and selected, by its output name."""
    model = chain_model(("", ""))
    _, report = decompose(model, rank=2)
    assert [layer.node for layer in report.layers] == ["t0", "t1"]
    new, report = decompose(model, ranks={"t1": 3})
    layers = layers_by_node(report)
    assert layers["t1"].decomposed and layers["t1"].rank == 3 and not layers["t0"].decomposed
    assert layers["t1"].vertical_node and layers["t1"].vertical_node in {n.name for n in new.graph.node}


def test_constant_through_identity_weight() -> None:
    """A weight from a Constant node behind an Identity is decomposed; the now unused pair goes."""
    model = constant_identity_model()
    new, report = decompose(model, rank=FULL, force=True)
    (layer,) = report.layers
    assert layer.decomposed and layer.reason is None and layer.rank == 18
    assert not [n for n in new.graph.node if n.name in ("weight_const", "weight_id")]
    assert [n.op_type for n in new.graph.node if n.op_type == "Conv"] == ["Conv", "Conv"]
    onnx.checker.check_model(new, full_check=True)
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(new, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("make", "keyword"),
    [(computed_weight_model, "computed"), (input_weight_model, "input")],
    ids=["computed-by-Add", "graph-input"],
)
def test_non_constant_weight_skipped(make: Callable[[], onnx.ModelProto], keyword: str) -> None:
    """A weight that is not a constant is left alone, with a reason saying why."""
    model = make()
    new, report = decompose(model, rank=2)
    (layer,) = report.layers
    assert not layer.decomposed and layer.reason and keyword in layer.reason
    assert [n.name for n in new.graph.node] == [n.name for n in model.graph.node]
    assert report.macs_after == report.macs_before


@pytest.mark.parametrize("op", ["QLinearConv", "ConvInteger"])
def test_quantized_conv_skipped(op: str) -> None:
    """Quantized convs are reported as skipped (quantized) and left as they are."""
    model = qlinear_model(op)
    new, report = decompose(model, rank=2)
    (layer,) = report.layers
    assert layer.node == "qconv" and layer.op_type == op
    assert not layer.decomposed and layer.reason and "quantized" in layer.reason
    assert new.graph == model.graph
    (info,) = inspect(model)
    assert not info.eligible and info.reason and "quantized" in info.reason


@pytest.mark.parametrize(
    ("kwargs", "keyword"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"energy": 1.5}, "energy"),
        ({"energy": float("nan")}, "energy"),
        ({"speedup": 0.5}, "speedup"),
        ({"speedup": float("inf")}, "speedup"),
        ({"rank": 2, "energy": 0.9}, "one"),
        ({"ranks": {"c1": 0}}, "c1"),
        ({"rank": 2, "include": "c(1"}, "--include"),
        ({"rank": 2, "exclude": "[c"}, "--exclude"),
        ({"rank": 2, "rank_multiple": 0}, "multiple"),
        ({"speedup": 500.0}, "cannot be reached"),
    ],
    ids=str,
)
def test_bad_arguments_raise(kwargs: dict[str, Any], keyword: str) -> None:
    """Bad arguments raise LowRankError (a ValueError) with a one-line message naming the problem."""
    with pytest.raises(LowRankError) as info:
        decompose(chain_model(), **kwargs)
    assert isinstance(info.value, ValueError)
    assert keyword in str(info.value) and "\n" not in str(info.value)


def test_bad_paths_raise(tmp_path: Path) -> None:
    """A missing or broken model file raises LowRankError, for decompose, inspect and verify alike."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\x12\x03abc" * 5)
    for path in (tmp_path / "absent.onnx", broken):
        for call in (lambda p: decompose(p, rank=2), inspect, lambda p: verify(p, conv_model())):
            with pytest.raises(LowRankError):
                call(path)


# --------------------------------------------------------------------------- inspect and verify


def test_inspect_fields(tmp_path: Path) -> None:
    """inspect() returns an InspectLayer per conv with ranks at 0.9/0.99/0.999; ineligible ones say why."""
    model = chain_model(("c1", "c2"))
    # then a Conv "c" whose weight is computed at run time (from a graph input), reading the chain's output
    model.graph.node.extend([helper.make_node("Add", ["Wa", "Wb"], ["Wc"], name="add"), conv("c", "y", "Wc", "z")])
    model.graph.initializer.extend([numpy_helper.from_array(kernel(3, 8, 6), "Wa")])
    model.graph.input.append(vi("Wb", [8, 6, 3, 3]))
    model.graph.output[0].CopyFrom(vi("z", [1, 8, 10, 10]))
    before = model.SerializeToString()
    layers = inspect(model)
    assert model.SerializeToString() == before
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    assert inspect(path) == layers
    assert all(isinstance(layer, InspectLayer) for layer in layers)
    c1, c2, c = layers
    assert [c1.node, c2.node, c.node] == ["c1", "c2", "c"]
    for layer in (c1, c2):
        assert layer.eligible and layer.reason is None and layer.full_rank == 18
        assert layer.weight_shape == [6, 6, 3, 3] and layer.groups == 1 and layer.macs == 6 * 6 * 9 * 100
        assert layer.kind == "spatial"  # the vertical/horizontal split: rank r costs r * (C*3 + N*3) MACs per pixel
        assert set(layer.energy_ranks) == {"0.9", "0.99", "0.999"}
        ranks = [layer.energy_ranks[e][0] for e in ("0.9", "0.99", "0.999")]
        assert 1 <= ranks[0] <= ranks[1] <= ranks[2] <= 18
        r, ratio = layer.energy_ranks["0.9"]
        assert ratio == pytest.approx(layer.macs / (r * (6 * 3 + 6 * 3) * 100))
    assert not c.eligible and c.reason and "computed" in c.reason and c.energy_ranks == {}


def test_verify_fields() -> None:
    """verify() returns a VerifyResult with per-output OutputStats, latency and a dict form."""
    model = chain_model()
    approx, _ = decompose(model, rank=1)
    result = verify(model, approx, runs=3, rtol=1e-3, atol=1e-4)
    assert isinstance(result, VerifyResult)
    assert result.rtol == 1e-3 and result.atol == 1e-4 and result.providers == ["CPUExecutionProvider"]
    assert result.runs == 3 and result.samples == 1
    assert result.original_ms and result.candidate_ms and result.latency_ratio == pytest.approx(result.original_ms / result.candidate_ms)
    (out,) = result.outputs
    assert isinstance(out, OutputStats) and out.name == "y" and out.shape == [1, 6, 10, 10]
    assert 0 < out.mean_abs <= out.p99_abs <= out.max_abs and out.relative_l2 > 0 and -1 <= out.cosine < 1
    assert not out.passed and not result.passed and out.required_atol > 1e-4
    assert out.top1_agreement is None  # not a (samples, classes) output
    data = result.to_dict()
    assert {"outputs", "rtol", "atol", "providers", "original_ms", "candidate_ms", "runs", "samples", "passed", "latency_ratio"} <= set(
        data
    )
    assert data["passed"] is False and data["outputs"][0]["max_abs"] == out.max_abs
    same = verify(model, model, runs=0)
    assert same.passed and same.outputs[0].max_abs == 0.0 and same.latency_ratio is None and same.original_ms is None
    # the tolerance the stats report as required is enough
    assert verify(model, approx, runs=0, rtol=1e-3, atol=out.required_atol * 1.01).passed


def test_verify_inputs_and_labels() -> None:
    """Inputs given as a mapping with labels: accuracy and top-1 agreement over the samples."""
    x = np.random.default_rng(9).standard_normal((5, 6)).astype(np.float32)
    w = np.random.default_rng(10).standard_normal((4, 6)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc", transB=1)], [vi("x", ["n", 6])], [vi("logits", ["n", 4])], {"w": w}
    )
    labels = (x @ w.T).argmax(axis=1)
    labels[0] = (labels[0] + 1) % 4  # the original gets 4 of 5 right
    result = verify(model, model, inputs={"x": x, "labels": labels}, runs=0)
    (out,) = result.outputs
    assert result.samples == 5 and out.shape == [5, 4]
    assert out.top1_agreement == 1.0 and out.accuracy_original == out.accuracy_candidate == pytest.approx(0.8)


def test_verify_refuses_unavailable_provider() -> None:
    """An execution provider this onnxruntime lacks is an error, not a silent fallback to CPU."""
    model = conv_model()
    with pytest.raises(LowRankError, match="XnnpackExecutionProvider"):
        verify(model, model, providers=["XnnpackExecutionProvider"], runs=0)
    with pytest.raises(LowRankError, match="NoSuchExecutionProvider"):
        verify(model, model, providers=["CPUExecutionProvider", "NoSuchExecutionProvider"], runs=0)


def test_unknown_input_size_warns_and_input_shapes_fix_it() -> None:
    """Symbolic H/W: a MAC budget is refused naming the input; a per-layer policy goes on, MACs per output pixel and
    one warning; input_shapes sizes the plan and verify's inputs."""
    model = conv_model(n=8, c=6, input_shape=("n", 6, "h", "w"))
    with pytest.raises(LowRankError, match=r"input 'x'.*--input-shape x=1,6,H,W.*--allow-unknown-shapes"):
        decompose(model, speedup=2)
    _, guessed = decompose(model, speedup=2, allow_unknown_shapes=True)
    assert not guessed.macs_exact and "--input-shape x=1,6,H,W" in guessed.warnings[0]
    _, report = decompose(model, rank=2)
    (warning,) = report.warnings
    assert "unknown size" in warning and "conv" in warning and "--input-shape x=1,6,H,W" in warning
    assert report.layers[0].macs_before == 8 * 6 * 9  # per output pixel
    approx, sized = decompose(model, rank=2, input_shapes={"x": [1, 6, 20, 20]})
    assert not sized.warnings and sized.layers[0].macs_before == 8 * 6 * 9 * 18 * 18  # no pads: 18x18 outputs
    assert not decompose(conv_model(), rank=2)[1].warnings  # a fixed size: nothing to say
    result = verify(model, approx, runs=0, input_shapes={"x": [2, 6, 20, 20]})
    assert result.outputs[0].shape == [2, 8, 18, 18]
    with pytest.raises(LowRankError, match=r"input 'x'.*--input-shape x=1,6,H,W"):  # no size to guess for h and w
        verify(model, approx, runs=0)


@pytest.mark.parametrize("optimization", ["disable", "default"])
def test_kernel_times_by_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimization: str) -> None:
    """The profiler's kernel times land in the conv / fully connected / other classes, and no trace file is left."""
    rng = np.random.default_rng(3)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        ],
        [vi("x", [1, 16, 16, 16])],
        [vi("y", [1, 10])],
        {"w": rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "fc": rng.standard_normal((10, 16 * 8 * 8)).astype(np.float32)},
    )
    monkeypatch.chdir(tmp_path)
    decomposed, _ = decompose(model, rank=4, kinds=["spatial"])
    feed = {"x": rng.standard_normal((1, 16, 16, 16)).astype(np.float32)}
    times, pair = kernel_times([model, decomposed], feed, threads=1, optimization=optimization, runs=3)
    assert pair.conv_ms > 0 and pair.fc_ms > 0 and set(pair.by_op) == set(times.by_op)
    assert times.conv_ms > 0 and times.fc_ms > 0 and times.other_ms > 0
    assert times.total_ms == pytest.approx(times.conv_ms + times.fc_ms + times.other_ms)
    assert "MaxPool" in times.by_op and set(times.by_op) & CONV_OPS and set(times.by_op) & FC_OPS
    assert list(tmp_path.iterdir()) == []  # the trace went to a temporary directory


# --------------------------------------------------------------------------- the package


def test_public_names() -> None:
    """__all__ lists the public API and every name in it exists."""
    expected = {
        "InspectLayer",
        "LayerReport",
        "LowRankError",
        "OutputStats",
        "Report",
        "VerifyResult",
        "__version__",
        "count_params",
        "decompose",
        "inspect",
        "load_model",
        "save_model",
        "verify",
    }
    assert expected <= set(onnx_lowrank.__all__)
    assert len(set(onnx_lowrank.__all__)) == len(onnx_lowrank.__all__)
    for name in onnx_lowrank.__all__:
        assert hasattr(onnx_lowrank, name), name
    assert issubclass(onnx_lowrank.LowRankError, ValueError)
    assert isinstance(onnx_lowrank.__version__, str) and onnx_lowrank.__version__


def test_load_and_save_model_roundtrip(tmp_path: Path) -> None:
    """save_model writes atomically (no temp left) and load_model reads it back; bad paths are LowRankError."""
    model, _ = decompose(chain_model(), rank=2)
    path = tmp_path / "out.onnx"
    onnx_lowrank.save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert onnx_lowrank.load_model(path).SerializeToString() == model.SerializeToString()
    assert onnx_lowrank.count_params(model) == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    with pytest.raises(LowRankError, match="does not exist"):
        onnx_lowrank.save_model(model, tmp_path / "absent" / "out.onnx")
    with pytest.raises(LowRankError, match="overwrite"):
        onnx_lowrank.save_model(model, path, inputs=(path,))


def test_option_keywords_build_the_option_objects_and_unknown_ones_are_type_errors() -> None:
    """decompose, verify and refit_layers take single options as keywords; one that names no option is a
    TypeError, as for any Python function."""
    from onnx_lowrank import VerifyOptions
    from onnx_lowrank.calibration import RefitOptions, refit_layers

    model = conv_model()
    approx, report = decompose(model, rank=2, check_runs=0)
    base = VerifyOptions(runs=0, rtol=0.5)
    strict = verify(model, approx, base, atol=0.0)
    assert not strict.passed and strict.rtol == 0.5  # the keyword overrides one field, the rest stay
    (out,) = strict.outputs
    assert verify(model, approx, base, atol=out.required_atol * 1.01).passed
    data = {"x": np.random.default_rng(0).standard_normal((4, 6, 12, 12)).astype(np.float32)}
    result = refit_layers(model, approx, report, data, RefitOptions(stages=1), positions=None)
    assert result.stages == 1
    for call in (
        lambda: decompose(model, rank=2, no_such_option=1),
        lambda: verify(model, approx, runs=0, no_such_option=1),
        lambda: refit_layers(model, approx, report, data, no_such_option=1),
    ):
        with pytest.raises(TypeError, match="no_such_option"):
            call()
