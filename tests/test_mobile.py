"""The mobile path: ORT format, mobile EP coverage, --mobile-safe, INT8 after the low-rank step, and their bad input.

Bad input follows tests/test_cli.py: exit 2, one line on stderr, nothing written, input untouched.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model
from onnx import TensorProto, helper
from test_cli import VGG_SHA, Workspace, assert_ok, check_bad_input, cli, sha256, ws  # noqa: F401 - ws is a fixture

import onnx_lowrank.cli
import onnx_lowrank.mobile
from onnx_lowrank import decompose
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.mobile import MOBILE_EPS, coverage, is_ort_format, save_ort
from onnx_lowrank.quantize import quantize_model
from onnx_lowrank.verify import verify

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIBRATION = ROOT / "models" / "digits_calibration.npz"
EP_KEYS = [key for key, _, _, _ in MOBILE_EPS]


class InProcess:
    """The CLI's ``main`` in this process (onnxruntime's tools import torch where it is installed: a few seconds
    per fresh process), with what it printed; the subprocess tests of bad input keep the process boundary."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str | Path, code: int | None = 0) -> str:
        capsys = self.capsys
        capsys.readouterr()
        returned = onnx_lowrank.cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        if code is not None:
            assert returned == code, captured.err
        assert "Traceback" not in captured.err
        if code == 0:
            assert captured.err == ""
        return captured.out


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(capsys)


def session_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the model file at ``path`` (.onnx or .ort) in onnxruntime on CPU."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return list(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds))


def dilated_depthwise(multiplier: int = 4, channels: int = 8) -> onnx.ModelProto:
    """A dilated depthwise conv with a channel multiplier, then a Relu, at a fixed input size.

    Its spatial split at rank 2 makes a horizontal conv with 2 channels per group and dilation (1, 2): a dilated
    grouped conv, which NNAPI's conv builder refuses while it takes the depthwise original.
    """
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels * multiplier, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["t"], name="dw", group=channels, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["t"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels * multiplier, 16, 16])],
        {"W": weight},
    )


def bn_after_add() -> onnx.ModelProto:
    """Conv -> Relu -> Add(input) -> BatchNormalization -> Conv: the BN reads an Add, so nothing folds it."""
    rng = np.random.default_rng(1)
    c = 4
    inits = {
        "W1": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "W2": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, c).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Add", ["b", "x"], ["s"], name="add"),
        helper.make_node("BatchNormalization", ["s", "scale", "bias", "mean", "var"], ["n"], name="bn_after_add"),
        helper.make_node("Conv", ["n", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 12, 12])],
        inits,
    )


# --------------------------------------------------------------------------- ORT format


def test_ort_round_trip_matches_onnx(tmp_path: Path, run: InProcess) -> None:
    """decompose --ort writes NAME.ort and the ops config; the .ort gives the .onnx's outputs in onnxruntime."""
    out = tmp_path / "digits_lr.onnx"
    proc = cli("decompose", DIGITS, out, "--rank", "8", "--ort")
    assert_ok(proc)
    ort_file, config = tmp_path / "digits_lr.ort", tmp_path / "digits_lr.required_operators.config"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, ort_file.name, config.name])
    assert is_ort_format(ort_file) and not is_ort_format(out)
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, ort_file, config):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    ops = [line for line in config.read_text().splitlines() if line and not line.startswith("#")]
    assert any(line.startswith("ai.onnx;") for line in ops)
    assert str(ort_file.resolve()) in config.read_text()  # names the file the user got, not a staging copy
    x = np.load(DIGITS_TEST)["input"][:16]
    onnx_out, ort_out = session_outputs(out, {"input": x}), session_outputs(ort_file, {"input": x})
    np.testing.assert_allclose(ort_out[0], onnx_out[0], rtol=1e-5, atol=1e-5)
    # verify takes .ort on either side and compares it like an .onnx
    printed = run("verify", out, ort_file, "--runs", "0", "--inputs", DIGITS_TEST, "--rtol", "1e-5", "--atol", "1e-5")
    assert "outputs match" in printed
    printed = run("verify", ort_file, DIGITS, "--runs", "2", "--json", code=None)
    assert json.loads(printed)["outputs"][0]["name"] == "logits"


def test_save_ort_api(tmp_path: Path) -> None:
    """save_ort from a ModelProto: the pair of files, and the model runs."""
    files = save_ort(onnx.load(DIGITS), tmp_path / "m.ort")
    assert files.model.is_file() and files.config.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "m.required_operators.config"]
    x = np.load(DIGITS_TEST)["input"][:4]
    np.testing.assert_allclose(
        session_outputs(files.model, {"input": x})[0], session_outputs(DIGITS, {"input": x})[0], rtol=1e-5, atol=1e-5
    )


