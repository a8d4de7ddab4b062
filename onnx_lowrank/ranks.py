"""Rank choice: per-layer policies and the global MAC-budget allocation (pure numpy).

Every layer offers a list of :class:`Option` s — "leave it" (the original conv,
error 0) and factorizations at given ranks, each with its MAC cost and its
*relative squared kernel error* ``e = ||W − W_K||_F² / ||W||_F² = Σ_{k>K} s_k² / Σ s_k²``.

Per-layer policies
------------------
* ``rank K``: every layer at ``min(K, full_rank)``.
* ``energy E``: per layer the smallest K with ``Σ_{k≤K} s_k² ≥ E · Σ s_k²``.

Global policy (``speedup S``)
-----------------------------
Find one option per layer minimising ``Σ_l e_l`` subject to
``fixed + Σ_l macs_l ≤ total_before / S`` — a multiple-choice knapsack.
Summing *relative* errors keeps layers of different weight scale comparable.

With a second budget on parameters (``--params-ratio``, alone or with
``--speedup``), :func:`allocate_two` uses Lagrangian relaxation: for
multipliers ``(a, b)`` each layer independently takes the option minimising
``e + a·macs/M + b·params/P``; along each of a fan of directions ``b/a`` a
bisection finds the least scale meeting both budgets, the best of these is
kept and polished as below. Every solution found this way is optimal for the
budgets it meets exactly (the Lagrangian sufficiency theorem); the gap to the
asked budgets is what the grid of directions leaves.

Algorithm (:func:`allocate`): for each layer take the Pareto front of its
options in the (macs, error) plane and its lower convex hull. Start every layer
at its cheapest error-free option (the original, or the full-rank pair when
that is cheaper), then repeatedly take, over all layers, the hull step with the
least error added per MAC saved (a heap), until the budget holds. On the hull
the slopes of a layer increase step by step, so this greedy solves the
LP relaxation of the knapsack exactly (Sinha & Zoltners, 1979); the integer
solution it stops at is worse than the true optimum by at most the error of the
last step taken. A final coordinate pass then gives each layer, in turn, the
least-error option (hull or not) that still fits the budget with the others
fixed, which removes most of the overshoot of that last step. When the error
is convex in the rank (true for the spatial and channel split alone, since
``s_k`` decreases) every rank is on the hull and the greedy step is one rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .factorization import Kind

__all__ = [
    "ERROR_CAP",
    "OBJECTIVES",
    "Infeasible",
    "LayerChoices",
    "Option",
    "allocate",
    "allocate_two",
    "candidate_ranks",
    "energy_rank",
    "options_for",
    "tail_errors",
    "weigh_errors",
]


@dataclass(frozen=True, order=True)
class Option:
    """One way to run a layer: ``kind=None`` is the original layer."""

    macs: int
    error: float
    kind: Kind | None = None
    rank: int = 0
    params: int = 0


@dataclass
class LayerChoices:
    key: str
    options: list[Option] = field(default_factory=list)

    @property
    def original(self) -> Option:
        return next(o for o in self.options if o.kind is None)


class Infeasible(ValueError):
    """The budget cannot be met; ``best`` is the least total cost reachable."""

    def __init__(self, message: str, best: float) -> None:
        super().__init__(message)
        self.best = best


def tail_errors(singular_values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``e[K]`` for ``K = 0..R``: the relative squared error when keeping K components."""
    sq = np.square(np.asarray(singular_values, dtype=np.float64)).sum(axis=0)
    total = float(sq.sum())
    if total == 0.0:
        return np.zeros(sq.size + 1)
    # reverse cumulative sum: e[K] = Σ_{k>=K} sq[k] / total; e[R] = 0
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]]) / total
    return np.clip(tail, 0.0, 1.0)


OBJECTIVES = ("sum", "log", "sum-cap", "log-cap")
ERROR_CAP = 0.25  # "-cap" objectives: no layer is offered a rank losing more than this share of its energy


