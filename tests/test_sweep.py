"""The sweep: one preparation for every target, each result what ``decompose`` gives, rows for unreachable targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import run
from test_measure import fake_timing, wide_chain  # noqa: F401 - the fixture is used by name

import onnx_lowrank.calibration
import onnx_lowrank.factorization
from onnx_lowrank import DecomposeConfig, LowRankError, PolicyConfig, SpeedConfig, decompose
from onnx_lowrank.sweep import SweepResult, parse_speedups, sweep
from onnx_lowrank.threads import default_threads

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIBRATION = ROOT / "models" / "digits_calibration.npz"


def ranks_of(report: Any) -> dict[str, tuple[str, int]]:
    """Per decomposed layer: (kind, rank)."""
    return {layer.node: (layer.kind, layer.rank) for layer in report.decomposed}


@pytest.fixture(scope="module")
def digits_sweep() -> SweepResult:
    """A data-free sweep of the digits model on its labelled test set, with one unreachable target."""
    return sweep(DIGITS, [1.5, 2, 3, 1000], eval_inputs=DIGITS_TEST, runs=3, by="macs")


def test_rows_reach_their_targets(digits_sweep: SweepResult) -> None:
    """Each reachable target meets its MAC budget; the unreachable one is a row saying why, not an error."""
    rows = {row.target: row for row in digits_sweep.rows}
    assert sorted(rows) == [1.5, 2.0, 3.0, 1000.0]
    for target in (1.5, 2.0, 3.0):
        row = rows[target]
        assert row.reached and row.reason is None
        assert row.mac_ratio is not None and row.mac_ratio >= target
        assert row.decomposed >= 1 and row.layers == 7
        assert row.original_ms and row.candidate_ms and row.latency_ratio == pytest.approx(row.original_ms / row.candidate_ms)
        assert row.outputs and row.outputs[0].shape == [450, 10]
        assert row.accuracy_original == pytest.approx(1.0, abs=0.02)  # the trained model on its own test set
        assert row.accuracy is not None and 0.0 <= row.accuracy <= 1.0
        assert row.top1_agreement is not None
        assert row.convert_seconds > 0
    assert not rows[1000.0].reached
    assert "cannot be reached" in str(rows[1000.0].reason)
    assert digits_sweep.labelled and digits_sweep.samples == 450


def test_rows_are_what_decompose_gives(digits_sweep: SweepResult) -> None:
    """A sweep row's conversion is exactly ``decompose(model, speedup=S)``: the same layers, kinds and ranks."""
    for row in digits_sweep.rows:
        if row.reached:
            _, report = decompose(DIGITS, speedup=row.target, by="macs")  # the sweep below plans by MACs too
            assert row.report is not None
            assert ranks_of(row.report) == ranks_of(report)
            assert row.mac_ratio == pytest.approx(report.mac_ratio)


def test_json_rows(digits_sweep: SweepResult) -> None:
    """The rows serialize to JSON with the fields the CLI prints."""
    data = json.loads(json.dumps(digits_sweep.to_dict()))
    assert [row["target"] for row in data["rows"]] == [1.5, 2.0, 3.0, 1000.0]
    first = data["rows"][0]
    for key in ("mac_ratio", "latency_ratio", "relative_l2", "top1_agreement", "accuracy", "convert_seconds", "ranks", "outputs"):
        assert key in first, key
    assert first["ranks"] and all({"kind", "rank", "full_rank", "relative_error"} <= set(v) for v in first["ranks"].values())


def test_spectra_computed_once_for_all_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers' singular values are computed once per layer and kind, however many targets."""
    made: list[tuple[int, ...]] = []
    original_init = onnx_lowrank.factorization.Decomposition.__init__

    def counting_init(self: Any, weight: np.ndarray, *args: Any, **kwargs: Any) -> None:
        made.append(tuple(weight.shape))
        original_init(self, weight, *args, **kwargs)

    monkeypatch.setattr(onnx_lowrank.factorization.Decomposition, "__init__", counting_init)
    sweep(DIGITS, [2], runs=0, by="macs")
    one = len(made)
    made.clear()
    sweep(DIGITS, [1.25, 1.5, 2, 3, 4], runs=0, by="macs")
    assert one > 0 and len(made) == one


