"""A representative sample input for planning (issue 23): ``--sample``, random values said as such, ``--branches all``.

The models (``vad_models.py``) are voice-activity nets whose int64 scalar input ``sr`` picks the path by its
value. Their MACs are counted independently from onnxruntime's profiler (``mac_count.py``) on the path a
sample at each rate runs: ``--sample sample16k.npz`` must plan the 16 kHz path (>= 1.95x fewer MACs there),
random values must be said as such (a note naming ``sr``, or an error naming ``--sample``), and
``--branches all`` must plan every path. No timing is asserted: plans are by MACs, the check runs are off.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model
from cli_contract import Outcome, run_cli, snapshot, violations
from mac_count import profiled_macs
from onnx import TensorProto, helper
from vad_models import export, sample

from onnx_lowrank import LowRankError, decompose, inspect
from onnx_lowrank.config import DecomposeConfig, ShapeConfig
from onnx_lowrank.run_shapes import MAC_OPS, resolve_shapes
from onnx_lowrank.sweep import sweep
from onnx_lowrank.value_flow import value_decisions

PLAN = ["--speedup", "2", "--by", "macs", "--check-runs", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two exported models and a sample at each rate, in a folder the tests only read."""
    folder = tmp_path_factory.mktemp("vad")
    out = {name: export(name, folder / f"{name}.onnx") for name in ("vad16", "vad18")}
    for rate in (16000, 8000):
        path = folder / f"sample{rate // 1000}k.npz"
        np.savez(path, **sample(rate))  # type: ignore[arg-type]
        out[f"{rate // 1000}k"] = path
    return out


def convert(tmp_path: Path, *argv: str | Path) -> tuple[Outcome, dict[str, Any] | None]:
    """``decompose IN OUT --report R *argv`` in a folder of its own; the contract is asserted."""
    (tmp_path / "out").mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    model, *flags = argv
    outcome = run_cli(["decompose", model, tmp_path / "out" / "out.onnx", *flags, "--report", tmp_path / "out" / "report.json"])
    assert violations(outcome, before, snapshot(tmp_path), ["out/out.onnx", "out/out.onnx.data", "out/report.json"]) == [], outcome
    report = json.loads((tmp_path / "out" / "report.json").read_text()) if outcome.code == 0 else None
    return outcome, report


def path_ratios(original: onnx.ModelProto | Path, converted: onnx.ModelProto | Path) -> dict[int, float]:
    """MACs before / after on the path a sample at each rate runs, counted from onnxruntime's profiler."""
    a = onnx.load(str(original)) if isinstance(original, Path) else original
    b = onnx.load(str(converted)) if isinstance(converted, Path) else converted
    return {rate: profiled_macs(a, sample(rate)) / profiled_macs(b, sample(rate)) for rate in (16000, 8000)}


def outputs(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feed)]


# --------------------------------------------------------------------------- before: random values


def test_random_rate_that_fails_names_sample(files: dict[str, Path], tmp_path: Path) -> None:
    """vad16 on random values: a random ``sr`` takes the path no rate takes, and the run fails; the one line
    names the random value, the If it decides, and --sample."""
    outcome, _ = convert(tmp_path, files["vad16"], *PLAN)
    assert outcome.code == 2
    assert "onnxruntime cannot run the model on a random input (input=1,576, state=2,1,128, sr=scalar)" in outcome.error
    assert "random values (sr=" in outcome.error and "decide If '/If_1', If '/If'" in outcome.error
    assert outcome.error.endswith("pass --sample FILE.npz with an input the model runs on")


def test_random_rate_that_runs_is_said_as_such(files: dict[str, Path], tmp_path: Path) -> None:
    """vad18 on random values: the 8 kHz sub-network is planned, the 16 kHz one left whole, and the summary and the
    report say a random value of ``sr`` chose the branch."""
    outcome, report = convert(tmp_path, files["vad18"], *PLAN)
    assert outcome.code == 0 and report is not None
    note = "the branch of If '/If' (else_branch ran) was chosen by a random value of input 'sr'"
    assert f"warning: {note}" in outcome.stdout and "pass --sample for the one you run" in outcome.stdout
    (choice,) = report["shapes"]["random_choices"]
    assert choice["node"] == "/If" and choice["what"] == "branch" and choice["inputs"] == ["sr"] and choice["outcome"] == "else_branch ran"
    assert any(note in warning for warning in report["warnings"])
    ratios = path_ratios(files["vad18"], tmp_path / "out" / "out.onnx")
    assert ratios[16000] == pytest.approx(1.0) and ratios[8000] >= 1.95


# --------------------------------------------------------------------------- after: --sample


