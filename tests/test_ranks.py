"""The rank allocator against brute force, and the per-layer rank policies through ``decompose``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.api import decompose
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.planning.mac_budget import allocate_effective
from onnx_lowrank.planning.units import LayerOverhead
from onnx_lowrank.ranks import Infeasible, LayerChoices, Option, allocate, options_for, tail_errors

FloatArray = npt.NDArray[np.float64]
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


# --------------------------------------------------------------------------- random knapsack problems


def random_layer(rng: np.random.Generator, key: str, arbitrary: bool) -> LayerChoices:
    """A layer's options: from a random spectrum (one or two kinds) or arbitrary (macs, error) points."""
    macs = int(rng.integers(50, 1000))
    if arbitrary:  # not convex, duplicates and dominated options allowed
        options = [Option(macs, 0.0)]
        for r in range(1, int(rng.integers(1, 5)) + 1):
            options.append(Option(int(rng.integers(1, 1200)), float(rng.choice([rng.random(), 0.0, 0.5])), "spatial", r))
        return LayerChoices(key, options)
    kinds = ["spatial", "channel"][: int(rng.integers(1, 3))]
    rank_macs, errors = {}, {}
    for kind in kinds:
        full = int(rng.integers(1, 5))
        s = np.sort(rng.random((int(rng.integers(1, 3)), full)) ** rng.uniform(0.5, 4.0), axis=1)[:, ::-1]
        errors[kind] = tail_errors(s)
        rank_macs[kind] = int(rng.integers(5, macs // 2 + 10))
    return options_for(key, macs, rank_macs, errors)  # type: ignore[arg-type]


def brute_force(layers: Sequence[LayerChoices], budget: float, fixed: float) -> float | None:
    """Least total error of any choice that fits the budget (``None`` when none does)."""
    best: float | None = None
    for combo in itertools.product(*(layer.options for layer in layers)):
        if fixed + sum(o.macs for o in combo) <= budget:
            error = sum(o.error for o in combo)
            best = error if best is None else min(best, error)
    return best


def lower_hull(options: Sequence[Option]) -> list[tuple[int, float]]:
    """Lower convex hull of the (macs, error) points, by macs (monotone chain)."""
    points = sorted({(o.macs, o.error) for o in options})
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def largest_step(layers: Sequence[LayerChoices]) -> float:
    """The largest error one greedy step on a hull can add (the documented bound on the gap)."""
    steps = [0.0]
    for layer in layers:
        hull = lower_hull(layer.options)
        steps += [max(0.0, a[1] - b[1]) for a, b in itertools.pairwise(hull)]
    return max(steps)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[LayerChoices], float, float]:
    """3-5 layers, a fixed cost and a budget between the cheapest and the original total."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arbitrary = draw(st.booleans())
    layers = [random_layer(rng, f"layer{i}", arbitrary) for i in range(draw(st.integers(3, 5)))]
    fixed = float(draw(st.sampled_from([0, 0, 100, 1000])))
    cheapest = fixed + sum(min(o.macs for o in layer.options) for layer in layers)
    top = fixed + sum(layer.original.macs for layer in layers)
    budget = cheapest + draw(st.floats(0.0, 1.0)) * max(0.0, top - cheapest)
    return layers, budget, fixed


def check_allocation(layers: Sequence[LayerChoices], budget: float, fixed: float) -> bool:
    """Assert the allocation is valid and within the documented bound; return whether it is optimal."""
    chosen = allocate(layers, budget, fixed=fixed)
    assert set(chosen) == {layer.key for layer in layers}
    for layer in layers:
        assert chosen[layer.key] in layer.options
    assert fixed + sum(o.macs for o in chosen.values()) <= budget
    total = sum(o.error for o in chosen.values())
    optimum = brute_force(layers, budget, fixed)
    assert optimum is not None
    assert total >= optimum - 1e-12
    assert total <= optimum + largest_step(layers) + 1e-12
    return total <= optimum + 1e-12


@SETTINGS
@given(problem=problems())
def test_allocation_fits_and_is_near_optimal(problem: tuple[list[LayerChoices], float, float]) -> None:
    """Within budget, and at most one hull step's error above the brute-force optimum."""
    check_allocation(*problem)


def test_allocation_is_mostly_optimal() -> None:
    """Over many random problems the allocation equals brute force in the great majority."""
    rng = np.random.default_rng(2016)
    optimal = trials = 0
    for _ in range(300):
        arbitrary = bool(rng.integers(0, 2))
        layers = [random_layer(rng, f"layer{i}", arbitrary) for i in range(int(rng.integers(3, 6)))]
        cheapest = sum(min(o.macs for o in layer.options) for layer in layers)
        top = sum(layer.original.macs for layer in layers)
        budget = cheapest + rng.random() * max(0, top - cheapest)
        optimal += check_allocation(layers, budget, 0.0)
        trials += 1
    # "most": 293 of 300 at this seed; the margin is for platform-dependent rounding only
    assert optimal / trials >= 0.9, f"optimal in {optimal} of {trials}"


def test_loose_budget_keeps_every_layer_exact() -> None:
    """With the original total as budget no error is taken."""
    rng = np.random.default_rng(1)
    layers = [random_layer(rng, f"layer{i}", False) for i in range(4)]
    chosen = allocate(layers, sum(layer.original.macs for layer in layers))
    assert sum(o.error for o in chosen.values()) == 0.0


@SETTINGS
@given(problem=problems(), shortfall=st.floats(1.0, 500.0))
def test_budget_below_the_cheapest_is_infeasible(problem: tuple[list[LayerChoices], float, float], shortfall: float) -> None:
    """``Infeasible.best`` is the least reachable total; exactly that budget is feasible."""
    layers, _, fixed = problem
    cheapest = fixed + sum(min(o.macs for o in layer.options) for layer in layers)
    with pytest.raises(Infeasible) as info:
        allocate(layers, cheapest - shortfall, fixed=fixed)
    assert info.value.best == pytest.approx(cheapest)
    chosen = allocate(layers, cheapest, fixed=fixed)
    assert fixed + sum(o.macs for o in chosen.values()) <= cheapest


# --------------------------------------------------------------------------- policies through decompose


def decaying_kernel(rng: np.random.Generator, n: int, cg: int, kh: int, kw: int, groups: int, decay: float) -> npt.NDArray[np.float32]:
    """``W[n, c, i, j] = Σ_k decay^k V[k, c, i] H[n, k, j]`` per group: a spectrum that falls off."""
    ng = n // groups
    r = min(cg * kh, ng * kw)
    parts = []
    for _ in range(groups):
        v = rng.standard_normal((r, cg, kh))
        h = rng.standard_normal((ng, r, kw)) * decay ** np.arange(r)[None, :, None]
        parts.append(np.einsum("kci,nkj->ncij", v, h))
    return np.concatenate(parts).astype(np.float32)


LAYERS = {
    # name: (N, C, kh, kw, groups, pads, spectral decay)
    "c1": (8, 3, 3, 3, 1, [1, 1, 1, 1], 0.3),
    "c2": (8, 8, 3, 3, 2, [1, 1, 1, 1], 0.6),
    "c3": (6, 8, 1, 1, 1, [0, 0, 0, 0], 0.5),  # pointwise: never eligible
    "c4": (16, 6, 5, 3, 1, [2, 1, 2, 1], 0.85),
}


def multi_conv_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, npt.NDArray[np.float32]]]:
    """x (1, 3, 16, 12) → c1 → c2 (2 groups) → c3 (1x1) → c4 → y, all keeping the spatial size."""
    rng = np.random.default_rng(seed)
    nodes, inits, weights = [], [], {}
    current = "x"
    for name, (n, c, kh, kw, g, pads, decay) in LAYERS.items():
        w = decaying_kernel(rng, n, c // g, kh, kw, g, decay)
        weights[name] = w
        inits.append(numpy_helper.from_array(w, f"{name}.W"))
        out = "y" if name == "c4" else f"{name}.out"
        nodes.append(helper.make_node("Conv", [current, f"{name}.W"], [out], name=name, group=g, pads=pads))
        current = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 12])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights


