"""The decomposition against ONNX's own backend test data.

(a) the ``pytorch-converted/test_Conv*`` models shipped in the onnx wheel with
their stored inputs and outputs; (b) the Conv node cases that
``onnx/backend/test/case/node/conv.py`` generates with ``expect(...)``.
Every case is decomposed at full rank with ``force``, once per kind of split,
and must reproduce the expected outputs in onnxruntime; layers the split cannot
take (1-D and 1-wide kernels for the spatial split, ConvTranspose for the
channel split) must be reported with a reason and run unchanged.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from builders import run
from onnx import numpy_helper

from onnx_lowrank.api import decompose
from onnx_lowrank.factorization import Kind

FULL = 10**6  # a rank every layer clips to its full rank
DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
PYTORCH_CASES = sorted(os.path.basename(d) for d in glob.glob(os.path.join(DATA_DIR, "test_Conv*")))
KINDS: tuple[Kind, ...] = ("spatial", "channel")


def assert_close(actual: npt.NDArray[np.generic], expected: npt.NDArray[np.generic]) -> None:
    """rtol 1e-4 and an atol scaled to the output magnitude."""
    assert actual.shape == expected.shape
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30))


def splittable(model: onnx.ModelProto, kind: Kind) -> bool:
    """Spatial: a kernel of >= 2 spatial dims, at least 2 in the width and in the rest. Channel: any Conv."""
    node = model.graph.node[0]
    if kind == "channel":
        return node.op_type == "Conv"
    dims = next(list(t.dims) for t in model.graph.initializer if t.name == node.input[1])
    spatial = dims[2:]
    return len(spatial) >= 2 and spatial[-1] >= 2 and int(np.prod(spatial[:-1])) >= 2


def check_decomposition(
    model: onnx.ModelProto, datasets: Sequence[tuple[dict[str, Any], list[npt.NDArray[np.generic]]]], kind: Kind
) -> None:
    """Decompose ``model``'s one layer at full rank and compare its outputs on every data set."""
    out, report = decompose(model, rank=FULL, force=True, kinds=[kind])
    onnx.checker.check_model(out)
    (node,) = model.graph.node
    (layer,) = report.layers
    assert layer.op_type == node.op_type
    if splittable(model, kind):
        assert layer.decomposed, layer.reason
        assert layer.kind == kind and layer.rank == layer.full_rank
        assert [n.op_type for n in out.graph.node] == [node.op_type] * 2
    else:
        assert not layer.decomposed
        assert isinstance(layer.reason, str) and layer.reason
        assert list(out.graph.node) == list(model.graph.node)
    for feeds, expected in datasets:
        actual = run(out, feeds)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_close(a, e)


# --------------------------------------------------------------------------- (a) pytorch-converted


def test_pytorch_conv_cases_are_shipped() -> None:
    """The wheel ships the Conv1d/2d/3d and ConvTranspose cases this module runs."""
    assert any(name.startswith("test_Conv2d") for name in PYTORCH_CASES)
    assert any(name.startswith("test_Conv3d") for name in PYTORCH_CASES)
    assert any(name.startswith("test_Conv1d") for name in PYTORCH_CASES)


def load_pytorch_case(name: str) -> tuple[onnx.ModelProto, list[tuple[dict[str, Any], list[npt.NDArray[np.generic]]]]]:
    """The model and its ``test_data_set_*`` (feeds by the model's non-initializer inputs, outputs in order)."""
    case_dir = os.path.join(DATA_DIR, name)
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    initializers = {t.name for t in model.graph.initializer}
    input_names = [v.name for v in model.graph.input if v.name not in initializers]
    datasets = []
    for set_dir in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
        inputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(os.path.join(set_dir, "input_*.pb")))]
        outputs = [numpy_helper.to_array(onnx.load_tensor(p)) for p in sorted(glob.glob(os.path.join(set_dir, "output_*.pb")))]
        assert len(inputs) == len(input_names)
        datasets.append((dict(zip(input_names, inputs, strict=True)), outputs))
    assert datasets
    return model, datasets


@pytest.mark.parametrize("name", PYTORCH_CASES)
def test_pytorch_stored_outputs_hold_for_the_original(name: str) -> None:
    """The stored outputs are what this onnxruntime computes for the original model (the reference is sound)."""
    model, datasets = load_pytorch_case(name)
    for feeds, expected in datasets:
        for a, e in zip(run(model, feeds), expected, strict=True):
            assert_close(a, e)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PYTORCH_CASES)
def test_pytorch_converted_conv(name: str, kind: Kind) -> None:
    """Decomposed at full rank, the model reproduces the stored outputs (or is left as is, with a reason)."""
    model, datasets = load_pytorch_case(name)
    check_decomposition(model, datasets, kind)


# --------------------------------------------------------------------------- (b) node cases of conv.py


@dataclass
class NodeCase:
    name: str
    node: onnx.NodeProto
    inputs: list[npt.NDArray[np.generic]]
    outputs: list[npt.NDArray[np.generic]]


def collect_conv_node_cases() -> list[NodeCase]:
    """Run every ``Conv.export*`` of onnx's generator with its ``expect`` captured."""
    from onnx.backend.test.case.node import conv

    captured: list[NodeCase] = []

    def capture(node: onnx.NodeProto, inputs: Sequence[Any], outputs: Sequence[Any], name: str, **_: Any) -> None:
        captured.append(NodeCase(name, node, [np.asarray(i) for i in inputs], [np.asarray(o) for o in outputs]))

    saved = conv.expect
    conv.expect = capture  # the generators look ``expect`` up in their module's globals
    try:
        for attr_name, value in sorted(vars(conv.Conv).items()):
            if attr_name.startswith("export") and isinstance(value, staticmethod):
                np.random.seed(0)  # as onnx's own collector does
                value.__func__()
    finally:
        conv.expect = saved
    return captured


NODE_CASES = collect_conv_node_cases()


def test_node_cases_are_collected() -> None:
    names = [c.name for c in NODE_CASES]
    assert len(names) == len(set(names)) >= 5
    assert all(c.node.op_type == "Conv" for c in NODE_CASES)


def node_case_model(case: NodeCase) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A one-node model; the kernel (and bias) a node case feeds as inputs become initializers, as in a real model."""
    present = [name for name in case.node.input if name]
    values = dict(zip(present, case.inputs, strict=True))
    x_name = case.node.input[0]
    constants = [numpy_helper.from_array(values[name], name) for name in present[1:]]
    graph = onnx.helper.make_graph(
        [case.node],
        case.name,
        [onnx.helper.make_tensor_value_info(x_name, onnx.helper.np_dtype_to_tensor_dtype(values[x_name].dtype), values[x_name].shape)],
        [
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in zip(case.node.output, case.outputs, strict=True)
        ],
        constants,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model, {x_name: values[x_name]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_conv_node_case(case: NodeCase, kind: Kind) -> None:
    """Decomposed at full rank, the node case's model gives onnx's expected outputs."""
    model, feeds = node_case_model(case)
    onnx.checker.check_model(model, full_check=True)
    check_decomposition(model, [(feeds, case.outputs)], kind)