def test_failed_conversion_leaves_nothing(ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """onnxruntime's converter failing half-way: exit 2, no .onnx, no .ort, no staging folder."""
    import onnxruntime.tools.convert_onnx_models_to_ort as converter

    def half(model_path: Path, output_dir: Path | None = None, **kwargs: Any) -> None:
        assert output_dir is not None
        output_dir.mkdir(parents=True)
        (output_dir / (model_path.stem + ".ort")).write_bytes(b"half")
        raise RuntimeError("converter broke")

    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", half)
    code = onnx_lowrank.cli.main(["decompose", str(ws.model), str(ws.target), "--rank", "2", "--ort"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "converter broke" in err
    assert list(ws.out.iterdir()) == []
    assert sha256(ws.model) == VGG_SHA


def test_failed_onnx_save_leaves_no_ort(ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The .onnx failing to save after the .ort was converted: neither appears."""

    def full(model: onnx.ModelProto, path: str | os.PathLike[str], **kwargs: Any) -> None:
        if Path(path).parent == ws.out:
            raise LowRankError(f"{path}: cannot write (No space left on device)")
        real_save(model, path, **kwargs)

    command = importlib.import_module("onnx_lowrank.cli.decompose")  # the package's `decompose` is the function
    real_save = command.save_model
    monkeypatch.setattr(command, "save_model", full)
    code = onnx_lowrank.cli.main(["decompose", str(ws.model), str(ws.target), "--rank", "2", "--ort"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left" in err
    assert list(ws.out.iterdir()) == []


def test_failed_ort_rename_removes_onnx(ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The .ort's final rename failing after the .onnx is in place: the .onnx is removed again."""
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).suffix == ".ort":
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code = onnx_lowrank.cli.main(["decompose", str(ws.model), str(ws.target), "--rank", "2", "--ort"])
    err = capsys.readouterr().err
    assert code == 2 and "Input/output error" in err
    assert list(ws.out.iterdir()) == []


# --------------------------------------------------------------------------- coverage


def check_ep_fields(entry: dict[str, Any]) -> None:
    """The fields every EP entry has, with their types and the counts consistent."""
    for key in ("partitions", "supported_nodes", "total_nodes"):
        assert type(entry[key]) is int and entry[key] >= 0, key
    assert entry["supported_nodes"] <= entry["total_nodes"]
    assert entry["partitions"] <= max(entry["supported_nodes"], 0) or entry["partitions"] == 0
    assert isinstance(entry["unsupported_ops"], list) and all(isinstance(op, str) and ":" in op for op in entry["unsupported_ops"])
    for listed in ("splitting_nodes", "refused_nodes"):
        assert all(set(n) == {"node", "op", "reason"} for n in entry[listed])


def test_verify_mobile_json_fields(tmp_path: Path, run: InProcess) -> None:
    """verify --mobile --json: "mobile": {"original", "candidate"}, one entry per EP with the documented fields."""
    out = tmp_path / "lr.onnx"
    run("decompose", DIGITS, out, "--rank", "8")
    data = json.loads(run("verify", DIGITS, out, "--runs", "0", "--mobile", "--json", "--input-shape", "input=1,1,32,32", code=1))
    assert set(data["mobile"]) == {"original", "candidate"}
    for side in ("original", "candidate"):
        assert sorted(data["mobile"][side]) == sorted(EP_KEYS)
        for entry in data["mobile"][side].values():
            check_ep_fields(entry)
            assert "if_shapes_fixed" not in entry  # the input shape is fixed
    # the digits CNN: every node on NNAPI and MLProgram in one partition; CoreML NN lacks ReduceMean
    original, candidate = data["mobile"]["original"], data["mobile"]["candidate"]
    assert original["nnapi"]["partitions"] == candidate["nnapi"]["partitions"] == 1
    assert candidate["nnapi"]["supported_nodes"] == candidate["nnapi"]["total_nodes"] > original["nnapi"]["total_nodes"]
    assert "ai.onnx:ReduceMean" in original["coreml_neuralnetwork"]["unsupported_ops"]
    # the text form prints both sides
    printed = run("verify", DIGITS, out, "--runs", "0", "--mobile", code=1)
    assert "original partitions" in printed and "candidate partitions" in printed and "dynamic shape" in printed


def test_dynamic_shapes_reported_both_ways() -> None:
    """A dynamic batch: nothing runs on the EPs as declared; the estimate with shapes ignored is given beside it."""
    result = coverage(DIGITS)
    assert result.dynamic_inputs == ["input"]
    nnapi = result.eps["nnapi"]
    assert nnapi.partitions == 0 and nnapi.supported_nodes == 0 and nnapi.dynamic_shape_nodes == nnapi.total_nodes
    assert nnapi.if_shapes_fixed is not None and nnapi.if_shapes_fixed["partitions"] == 1


def test_unfolded_batchnorm_named_as_splitting_mlprogram() -> None:
    """A BatchNormalization nothing can fold: CoreML MLProgram (no BN) is split there and the node is named."""
    result = coverage(bn_after_add())
    mlprogram, nnapi = result.eps["coreml_mlprogram"], result.eps["nnapi"]
    assert mlprogram.partitions == 2
    assert [n["node"] for n in mlprogram.splitting_nodes] == ["bn_after_add"]
    assert "ai.onnx:BatchNormalization" in mlprogram.unsupported_ops
    assert nnapi.partitions == 1 and nnapi.splitting_nodes == []  # NNAPI takes BatchNormalization


def test_inspect_mobile(tmp_path: Path, run: InProcess) -> None:
    """inspect --mobile prints the coverage; with --json under "mobile" beside the layers."""
    path = tmp_path / "bn.onnx"
    onnx.save(bn_after_add(), path)
    printed = run("inspect", path, "--mobile")
    assert "CoreML MLProgram" in printed and "bn_after_add" in printed
    data = json.loads(run("inspect", path, "--mobile", "--json"))
    assert [layer["node"] for layer in data["layers"]] == ["conv1", "conv2"]
    check_ep_fields(data["mobile"]["coreml_mlprogram"])


# --------------------------------------------------------------------------- --mobile-safe


def test_mobile_safe_keeps_layer_whose_pair_splits_a_partition(tmp_path: Path, run: InProcess) -> None:
    """The dilated depthwise conv: decomposed, NNAPI loses the pair's second conv and gains a partition;
    with --mobile-safe the layer stays whole and the report says why."""
    src = tmp_path / "dw.onnx"
    onnx.save(dilated_depthwise(), src)
    plain, safe = tmp_path / "plain.onnx", tmp_path / "safe.onnx"
    run("decompose", src, plain, "--rank", "2", "--kinds", "spatial")
    before, after = coverage(src), coverage(plain)
    assert before.eps["nnapi"].partitions == 1 and after.eps["nnapi"].partitions == 2
    assert [n["node"] for n in after.eps["nnapi"].refused_nodes] == ["dw/horizontal"]
    assert after.eps["coreml_mlprogram"].partitions == 1  # CoreML takes the pair

    report = tmp_path / "report.json"
    printed = run("decompose", src, safe, "--rank", "2", "--kinds", "spatial", "--mobile-safe", "--report", report)
    layer = json.loads(report.read_text())["layers"][0]
    assert layer["decomposed"] is False
    assert "--mobile-safe" in layer["reason"] and "NNAPI" in layer["reason"] and "dw/horizontal" in layer["reason"]
    assert "kept whole by --mobile-safe" in printed
    assert coverage(safe).eps["nnapi"].partitions == 1
    assert json.loads(report.read_text())["mobile"]["kept_whole"] == {"dw": layer["reason"].removeprefix("kept whole by --mobile-safe: ")}


def test_mobile_safe_leaves_safe_layers_decomposed() -> None:
    """The digits CNN's pairs are all taken by every EP: --mobile-safe changes nothing."""
    model = onnx.load(DIGITS)
    plain, _ = decompose(model, rank=8)
    safe, report = decompose(model, rank=8, mobile_safe=True, input_shapes={"input": [1, 1, 32, 32]})
    assert [n.name for n in safe.graph.node] == [n.name for n in plain.graph.node]
    assert report.mobile["kept_whole"] == {}
    assert not any("partitions after decomposition" in w for w in report.warnings)


# --------------------------------------------------------------------------- INT8


@pytest.fixture(scope="module")
def refit_digits() -> onnx.ModelProto:
    """The digits CNN at a 1.5x MAC speedup with refit factors (calibration set): the float low-rank model."""
    model, _ = decompose(onnx.load(DIGITS), speedup=1.5, calibration=DIGITS_CALIBRATION, sensitivity=False, by="macs")
    return model


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_candidate_verifies_against_float_original(refit_digits: onnx.ModelProto, mode: str) -> None:
    """Low-rank + INT8 against the float original on the held-out digits: the quantized nodes are the pairs', and
    the accuracy stays within a few points."""
    result = quantize_model(refit_digits, mode, calibration=DIGITS_CALIBRATION)
    ops = {n.op_type for n in result.model.graph.node}
    if mode == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert result.samples == 128
    else:
        assert "ConvInteger" in ops and result.samples == 0
    pairs = [name for name in result.forms if name.endswith(("/vertical", "/horizontal", "/channel_reduce", "/channel_expand"))]
    assert pairs and all(result.forms[name] != "float" for name in pairs)
    check = verify(DIGITS, result.model, inputs=DIGITS_TEST, runs=0)
    logits = check.outputs[0]
    assert logits.accuracy_original == 1.0
    assert logits.accuracy_candidate is not None and logits.accuracy_candidate >= 0.95
    assert logits.top1_agreement is not None and logits.top1_agreement >= 0.95


def test_decompose_quantize_cli_table(tmp_path: Path, run: InProcess) -> None:
    """decompose --quantize static --ort: the per-layer table shows each pair's INT8 form; the files verify."""
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    printed = run(
        "decompose", DIGITS, out, "--speedup", "1.5", "--by", "macs", "--calibration", DIGITS_CALIBRATION, "--no-sensitivity",
        "--quantize", "static", "--ort", "--report", report,
    )  # fmt: skip
    assert "int8" in printed.splitlines()[0] and "int8 (QDQ)" in printed
    data = json.loads(report.read_text())
    assert data["quantization"]["mode"] == "static" and data["quantization"]["format"] == "QDQ"
    assert all(layer["quantized"] == "int8 (QDQ)" for layer in data["layers"] if layer["decomposed"])
    x = np.load(DIGITS_TEST)["input"][:16]
    np.testing.assert_allclose(
        session_outputs(out.with_suffix(".ort"), {"input": x})[0], session_outputs(out, {"input": x})[0], rtol=1e-4, atol=1e-4
    )
    accuracy = json.loads(run("verify", DIGITS, out, "--inputs", DIGITS_TEST, "--runs", "0", "--json", code=None))["outputs"][0][
        "accuracy_candidate"
    ]
    assert accuracy >= 0.95


# --------------------------------------------------------------------------- bad input


def _unloadable(w: Workspace) -> Path:
    """A valid ONNX file with an operator onnxruntime does not know: the checker cannot read it."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="com.example")
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = w.inp / "custom.onnx"
    onnx.save(model, path)
    return path


def _ort_copy(w: Workspace) -> Path:
    path = w.inp / "model.ort"
    save_ort(w.model, path)
    return path


BAD_MOBILE: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    (
        "quantize-static-without-calibration",
        lambda w: ["decompose", str(w.model), str(w.target), "--quantize", "static"],
        "--calibration",
    ),
    ("quantize-unknown-mode", lambda w: ["decompose", str(w.model), str(w.target), "--quantize", "int4"], "--quantize"),
    ("ort-folder-missing", lambda w: ["decompose", str(w.model), str(w.out / "absent" / "m.onnx"), "--ort"], "does not exist"),
    ("ort-output-named-ort", lambda w: ["decompose", str(w.model), str(w.out / "m.ort"), "--rank", "2", "--ort"], ".ort"),
    ("decompose-ort-input", lambda w: ["decompose", str(_ort_copy(w)), str(w.out / "x.onnx")], "onnx model"),
    ("verify-mobile-on-ort", lambda w: ["verify", str(w.model), str(_ort_copy(w)), "--mobile"], "ort-format"),
    ("inspect-mobile-unreadable", lambda w: ["inspect", str(_unloadable(w)), "--mobile"], "mobile usability checker cannot read"),
    ("verify-mobile-unreadable", lambda w: ["verify", str(w.model), str(_unloadable(w)), "--mobile"], "cannot read"),
    (
        "verify-mobile-bad-input-name",
        lambda w: ["verify", str(w.model), str(w.model), "--mobile", "--input-shape", "nope=1,3,64,64"],
        "nope",
    ),
    ("verify-ort-missing", lambda w: ["verify", str(w.model), str(w.inp / "absent.ort"), "--runs", "0"], "no such file"),
]


@pytest.mark.parametrize(("make_argv", "keyword"), [pytest.param(f, k, id=i) for i, f, k in BAD_MOBILE])
def test_bad_mobile_input(ws: Workspace, make_argv: Callable[[Workspace], list[str]], keyword: str) -> None:  # noqa: F811
    """Exit 2, one line on stderr naming the problem, no traceback, input untouched, nothing written."""
    check_bad_input(ws, make_argv, keyword)
