"""An accuracy budget instead of a speed target: the fastest measured conversion whose drop stays within P points.

``decompose --max-drop P --eval-inputs FILE.npz`` searches ``--speedup`` targets as ``sweep`` converts them
(one preparation shared, :class:`onnx_lowrank.sweep.TargetRunner`) and keeps the result that runs fastest in
onnxruntime among those whose *drop* on the evaluation inputs is at most ``P``:

* with ``labels`` in the file, the drop is the accuracy lost, in points (top-1 for class scores; exact decoded
  strings for per-position class scores, whose labels are class sequences padded with -1);
* without, it is ``100 × (1 − agreement)`` with the original's own answers (top-1, or decoded strings), or for
  outputs that are not class scores the relative L2 error in percent (:mod:`onnx_lowrank.agreement`).

The search climbs a ladder of targets from the mildest until one drops more than ``P`` (or cannot be reached),
then halves the gap between the last target within the budget and the first beyond it (in log scale) while
the gap is wider than :data:`RESOLUTION`. Every point searched is kept — target, MACs cut, measured speedup
with its interval, drop — and the frontier is reported beside the chosen model. The drop assumed to grow
with the target is what makes the search stop; a point within the budget above a point beyond it is still
a candidate when the search meets it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy.typing as npt
import onnx

from .agreement import summary_measure
from .config import DecomposeConfig
from .errors import LowRankError
from .model_io import ModelLike
from .report import Report
from .sweep import SweepRow, TargetRunner, check_runs, sweep_config

__all__ = ["LADDER", "RESOLUTION", "BudgetPoint", "BudgetSearch", "fastest_within_drop"]

LADDER = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)  # the targets climbed, mildest first
RESOLUTION = 1.12  # the gap (ratio of targets) between within and beyond the budget below which the search stops
MAX_REFINEMENTS = 3

Array = npt.NDArray[Any]
Progress = Callable[[int, int, str], None]


@dataclass
class BudgetPoint:
    """One target searched."""

    target: float
    reached: bool
    reason: str | None = None
    mac_ratio: float | None = None
    speedup: float | None = None  # measured here: original / converted median milliseconds
    speedup_low: float | None = None
    speedup_high: float | None = None
    measure: str | None = None  # what the drop is measured by
    drop: float | None = None  # points
    within: bool = False


@dataclass
class BudgetSearch:
    """What ``--max-drop`` searched, and which point it kept."""

    max_drop: float
    inputs: str
    samples: int
    labelled: bool
    threads: int
    runs: int
    points: list[BudgetPoint] = field(default_factory=list)
    chosen: float | None = None  # the target of the model returned

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "points": [asdict(p) for p in sorted(self.points, key=lambda p: p.target)]}


def _point(row: SweepRow, max_drop: float) -> BudgetPoint:
    point = BudgetPoint(row.target, row.reached, row.reason, row.mac_ratio, row.latency_ratio, row.speedup_low, row.speedup_high)
    speaker = summary_measure(row.answers)
    if speaker is not None:
        point.measure = "accuracy" if speaker.accuracy_candidate is not None else speaker.measure
        point.drop = speaker.drop
        point.within = point.drop <= max_drop + 1e-9
    return point


def _speed(point: BudgetPoint) -> float:
    """What makes one conversion faster than another: its measured speedup, its MAC ratio where not timed."""
    return point.speedup if point.speedup is not None else (point.mac_ratio or 1.0)


def fastest_within_drop(
    model: ModelLike,
    max_drop: float,
    eval_inputs: str | os.PathLike[str] | Mapping[str, Array],
    config: DecomposeConfig | None = None,
    /,
    *,
    runs: int = 20,
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[onnx.ModelProto, Report, BudgetSearch]:
    """The fastest conversion of ``model`` whose drop on ``eval_inputs`` is at most ``max_drop`` points (module docstring).

    ``config``: the options every target is converted with, as for :func:`onnx_lowrank.decompose` (its
    ``--speedup`` is what the search sets). ``runs``: interleaved timed runs per point (0: the fastest by MACs).
    Raises :class:`LowRankError` when no target keeps the drop within the budget (the message gives the
    mildest point's drop).
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise LowRankError(f"--max-drop must be a number of points >= 0, got {max_drop!r}")
    check_runs(runs)
    config = sweep_config(config or DecomposeConfig(), LADDER[0])
    runner = TargetRunner(model, config, eval_inputs, runs, workers=workers)
    evaluation = runner.evaluation
    search = BudgetSearch(float(max_drop), evaluation.description, evaluation.samples, evaluation.labels is not None, runner.threads, runs)
    best: tuple[BudgetPoint, onnx.ModelProto, SweepRow] | None = None
    planned = len(LADDER)

    def visit(target: float) -> BudgetPoint:
        nonlocal best
        row, candidate = runner.row(target)
        point = _point(row, max_drop)
        search.points.append(point)
        if candidate is not None and row.report is not None and point.within and (best is None or _speed(point) > _speed(best[0])):
            best = (point, candidate, row)
        if progress is not None:
            progress(len(search.points), max(planned, len(search.points)), f"{target:g}x")
        return point

    within: float | None = None
    beyond: float | None = None
    for target in LADDER:
        point = visit(target)
        if point.within:
            within = target
            continue
        beyond = target
        break
    planned = len(search.points) + (MAX_REFINEMENTS if within is not None and beyond is not None else 0)
    for _ in range(MAX_REFINEMENTS):
        if within is None or beyond is None or beyond / within <= RESOLUTION:
            break
        middle = round(math.sqrt(within * beyond), 3)
        if visit(middle).within:
            within = middle
        else:
            beyond = middle
    if best is None:
        mildest = min(search.points, key=lambda p: p.target)
        why = f"drops {mildest.drop:.2f} points" if mildest.drop is not None else (mildest.reason or "was not measured")
        raise LowRankError(f"--max-drop {max_drop:g}: no conversion stays within it; the mildest target, {mildest.target:g}x, {why}")
    point, chosen, row = best
    assert row.report is not None
    report = row.report
    search.chosen = point.target
    report.search = search.to_dict()
    if report.latency.get("by") != "latency" and row.original_ms and row.candidate_ms:
        # the search timed the kept model against the original: that measurement is the result's
        report.latency.pop("not_timed", None)
        report.latency.update(
            measured_speedup=row.original_ms / row.candidate_ms,
            original_ms=row.original_ms,
            candidate_ms=row.candidate_ms,
            speedup_low=row.speedup_low,
            speedup_high=row.speedup_high,
            runs=runs,
            threads=runner.threads,
        )
    return chosen, report, search
