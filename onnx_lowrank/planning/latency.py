"""The plan by latency measured on this machine (``--speedup S``, ``--by latency``; the default where the model can be timed).

Each layer's splits are timed in onnxruntime at a few ranks
(:class:`onnx_lowrank.layer_timing.LayerTimer`, the timings kept across runs in
the timing store) and interpolated between them; the allocator of
:mod:`onnx_lowrank.ranks` then runs on milliseconds instead of MACs, an option
slower than the original layer never offered, and a layer under
``MEASURE_SCREEN`` of the model's time left as it is.

Every allocation is then timed as a whole model against the original: paired,
interleaved runs until the 95 % interval of their ratio is narrow
(:func:`onnx_lowrank.timing.measure_speedup`). A round *meets* S when the
interval's lower end is at least S, and is *in the band* when besides its ratio
is at most ``S·(1 + tolerance)`` (``TOLERANCE``, or the interval's own relative
width when that is wider): every MAC cut beyond S is accuracy thrown away, so
overshoot is corrected as a shortfall is. The rounds keep a bracket — the
slowest round above the band and the fastest below it — and move the budget
between its ends (the candidate's measured time interpolated in the budget), or,
with one end known, by the share of the promised saving the splits delivered,
until a round lands in the band or ``MAX_ROUNDS`` end. Of the rounds that met S
the one that cuts the fewest MACs is kept; when none did, the fastest, with a
warning, if it reached ``FAR_MISS`` of S — else the target is refused with what
the splits allow and what was measured. A target beyond what the timed splits
allow is measured at their fastest allocation first, not refused unseen.

The timings are checked against the model: a prediction that is not positive,
or a round whose splits delivered less than a fifth or more than 1.5 times the
saving their timings promised, has the layers it rests on timed again, without
the timing store (once per plan; the store loses the contradicted entries).
When the load probe or the original's drift between rounds says the machine
was busy, the run's new timings are not written to the store.

Between the ranks a layer is timed at, its latency is interpolated linearly: a
pair's work grows linearly in the rank, and the steps of onnxruntime's blocked
kernels are small against a layer's time except at the smallest ranks, which
are timed. The whole-model check after every allocation corrects what the
interpolation misses.

An option's error is what the budget allocation by MACs would weigh
(:meth:`onnx_lowrank.planning.units.Unit.errors`: the kernel error, or with
calibration data the predicted damage to the outputs).

Preconditions: a reference input (the sizing run's) and a known size for every
layer the plan would touch (:func:`untimeable_reason` says what is missing).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import onnx

from ..config import PolicyConfig
from ..errors import LowRankError
from ..layer_timing import LayerTimer
from ..passes import Site, apply_factors, find_sites
from ..ranks import Infeasible, LayerChoices, Option, allocate
from ..run_shapes import ModelShapes
from ..runtime import first_line
from ..stats import SpeedupEstimate
from ..timing import Clock, Timing, no_reference_reason
from ..timing_cache import LOAD_SLACK
from .interface import LayerChoice, Plan, PlanInputs, Planner
from .units import Unit

__all__ = [
    "FAR_MISS",
    "MAX_ROUNDS",
    "MEASURE_POINTS",
    "MEASURE_SCREEN",
    "MEASURE_STEP",
    "LatencyPlanner",
    "TimingFailed",
    "corrected_budget",
    "interpolate",
    "timed_ranks",
    "untimeable_reason",
]

MEASURE_STEP = 8  # timed ranks are multiples of this (or of --rank-multiple when larger): onnxruntime's kernels block by 8
MEASURE_POINTS = 6  # at most this many timed ranks per layer and kind; the ranks between are interpolated
# a layer taking less than this share of the model's time is left as it is without timing its splits: it could
# save at most that share, and timing every small layer of a large network (DenseNet: 120 convs) costs seconds
MEASURE_SCREEN = 0.002
# a round's whole-model measurement: paired interleaved runs of the original and the candidate until the 95 %
# interval of their ratio is ROUND_WIDTH wide (relative), or ROUND_BUDGET_MS is spent, or ROUND_RUNS pairs are taken
ROUND_RUNS = 40
ROUND_BUDGET_MS = 5000.0
ROUND_WIDTH = 0.06
MAX_ROUNDS = 6
# a round is in the band when its interval's lower end is at least S and its ratio at most S·(1 + tolerance): the
# tolerance is TOLERANCE, or the round's own relative interval width when that is wider (up to MAX_TOLERANCE)
TOLERANCE = 0.10
MAX_TOLERANCE = 0.25
# the original timed in a round more than this far from its time before the rounds: the machine's load changed
NOISY_DRIFT = 0.25
# when no round meets the target, the fastest is kept with a warning when it reaches this share of it, else the
# target is refused: a plan measured far below what was asked is not what the user asked for (and a sign that
# the layers, timed alone, promised more than the model gave)
FAR_MISS = 0.8


class TimingFailed(LowRankError):
    """onnxruntime could not time a layer: a plan by latency cannot be made (the default then plans by MACs)."""


def untimeable_reason(shapes: ModelShapes, sites: Iterable[Site]) -> str | None:
    """Why the planner cannot time the model on this machine, or None when it can."""
    why = no_reference_reason(shapes)
    if why is not None:
        return why
    unsized = [site.key for site in sites if site.cost is not None and not site.shape_known and site.ran is not False]
    if unsized:
        shown = ", ".join(unsized[:3]) + (", …" if len(unsized) > 3 else "")
        return f"{len(unsized)} layer(s) have no known size on the reference input ({shown})"
    return None


def timed_ranks(grid: Sequence[int], points: int) -> list[int]:
    """At most ``points`` ranks of ``grid`` (sorted), spread evenly, the smallest and the largest among them."""
    if len(grid) <= points:
        return list(grid)
    return sorted({grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)})


def interpolate(timed: Mapping[int, float], rank: int) -> float:
    """Milliseconds at ``rank`` from the ranks timed: exact where timed, linear between the nearest two,
    the nearest one's time outside them."""
    if rank in timed:
        return timed[rank]
    ranks = sorted(timed)
    i = bisect.bisect_left(ranks, rank)
    if i == 0:
        return timed[ranks[0]]
    if i == len(ranks):
        return timed[ranks[-1]]
    lo, hi = ranks[i - 1], ranks[i]
    return timed[lo] + (timed[hi] - timed[lo]) * (rank - lo) / (hi - lo)


