"""The accuracy budget: ``decompose --max-drop P --eval-inputs FILE`` keeps the fastest result within P points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from cli_contract import run_cli

import onnx_lowrank.accuracy_budget as budget
from onnx_lowrank import LowRankError
from onnx_lowrank.agreement import STRINGS, OutputAgreement, compare
from onnx_lowrank.report import Report
from onnx_lowrank.sweep import SweepRow, TargetRunner

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"


class ScriptedRunner:
    """Stands in for :class:`TargetRunner`: each target's drop and measured speedup from a table (no conversion)."""

    drops: ClassVar[dict[float, float]] = {}
    speed: ClassVar[dict[float, float]] = {}
    visited: ClassVar[list[float]] = []

    def __init__(self, model: Any, config: Any, eval_inputs: Any, runs: int, workers: Any = None) -> None:
        self.evaluation = type("E", (), {"description": "scripted", "samples": 100, "labels": None})()
        self.threads = 1

    def row(self, target: float) -> tuple[SweepRow, onnx.ModelProto | None]:
        type(self).visited.append(target)
        drop = np.interp(target, sorted(self.drops), [self.drops[k] for k in sorted(self.drops)])
        row = SweepRow(target=target, reached=True, mac_ratio=target, original_ms=10.0)
        speed = self.speed.get(target, 0.8 * target)
        row.candidate_ms = 10.0 / speed
        row.report = Report(macs_before=100, macs_after=int(100 / target), params_before=1, params_after=1)
        row.answers = [OutputAgreement("y", "top-1 agreement", 1.0 - drop / 100.0, 100)]
        model = onnx.ModelProto()
        model.doc_string = f"{target:g}"
        return row, model


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedRunner]:
    ScriptedRunner.visited = []
    ScriptedRunner.speed = {}
    monkeypatch.setattr(budget, "TargetRunner", ScriptedRunner)
    return ScriptedRunner


def test_search_climbs_then_halves_the_gap(scripted: type[ScriptedRunner]) -> None:
    """The ladder is climbed until the drop passes the budget, then the gap is halved in log scale; the
    fastest within the budget is returned and every point searched is reported."""
    scripted.drops = {1.25: 0.2, 2.0: 0.8, 2.5: 1.4, 6.0: 10.0}
    model, report, search = budget.fastest_within_drop(onnx.ModelProto(), 1.0, "x.npz")
    assert scripted.visited[:4] == [1.25, 1.5, 2.0, 2.5]
    refined = scripted.visited[4:]
    assert refined and all(2.0 < t < 2.5 for t in refined)
    assert all(p.within == (p.drop is not None and p.drop <= 1.0) for p in search.points)
    kept = max((p for p in search.points if p.within), key=lambda p: p.speedup or 0)
    assert search.chosen == kept.target and model.doc_string == f"{kept.target:g}"
    assert report.search["chosen"] == kept.target and len(report.search["points"]) == len(scripted.visited)
    assert report.latency["measured_speedup"] == pytest.approx(kept.speedup)


def test_fastest_measured_not_highest_target(scripted: type[ScriptedRunner]) -> None:
    """Among the points within the budget the one measured fastest is kept, even if it is not the highest target."""
    scripted.drops = {1.25: 0.0, 2.0: 0.5, 3.0: 5.0}
    scripted.speed = {1.25: 1.1, 1.5: 1.9, 2.0: 1.4}
    _, _, search = budget.fastest_within_drop(onnx.ModelProto(), 1.0, "x.npz")
    assert search.chosen == 1.5


def test_no_target_within_budget(scripted: type[ScriptedRunner]) -> None:
    scripted.drops = {1.25: 3.0, 6.0: 30.0}
    with pytest.raises(LowRankError, match=r"--max-drop 1: no conversion stays within it; the mildest target, 1.25x, drops 3.00"):
        budget.fastest_within_drop(onnx.ModelProto(), 1.0, "x.npz")
    assert scripted.visited == [1.25]


@pytest.mark.parametrize("value", [-1.0, float("nan"), True])
def test_bad_budget_refused(value: Any) -> None:
    with pytest.raises(LowRankError, match="--max-drop must be a number"):
        budget.fastest_within_drop(DIGITS, value, DIGITS_TEST)


def test_string_labels_give_exact_string_accuracy() -> None:
    """Per-position class scores with class-sequence labels (padded with -1): accuracy is exact decoded strings."""
    scores = np.zeros((3, 4, 3), np.float32)
    # greedy CTC: sample 0 reads (1, 2), sample 1 reads (1,), sample 2 reads (2, 2)
    for n, path in enumerate([[1, 0, 2, 2], [1, 1, 0, 0], [2, 0, 2, 0]]):
        scores[n, np.arange(4), path] = 1.0
    scores = np.log(np.exp(scores) / np.exp(scores).sum(-1, keepdims=True))
    labels = np.array([[1, 2], [2, -1], [2, 2]])
    candidate = scores.copy()
    candidate[2] = candidate[0]  # the candidate reads (1, 2) on sample 2
    (entry,) = compare(["y"], [scores], [candidate], labels=labels)
    assert entry.measure == STRINGS
    assert entry.accuracy_original == pytest.approx(2 / 3) and entry.accuracy_candidate == pytest.approx(1 / 3)
    assert entry.drop == pytest.approx(100 / 3)


def test_digits_within_a_generous_budget_end_to_end(tmp_path: Path) -> None:
    """On the trained digits model and its labelled test set: the CLI keeps a result whose measured drop is within
    the budget, and the report holds the frontier it searched (untimed: the fastest by MACs)."""
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    flags = ["--max-drop", "2", "--eval-inputs", DIGITS_TEST, "--by", "macs", "--check-runs", "0", "--report", report]
    result = run_cli(["decompose", DIGITS, out, *flags])
    assert result.code == 0, result.stderr
    assert "accuracy budget: at most 2 points of accuracy on 450 samples" in result.stdout
    data = json.loads(report.read_text())
    points = data["search"]["points"]
    chosen = [p for p in points if p["target"] == data["search"]["chosen"]]
    assert len(chosen) == 1 and chosen[0]["within"] and chosen[0]["drop"] <= 2.0
    assert data["mac_ratio"] == pytest.approx(chosen[0]["mac_ratio"])
    reached = [p for p in points if p["reached"] and p["within"]]
    assert chosen[0]["mac_ratio"] == max(p["mac_ratio"] for p in reached)  # untimed: the fastest by MACs
    beyond = [p for p in points if p["reached"] and not p["within"]]
    assert all(p["drop"] > 2.0 for p in beyond)
    # the model written is the one measured: its MACs are the chosen point's
    assert onnx.load(out).graph.node


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-drop", "1"], "give --eval-inputs"),
        (["--eval-inputs", str(DIGITS_TEST)], "give --max-drop P too"),
        (["--max-drop", "1", "--eval-inputs", str(DIGITS_TEST), "--speedup", "2"], "drop --speedup"),
        (["--max-drop", "-1", "--eval-inputs", str(DIGITS_TEST)], "expected a number >= 0"),
    ],
)
def test_cli_refusals(tmp_path: Path, flags: list[str], message: str) -> None:
    result = run_cli(["decompose", DIGITS, tmp_path / "o.onnx", *flags])
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_runner_is_what_sweep_uses() -> None:
    """The search converts through the sweep's runner (one preparation for every target)."""
    assert budget.TargetRunner is TargetRunner