@pytest.mark.parametrize("name", ["vad16", "vad18"])
def test_sample_plans_the_path_it_runs(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    """The target: --speedup 2 --by macs --sample sample16k.npz cuts the 16 kHz path's MACs >= 1.95x by an
    independent count, and the report's MACs are those the profiler counts on that path."""
    outcome, report = convert(tmp_path, files[name], *PLAN, "--sample", files["16k"])
    assert outcome.code == 0 and report is not None
    assert "warning" not in outcome.stdout and not report["shapes"]["random_choices"]
    assert f"sizes: from one onnxruntime run on the sample {files['16k']} input=1x576, state=2x1x128, sr=scalar" in outcome.stdout
    assert report["shapes"]["reference_from"] == f"the sample {files['16k']}"
    converted = tmp_path / "out" / "out.onnx"
    ratios = path_ratios(files[name], converted)
    assert ratios[16000] >= 1.95
    original = onnx.load(str(files[name]))
    assert report["macs_before"] == pytest.approx(profiled_macs(original, sample(16000)), rel=0.01)
    assert report["macs_after"] == pytest.approx(profiled_macs(onnx.load(str(converted)), sample(16000)), rel=0.01)


@pytest.mark.parametrize("name", ["vad16", "vad18"])
def test_full_rank_is_exact_on_both_paths(files: dict[str, Path], name: str) -> None:
    """--rank large --force with the sample: every layer decomposed at full rank, outputs equal on both rates."""
    original = onnx.load(str(files[name]))
    new, report = decompose(original, rank=100_000, force=True, sample=files["16k"], check_runs=0)
    assert report.decomposed and all(layer.decomposed for layer in report.layers if layer.op_type == "Conv")
    for rate in (16000, 8000):
        feed = sample(rate, seed=3)
        for before, after in zip(outputs(original, feed), outputs(new, feed), strict=True):
            np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_sample_as_a_mapping_and_the_config(files: dict[str, Path]) -> None:
    """The API takes ``sample=`` as a path or a mapping (a field of ShapeConfig); the options say which."""
    original = onnx.load(str(files["vad18"]))
    _, report = decompose(original, speedup=2, by="macs", check_runs=0, sample=sample(16000))
    assert report.shapes["reference_from"] == "the sample" and report.control_flow[0]["runs"]["then_branch"] == 1
    config = DecomposeConfig.from_keywords(sample=files["16k"], branches="all")
    assert config.to_dict()["shapes"]["sample"] == [str(files["16k"])] and config.shapes.branches == "all"
    assert DecomposeConfig.from_keywords(sample=sample(16000)).to_dict()["shapes"]["sample"] == ["given"]


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"sample": [sample(16000), sample(8000)]}, "more than one --sample"),
        ({"sample": 3}, "a sample is a path to an .npz or a mapping"),
        ({"branches": "some"}, "--branches must be one of run, all"),
        ({"branches": "all", "by": "latency"}, "--branches all plans every branch by MACs"),
        ({"sample": {"input": sample(16000)["input"], "state": sample(16000)["state"]}}, "the sample lacks model input 'sr'"),
        ({"sample": {**sample(16000), "sr": np.array([16000])}}, "one axis more than the model's () (a scalar: a 0-d array)"),
        ({"sample": {**sample(16000), "sr": np.array(16000.0)}}, "floating dtype float64; the model's input is int64"),
        ({"sample": {**sample(16000), "extra": np.zeros(2)}}, "holds 'extra', not an input of the model"),
        ({"sample": sample(16000), "input_shapes": {"input": [1, 288]}}, "differs from the sample's 'input' (1, 576)"),
    ],
)
def test_bad_samples_are_refused(files: dict[str, Path], keywords: dict[str, Any], message: str) -> None:
    original = onnx.load(str(files["vad18"]))
    with pytest.raises(LowRankError, match=None) as caught:
        decompose(original, speedup=2, check_runs=0, **keywords)
    assert message in str(caught.value), str(caught.value)


def test_inspect_sweep_and_verify_take_the_sample(files: dict[str, Path], tmp_path: Path) -> None:
    """inspect sizes the 16 kHz front end on the sample; sweep evaluates on it (random values cannot run vad16);
    verify runs both models on it; decompose --verify too."""
    layers = {layer.node: layer for layer in inspect(files["vad16"], sample=files["16k"])}
    assert layers["/front16/stft/Conv"].shape_known and layers["/front16/stft/Conv"].macs == 258 * 256 * 7
    assert not layers["/front8/stft/Conv"].shape_known
    result = sweep(files["vad16"], [2.0], sample=files["16k"], by="macs", runs=0)
    (row,) = result.rows
    assert result.inputs == f"sample {files['16k']}" and result.samples == 1
    assert row.reached and row.mac_ratio is not None and row.mac_ratio >= 1.95
    outcome, _ = convert(tmp_path, files["vad16"], *PLAN, "--sample", files["16k"], "--verify", "--quiet")
    assert outcome.code == 0 and "output  1x1" in outcome.stdout
    converted = tmp_path / "out" / "out.onnx"
    checked = run_cli(["verify", files["vad16"], converted, "--sample", files["16k"], "--runs", "0", "--json"])
    assert checked.code in (0, 1) and json.loads(checked.stdout)["samples"] == 1
    refused = run_cli(["verify", files["vad16"], converted, "--sample", files["16k"], "--inputs", files["8k"]])
    assert refused.code == 2 and "--inputs and --sample" in refused.error