def corrected_budget(before_ms: float, predicted_ms: float, ratio: float, target: float, budget_ms: float) -> float:
    """The next round's latency budget after a round that measured ``ratio`` where ``predicted_ms`` was predicted.

    The splits saved a share ``a`` of what their timings alone promised (layers timed alone pay layout reorders
    and thread wake-ups the model shares, and at two threads a pair parallelises worse in the model than alone);
    the next allocation is asked for the saving the target needs at that rate, ``before − (before − before/S)/a``
    — never for less than the last budget times ``ratio/S`` would.
    """
    promised = before_ms - predicted_ms
    measured_ms = before_ms / ratio
    scaled = budget_ms * ratio / target
    if promised <= 0:
        return scaled
    share = min(max((before_ms - measured_ms) / promised, 0.2), 1.5)
    return min(scaled, before_ms - (before_ms - before_ms / target) / share)


def candidate_model(proto: onnx.ModelProto, shapes: ModelShapes, units: list[Unit], picks: Mapping[str, Option]) -> onnx.ModelProto:
    """A decomposed copy of ``proto`` for timing; ``proto`` itself is left as it is."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    sites = {site.key: site for site in find_sites(copy, shapes)}
    plan = []
    for unit in units:
        pick = picks.get(unit.key)
        if pick is None or pick.kind is None:
            continue
        factors = unit.decomposition(pick.kind).factors(pick.rank)
        plan += [(sites[site.key], factors) for site in unit.sites]
    return apply_factors(copy, plan)[0]


@dataclass
class _Round:
    """One allocation timed as a whole model."""

    budget_ms: float
    predicted_ms: float
    estimate: SpeedupEstimate
    error: float
    macs: int  # MACs of the units as planned
    picks: dict[str, Option]

    def record(self, before_ms: float) -> dict[str, Any]:
        return {
            "budget_ms": self.budget_ms,
            "planned_macs": self.macs,
            "predicted_speedup": before_ms / self.predicted_ms if self.predicted_ms > 0 else None,
            **self.estimate.to_dict(),
        }


class LatencyPlanner(Planner):
    """``--speedup S`` by latency measured here: layer timings, then whole-model rounds that converge on S from both
    sides (see the module docstring). ``clock``: what reads time (default: the one ``timing`` holds)."""

    def __init__(
        self, proto: onnx.ModelProto, shapes: ModelShapes, timing: Timing, policy: PolicyConfig, clock: Clock | None = None
    ) -> None:
        assert policy.speedup_alone
        self.proto, self.shapes, self.timing, self.policy = proto, shapes, timing, policy
        self.clock = clock if clock is not None else timing.clock

    def _unit_options(self, unit: Unit, timer: LayerTimer, before_ms: float) -> tuple[LayerChoices, float, bool] | None:
        """The unit's options in milliseconds (timed at a few ranks, interpolated between), its own time, and whether
        it is too small to time its splits; None when its input shape is unknown."""
        times = [timer.original(site) for site in unit.sites]
        if any(t is None for t in times):
            return None  # unknown input shape: cannot be timed, left as is
        # a layer that runs several times per inference (a Loop body) costs each run
        base = float(sum(t * site.executions for t, site in zip(times, unit.sites, strict=True) if t is not None))
        options = [Option(int(base * 1e6), 0.0, None, 0)]
        if base < MEASURE_SCREEN * before_ms:
            return LayerChoices(unit.key, options), base, True
        step = max(self.policy.multiple, MEASURE_STEP)
        for kind in unit.kinds:
            errors = unit.errors(kind)
            limit = min(errors.size - 1, unit.macs // max(unit.rank_macs[kind], 1))
            grid = list(range(step, limit + 1, step)) or ([limit] if limit >= 1 else [])
            timed = {
                r: sum((timer.pair(site, kind, r) or 0.0) * site.executions for site in unit.sites)
                for r in timed_ranks(grid, MEASURE_POINTS)
            }
            for r in grid:
                pair = interpolate(timed, r)
                if pair < base:  # never offer a layer that gets slower
                    options.append(Option(int(pair * 1e6), float(errors[r]), kind, r))
        return LayerChoices(unit.key, options), base, False

    def _time_layers(
        self, units: list[Unit], timer: LayerTimer, before_ms: float
    ) -> tuple[dict[str, LayerChoices], dict[str, float], set[str]]:
        """Every timeable unit's options, own time, and the units too small to time (by key)."""
        choices: dict[str, LayerChoices] = {}
        unit_ms: dict[str, float] = {}
        screened: set[str] = set()
        try:
            for unit in units:
                found = self._unit_options(unit, timer, before_ms)
                if found is None:
                    continue
                choices[unit.key], unit_ms[unit.key], small = found
                if small:
                    screened.add(unit.key)
        except LowRankError as exc:  # a layer model onnxruntime cannot load (a dtype its CPU kernels lack, say)
            raise TimingFailed(f"a layer could not be timed: {exc}; --by macs plans by MAC count") from None
        except Exception as exc:  # onnxruntime raises its own exception types when a layer model fails to run
            raise TimingFailed(f"a layer could not be timed in onnxruntime ({first_line(exc)}); --by macs plans by MAC count") from None
        return choices, unit_ms, screened

    def plan(self, inputs: PlanInputs) -> Plan:
        units, timing, clock = inputs.units, self.timing, self.clock
        target = float(self.policy.speedup)  # type: ignore[arg-type]
        threads = timing.threads
        store = timing.store
        if store is not None:
            store.begin(clock.load(threads))
        timer = LayerTimer(self.proto.opset_import, threads=threads, store=store, clock=clock)
        warm = clock.model_runs(timing.original, timing.feeds, 1)[0]  # the warm-up run sets how many runs fit in ~2 s
        before_ms = statistics.median(clock.model_runs(timing.original, timing.feeds, max(3, min(7, int(2000.0 / max(warm, 1e-3))))))
        choices, unit_ms, screened = self._time_layers(units, timer, before_ms)
        search = _Search(self, units, timer, choices, unit_ms, screened, before_ms, target)
        rounds = search.run()
        search.finish()
        if not rounds:
            raise LowRankError(search.refusal(None, 0))
        accepted = [r for r in rounds if r.estimate.lower >= target]
        # of the plans that met S, the one that cuts the fewest MACs (every MAC cut beyond S is accuracy thrown away);
        # else the fastest
        best = max(accepted, key=lambda r: (r.macs, -r.error)) if accepted else max(rounds, key=lambda r: r.estimate.ratio)
        if best.estimate.ratio < FAR_MISS * target:
            raise LowRankError(search.refusal(best, len(rounds)))
        chosen = search.choices_of(best)
        measured = {
            "by": "latency",
            **best.record(before_ms),
            "target": target,
            "met": bool(accepted),
            "tolerance": search.tolerance,
            "threads": threads,
            "before_ms": before_ms,
            "rounds": [r.record(before_ms) for r in rounds],
            "layers_timed": timer.timed,
            "layers_retimed": search.retimed,
            "timing_cache": store.summary() if store is not None else None,
        }
        return Plan(chosen, by="latency", measured=measured)


