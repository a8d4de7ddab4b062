"""What a conversion does to the answers: the measure each output gets, held-back calibration samples, the warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import run

from onnx_lowrank import decompose
from onnx_lowrank.agreement import RELATIVE_L2, STRINGS, TOP1, agreement, compare, greedy_ctc, measure_of
from onnx_lowrank.answers import warn_of_damage
from onnx_lowrank.calibration import hold_back, load_calibration
from onnx_lowrank.config import DecomposeConfig
from onnx_lowrank.report import Report

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIBRATION = ROOT / "models" / "digits_calibration.npz"


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_each_output_gets_the_measure_that_fits_it() -> None:
    rng = np.random.default_rng(0)
    assert measure_of("logits", rng.standard_normal((8, 10)).astype(np.float32)) == TOP1
    assert measure_of("scores", log_softmax(rng.standard_normal((8, 16, 5))).astype(np.float32)) == STRINGS
    assert measure_of("boxes", rng.standard_normal((8, 16, 5)).astype(np.float32)) == RELATIVE_L2  # not scores, no linear layer
    assert measure_of("mask", rng.random((8, 1, 16, 16)).astype(np.float32)) == RELATIVE_L2
    assert measure_of("ids", np.arange(8)) == "equal values"


def test_greedy_ctc_merges_repeats_and_drops_blanks() -> None:
    classes = np.array([[1, 1, 0, 1, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0, 0, 3]])
    scores = np.eye(4)[classes]
    assert greedy_ctc(scores) == [(1, 1, 2), (3,)]
    other = scores.copy()
    other[0, 2] = np.eye(4)[1]  # the blank between the two 1s goes: they merge into one
    assert agreement(STRINGS, other, scores) == 0.5


def test_labels_give_accuracy_and_drop() -> None:
    original = np.eye(3)[[0, 1, 2, 1]]
    candidate = np.eye(3)[[0, 1, 1, 1]]
    (entry,) = compare(["p"], [original], [candidate], labels=np.array([0, 1, 2, 0]))
    assert entry.value == 0.75 and entry.accuracy_original == 0.75 and entry.accuracy_candidate == 0.5
    assert entry.drop == pytest.approx(25.0)


def test_calibrated_conversion_measures_the_answers_on_held_back_samples() -> None:
    """The last samples of the calibration set are held back from the conversion; the report's agreement is what
    both models answer on exactly those."""
    new, report = decompose(DIGITS, speedup=2, by="macs", calibration=DIGITS_CALIBRATION, check_runs=0)
    original = onnx.load(DIGITS)
    data = load_calibration(DIGITS_CALIBRATION, original)
    used, held = hold_back(data, original)
    assert len(held["input"]) == report.answers["samples"] == 270 // 8 and len(used["input"]) == 270 - 270 // 8
    assert report.calibration["samples"] == len(used["input"])  # the statistics never saw the held-back samples
    (output,) = report.answers["outputs"]
    assert output["measure"] == TOP1 and output["samples"] == len(held["input"])
    (want,) = run(original, {"input": held["input"]})
    (got,) = run(new, {"input": held["input"]})
    assert output["value"] == pytest.approx(float(np.mean(got.argmax(1) == want.argmax(1))))


def test_answers_unmeasured_say_why() -> None:
    _, free = decompose(DIGITS, speedup=2, by="macs", check_runs=0)
    assert "--calibration" in free.answers["not_measured"]
    few = {"input": np.load(DIGITS_CALIBRATION)["input"][:20]}
    _, small = decompose(DIGITS, speedup=2, by="macs", check_runs=0, calibration=few)
    assert "fewer than 32" in small.answers["not_measured"] and small.calibration["samples"] == 20


@pytest.mark.parametrize(
    ("answers", "mac_ratio", "warned"),
    [
        ({"outputs": [{"output": "y", "measure": TOP1, "value": 0.85, "samples": 40}]}, 2.0, "the answers changed"),
        ({"outputs": [{"output": "y", "measure": TOP1, "value": 0.97, "samples": 40}]}, 2.0, None),
        ({"outputs": [{"output": "y", "measure": RELATIVE_L2, "value": 0.4, "samples": 40}]}, 2.0, "the answers changed"),
        ({"not_measured": "no data"}, 7.2, "cuts MACs 7.20x"),
        ({"not_measured": "no data"}, 2.3, None),
    ],
)
def test_extreme_damage_is_warned_of(answers: dict[str, object], mac_ratio: float, warned: str | None) -> None:
    report = Report(macs_before=int(mac_ratio * 1000), macs_after=1000, params_before=1, params_after=1, answers=answers)
    warn_of_damage(report, DecomposeConfig.from_keywords(speedup=2))
    if warned is None:
        assert not report.warnings
    else:
        assert len(report.warnings) == 1 and warned in report.warnings[0]