def spectrum(w: npt.NDArray[np.generic], groups: int) -> FloatArray:
    """Squared singular values of Theorem 1's matrix ``M[(c, i), (n, j)]``, summed over groups, descending."""
    n, cg, kh, kw = w.shape
    ng = n // groups
    total = None
    for g in range(groups):
        m = w[g * ng : (g + 1) * ng].astype(np.float64).transpose(1, 2, 0, 3).reshape(cg * kh, ng * kw)
        sq = np.linalg.svd(m, compute_uv=False) ** 2
        total = sq if total is None else total + sq
    assert total is not None
    return total


def full_rank_of(name: str) -> int:
    n, c, kh, kw, g, *_ = LAYERS[name]
    return min((c // g) * kh, (n // g) * kw)


def test_rank_policy_clips_to_full_rank() -> None:
    """``rank=K`` gives every spatially splittable layer ``min(K, full rank)``; the 1x1 conv is left with a reason."""
    model, _ = multi_conv_model()
    for k in (2, 10, 1000):
        _, report = decompose(model, rank=k, force=True, kinds=["spatial"])
        layers = {layer.node: layer for layer in report.layers}
        assert set(layers) == set(LAYERS)
        assert not layers["c3"].decomposed and layers["c3"].reason
        for name in ("c1", "c2", "c4"):
            assert layers[name].decomposed
            assert layers[name].full_rank == full_rank_of(name)
            assert layers[name].rank == min(k, full_rank_of(name))


def test_rank_policy_without_force_skips_layers_that_would_not_save() -> None:
    """Without ``force`` a layer whose pair would cost at least its MACs stays, with a reason; the others are split."""
    model, _ = multi_conv_model()
    height, width = 16, 12  # every conv keeps the input's spatial size
    for k in (4, 7, 1000):
        _, report = decompose(model, rank=k, kinds=["spatial"])
        layers = {layer.node: layer for layer in report.layers}
        outcomes = set()
        for name in ("c1", "c2", "c4"):
            n, c, kh, kw, g, *_ = LAYERS[name]
            r = min(k, full_rank_of(name))
            before = n * (c // g) * kh * kw * height * width
            # the vertical conv at the input size, then the horizontal one
            pair = g * r * (c // g) * kh * height * width + n * r * kw * height * width
            layer = layers[name]
            assert layer.macs_before == before
            assert layer.decomposed == (pair < before), (name, k, layer.reason)
            outcomes.add(layer.decomposed)
            if layer.decomposed:
                assert layer.rank == r and layer.macs_after == pair
            else:
                assert layer.reason and "MAC" in layer.reason and layer.macs_after == before
        if k == 7:  # this rank splits c4 and leaves c1 and c2: both outcomes are exercised
            assert outcomes == {True, False}


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_policy_takes_the_least_rank_per_layer(energy: float) -> None:
    """Each layer gets the least K whose kept share of Σ s² reaches the energy (computed here from the SVD)."""
    model, weights = multi_conv_model()
    _, report = decompose(model, energy=energy, force=True, kinds=["spatial"])
    layers = {layer.node: layer for layer in report.layers}
    for name in ("c1", "c2", "c4"):
        sq = spectrum(weights[name], LAYERS[name][4])
        kept = np.cumsum(sq) / sq.sum()
        k = layers[name].rank
        assert k is not None and layers[name].decomposed
        assert kept[k - 1] >= energy - 1e-9
        if k > 1:
            assert kept[k - 2] < energy
        assert layers[name].optimal_error == pytest.approx(np.sqrt(sq[k:].sum() / sq.sum()), abs=1e-9)
    ranks = {name: layers[name].rank for name in ("c1", "c2", "c4")}
    assert len(set(ranks.values())) > 1 or energy == 1.0, ranks  # the policy is per layer, not one rank for all


@pytest.mark.parametrize("kinds", [["spatial"], None])
@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 3.0])
def test_speedup_policy_reaches_the_mac_ratio(target: float, kinds: list[str] | None) -> None:
    """``speedup=S`` brings the total MAC ratio to at least S (the 1x1 conv counts, split or not)."""
    model, _ = multi_conv_model()
    _, report = decompose(model, speedup=target, kinds=kinds, by="macs")
    assert report.mac_ratio >= target
    assert report.macs_before == sum(layer.macs_before for layer in report.layers)
    assert report.macs_after == sum(layer.macs_after for layer in report.layers)
    layers = {layer.node: layer for layer in report.layers}
    assert layers["c3"].macs_before > 0
    if kinds == ["spatial"]:  # a pointwise conv has no spatial split: it stays as fixed cost
        assert not layers["c3"].decomposed and layers["c3"].macs_after == layers["c3"].macs_before
    for layer in report.decomposed:
        assert layer.rank is not None and layer.full_rank is not None and 1 <= layer.rank <= layer.full_rank
        if layer.kind == "spatial":
            assert layer.full_rank == full_rank_of(layer.node)


def test_unreachable_speedup_is_an_error() -> None:
    """A target beyond every layer at rank 1 is refused with a message, not silently missed."""
    model, _ = multi_conv_model()
    with pytest.raises(LowRankError, match="speedup"):
        decompose(model, speedup=1000.0, by="macs")


# --------------------------------------------------------------------------- the MAC plan with overheads


@SETTINGS
@given(problems())
def test_effective_allocation_meets_the_mac_budget(problem: tuple[list[LayerChoices], float, float]) -> None:
    """Ranked by effective MACs, the allocation still meets the MAC budget whenever the plain one can."""
    layers, budget, fixed = problem
    overheads = [LayerOverhead(1, 1000, {"spatial": 7, "channel": 3}) for _ in layers]
    try:
        allocate(layers, budget, fixed)
    except Infeasible:
        with pytest.raises(Infeasible):
            allocate_effective(layers, overheads, budget, fixed, per_node=50.0, per_element=0.1)
        return
    picks = allocate_effective(layers, overheads, budget, fixed, per_node=50.0, per_element=0.1)
    assert fixed + sum(o.macs for o in picks.values()) <= budget * (1 + 1e-9)
    assert set(picks) == {layer.key for layer in layers}


def test_effective_allocation_skips_splits_that_cost_more_to_run() -> None:
    """A small layer whose split saves MACs but adds more node overhead than it saves is left as it is, even
    though its error per MAC saved is the lowest; with no overhead the plain MAC plan takes it."""
    big = LayerChoices("big", [Option(10_000, 0.0), Option(4_000, 0.20, "spatial", 8), Option(6_000, 0.05, "spatial", 16)])
    small = LayerChoices("small", [Option(1_000, 0.0), Option(400, 0.001, "spatial", 8)])
    overheads = [LayerOverhead(1, 0, {"spatial": 0}), LayerOverhead(1, 0, {"spatial": 0})]
    plain = allocate_effective([big, small], overheads, 6_500, 0.0, per_node=0.0, per_element=0.0)
    assert plain["small"].kind == "spatial" and plain["big"].rank == 16
    costed = allocate_effective([big, small], overheads, 6_500, 0.0, per_node=800.0, per_element=0.0)
    assert costed["small"].kind is None and costed["big"].kind == "spatial"
    assert sum(o.macs for o in costed.values()) <= 6_500