def weigh_errors(errors: npt.NDArray[np.float64], objective: str) -> npt.NDArray[np.float64]:
    """The cost the allocation sums per layer, from relative squared errors ``e ∈ [0, 1]`` (see the module
    docstring): ``sum`` is ``e``; ``log`` is ``−log(1 − e)``, the loss in log kept energy (Zhang et al.'s
    product of kept energies); ``-cap`` makes ranks with ``e`` over :data:`ERROR_CAP` unavailable (infinite)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    e = np.clip(np.asarray(errors, dtype=np.float64), 0.0, 1.0)
    out = -np.log(np.clip(1.0 - e, 1e-12, None)) if objective.startswith("log") else e.copy()
    if objective.endswith("-cap"):
        out[e > ERROR_CAP] = np.inf
    return out


def energy_rank(singular_values: npt.NDArray[np.float64], energy: float) -> int:
    """The smallest K keeping at least ``energy`` of ``Σ s²`` (summed over groups)."""
    errors = tail_errors(singular_values)
    # the first K whose lost energy is <= 1 - energy; tolerate rounding so energy=1 is the numerical rank
    ok = np.nonzero(errors <= (1.0 - energy) + 1e-12)[0]
    return max(int(ok[0]), 1)


def candidate_ranks(full_rank: int, multiple: int = 1) -> list[int]:
    """Ranks the allocator may choose: multiples of ``multiple``, the full rank, and powers of two below ``multiple``.

    The powers of two keep small layers (and deep cuts) reachable when the
    multiple is coarse; they are aligned sizes too.
    """
    if multiple <= 1 or full_rank <= multiple:
        return list(range(1, full_rank + 1))
    small = {1 << i for i in range(multiple.bit_length()) if 1 << i < multiple}
    return sorted({*small, *range(multiple, full_rank + 1, multiple), full_rank})


def _hull(options: Sequence[Option]) -> list[Option]:
    """Lower convex hull of the Pareto front, from most expensive (least error) to cheapest."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.macs, o.error)):
        if not front or o.error < front[-1].error:
            front.append(o)
    # front: macs ascending, error strictly descending
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> o
            if (b.error - a.error) * (o.macs - a.macs) >= (o.error - a.error) * (b.macs - a.macs):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull[::-1]


