"""Sessions that share weights: the store of onnx_lowrank.runtime, the check of a result, the plan's rounds, verify.

What is tested is deterministic: the outputs (the same as sessions of their own), which tensors the candidate's
session reads from the original's copy (the same map objects, one copy in the store's file), the lines the
command prints about the check, and that the store's temporary file never outlives the command.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fake_clock import FakeClock, install
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.api import convert
from onnx_lowrank.cli import main
from onnx_lowrank.runtime import SHARE_MIN_BYTES, HeldModel, SharedWeights, make_session
from onnx_lowrank.verify import verify

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


# --------------------------------------------------------------------------- the check of a result


def spy_holds(monkeypatch: pytest.MonkeyPatch) -> list[HeldModel]:
    """Every model held by any store from now on (``given`` on each: the names of the given model's initializers
    that came without their data, pointing at the store already)."""
    held: list[HeldModel] = []
    real = SharedWeights.hold

    def hold(self: SharedWeights, model: Any) -> HeldModel:
        got = real(self, model)
        stubs = (
            {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
            if isinstance(model, onnx.ModelProto)
            else set()
        )
        got.given_stubs = stubs  # type: ignore[attr-defined]
        held.append(got)
        return got

    monkeypatch.setattr(SharedWeights, "hold", hold)
    return held


def test_check_times_the_final_model_on_the_original_weights(own_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--by macs: the check holds the original before the rewrite and the result after it; the result's session
    reads the layers left whole from the original's copy; the file is gone once the check has run."""
    held = spy_holds(monkeypatch)
    model = chain()
    conversion = convert(model, speedup=1.5, by="macs", kinds=["spatial"], threads=1, check_runs=3)
    assert conversion.check is not None and stores(own_tmp)  # held, not yet run
    new, report = conversion.finish()
    assert not stores(own_tmp)
    assert len(held) == 2
    whole = {t.name for t in new.graph.initializer} & {"W0", "W1", "W2"}
    assert set(held[1].slots) >= whole and held[1].shared >= sum(len(t.raw_data) for t in model.graph.initializer if t.name in whole)
    latency = report.latency
    assert latency["runs"] == 3 and latency["measured_speedup"] > 0 and latency["check"]["prepacking"] is True
    assert latency["check"]["seconds"] > 0 and "check_note" not in latency


def test_large_model_check_says_first_what_it_costs() -> None:
    """Above ``large_model`` the check runs without prepacking, and the notice gets its cost before it runs."""
    notes: list[str] = []
    conversion = convert(chain(), speedup=1.5, by="macs", threads=1, check_runs=3, large_model=0.1)
    assert conversion.check is not None and conversion.check.cost_note() is not None
    _, report = conversion.finish(notice=notes.append)
    assert len(notes) == 1 and "temporary file" in notes[0] and "prepacking" in notes[0]
    assert report.latency["check"]["prepacking"] is False and report.latency["check_note"] == notes[0]
    _, small = decompose(chain(), speedup=1.5, by="macs", threads=1, check_runs=3)
    assert small.latency["check"]["prepacking"] is True and "check_note" not in small.latency


