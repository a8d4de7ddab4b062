"""Sessions that share weights: the store of onnx_lowrank.runtime.

What is tested is deterministic: the outputs (the same as sessions of their own), which tensors the candidate's
session reads from the original's copy (the same map objects, one copy in the store's file), and that the
store's temporary file does not outlive it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import decompose
from onnx_lowrank.runtime import SHARE_MIN_BYTES, SharedWeights, make_session

ROOT = Path(__file__).resolve().parent.parent
VGG_SMALL = ROOT / "models" / "vgg16_small.onnx"


def chain(channels: int = 48, layers: int = 3, seed: int = 0) -> onnx.ModelProto:
    """``x -> [Conv 3x3 -> Relu]*``: each weight (48x48x3x3 floats, 81 KiB) above the store's threshold."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"B{i}")]
        nodes.append(helper.make_node("Conv", [current, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    shape = [1, channels, 16, 16]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def large_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers a store holds (those of at least SHARE_MIN_BYTES)."""
    return sum(len(t.raw_data) for t in model.graph.initializer if len(t.raw_data) >= SHARE_MIN_BYTES)


FEED = {"x": np.random.default_rng(1).standard_normal((1, 48, 16, 16)).astype(np.float32)}


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary folder of its own for the stores the code under test makes, to see what is left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder


def stores(folder: Path) -> list[Path]:
    return sorted(folder.glob("onnx-lowrank-weights-*"))


def maps(session: Any) -> list[Any]:
    """The OrtValues a session of the store reads its held weights from."""
    return list(session._onnx_lowrank_weights)


def test_pair_shares_the_original_tensors_and_gives_the_same_outputs(own_tmp: Path) -> None:
    """The candidate's unchanged weights are the original's: written once, read from the same maps by both
    sessions; both sessions give exactly what sessions of their own give."""
    original = chain()
    candidate, _ = decompose(original, rank=8, check_runs=0, kinds=["spatial"], include="conv1")
    large = {t.name for t in original.graph.initializer if t.raw_data and len(t.raw_data) >= SHARE_MIN_BYTES}
    assert large == {"W0", "W1", "W2"}
    with SharedWeights() as store:
        first = store.hold(original)
        second = store.hold(candidate)
        assert store.folder is not None and store.folder.parent == own_tmp
        unchanged = {"W0", "W2"}  # conv1 was split: its weight is gone, its two factors are new (and small)
        assert set(second.slots) == unchanged and all(second.slots[n] == first.slots[n] for n in unchanged)
        assert second.shared == sum(len(t.raw_data) for t in original.graph.initializer if t.name in unchanged)
        assert store.held_bytes == large_bytes(original)  # one copy: the candidate added nothing large
        # the graphs onnxruntime reads carry no weight bytes of their own for the held tensors
        for held in (first, second):
            for tensor in held.proto.graph.initializer:
                assert not tensor.raw_data or tensor.name not in held.slots
        a, b = store.session(first), store.session(second)
        shared = {id(v) for v in maps(a)} & {id(v) for v in maps(b)}
        assert len(shared) == 2 and len(maps(b)) == 2
    assert not stores(own_tmp)  # closed: the file and its folder are gone, the sessions keep their maps
    for model, session in ((original, a), (candidate, b)):
        assert np.array_equal(session.run(None, FEED)[0], make_session(model).run(None, FEED)[0])


def test_same_name_other_bytes_is_not_shared() -> None:
    """A tensor of the same name, dtype and shape whose bytes differ is a tensor of its own."""
    with SharedWeights() as store:
        first, second = store.hold(chain(seed=0)), store.hold(chain(seed=1))
        assert second.shared == 0 and not set(first.slots.values()) & set(second.slots.values())


def test_candidate_made_from_the_held_graph_reads_the_same_slots() -> None:
    """A model built from a held graph (as the plan's rounds build candidates) shares every tensor it kept."""
    with SharedWeights() as store:
        first = store.hold(chain())
        copy = onnx.ModelProto()
        copy.CopyFrom(first.proto)
        again = store.hold(copy)
        assert again.slots == first.slots and again.shared == store.held_bytes == large_bytes(chain())
        assert np.array_equal(store.session(again).run(None, FEED)[0], make_session(chain()).run(None, FEED)[0])


def test_prepacking_off_and_on_give_the_same_outputs() -> None:
    """The store of a large model turns prepacking off; the outputs stay those of the model."""
    model = chain()
    expected = make_session(model).run(None, FEED)[0]
    for prepack in (True, False):
        with SharedWeights(prepack=prepack) as store:
            np.testing.assert_allclose(store.session(store.hold(model)).run(None, FEED)[0], expected, rtol=1e-5, atol=1e-5)


def test_small_weights_stay_in_the_model() -> None:
    """Tensors below the threshold are not held: no file is written for a model of small weights."""
    with SharedWeights() as store:
        held = store.hold(chain(channels=8))
        assert not held.slots and store.folder is None and store.file_bytes == 0
        assert store.session(held).run(None, {"x": np.zeros((1, 8, 16, 16), np.float32)})[0].shape == (1, 8, 16, 16)