def allocate(
    layers: Sequence[LayerChoices],
    budget: float,
    fixed: float = 0.0,
    cost: Callable[[Option], float] = lambda o: float(o.macs),
) -> dict[str, Option]:
    """Least total error with ``fixed + Σ cost(chosen) ≤ budget`` (see the module docstring)."""
    cheapest = fixed + sum(min(cost(o) for o in layer.options) for layer in layers)
    if cheapest > budget * (1 + 1e-12):
        raise Infeasible(f"budget {budget:.6g} is below the least reachable cost {cheapest:.6g}", cheapest)
    costed = {layer.key: [Option(int(cost(o)), o.error, o.kind, o.rank, o.params) for o in layer.options] for layer in layers}
    originals = {layer.key: {(o.kind, o.rank): o for o in layer.options} for layer in layers}
    hulls = {key: _hull(opts) for key, opts in costed.items()}
    position = dict.fromkeys(hulls, 0)
    total = fixed + sum(h[0].macs for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(key: str) -> None:
        h, i = hulls[key], position[key]
        if i + 1 < len(h):
            saved = h[i].macs - h[i + 1].macs
            heapq.heappush(heap, ((h[i + 1].error - h[i].error) / saved, key))

    for key in hulls:
        push(key)
    while total > budget and heap:
        _, key = heapq.heappop(heap)
        h, i = hulls[key], position[key]
        total -= h[i].macs - h[i + 1].macs
        position[key] = i + 1
        push(key)
    chosen = {key: hulls[key][position[key]] for key in hulls}
    # coordinate polish: each layer takes the least-error option that still fits
    improved = True
    while improved:
        improved = False
        for key, opts in costed.items():
            slack = budget - (total - chosen[key].macs)
            fits = [o for o in opts if o.macs <= slack and o.error < chosen[key].error]
            if fits:
                best = min(fits, key=lambda o: (o.error, o.macs))
                total += best.macs - chosen[key].macs
                chosen[key] = best
                improved = True
    return {key: originals[key][(o.kind, o.rank)] for key, o in chosen.items()}


def options_for(
    key: str,
    macs: int,
    rank_macs: Mapping[Kind, int],
    errors: Mapping[Kind, npt.NDArray[np.float64]],
    multiple: int = 1,
) -> LayerChoices:
    """The leave option plus every candidate rank of each kind (``errors[kind][K]`` from :func:`tail_errors`)."""
    options = [Option(macs, 0.0)]
    for kind, per_rank in rank_macs.items():
        full = errors[kind].size - 1
        for r in candidate_ranks(full, multiple):
            options.append(Option(per_rank * r, float(errors[kind][r]), kind, r))
    return LayerChoices(key, options)


def _polish(costed: Mapping[str, Sequence[Option]], chosen: dict[str, Option], mac_budget: float, param_budget: float) -> None:
    """Give each layer, in turn, the least-error option that keeps both totals within budget."""
    total_m = sum(o.macs for o in chosen.values())
    total_p = sum(o.params for o in chosen.values())
    improved = True
    while improved:
        improved = False
        for key, opts in costed.items():
            current = chosen[key]
            slack_m = mac_budget - (total_m - current.macs)
            slack_p = param_budget - (total_p - current.params)
            fits = [o for o in opts if o.macs <= slack_m and o.params <= slack_p and o.error < current.error]
            if fits:
                best = min(fits, key=lambda o: (o.error, o.macs, o.params))
                total_m += best.macs - current.macs
                total_p += best.params - current.params
                chosen[key] = best
                improved = True


def allocate_two(
    layers: Sequence[LayerChoices],
    mac_budget: float,
    param_budget: float,
    fixed_macs: float = 0.0,
    fixed_params: float = 0.0,
    directions: int = 33,
) -> dict[str, Option]:
    """Least total error with MACs and parameters both within budget (see the module docstring)."""
    budget_m, budget_p = mac_budget - fixed_macs, param_budget - fixed_params
    least_m = sum(min(o.macs for o in layer.options) for layer in layers)
    least_p = sum(min(o.params for o in layer.options) for layer in layers)
    if least_m > budget_m * (1 + 1e-12):
        raise Infeasible("MAC budget below the least reachable", fixed_macs + least_m)
    if least_p > budget_p * (1 + 1e-12):
        raise Infeasible("parameter budget below the least reachable", fixed_params + least_p)
    arrays = [
        (
            layer.key,
            np.array([o.error for o in layer.options]),
            np.array([o.macs for o in layer.options], dtype=np.float64),
            np.array([o.params for o in layer.options], dtype=np.float64),
        )
        for layer in layers
    ]
    scale_m = max(sum(float(m.max()) for _, _, m, _ in arrays), 1.0)
    scale_p = max(sum(float(p.max()) for _, _, _, p in arrays), 1.0)

    def pick(a: float, b: float) -> tuple[list[int], float, float, float]:
        idx, tm, tp, te = [], 0.0, 0.0, 0.0
        for _, e, m, p in arrays:
            i = int(np.argmin(e + a * m / scale_m + b * p / scale_p))
            idx.append(i)
            tm, tp, te = tm + m[i], tp + p[i], te + e[i]
        return idx, tm, tp, te

    best: tuple[float, list[int]] | None = None
    for j in range(directions):
        theta = (np.pi / 2) * j / (directions - 1)
        ca, cb = float(np.cos(theta)), float(np.sin(theta))
        lo, hi = 0.0, 1.0
        while hi <= 1e12:  # grow the multipliers until both budgets hold (a zero multiplier may never get there)
            _, tm, tp, _ = pick(hi * ca, hi * cb)
            if tm <= budget_m and tp <= budget_p:
                break
            hi *= 4.0
        else:
            continue
        for _ in range(60):
            mid = (lo + hi) / 2
            _, tm, tp, _ = pick(mid * ca, mid * cb)
            if tm <= budget_m and tp <= budget_p:
                hi = mid
            else:
                lo = mid
        idx, tm, tp, te = pick(hi * ca, hi * cb)
        if tm <= budget_m and tp <= budget_p and (best is None or te < best[0]):
            best = (te, idx)
    if best is None:  # no direction reached both budgets: start from the cheapest in MACs that fits
        raise Infeasible("no allocation meets both budgets", fixed_macs + least_m)
    chosen = {layer.key: layer.options[i] for layer, i in zip(layers, best[1], strict=True)}
    _polish({layer.key: layer.options for layer in layers}, chosen, budget_m, budget_p)
    return chosen