def test_failed_conversion_leaves_no_store(own_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite failing after the original's weights were held: the store's folder is removed."""
    api = importlib.import_module("onnx_lowrank.api")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise LowRankError("the rewrite failed")

    monkeypatch.setattr(api, "apply_factors", fail)
    with pytest.raises(LowRankError, match="the rewrite failed"):
        decompose(chain(), speedup=1.5, by="macs", check_runs=3)
    assert not stores(own_tmp)


def test_check_that_cannot_run_says_why_and_leaves_nothing(own_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime failing in the check: the report says why, the file is gone."""
    real = SharedWeights.session

    def session(self: SharedWeights, held: HeldModel, *args: Any, **kwargs: Any) -> Any:
        got = real(self, held, *args, **kwargs)
        if "W1" not in held.slots:  # the candidate
            raise LowRankError("onnxruntime cannot load the model: broken on purpose")
        return got

    monkeypatch.setattr(SharedWeights, "session", session)
    _, report = decompose(chain(), rank=8, kinds=["spatial"], include="conv1", check_runs=3)
    assert "broken on purpose" in report.latency["not_timed"] and "measured_speedup" not in report.latency
    assert not stores(own_tmp)


def test_rounds_of_the_plan_by_latency_share_the_original(own_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round's candidate is made from the original's held graph: it reads the layers it keeps whole from the
    original's maps, and nothing is left once the plan is made."""
    held = spy_holds(monkeypatch)
    # the machine's timings do not matter here, only which weights the rounds' sessions read: the fake clock
    # (tests/fake_clock.py), whose sessions are real ones built on the store
    clock = install(monkeypatch, FakeClock())
    model = chain(layers=4)
    _, report = decompose(model, speedup=1.5, by="latency", timing_cache=False, threads=1, exclude="conv3")
    assert report.latency["by"] == "latency" and clock.rounds and len(held) == 1 + len(clock.rounds)
    original, rounds = held[0], held[1:]
    for candidate in rounds:
        kept = set(candidate.slots) & set(original.slots)
        assert "W3" in kept and candidate.given_stubs == kept  # type: ignore[attr-defined]  # built without the weights
        assert all(candidate.slots[name] == original.slots[name] for name in kept)
        assert candidate.shared == sum(len(t.raw_data) for t in model.graph.initializer if t.name in kept)
    assert not stores(own_tmp)


def test_verify_shares_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify on two files: the candidate's layers left whole are read from the original's copy."""
    held = spy_holds(monkeypatch)
    src, dst = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = chain()
    onnx.save(model, src)
    onnx.save(decompose(model, rank=8, kinds=["spatial"], include="conv1", check_runs=0)[0], dst)
    result = verify(src, dst, runs=2, threads=1)
    assert result.runs == 2 and len(result.outputs) == 1
    assert held[1].shared == sum(len(t.raw_data) for t in model.graph.initializer if t.name in ("W0", "W2"))
    same = verify(src, src, runs=0)
    assert same.passed and all(o.max_abs == 0 for o in same.outputs)


def test_answers_on_held_back_samples_share_the_weights(own_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With calibration data the answers are measured on the held-back samples by two sessions that read the
    layers left whole from one copy; nothing is left once they are measured."""
    held = spy_holds(monkeypatch)
    model = chain()
    data = {"x": np.random.default_rng(2).standard_normal((64, 48, 16, 16)).astype(np.float32)}
    _, report = decompose(model, rank=8, kinds=["spatial"], include="conv1", calibration=data, check_runs=0, threads=1)
    assert report.answers["samples"] == 8 and len(held) == 2
    assert held[1].shared == sum(len(t.raw_data) for t in model.graph.initializer if t.name in ("W0", "W2"))
    assert not stores(own_tmp)


# --------------------------------------------------------------------------- the command


def test_cli_prints_the_check_on_its_own_line(tmp_path: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """decompose prints the check's runs on their own line; a model above --large-model is checked without
    prepacking, and the note of what the check costs is printed before it runs (unless --quiet); the report holds
    both; nothing of the check is left."""
    dst, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["decompose", str(VGG_SMALL), str(dst), "--by", "macs", "--threads", "1", "--check-runs", "3"]
    code = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and not err, err
    assert "checked in " in out and ": 3 interleaved runs; both sessions read one copy of the weights" in out
    assert "prepacking" not in out and "note: checking" not in out
    code = main([*args, "--large-model", "1", "--report", str(report)])
    out, err = capsys.readouterr()
    assert code == 0 and not err, err  # not a terminal: nothing on stderr
    lines = out.splitlines()
    assert lines[0].startswith("note: checking the result against the original") and "temporary file" in lines[0]
    assert "above --large-model 1 MiB" in lines[0] and "--check-runs 0 skips the check" in lines[0]
    assert ", without onnxruntime's prepacking" in out and "checked in " in out
    data = json.loads(report.read_text())
    assert data["latency"]["check"]["prepacking"] is False and data["latency"]["runs"] == 3
    assert "temporary file" in data["latency"]["check_note"]
    code = main([*args, "--large-model", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and not err and "note: checking" not in out and ", without onnxruntime's prepacking" in out
    assert not stores(own_tmp)


def test_cli_check_runs_zero_holds_nothing(tmp_path: Path, own_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check-runs 0: no store is made, no check line."""
    code = main(["decompose", str(VGG_SMALL), str(tmp_path / "o.onnx"), "--by", "macs", "--check-runs", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "checked in" not in out and "0 check runs" in out
    assert not stores(own_tmp)


def test_bad_large_model_is_refused() -> None:
    with pytest.raises(LowRankError, match="--large-model"):
        decompose(chain(), speedup=1.5, by="macs", large_model=-1)
