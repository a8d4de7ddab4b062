"""The plan by latency's logic under a fake clock (``tests/fake_clock.py``): how its rounds converge on the target
from both sides, what it keeps, when it refuses, and how the timing cache is kept honest. Nothing here reads a real
clock, so no outcome depends on how busy the machine is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from fake_clock import FakeClock, install
from test_measure import wide_chain

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.cli import main
from onnx_lowrank.threads import available_cpus


def plan(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, target: float, layers: int = 6, **options: Any) -> dict[str, Any]:
    install(monkeypatch, clock)
    _, report = decompose(
        wide_chain(layers=layers), speedup=target, by="latency", timing_cache=options.pop("timing_cache", False), **options
    )
    assert report.policy["by"] == "latency"
    return report.latency


@pytest.mark.parametrize("delivered", [1.0, 0.7, 1.3], ids=["as-promised", "short", "beyond"])
def test_rounds_meet_the_target_and_keep_the_least_cut(monkeypatch: pytest.MonkeyPatch, delivered: float) -> None:
    """Whether the splits deliver what their timings promise, less or more, the plan meets S on its interval's lower
    end, and of the rounds that met S it keeps the one that cuts the fewest MACs."""
    latency = plan(monkeypatch, FakeClock(delivered=delivered), 2.0)
    assert latency["met"] and latency["speedup_low"] >= 2.0
    accepted = [r for r in latency["rounds"] if r["speedup_low"] >= 2.0]
    assert latency["planned_macs"] == max(r["planned_macs"] for r in accepted)
    assert 1 <= len(latency["rounds"]) <= 6


def test_overshoot_is_corrected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits that deliver 1.3x what they promised overshoot the first round; a later round asks for less and cuts
    fewer MACs, ending within the band when one exists."""
    latency = plan(monkeypatch, FakeClock(delivered=1.3), 2.0)
    first = latency["rounds"][0]
    assert first["measured_speedup"] > 2.0 * (1 + latency["tolerance"])  # the overshoot this test is about
    assert len(latency["rounds"]) > 1 and latency["planned_macs"] > first["planned_macs"]
    assert latency["measured_speedup"] < first["measured_speedup"]


def test_shortfall_is_corrected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits that deliver 0.7x what they promised fall short at first; the next rounds ask for more until S is met."""
    latency = plan(monkeypatch, FakeClock(delivered=0.7), 2.0)
    assert latency["rounds"][0]["speedup_low"] < 2.0 and latency["met"]


def test_a_target_just_beyond_the_splits_is_measured_and_kept_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target a little above what the fastest allocation gives is measured there, not refused unseen: the fastest
    plan is kept, not met, and the summary says so."""
    install(monkeypatch, FakeClock())
    with pytest.raises(LowRankError) as info:  # the fastest plan's ratio, as the refusal of a far target says
        decompose(wide_chain(layers=2), speedup=50, by="latency", timing_cache=False)
    target = 1.1 * float(str(info.value).split("measured ")[1].split("x")[0])
    latency = plan(monkeypatch, FakeClock(), target, layers=2)
    assert not latency["met"] and latency["measured_speedup"] >= 0.8 * target
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(wide_chain(layers=2), src)
    install(monkeypatch, FakeClock())
    assert main(["decompose", str(src), str(dst), "--speedup", f"{target:.4f}", "--no-timing-cache"]) == 0
    assert dst.is_file() and "does not meet the target" in capsys.readouterr().out


def test_far_target_refused_with_what_was_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeClock())
    with pytest.raises(LowRankError, match=r"allow at most [\d.]+x by their own timings, and the fastest plan measured [\d.]+x") as info:
        decompose(wide_chain(layers=2), speedup=50, by="latency", timing_cache=False)
    assert "\n" not in str(info.value)


def test_contradicted_timings_are_taken_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A model that gives a tenth of what its layers' timings promised: the layers it rests on are timed again
    without the store, and the contradicted entries leave the store."""
    latency = plan(monkeypatch, FakeClock(delivered=0.1), 1.2, timing_cache=tmp_path)
    assert latency["layers_retimed"] > 0 and latency["timing_cache"]["discarded"] > 0


def test_noisy_measurements_widen_the_band_and_are_judged_on_the_lower_end(monkeypatch: pytest.MonkeyPatch) -> None:
    latency = plan(monkeypatch, FakeClock(noise=0.25, seed=1), 2.0)
    assert latency["tolerance"] > 0.10  # the band follows the measurement's own spread
    for r in latency["rounds"]:
        assert r["speedup_low"] is not None and r["speedup_low"] <= r["measured_speedup"] <= r["speedup_high"]
    if latency["met"]:
        assert latency["speedup_low"] >= 2.0


def test_a_busy_run_keeps_none_of_its_timings_and_a_quiet_run_retimes_busy_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run whose load probe is far above the store's quietest writes none of its timings; entries timed on a
    busier machine than today's are timed again, not trusted."""
    quiet = plan(monkeypatch, FakeClock(load=1.0), 2.0, timing_cache=tmp_path)
    assert quiet["timing_cache"]["not_kept"] is None and quiet["timing_cache"]["misses"] > 0
    (store,) = tmp_path.glob("timings-*.json")
    saved = json.loads(store.read_text())

    busy = plan(monkeypatch, FakeClock(load=2.0), 2.0, timing_cache=tmp_path)
    cache = busy["timing_cache"]
    assert cache["load"] == pytest.approx(2.0) and "busy" in cache["not_kept"] and cache["hits"] > 0
    assert json.loads(store.read_text())["entries"].keys() == saved["entries"].keys()  # nothing of the busy run written

    # the entries as if timed on a machine twice as busy as the quietest: a quiet run times them again
    for entry in saved["entries"].values():
        entry[3] = 2.0 * saved["quiet_probe"]
    store.write_text(json.dumps(saved))
    again = plan(monkeypatch, FakeClock(load=1.0), 2.0, timing_cache=tmp_path)
    assert again["timing_cache"]["stale"] > 0 and again["timing_cache"]["hits"] == 0


def test_threads_beyond_the_cpus_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    too_many = available_cpus() + 1
    with pytest.raises(LowRankError, match=rf"--threads {too_many}: this machine gives the process"):
        decompose(wide_chain(layers=1), speedup=2, threads=too_many)
    src = tmp_path / "in.onnx"
    onnx.save(wide_chain(layers=1), src)
    assert main(["decompose", str(src), str(tmp_path / "out.onnx"), "--threads", str(too_many)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--threads" in err and not (tmp_path / "out.onnx").exists()