class _Search:
    """The rounds of one plan by latency: allocate on milliseconds, time the whole model, move the budget towards
    ``[S, S·(1 + tolerance)]`` from whichever side the measurement fell on."""

    def __init__(
        self,
        planner: LatencyPlanner,
        units: list[Unit],
        timer: LayerTimer,
        choices: dict[str, LayerChoices],
        unit_ms: dict[str, float],
        screened: set[str],
        before_ms: float,
        target: float,
    ) -> None:
        self.planner, self.units, self.timer = planner, units, timer
        self.choices, self.unit_ms, self.screened = choices, unit_ms, screened
        self.before_ms, self.target = before_ms, target
        self.tolerance = TOLERANCE
        self.retimed = 0
        self.noisy: str | None = None

    @property
    def fixed(self) -> float:
        """The rest of the model, by difference: a layer timed alone also pays its own layout reorders and the
        session's call, which in the model it does not, so this can be negative; the allocation then works on what
        each split saves (the layer alone minus the pair alone), which is what carries over to the model."""
        return self.before_ms - sum(self.unit_ms.values())

    def _allocate(self, budget_ms: float) -> tuple[dict[str, Option], float, bool]:
        """The least-error picks within ``budget_ms`` (or, when no allocation fits, every layer at its fastest
        option: a target just beyond the timed splits is measured, not refused unseen), the budget used, and
        whether it was the fastest."""
        choices = list(self.choices.values())
        try:
            return allocate(choices, budget_ms * 1e6, fixed=self.fixed * 1e6), budget_ms, False
        except Infeasible as exc:
            # costs are whole nanoseconds, and the best can be negative: it counts what the splits save
            least = (exc.best + 1) / 1e6
            return allocate(choices, least * 1e6, fixed=self.fixed * 1e6), least, True

    def _macs(self, picks: Mapping[str, Option]) -> int:
        total = 0
        for unit in self.units:
            pick = picks.get(unit.key)
            total += unit.macs if pick is None or pick.kind is None else unit.rank_macs[pick.kind] * pick.rank
        return total

    def _retime(self, picks: Mapping[str, Option]) -> bool:
        """Time again, without the store, the layers a prediction rests on (those split); True when any was."""
        split = [unit for unit in self.units if (pick := picks.get(unit.key)) is not None and pick.kind is not None]
        if not split or self.retimed:
            return False  # once per plan: the second prediction stands on fresh timings
        self.timer.forget([site for unit in split for site in unit.sites])
        for unit in split:
            found = self.planner._unit_options(unit, self.timer, self.before_ms)
            if found is not None:
                self.choices[unit.key], self.unit_ms[unit.key], _ = found
        self.retimed = len(split)
        return True

    def _measure(self, picks: dict[str, Option]) -> SpeedupEstimate:
        planner = self.planner
        # built from the original without its large weights: the candidate's session reads the original's maps
        candidate = planner.timing.candidate(partial(candidate_model, shapes=planner.shapes, units=self.units, picks=picks))
        estimate = planner.clock.speedup(planner.timing, candidate, max_runs=ROUND_RUNS, budget_ms=ROUND_BUDGET_MS, width=ROUND_WIDTH)
        # the original timed in the round against the one timed before: a machine busier or quieter since
        drift = abs(estimate.original_ms / self.before_ms - 1.0)
        if drift > NOISY_DRIFT and self.noisy is None:
            self.noisy = f"the original's time moved by {drift:.0%} between measurements"
        return estimate

    def run(self) -> list[_Round]:
        rounds: list[_Round] = []
        seen: set[tuple[tuple[str, str | None, int], ...]] = set()
        budget = self.before_ms / self.target
        too_fast: _Round | None = None  # the slowest round above the band, and the fastest below it
        too_slow: _Round | None = None
        for _ in range(MAX_ROUNDS):
            picks, budget, least = self._allocate(budget)
            predicted = self.fixed + sum(o.macs for o in picks.values()) / 1e6
            if predicted <= 0 and self._retime(picks):
                # a non-positive prediction is a contradiction: the layers it rests on are timed again first
                picks, budget, least = self._allocate(budget)
                predicted = self.fixed + sum(o.macs for o in picks.values()) / 1e6
            signature = tuple(sorted((key, o.kind, o.rank) for key, o in picks.items()))
            if signature in seen or all(o.kind is None for o in picks.values()):
                break  # the budget moved, the allocation did not (or splits nothing): nothing new to measure
            seen.add(signature)
            estimate = self._measure(picks)
            this = _Round(budget, predicted, estimate, sum(o.error for o in picks.values()), self._macs(picks), picks)
            rounds.append(this)
            # the measurement's own spread sets how close to S a round must land
            self.tolerance = max(TOLERANCE, min(MAX_TOLERANCE, estimate.relative_width))
            ratio = estimate.ratio
            if estimate.lower >= self.target and ratio <= self.target * (1.0 + self.tolerance):
                break  # in the band
            promised, delivered = self.before_ms - predicted, self.before_ms - self.before_ms / ratio
            if promised > 0 and not 0.2 <= delivered / promised <= 1.5 and self._retime(picks):
                continue  # the timings promised far more or less than the model gave: timed again, allocated again
            if estimate.lower >= self.target:
                too_fast = this if too_fast is None or this.budget_ms > too_fast.budget_ms else too_fast
            else:
                too_slow = this if too_slow is None or this.budget_ms < too_slow.budget_ms else too_slow
                if least:
                    break  # the fastest the splits allow, and still short of S
            budget = self._next_budget(this, too_fast, too_slow)
        return rounds

    def _next_budget(self, last: _Round, too_fast: _Round | None, too_slow: _Round | None) -> float:
        """Between the bracket's ends when both are known (the candidate's time interpolated in the budget),
        else the budget that asks the splits for the saving the band's middle needs at the rate they delivered."""
        aim = self.target * (1.0 + self.tolerance / 2.0)
        wanted_ms = self.before_ms / aim
        if too_fast is not None and too_slow is not None:
            lo, hi = too_fast, too_slow  # lo: a smaller budget (faster), hi: a larger one (slower)
            t_lo, t_hi = lo.estimate.candidate_ms / lo.estimate.original_ms, hi.estimate.candidate_ms / hi.estimate.original_ms
            share = (wanted_ms / self.before_ms - t_lo) / (t_hi - t_lo) if t_hi > t_lo else 0.5
            share = min(max(share, 0.15), 0.85)  # strictly inside the bracket
            return lo.budget_ms + share * (hi.budget_ms - lo.budget_ms)
        step = corrected_budget(self.before_ms, last.predicted_ms, last.estimate.ratio, aim, last.budget_ms)
        if last.estimate.lower >= self.target:  # too fast: a larger budget, at least as large as scaling asks
            return max(step, last.budget_ms * last.estimate.ratio / aim)
        return step

    def finish(self) -> None:
        """Hold this run's new layer timings when the measurements said the machine was busy."""
        store = self.timer.store
        load = store.load
        if load is not None and load > LOAD_SLACK:
            store.hold(f"the machine was busy (the load probe took {load:.2f}x its quietest time)")
        elif self.noisy is not None:
            store.hold(self.noisy)

    def choices_of(self, best: _Round) -> dict[str, LayerChoice]:
        threads = self.planner.timing.threads
        what = f"--speedup {self.target:g} by latency ({threads} thread(s))"
        chosen: dict[str, LayerChoice] = {}
        for unit in self.units:
            pick = best.picks.get(unit.key)
            if pick is None:
                chosen[unit.key] = LayerChoice.keep("input shape unknown: cannot be timed")
            elif unit.key in self.screened:
                chosen[unit.key] = LayerChoice.keep(f"left as is by {what}: takes under {MEASURE_SCREEN:.1%} of the model's time")
            elif pick.kind is None:
                chosen[unit.key] = LayerChoice.keep(f"left as is by {what}: slower, or costlier in accuracy per ms saved")
            else:
                chosen[unit.key] = LayerChoice(pick.kind, pick.rank)
        return chosen

    def refusal(self, best: _Round | None, rounds: int) -> str:
        """A target no plan came near (below ``FAR_MISS`` of it): what the splits allow by their own timings, and
        what the fastest plan measured (``best`` None: no split is faster than its layer, nothing was measured)."""
        threads = self.planner.timing.threads
        fastest = self.fixed + sum(min(o.macs for o in layer.options) for layer in self.choices.values()) / 1e6
        promised = f"{self.before_ms / fastest:.3g}x" if fastest > 0 else "more than any plan measured"
        if best is None:
            return (
                f"--speedup {self.target:g} cannot be reached by latency on this machine ({threads} thread(s)): the timed splits "
                f"allow at most 1x (no split runs faster than its layer here); --by macs plans by MAC count"
            )
        estimate = best.estimate
        interval = f" (95 % CI {estimate.low:.3g}-{estimate.high:.3g})" if estimate.low is not None and estimate.high is not None else ""
        return (
            f"--speedup {self.target:g} cannot be reached by latency on this machine ({threads} thread(s)): the timed splits "
            f"allow at most {promised} by their own timings, and the fastest plan measured {estimate.ratio:.3g}x{interval} in "
            f"{rounds} round(s); ask for less, or --by macs for a plan by MAC count"
        )
