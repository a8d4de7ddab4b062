"""The latency-aware policy (``--speedup S``, by default where the model can be timed; ``--by latency``):
layers timed in onnxruntime, the whole model re-timed.

No assertion here is on a duration — timings vary from run to run. What is checked is what the policy does
with the timings it took: what it records in the report, that the model it writes is the one it measured,
that a layer timed slower than the original is never decomposed, that layers of one geometry are timed
once, and what it must refuse. Where the outcome depends on what was measured, the clock is a fake one
(``tests/fake_clock.py``); the few tests that time for real assert only what holds on a busy machine.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import make_model, run
from fake_clock import FakeClock, install
from onnx import TensorProto, helper

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.cli import main
from onnx_lowrank.layer_timing import LayerTimer
from onnx_lowrank.passes._rewrite import Site
from onnx_lowrank.planning.latency import interpolate, timed_ranks
from onnx_lowrank.stats import speedup_estimate
from onnx_lowrank.threads import default_threads
from onnx_lowrank.timing import MIN_PAIRS, kernel_block, measure_speedup

TARGET = 1.05  # low enough that rank-8 pairs of 3x3 48->48 convs (4.5x fewer MACs each) reach it with room to spare


def wide_chain(layers: int = 3, channels: int = 48, size: int = 24) -> onnx.ModelProto:
    """``x -> [Conv 3x3 -> Relu]*`` with equal layers (one geometry), seeded weights."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], {}, "x"
    for i in range(layers):
        inits[f"W{i}"] = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        inits[f"B{i}"] = rng.standard_normal(channels).astype(np.float32)
        nodes.append(helper.make_node("Conv", [current, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    shape = [1, channels, size, size]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        inits,
    )


def test_report_records_what_was_measured() -> None:
    """The report holds the target, the rounds and the chosen round's timing, and they agree with each other."""
    model = wide_chain()
    out, report = decompose(model, speedup=TARGET, by="latency")
    latency = report.latency
    assert {"predicted_speedup", "measured_speedup", "original_ms", "candidate_ms", "target", "met", "threads", "rounds", "runs"} <= set(
        latency
    )
    assert latency["by"] == "latency" and report.policy["by"] == "latency"
    assert latency["target"] == TARGET and latency["threads"] == report.policy["threads"] == default_threads()
    assert latency["measured_speedup"] == pytest.approx(latency["original_ms"] / latency["candidate_ms"])
    assert latency["met"] == any((r["speedup_low"] or r["measured_speedup"]) >= TARGET for r in latency["rounds"])
    assert 1 <= len(latency["rounds"]) <= 6
    assert any(r["measured_speedup"] == latency["measured_speedup"] for r in latency["rounds"])
    assert report.policy["by"] == "latency"
    # the written model is a decomposed one that still runs, with ranks on the timing grid (multiples of 8)
    assert report.decomposed and all(layer.rank % 8 == 0 for layer in report.decomposed)
    x = np.random.default_rng(1).standard_normal((1, 48, 24, 24)).astype(np.float32)
    (got,) = run(out, {"x": x})
    (want,) = run(model, {"x": x})
    assert got.shape == want.shape and np.isfinite(got).all()


@pytest.mark.usefixtures("fake_timing")
def test_one_geometry_is_timed_once() -> None:
    """Three layers of one geometry cost the layer timings of one: the timings are cached per shape and rank."""
    # the timing cache across runs is off: it would serve the second conversion from the first one's timings
    _, one = decompose(wide_chain(layers=1), speedup=TARGET, by="latency", timing_cache=False)
    _, three = decompose(wide_chain(layers=3), speedup=TARGET, by="latency", timing_cache=False)
    assert three.latency["layers_timed"] == one.latency["layers_timed"] > 1


def test_slower_layer_never_decomposed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose every pair is timed slower than the layer itself is left as is, with the reason."""
    real_pair = LayerTimer.pair

    def pair(self: LayerTimer, site: Site, kind: Any, rank: int) -> float | None:
        if site.node.name == "conv1":  # pretend this layer's pairs are all slower than the layer
            original = self.original(site)
            return None if original is None else original * 1.5
        return real_pair(self, site, kind, rank)

    monkeypatch.setattr(LayerTimer, "pair", pair)
    _, report = decompose(wide_chain(), speedup=TARGET, by="latency")
    by_node = {layer.node: layer for layer in report.layers}
    assert not by_node["conv1"].decomposed
    assert "by latency" in (by_node["conv1"].reason or "")
    assert by_node["conv0"].decomposed or by_node["conv2"].decomposed


@pytest.mark.usefixtures("fake_timing")
@pytest.mark.parametrize("layers", [1, 2])
def test_unreachable_target_refused(layers: int) -> None:
    """A target MACs allow but no timed allocation can give is refused in one line naming the best timed speedup.

    50x: rank 1 everywhere gives 72x fewer MACs, but the timed ranks are multiples of 8 (4.5x fewer MACs each).
    """
    with pytest.raises(LowRankError, match=r"--speedup 50 cannot be reached by latency on this machine .*allow at most [\d.]+x"):
        decompose(wide_chain(layers=layers), speedup=50, by="latency")


def test_layers_that_never_pay_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no layer gets faster, nothing can reach the target: refused, not a model that is no faster."""
    monkeypatch.setattr(LayerTimer, "pair", lambda self, site, kind, rank: 1e9)
    with pytest.raises(LowRankError, match="cannot be reached"):
        decompose(wide_chain(), speedup=TARGET, by="latency")


def cli(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_predicted_and_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`decompose --speedup S --by latency` prints the predicted and measured speedup; --report holds them."""
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(wide_chain(), src)
    code, out, err = cli(["decompose", src, dst, "--speedup", TARGET, "--by", "latency", "--report", report], capsys)
    assert code == 0, err
    assert re.search(
        rf"[\d.]+x \(95 % CI [\d.]+-[\d.]+, \d+ paired runs\) faster in onnxruntime \({default_threads()} thread\(s\); predicted", out
    )
    assert dst.is_file()

    latency = json.loads(report.read_text())["latency"]
    assert latency["target"] == TARGET and latency["measured_speedup"] > 0


def test_by_latency_needs_speedup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--by latency without --speedup is a one-line error (exit 2), and nothing is written."""
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(wide_chain(layers=1), src)
    code, _, err = cli(["decompose", src, dst, "--rank", "8", "--by", "latency"], capsys)
    assert code == 2 and "--by latency" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


@pytest.mark.parametrize("command", ["decompose", "sweep"])
def test_measure_is_gone_and_names_by_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """The --measure alias is removed from both commands: one line that names --by latency, nothing written."""
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(wide_chain(layers=1), src)
    args = [command, src, *([dst] if command == "decompose" else []), "--speedup" if command == "decompose" else "--speedups", "2"]
    code, _, err = cli([*args, "--measure"], capsys)
    assert code == 2 and "--measure was removed: use --by latency" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()
    with pytest.raises(LowRankError, match="by='latency'"):
        decompose(wide_chain(layers=1), speedup=2, measure=True)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- what the default plans by


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Deterministic timings: layers and whole models in proportion to their weights and pixels (the splits deliver
    what they promise). What is tested is what the planner does with them, not the machine."""
    return install(monkeypatch, FakeClock())


def test_default_plans_by_latency_where_it_can_time(fake_timing: FakeClock) -> None:
    """No `by`: a model of known sizes is planned by latency at onnxruntime's default thread count, and lands in
    the band above the target."""
    _, report = decompose(wide_chain(), speedup=2, timing_cache=False)  # the faked timings, not stored ones
    latency = report.latency
    assert report.policy["by"] == "latency" and latency["by"] == "latency"
    assert latency["threads"] == default_threads() and latency["runs"] > 0 and report.decomposed
    assert latency["met"] and 2 <= latency["speedup_low"] <= latency["measured_speedup"] <= 2 * (1 + latency["tolerance"])


def test_default_plans_by_macs_where_it_cannot_time_and_says_why() -> None:
    """A symbolic H/W planned by request at one output pixel cannot be timed: the plan is by MACs, the report says
    why, and no ratio is claimed; asking for latency there is refused in one line."""
    model = wide_chain()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "w"
    _, report = decompose(model, speedup=2, allow_unknown_shapes=True)
    assert report.policy["by"] == "macs" and "--input-shape" in report.latency["why_macs"]
    assert "measured_speedup" not in report.latency and report.latency["not_timed"]
    with pytest.raises(LowRankError, match=r"--by latency times the model on this machine, and cannot: .*--input-shape") as info:
        decompose(model, speedup=2, allow_unknown_shapes=True, by="latency")
    assert "\n" not in str(info.value)


def test_failed_layer_timing_falls_back_to_macs(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime failing on a layer model (a dtype its CPU kernels lack, say): the default plans by MACs and says
    why; --by latency is refused instead."""

    def fail(*args: Any) -> float:
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv")

    monkeypatch.setattr(LayerTimer, "_time", fail)
    _, report = decompose(wide_chain(), speedup=1.5, timing_cache=False)
    assert report.policy["by"] == "macs" and "NOT_IMPLEMENTED" in report.latency["why_macs"]
    assert report.mac_ratio >= 1.5
    with pytest.raises(LowRankError, match="a layer could not be timed"):
        decompose(wide_chain(), speedup=1.5, by="latency", timing_cache=False)


def test_by_macs_is_the_mac_plan_timed_once() -> None:
    """--by macs: the MAC budget is met, and the result is timed against the original (no value asserted)."""
    _, report = decompose(wide_chain(), speedup=2, by="macs", threads=1)
    assert report.policy["by"] == "macs" and report.mac_ratio >= 2
    latency = report.latency
    assert latency["by"] == "macs" and latency["threads"] == 1 and 3 <= latency["runs"] <= 10
    assert latency["measured_speedup"] == pytest.approx(latency["original_ms"] / latency["candidate_ms"])
    _, quiet = decompose(wide_chain(), speedup=2, by="macs", check_runs=0)
    assert "measured_speedup" not in quiet.latency and "0 check runs" in quiet.latency["not_timed"]


def test_per_layer_policies_are_timed_too() -> None:
    _, report = decompose(wide_chain(), rank=8, check_runs=3)
    assert report.policy["by"] is None and report.latency["by"] is None and report.latency["runs"] == 3
    assert report.latency["measured_speedup"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speedup": 2, "by": "macs", "measure": True}, "measure was removed"),
        ({"speedup": 2, "by": "fast"}, "--by must be one of latency, macs"),
        ({"rank": 4, "by": "latency"}, "plans a --speedup budget alone"),
        ({"speedup": 2, "params_ratio": 0.5, "by": "latency"}, "plans a --speedup budget alone"),
        ({"speedup": 2, "threads": 0}, "--threads"),
        ({"speedup": 2, "check_runs": -1}, "check runs"),
    ],
    ids=str,
)
def test_bad_by_and_threads(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LowRankError, match=message):
        decompose(wide_chain(layers=1), **kwargs)


def test_cli_prints_both_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--by macs prints the MAC ratio and the measured one with its thread count and runs; the report holds both."""
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(wide_chain(), src)
    code, out, err = cli(["decompose", src, dst, "--by", "macs", "--threads", "1", "--report", report, "--quiet"], capsys)
    assert code == 0, err
    assert "planned by MACs (--by macs)" in out and "fewer" in out
    assert re.search(
        r"measured in onnxruntime \(1 thread\(s\)\): [\d.]+ ms -> [\d.]+ ms, [\d.]+x \(95 % CI [\d.]+-[\d.]+, \d+ paired runs\) faster", out
    ), out
    data = json.loads(report.read_text())
    assert data["mac_ratio"] >= 2 and data["latency"]["measured_speedup"] > 0 and data["policy"]["by"] == "macs"
    code, out, err = cli(["decompose", src, dst, "--by", "macs", "--measure"], capsys)
    assert code == 2 and "--by latency" in err and len(err.strip().splitlines()) == 1


def test_calibration_plans_by_latency_with_predicted_damage(fake_timing: None) -> None:
    """With calibration data the default still plans by latency, each option's error the damage predicted from the
    data (output error times gain); --by macs plans the same errors by MACs."""
    data = {"x": np.random.default_rng(0).standard_normal((4, 48, 24, 24)).astype(np.float32)}
    _, report = decompose(wide_chain(), speedup=2, calibration=data, refit=False, timing_cache=False)
    assert report.policy["by"] == "latency" and report.policy["allocation"].startswith("damage to the outputs")
    assert report.decomposed and all(layer.output_error is not None for layer in report.decomposed)
    assert all(layer.gain is not None for layer in report.decomposed)
    _, by_macs = decompose(wide_chain(), speedup=2, calibration=data, refit=False, by="macs")
    assert by_macs.policy["by"] == "macs" and by_macs.policy["allocation"].startswith("damage to the outputs")
    assert by_macs.mac_ratio >= 2


# --------------------------------------------------------------------------- the pieces, without onnxruntime


def test_interpolation_between_timed_ranks() -> None:
    timed = {16: 1.0, 48: 3.0, 96: 4.0}
    assert interpolate(timed, 16) == 1.0 and interpolate(timed, 32) == pytest.approx(2.0)
    assert interpolate(timed, 72) == pytest.approx(3.5) and interpolate(timed, 8) == 1.0 and interpolate(timed, 200) == 4.0
    grid = list(range(16, 1537, 16))
    picked = timed_ranks(grid, 6)
    assert len(picked) == 6 and picked[0] == 16 and picked[-1] == 1536 and set(picked) <= set(grid)
    assert timed_ranks([8, 16], 6) == [8, 16]


class _Sleeper:
    """A stand-in session whose runs take the given milliseconds in turn (counted, not slept: the clock is faked)."""

    def __init__(self, ms: Sequence[float], clock: list[float]) -> None:
        self.ms, self.clock, self.calls = list(ms), clock, 0

    def run(self, names: Any, feeds: Any) -> None:
        self.clock[0] += self.ms[self.calls % len(self.ms)] / 1000.0
        self.calls += 1


@pytest.mark.parametrize(
    ("first_ms", "second_ms", "pairs"),
    [
        ([1.0], [0.5], MIN_PAIRS),  # steady: the interval is narrow at once
        ([300.0, 900.0, 400.0, 700.0, 350.0], [150.0, 500.0, 160.0, 420.0, 170.0], MIN_PAIRS),  # slow and noisy: the budget ends it
        ([1.0, 3.0, 1.2, 2.5, 1.1, 2.8, 1.0], [0.5, 1.4, 0.6, 1.3, 0.55, 1.5, 0.5, 1.2], 40),  # fast and noisy: up to the cap
    ],
    ids=["steady", "slow", "noisy"],
)
def test_measured_speedup_stops_when_its_interval_is_narrow_or_the_budget_ends(
    monkeypatch: pytest.MonkeyPatch, first_ms: list[float], second_ms: list[float], pairs: int
) -> None:
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    first, second = _Sleeper(first_ms, clock), _Sleeper(second_ms, clock)
    estimate = measure_speedup(first, second, {}, max_runs=40, budget_ms=3000.0, width=0.05, warmup=1)
    assert estimate.runs == pairs and first.calls == second.calls == pairs + 1
    assert estimate.low is not None and estimate.high is not None and estimate.low <= estimate.ratio <= estimate.high


def test_interval_of_paired_runs() -> None:
    """The bootstrap interval holds the ratio of medians, is seeded, narrows with more pairs, and needs a few pairs."""
    rng = np.random.default_rng(3)
    original = 10 * (1 + 0.1 * rng.standard_normal(200))
    candidate = 5 * (1 + 0.1 * rng.standard_normal(200))
    small, large = speedup_estimate(original[:12], candidate[:12]), speedup_estimate(original, candidate)
    assert small.low is not None and small.high is not None and large.low is not None and large.high is not None
    assert small.low <= small.ratio <= small.high and large.relative_width < small.relative_width
    assert large.low < 2.0 < large.high  # the true ratio
    assert speedup_estimate(original, candidate) == large
    few = speedup_estimate(original[:3], candidate[:3])
    assert few.low is None and few.lower == few.ratio and few.relative_width == float("inf")


def test_padded_ranks_compute_the_same_pair() -> None:
    """pad_ranks: a rank that does not fill the kernel block here is stored with zero filters up to it; the pair
    computes what the unpadded one does, the report keeps the rank and counts the stored channels' MACs."""
    block = kernel_block()
    if block is None:
        pytest.skip("onnxruntime has no blocked conv kernels on this CPU: nothing to pad to")
    model = wide_chain(layers=1)
    plain, report = decompose(model, rank=5, check_runs=0)
    wide, padded_report = decompose(model, rank=5, check_runs=0, pad_ranks=True)
    (layer,), (padded_layer,) = report.decomposed, padded_report.decomposed
    assert layer.rank == padded_layer.rank == 5 and layer.stored_rank is None and padded_layer.stored_rank == block
    assert padded_layer.relative_error == pytest.approx(layer.relative_error)
    assert padded_layer.macs_after == layer.macs_after // 5 * block
    x = np.random.default_rng(2).standard_normal((1, 48, 24, 24)).astype(np.float32)
    np.testing.assert_allclose(run(wide, {"x": x})[0], run(plain, {"x": x})[0], rtol=1e-4, atol=1e-4)
    first = next(t for t in wide.graph.initializer if "vertical" in t.name)
    assert first.dims[0] == block


def test_corrected_budget_asks_for_the_saving_at_the_measured_rate() -> None:
    """A round that saved 60 % of what its layer timings promised: the next asks for the target's saving at that
    rate, and never for less than the last budget scaled by the shortfall."""
    from onnx_lowrank.planning.latency import corrected_budget as _corrected_budget

    before, target = 100.0, 2.0
    predicted = 100.0 / 3.0  # promised 66.7 ms saved
    measured_ratio = 100.0 / (100.0 - 0.6 * (100.0 - predicted))  # saved 40 ms
    budget = _corrected_budget(before, predicted, measured_ratio, target, predicted)
    assert budget == pytest.approx(100.0 - 50.0 / 0.6)
    # a round that saved more than promised is not loosened past the plain correction
    assert _corrected_budget(before, 80.0, 1.9, target, 50.0) == pytest.approx(50.0 * 1.9 / 2.0)
