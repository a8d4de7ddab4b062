"""The plan by latency measured on this machine (``--speedup S``, ``--by latency``; the default where the model can be timed).

Each layer's splits are timed in onnxruntime at a few ranks
(:class:`onnx_lowrank.layer_timing.LayerTimer`, the timings kept across runs in
the timing store) and interpolated between them; the allocator of
:mod:`onnx_lowrank.ranks` then runs on milliseconds instead of MACs, an option
slower than the original layer never offered, and a layer under
``MEASURE_SCREEN`` of the model's time left as it is. The result is timed as a
whole model against the original (interleaved runs); when it falls short of
the target, the latency budget is corrected by the share of the promised
saving the splits delivered and the allocation redone (at most ``MAX_ROUNDS``
rounds). A round that meets the target is measured a second time and keeps the
lower ratio, so noise does not pass a candidate that is too slow.

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

import onnx

from ..config import PolicyConfig
from ..errors import LowRankError
from ..layer_timing import LayerTimer
from ..passes import Site, apply_factors, find_sites
from ..ranks import Infeasible, LayerChoices, Option, allocate
from ..run_shapes import ModelShapes
from ..runtime import first_line, make_session
from ..timing import Timing, adaptive_interleaved, interleaved_latency, no_reference_reason, timed_runs
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
# a round's whole-model check: interleaved runs of the original and the candidate, as many as fit in
# ROUND_BUDGET_MS between ROUND_MIN_RUNS and ROUND_RUNS (VGG-16 at 1 thread: 0.55 s a round, 7 runs; the medians
# of runs that long vary by 1-2 %), twice when the target is met
ROUND_RUNS = 10
ROUND_MIN_RUNS = 3
ROUND_BUDGET_MS = 4000.0
MAX_ROUNDS = 4
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


def _unreachable(target: float, threads: int, before_ms: float, best_ms: float) -> str:
    """The refusal of a latency target the timed layers cannot reach: what the fastest splits save at most."""
    reachable = before_ms / best_ms if best_ms > 0 else float("inf")
    return (
        f"--speedup {target:g} cannot be reached by latency on this machine ({threads} thread(s)): the timed splits allow "
        f"at most {reachable:.3g}x (they save at most {before_ms - best_ms:.3g} of the model's {before_ms:.3g} ms; the rest is "
        "work no split makes faster); ask for less, or --by macs for a plan by MAC count"
    )


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


class LatencyPlanner(Planner):
    """``--speedup S`` by latency measured here: layer timings, then whole-model rounds (see the module docstring)."""

    def __init__(self, proto: onnx.ModelProto, shapes: ModelShapes, timing: Timing, policy: PolicyConfig) -> None:
        assert policy.speedup_alone
        self.proto, self.shapes, self.timing, self.policy = proto, shapes, timing, policy

    def _layer_choices(
        self, units: list[Unit], timer: LayerTimer, before_ms: float
    ) -> tuple[list[LayerChoices], dict[str, float], set[str]]:
        """Every unit's options in milliseconds (timed at a few ranks, interpolated between), the units' own
        times, and the units too small to time."""
        step = max(self.policy.multiple, MEASURE_STEP)
        choices: list[LayerChoices] = []
        unit_ms: dict[str, float] = {}
        screened: set[str] = set()
        for unit in units:
            times = [timer.original(site) for site in unit.sites]
            if any(t is None for t in times):
                continue  # unknown input shape: cannot be timed, left as is
            # a layer that runs several times per inference (a Loop body) costs each run
            base = float(sum(t * site.executions for t, site in zip(times, unit.sites, strict=True) if t is not None))
            unit_ms[unit.key] = base
            options = [Option(int(base * 1e6), 0.0, None, 0)]
            if base < MEASURE_SCREEN * before_ms:
                screened.add(unit.key)
                choices.append(LayerChoices(unit.key, options))
                continue
            for kind in unit.kinds:
                errors = unit.errors(kind)
                full = errors.size - 1
                limit = min(full, unit.macs // max(unit.rank_macs[kind], 1))
                grid = list(range(step, limit + 1, step)) or ([limit] if limit >= 1 else [])
                timed = {
                    r: sum((timer.pair(site, kind, r) or 0.0) * site.executions for site in unit.sites)
                    for r in timed_ranks(grid, MEASURE_POINTS)
                }
                for r in grid:
                    pair = interpolate(timed, r)
                    if pair < base:  # never offer a layer that gets slower
                        options.append(Option(int(pair * 1e6), float(errors[r]), kind, r))
            choices.append(LayerChoices(unit.key, options))
        return choices, unit_ms, screened

    def plan(self, inputs: PlanInputs) -> Plan:
        units, timing = inputs.units, self.timing
        target = float(self.policy.speedup)  # type: ignore[arg-type]
        threads = timing.threads
        timer = LayerTimer(self.proto.opset_import, threads=threads, store=timing.store)
        feeds = timing.feeds
        warm = timed_runs(timing.original, feeds, 1)[0]  # the warm-up run sets how many runs fit in ~2 s
        before_ms = statistics.median(timed_runs(timing.original, feeds, max(3, min(7, int(2000.0 / max(warm, 1e-3))))))
        try:
            choices, unit_ms, screened = self._layer_choices(units, timer, before_ms)
        except LowRankError as exc:  # a layer model onnxruntime cannot load (a dtype its CPU kernels lack, say)
            raise TimingFailed(f"a layer could not be timed: {exc}; --by macs plans by MAC count") from None
        except Exception as exc:  # onnxruntime raises its own exception types when a layer model fails to run
            raise TimingFailed(f"a layer could not be timed in onnxruntime ({first_line(exc)}); --by macs plans by MAC count") from None
        # the rest of the model, by difference: a layer timed alone also pays its own layout reorders and the
        # session's call, which in the model it does not, so this can be negative; the allocation then works on
        # what each split saves (the layer alone minus the pair alone), which is what carries over to the model
        fixed = before_ms - sum(unit_ms.values())
        history, rounds = self._rounds(units, choices, fixed, before_ms, target)
        meeting = [r for r in rounds if r[0] >= target]
        # the least error among rounds that met the target, else the fastest round
        best = min(meeting, key=lambda r: r[1]) if meeting else max(rounds, key=lambda r: r[0])
        if best[0] < FAR_MISS * target:
            # the timed splits promised more than the model gave (layers of a few microseconds, timed alone, are
            # mostly the session's own overhead): no plan came near the target, so none is written
            raise LowRankError(
                f"--speedup {target:g} cannot be reached by latency on this machine ({threads} thread(s)): the plans timed "
                f"reached at most {best[0]:.3g}x in {len(rounds)} round(s); ask for less, or --by macs for a plan by MAC count"
            )
        picks = best[2]
        what = f"--speedup {target:g} by latency ({threads} thread(s))"
        chosen: dict[str, LayerChoice] = {}
        for unit in units:
            pick = picks.get(unit.key)
            if pick is None:
                chosen[unit.key] = LayerChoice.keep("input shape unknown: cannot be timed")
            elif unit.key in screened:
                chosen[unit.key] = LayerChoice.keep(f"left as is by {what}: takes under {MEASURE_SCREEN:.1%} of the model's time")
            elif pick.kind is None:
                chosen[unit.key] = LayerChoice.keep(f"left as is by {what}: slower, or costlier in accuracy per ms saved")
            else:
                chosen[unit.key] = LayerChoice(pick.kind, pick.rank)
        final = history[rounds.index(best)]
        measured = {
            "by": "latency",
            **final,
            "target": target,
            "met": final["measured_speedup"] >= target,
            "threads": threads,
            "rounds": history,
            "layers_timed": timer.timed,
            "timing_cache": timing.store.summary() if timing.store is not None else None,
        }
        return Plan(chosen, by="latency", measured=measured)

    def _rounds(
        self, units: list[Unit], choices: list[LayerChoices], fixed: float, before_ms: float, target: float
    ) -> tuple[list[dict[str, float]], list[tuple[float, float, dict[str, Option]]]]:
        """Allocate on milliseconds, time the whole model, correct the budget; per round what was predicted and
        measured, and (measured ratio, total error, picks)."""
        timing = self.timing
        budget = before_ms / target
        history: list[dict[str, float]] = []
        rounds: list[tuple[float, float, dict[str, Option]]] = []
        least = False  # the last round took every layer's fastest option
        for _ in range(MAX_ROUNDS):
            try:
                picks = allocate(choices, budget * 1e6, fixed=fixed * 1e6)
            except Infeasible as exc:
                if not rounds:
                    raise LowRankError(_unreachable(target, timing.threads, before_ms, exc.best / 1e6)) from None
                if least:
                    break
                # short of the target and the correction asks for more than the splits can give: one last round
                # with every layer at its fastest option
                # (costs are whole nanoseconds, and the best can be negative: it counts what the splits save)
                budget, least = (exc.best + 1) / 1e6, True
                picks = allocate(choices, budget * 1e6, fixed=fixed * 1e6)
            predicted_ms = fixed + sum(o.macs for o in picks.values()) / 1e6
            candidate = make_session(candidate_model(self.proto, self.shapes, units, picks), threads=timing.threads)
            orig_ms, cand_ms, runs = adaptive_interleaved(
                timing.original, candidate, timing.feeds, ROUND_RUNS, ROUND_MIN_RUNS, ROUND_BUDGET_MS, warmup=2
            )
            ratio = orig_ms / cand_ms
            if ratio >= target:
                # the median of a few runs on a busy small machine can be several percent off: a round is accepted
                # only when a second, independent measurement agrees, and the lower of the two is kept
                again_orig, again_cand = interleaved_latency(timing.original, candidate, timing.feeds, runs=runs, warmup=0)
                if again_orig / again_cand < ratio:
                    orig_ms, cand_ms, ratio = again_orig, again_cand, again_orig / again_cand
            del candidate
            history.append(
                {
                    "predicted_speedup": before_ms / predicted_ms if predicted_ms > 0 else float("inf"),
                    "measured_speedup": ratio,
                    "original_ms": orig_ms,
                    "candidate_ms": cand_ms,
                    "runs": runs,
                }
            )
            rounds.append((ratio, sum(o.error for o in picks.values()), picks))
            if ratio >= target or least:
                break
            budget = corrected_budget(before_ms, predicted_ms, ratio, target, budget)
        return history, rounds