def test_calibration_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With calibration data the statistics and gains are measured once; each target is then what the calibrated
    decompose gives."""
    calls: list[int] = []
    plan = onnx_lowrank.calibration.data_aware_plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return plan(*args, **kwargs)

    monkeypatch.setattr(onnx_lowrank.calibration, "data_aware_plan", counting)
    result = sweep(DIGITS, [2, 3], eval_inputs=DIGITS_TEST, calibration=DIGITS_CALIBRATION, runs=0, by="macs")
    assert len(calls) == 1
    assert "sensitivity" in result.calibration and "statistics_seconds" in result.calibration
    assert result.calibration["refit"] is True
    for row in result.rows:
        assert row.reached and row.allocation is not None and row.allocation.startswith("damage to the outputs")
        assert row.report is not None and "refit" in row.report.calibration
    _, report = decompose(DIGITS, speedup=3, calibration=DIGITS_CALIBRATION, by="macs")
    assert ranks_of(result.rows[1].report) == ranks_of(report)


def test_save_dir_writes_each_model(tmp_path: Path) -> None:
    """--save-dir writes one runnable model per reached target; without it nothing is written."""
    result = sweep(DIGITS, [2, 1000], runs=0, by="macs", save_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_cnn-x2.onnx"]
    assert result.rows[0].saved == str(tmp_path / "digits_cnn-x2.onnx")
    (logits,) = run(onnx.load(tmp_path / "digits_cnn-x2.onnx"), {"input": np.zeros((2, 1, 32, 32), np.float32)})
    assert logits.shape == (2, 10)


def test_random_inputs_and_no_timing() -> None:
    """Without eval inputs the comparison runs on random inputs; runs=0 leaves the latency out, not zero."""
    result = sweep(DIGITS, [2], runs=0, by="macs")
    row = result.rows[0]
    assert result.inputs == "random" and not result.labelled
    assert row.latency_ratio is None and row.original_ms is None
    assert row.outputs and row.accuracy is None and row.top1_agreement is not None


def test_given_model_not_changed() -> None:
    """A ModelProto given to the sweep is not modified."""
    model = onnx.load(DIGITS)
    before = model.SerializeToString()
    sweep(model, [2], runs=0, by="macs")
    assert model.SerializeToString() == before


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "eval.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 1, 32, 32), np.float32)}, "eval inputs file lacks model input 'input'"),
        ({"input": np.zeros((2, 1, 8, 8), np.float32)}, r"eval input 'input' has shape \(2, 1, 8, 8\); the model expects"),
        ({"input": np.zeros((2, 1, 32, 32), np.float32), "labels": np.zeros(3, np.int64)}, "labels"),
    ],
    ids=["missing-input", "wrong-shape", "labels-count"],
)
def test_eval_inputs_that_do_not_fit(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    """Eval inputs that do not fit the model are refused before any conversion, with a one-line reason."""
    with pytest.raises(LowRankError, match=message) as info:
        sweep(DIGITS, [2], eval_inputs=_npz(tmp_path, **arrays), runs=0, save_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.npz"]


@pytest.mark.parametrize(
    ("text", "ok"),
    [("1.25,1.5,2", [1.25, 1.5, 2.0]), ("3,2,2", [2.0, 3.0]), ("2", [2.0])],
)
def test_parse_speedups(text: str, ok: list[float]) -> None:
    """Targets are sorted, without repeats."""
    assert parse_speedups(text) == ok


@pytest.mark.parametrize("text", ["", "2,abc", "0.5", "1,nan", "inf", "2,,3"])
def test_parse_speedups_refuses(text: str) -> None:
    """Anything but finite numbers >= 1 is refused."""
    with pytest.raises(LowRankError, match="--speedups"):
        parse_speedups(text)


def test_bad_options_refused_before_work() -> None:
    """A bad option is one error, not one row per target."""
    with pytest.raises(LowRankError, match="regular expression"):
        sweep(DIGITS, [2, 3], include="conv(", runs=0)
    with pytest.raises(LowRankError, match="--speedups"):
        sweep(DIGITS, [0.5], runs=0, by="macs")
    with pytest.raises(LowRankError, match="--runs"):
        sweep(DIGITS, [2], runs=-1)


@pytest.mark.usefixtures("fake_timing")
def test_default_plan_is_decompose_default() -> None:
    """Without --by the sweep plans each target as decompose plans --speedup S: by latency where the model can be
    timed, at onnxruntime's default threads; the row of the default target is decompose's model (the timings are
    faked, so the plan is the same in both)."""
    model = wide_chain()
    result = sweep(model, [2], runs=0, timing_cache=False)
    _, report = decompose(model, speedup=2, timing_cache=False)
    row = result.rows[0]
    assert row.reached and row.report is not None and row.planned_by == report.policy["by"] == "latency"
    assert result.threads == report.policy["threads"] == default_threads()
    assert result.by is None and result.default_target == 2
    assert ranks_of(row.report) == ranks_of(report)


def test_sweep_takes_decompose_config() -> None:
    """A DecomposeConfig given to the sweep is what each target is planned with; per-layer policies are decompose's."""
    config = DecomposeConfig(policy=PolicyConfig(speedup=2, kinds=["spatial"]), speed=SpeedConfig(by="macs", threads=1))
    result = sweep(DIGITS, [2], config, runs=0)
    assert result.rows[0].report is not None and {layer.kind for layer in result.rows[0].report.decomposed} == {"spatial"}
    assert result.threads == 1 and result.rows[0].planned_by == "macs"
    with pytest.raises(LowRankError, match="sweep converts at --speedup targets"):
        sweep(DIGITS, [2], rank=4, runs=0)
