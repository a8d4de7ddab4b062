"""The budgets by count: ``--speedup S --by macs`` (the MAC budget) and ``--params-ratio R`` (with or without S).

The MAC budget alone is met with the splits chosen by what they cost to run
(below); a parameter budget by the Lagrangian allocation of
:func:`onnx_lowrank.ranks.allocate_two`. Both minimise the total error the
units weigh (:meth:`onnx_lowrank.planning.units.Unit.choices`).

MACs are not time. A split adds a node (a kernel launch, its threads woken
and joined) and an intermediate tensor written and read back; a thin pair of
a small layer can cost more than the layer it replaces while it saves MACs on
paper. The plan by MACs therefore ranks the options by their *effective* MACs
(:func:`onnx_lowrank.cost.effective_macs`: MACs plus a fixed cost per node and
per activation element written) and still meets the MAC budget:

1. every layer offers its options at their effective cost; an option whose
   effective cost is not below the original layer's is never taken (the
   allocation only takes steps that save);
2. the allocator of :mod:`onnx_lowrank.ranks` runs on effective MACs with a
   budget ``B``; a bisection finds the largest ``B`` whose allocation meets
   the *MAC* budget ``total / S`` — the least error among the allocations that
   avoid overhead-heavy splits. When no ``B`` does, the plain MAC allocation
   is used.

A split always adds overhead (one more node and one more tensor), so an
allocation within an effective budget of ``effective_total / S`` also has a
MAC ratio of at least S; the bisection loosens the budget from there.

With every If branch sized (``--branches all``), the budget holds on every
path through the branches, not on their sum: a sum lets the plan cut one
branch deep and leave the other whole. :func:`allocate_paths` meets one budget
per path (:class:`~.interface.PathBudget`) greedily: from every layer at its
least error, it takes the step with the least error added per MAC saved on the
paths still over budget (each path's MACs counted as a share of its budget, so
a layer shared by two paths over budget saves on both and one on a path within
budget saves nothing), until every path is within; then each layer in turn
takes the least-error option that keeps every path within (the plain MAC
allocation, without the effective-cost refinement). On paths that share no
layer this is the greedy of each path alone.

The constants are measured, not guessed: ``benchmarks/layer_costs.py`` times
every layer geometry of the benchmark models alone and split, and fits
``ms ≈ a·MACs + b·activations + c·nodes``; ``PER_NODE_MACS = c/a`` and
``PER_ELEMENT_MACS = b/a`` at one intra-op thread (a plan by MACs is for
hardware it was not measured on, and one core is the common case there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import PolicyConfig
from ..errors import LowRankError
from ..ranks import Infeasible, LayerChoices, Option, allocate, allocate_two
from .interface import LayerChoice, PathBudget, Plan, PlanInputs, Planner
from .units import LayerOverhead, Unit

__all__ = ["PER_ELEMENT_MACS", "PER_NODE_MACS", "LayerOverhead", "MacBudgetPlanner", "allocate_effective", "allocate_paths"]

# fitted by benchmarks/layer_costs.py to 1516 timings of the layers of 9 models at 1 thread (2-core AMD EPYC, AVX2,
# onnxruntime 1.32; benchmarks/results/layer_costs.json, "fits"): 22.0 ms per GMAC, 9.7 µs per node, 0.35 ms per
# million activation elements written, i.e. a node costs 438k MACs and an element 15.7 (a first run of the same
# benchmark: 402k and 16.7); at 2 threads a node costs more (887k MACs, 25.6 per element), but a plan by MACs is
# for other hardware, and one core is the common case there
PER_NODE_MACS = 400_000
PER_ELEMENT_MACS = 17.0
BISECTION_STEPS = 40


def allocate_effective(
    layers: Sequence[LayerChoices],
    overheads: Sequence[LayerOverhead],
    mac_budget: float,
    fixed_macs: float,
    per_node: float = PER_NODE_MACS,
    per_element: float = PER_ELEMENT_MACS,
) -> dict[str, Option]:
    """Least total error with ``fixed_macs + Σ MACs ≤ mac_budget``, the splits ranked by effective MACs (see the
    module docstring). Raises :class:`Infeasible` when the MAC budget cannot be met at all."""
    plain = allocate(layers, mac_budget, fixed=fixed_macs)  # the MAC plan: feasibility, and the fall-back
    if per_node == 0 and per_element == 0:
        return plain
    real = {layer.key: {(o.kind, o.rank): o for o in layer.options} for layer in layers}
    effective = []
    for layer, overhead in zip(layers, overheads, strict=True):
        original = overhead.effective(layer.original, per_node, per_element)
        options = [Option(overhead.effective(o, per_node, per_element), o.error, o.kind, o.rank, o.params) for o in layer.options]
        # a split that costs more to run than the layer is never an option
        effective.append(LayerChoices(layer.key, [o for o in options if o.kind is None or o.macs < original]))

    def macs_of(picks: Mapping[str, Option]) -> float:
        return fixed_macs + sum(real[key][(o.kind, o.rank)].macs for key, o in picks.items())

    lo = float(sum(min(o.macs for o in layer.options) for layer in effective))
    hi = float(sum(layer.original.macs for layer in effective))
    best: dict[str, Option] | None = None
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        try:
            picks = allocate(effective, mid)
        except Infeasible:
            lo = mid
            continue
        if macs_of(picks) <= mac_budget:
            best, lo = picks, mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    if best is None:
        return plain
    return {key: real[key][(o.kind, o.rank)] for key, o in best.items()}


def path_macs(path: PathBudget, picks: Mapping[str, Option]) -> float:
    """The MACs of ``path`` under ``picks``."""
    return path.fixed + sum(share * picks[key].macs for key, share in path.shares.items() if key in picks)


def allocate_paths(layers: Sequence[LayerChoices], paths: Sequence[PathBudget], speedup: float) -> dict[str, Option]:
    """Least total error, greedily, with every path's MACs at most its MACs before / ``speedup`` (see the module
    docstring). Raises :class:`Infeasible` naming the path when one cannot reach it at all."""
    budgets = [path.before / speedup for path in paths]
    fronts: dict[str, list[Option]] = {}
    for layer in layers:
        front: list[Option] = []
        for option in sorted(layer.options, key=lambda o: (o.macs, o.error)):
            if not front or option.error < front[-1].error:
                front.append(option)
        fronts[layer.key] = front  # by MACs ascending, error descending
    shares = {layer.key: [path.shares.get(layer.key, 0.0) for path in paths] for layer in layers}
    chosen = {key: front[-1] for key, front in fronts.items()}  # the least error, at the fewest MACs
    totals = [path_macs(path, chosen) for path in paths]

    def apply(key: str, option: Option) -> None:
        delta = option.macs - chosen[key].macs
        for p, share in enumerate(shares[key]):
            totals[p] += share * delta
        chosen[key] = option

    while True:
        over = [p for p, (total, budget) in enumerate(zip(totals, budgets, strict=True)) if total > budget * (1 + 1e-12)]
        if not over:
            break
        best: tuple[float, str, Option] | None = None
        for key, front in fronts.items():
            current = chosen[key]
            for option in front:
                if option.macs >= current.macs:
                    break
                saved = sum(shares[key][p] * (current.macs - option.macs) / budgets[p] for p in over)
                if saved > 0:
                    score = (option.error - current.error) / saved
                    if best is None or score < best[0]:
                        best = (score, key, option)
        if best is None:
            path = paths[over[0]]
            least = path_macs(path, {key: front[0] for key, front in fronts.items()})
            raise Infeasible(
                f"--speedup {speedup:g} cannot be reached on {path.name}: the most any allocation gives there is "
                f"{path.before / least:.3g}x (every eligible layer at its smallest rank)",
                least,
            )
        apply(best[1], best[2])
    improved = True  # polish: each layer, in turn, the least-error option that keeps every path within its budget
    while improved:
        improved = False
        for key, front in fronts.items():
            current = chosen[key]
            for option in reversed(front):
                if option.error >= current.error:
                    break
                delta = option.macs - current.macs
                if all(
                    total + share * delta <= budget * (1 + 1e-12) for total, share, budget in zip(totals, shares[key], budgets, strict=True)
                ):
                    apply(key, option)
                    improved = True
                    break
    return chosen


class MacBudgetPlanner(Planner):
    """``--speedup S`` by MACs and/or ``--params-ratio R``: the least total error within the budgets."""

    def __init__(self, policy: PolicyConfig) -> None:
        assert policy.name == "budget"
        self.policy = policy

    def plan(self, inputs: PlanInputs) -> Plan:
        policy, units = self.policy, inputs.units
        layers = [u.choices(policy.multiple, policy.objective) for u in units]
        before = inputs.macs_before
        try:
            if policy.params_ratio is None and len(inputs.paths) > 1:
                # every path through the If branches meets the budget on its own
                try:
                    picks = allocate_paths(layers, inputs.paths, float(policy.speedup or 1.0))
                except Infeasible as exc:
                    raise LowRankError(str(exc)) from None
            elif policy.params_ratio is None:
                # the MAC budget, the splits ranked by what they cost to run
                budget = before / float(policy.speedup or 1.0)
                # the constants are read at the call: benchmarks/default_plan.py sets them to 0 for the plain MAC plan
                picks = allocate_effective(layers, [u.overhead for u in units], budget, inputs.fixed_macs, PER_NODE_MACS, PER_ELEMENT_MACS)
            else:
                mac_budget = before / float(policy.speedup) if policy.speedup else float("inf")
                param_budget = policy.params_ratio * inputs.params_before
                picks = allocate_two(layers, mac_budget, param_budget, inputs.fixed_macs, inputs.fixed_params)
        except Infeasible as exc:
            raise LowRankError(self._unreachable(exc, before, inputs.params_before)) from None
        what = " and ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in policy.describe().items() if k in ("speedup", "params_ratio"))
        return Plan({unit.key: self._choice(unit, picks[unit.key], what) for unit in units}, by="macs")

    def _choice(self, unit: Unit, pick: Option, what: str) -> LayerChoice:
        if pick.kind is not None:
            return LayerChoice(pick.kind, pick.rank)
        if self.policy.force:
            kind = unit.kinds[0]
            return LayerChoice(kind, unit.decomposition(kind).full_rank)
        return LayerChoice.keep(f"left as is by {what}: other layers lose less per MAC/parameter saved")

    def _unreachable(self, exc: Infeasible, before: int, params_total: int) -> str:
        policy = self.policy
        if policy.params_ratio is not None and "parameter" in str(exc):
            best = exc.best / params_total if params_total else 1.0
            return f"--params-ratio {policy.params_ratio:g} cannot be reached: the least reachable is {best:.3g} (all at rank 1)"
        best_speedup = before / exc.best if exc.best else float("inf")
        return (
            f"--speedup {policy.speedup:g} cannot be reached: the most any allocation gives is {best_speedup:.3g}x "
            "(every eligible layer at its smallest rank)"
        )