# --------------------------------------------------------------------------- --branches all


@pytest.mark.parametrize("name", ["vad16", "vad18"])
@pytest.mark.parametrize("second", [False, True], ids=["forced", "second-sample"])
def test_every_branch_planned(files: dict[str, Path], tmp_path: Path, name: str, second: bool) -> None:
    """--branches all sizes the branch the sample does not take — by a run with the If's condition forced, or by
    a second sample that takes it — and every path reaches the target by the independent count."""
    extra = ["--sample", files["8k"]] if second else []
    outcome, report = convert(tmp_path, files[name], *PLAN, "--sample", files["16k"], *extra, "--branches", "all")
    assert outcome.code == 0 and report is not None
    ratios = path_ratios(files[name], tmp_path / "out" / "out.onnx")
    assert ratios[16000] >= 1.95 and ratios[8000] >= 1.95, ratios
    runs = report["shapes"]["branch_runs"]
    if second:
        assert runs == [f"the sample {files['8k']}"]
    else:  # vad16's 8 kHz front end sits in a nested If, which the forced run forces too (its other branch fails)
        nested = ", If '/If' forced to then_branch" if name == "vad16" else ""
        assert runs == [f"the sample {files['16k']} with If '{'/If_1' if name == 'vad16' else '/If'}' forced to else_branch{nested}"]
    outer = report["control_flow"][0]
    assert outer["subgraphs"]["then_branch"]["sized_by"] == f"the sample {files['16k']}"
    assert outer["subgraphs"]["else_branch"]["sized_by"] == runs[0]
    for branch in outer["subgraphs"].values():
        assert branch["path_macs_before"] / branch["path_macs_after"] >= 2.0
    assert f"sizes: --branches all sized the branches it does not run by 1 further run(s): {runs[0]}" in outcome.stdout
    # vad16's shared encoder runs 16 frames at 8 kHz, 7 at 16 kHz: counted at the sample's, and said so
    assert any("have other sizes" in w for w in report["warnings"]) == (name == "vad16")
    assert "every If branch counted at its own sizes" in outcome.stdout


def test_every_branch_is_planned_by_macs_by_default(files: dict[str, Path]) -> None:
    """A timing on the sample sees one path: without --by, --branches all plans by MACs and says why."""
    _, report = decompose(onnx.load(str(files["vad18"])), speedup=2, sample=files["16k"], branches="all", check_runs=0)
    assert report.policy["by"] == "macs" and "--branches all" in report.latency["why_macs"]


def test_a_branch_no_run_can_size_is_left_whole() -> None:
    """A forced branch that fails on the reference input (and holds no nested If to force) keeps no size: the
    warning says so and names --sample; the branch's layers are left as they are."""
    rng = np.random.default_rng(0)

    def branch(name: str, reshape: bool) -> onnx.GraphProto:
        w = onnx.numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"{name}_W")
        nodes = []
        source = "x"
        if reshape:  # only inputs of 2x the width reach the conv
            nodes.append(helper.make_node("Reshape", ["x", "half"], [f"{name}_r"]))
            source = f"{name}_r"
        nodes.append(helper.make_node("Conv", [source, f"{name}_W"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1]))
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])

    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("then", False), else_branch=branch("else", True))],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"half": np.array([1, 4, 8, 16], np.int64)},
    )
    feed = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "flag": np.array(True)}
    _, report = decompose(model, speedup=1.5, by="macs", sample=feed, branches="all", check_runs=0)
    assert any("the else_branch of If 'if' could not be sized" in w and "--sample" in w for w in report.warnings)
    layers = {layer.node: layer for layer in report.layers}
    assert layers["then_conv"].counted and not layers["else_conv"].decomposed
    assert "no run sized it" in str(layers["else_conv"].reason)


# --------------------------------------------------------------------------- what random values decide


def _loop_and_slice() -> onnx.ModelProto:
    """An int64 ``steps`` sets a Loop's trip count and an int64 ``width`` a Slice before its Conv; a float ``x``
    feeds them; an int64 ``ids`` is only added to an output (it decides nothing)."""
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["s_in", "W"], ["s_out"], name="body_conv", pads=[1, 1, 1, 1]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 4, 4, None]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Slice", ["x", "zero", "width", "last"], ["r"], name="slice"),
        helper.make_node("Loop", ["steps", "true", "r"], ["y"], name="loop", body=body),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["y", "idsf"], ["z"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 16]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, []),
            helper.make_tensor_value_info("width", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        {
            "zero": np.array([0], np.int64),
            "last": np.array([3], np.int64),
            "true": np.array(True),
            "W": (rng.standard_normal((4, 4, 3, 3)) * 0.1).astype(np.float32),
        },
    )


def test_value_decisions_find_trip_counts_and_sizes() -> None:
    model = _loop_and_slice()
    found = {(d.node, d.what): d.inputs for d in value_decisions(model, ["steps", "width", "ids"], MAC_OPS)}
    assert found == {("slice", "sizes"): ["width"], ("loop", "trip count"): ["steps"]}
    assert value_decisions(model, ["x"], MAC_OPS) == []  # values of x change no size here
    feed = {"x": np.zeros((1, 4, 4, 16), np.float32), "steps": np.array(3), "width": np.array([16]), "ids": np.array([0])}
    given = resolve_shapes(model, reference=feed, reference_from="the sample")
    assert not given.random_choices and given.control_flow[0].runs == {"body": 3}


def test_random_trip_count_and_size_are_named() -> None:
    """On random values (small integers), the notes name the Loop's trip count and the Slice's sizes."""
    shapes = resolve_shapes(_loop_and_slice())
    messages = [choice.message for choice in shapes.random_choices]
    assert len(messages) == 2 and all(m.endswith("pass --sample for the one you run") for m in messages)
    assert messages[0].startswith("the output sizes of Slice 'slice' were set by a random value of input 'width' (width=")
    assert messages[1].startswith("the trip count of Loop 'loop' (") and "was set by a random value of input 'steps' (steps=" in messages[1]


def test_shape_config_samples() -> None:
    assert ShapeConfig().samples == [] and ShapeConfig(sample="a.npz").samples == ["a.npz"]
    assert ShapeConfig(sample=["a.npz", "b.npz"], branches="all").samples == ["a.npz", "b.npz"]


CliCase = Callable[[dict[str, Path], Path], list[str | Path]]


def _npz(folder: Path, name: str, **arrays: Any) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda f, d: ["decompose", f["vad18"], d / "o.onnx", "--sample", d / "absent.npz"], "absent.npz: no such sample file"),
        (
            lambda f, d: [
                "decompose",
                f["vad18"],
                d / "o.onnx",
                "--sample",
                _npz(d, "s.npz", **{**sample(16000), "sr": np.array([[16000]])}),
            ],
            "sample input 'sr' has shape (1, 1); the model expects () (a scalar: a 0-d array)",
        ),
        (
            lambda f, d: [
                "decompose",
                f["vad18"],
                d / "o.onnx",
                "--sample",
                _npz(d, "s.npz", **{**sample(16000), "input": np.zeros((1, 1, 576))}),
            ],
            "one axis more than the model's (batch, 576): a sample is one input set as the model takes it, without a sample axis",
        ),
        (lambda f, d: ["decompose", f["vad18"], d / "o.onnx", "--sample", f["16k"], "--sample", f["8k"]], "with --branches all"),
        (
            lambda f, d: ["inspect", f["vad18"], "--sample", _npz(d, "s.npz", input=np.zeros((1, 576), np.float32))],
            "lacks model input 'state'",
        ),
        (lambda f, d: ["sweep", f["vad18"], "--runs", "0", "--sample", d / "absent.npz"], "no such sample file"),
        (lambda f, d: ["decompose", f["vad18"], f["16k"], "--sample", f["16k"]], "sample file"),
    ],
    ids=["missing", "sr-2d", "sample-axis", "two-without-branches", "inspect-lacks", "sweep-missing", "output-is-sample"],
)
def test_cli_refuses_bad_samples(files: dict[str, Path], tmp_path: Path, make_argv: CliCase, message: str) -> None:
    """One line on stderr, exit 2, nothing written, the inputs untouched (the models and samples are read only)."""
    argv = make_argv(files, tmp_path)
    watched = files["16k"].parent
    before, mine = snapshot(watched), snapshot(tmp_path)
    outcome = run_cli(argv)
    assert outcome.code == 2 and message in outcome.error, outcome
    assert violations(outcome, mine, snapshot(tmp_path), []) == [] and snapshot(watched) == before
