"""Allocation units: the sites that share one weight, factored once, with every rank's cost and error.

A weight read by several layers (a shared conv, a tied FC) is factored once, so
its layers form one unit and get one kind and one rank. A unit offers the
planners its options — leave it as it is, or each allowed kind at each
candidate rank — each with the MACs it costs and the error the allocation
weighs: the relative squared kernel error ``Σ_{k>K} s_k² / Σ s_k²`` (weighed by
the objective of :func:`onnx_lowrank.ranks.weigh_errors`), or with calibration
data the predicted relative output error times the layer's gain
(:mod:`onnx_lowrank.planning.calibrated`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..cost import effective_macs
from ..factorization import Decomposition, Kind, decompose_kernel
from ..passes import Site
from ..ranks import LayerChoices, Option, candidate_ranks, tail_errors, weigh_errors

__all__ = [
    "SCREEN_MAC_SHARE",
    "SCREEN_WEIGHTS",
    "LayerOverhead",
    "Progress",
    "SharedDecompositions",
    "Unit",
    "compute_spectra",
    "make_units",
    "parallel_map",
    "round_rank",
    "screen_for_macs",
]

Progress = Callable[[int, int, str], None]
# every spectrum computed, by weight: the units of several plans over one prepared model share them
SharedDecompositions = dict[tuple[object, ...], dict[Kind, Decomposition]]


@dataclass(frozen=True)
class LayerOverhead:
    """What a layer writes and runs as: ``nodes`` original nodes (a shared weight's layers), ``activations``
    elements of output, and a pair's intermediate elements per unit of rank, by kind."""

    nodes: int
    activations: int
    rank_activations: Mapping[Kind, int]

    def effective(self, option: Option, per_node: float, per_element: float) -> int:
        if option.kind is None:
            return int(effective_macs(option.macs, self.nodes, self.activations, per_node, per_element))
        written = self.activations + self.rank_activations[option.kind] * option.rank
        return int(effective_macs(option.macs, 2 * self.nodes, written, per_node, per_element))


class Unit:
    """Sites that share one weight: factored once, one kind and rank for all."""

    def __init__(self, sites: list[Site], kinds: list[Kind], shared: SharedDecompositions | None = None) -> None:
        self.sites = sites
        self.kinds = kinds
        first = sites[0]
        # keyed by the weight as buckets are: units of several plans over one prepared model share the spectra
        self._decompositions: dict[Kind, Decomposition] = (
            {} if shared is None else shared.setdefault((first.weight_key, type(first), first.groups), {})
        )
        self.macs = sum(s.cost.macs for s in sites if s.cost)
        assert first.cost is not None
        self.params = first.cost.params  # the weight is stored once
        self.rank_macs = {k: sum(s.cost.rank_macs[k] for s in sites if s.cost) for k in kinds}
        self.rank_params = {k: first.cost.rank_params[k] for k in kinds}
        self.bias = first.cost.bias
        # with calibration data: data-aware decompositions (per kind) and the gain from this layer's output
        # error to the model's outputs (see onnx_lowrank.planning.calibrated)
        self.data_aware: dict[Kind, Any] = {}
        self.gain = 1.0
        self.overhead = LayerOverhead(
            len(sites),
            sum(s.cost.activations for s in sites if s.cost),
            {k: sum(s.cost.rank_activations.get(k, 0) for s in sites if s.cost) for k in kinds},
        )

    @property
    def key(self) -> str:
        return self.sites[0].key

    @functools.cached_property
    def kernel(self) -> np.ndarray:
        """The weight in conv layout, read once and shared by every kind's decomposition."""
        return self.sites[0].kernel()

    def decomposition(self, kind: Kind) -> Decomposition:
        if kind in self.data_aware:
            found: Decomposition = self.data_aware[kind]
            return found
        if kind not in self._decompositions:
            self._decompositions[kind] = decompose_kernel(self.kernel, self.sites[0].groups, kind)
        return self._decompositions[kind]

    def errors(self, kind: Kind) -> np.ndarray:
        """Per rank, the error the allocation weighs: relative squared kernel error, or with calibration data
        the predicted relative output error times the layer's gain."""
        return tail_errors(self.decomposition(kind).s) * self.gain

    def choices(self, multiple: int, objective: str = "sum") -> LayerChoices:
        options = [Option(self.macs, 0.0, None, 0, self.params)]
        for kind in self.kinds:
            # with calibration data the errors are predicted damage, which adds up: summed as they are
            errors = self.errors(kind) if kind in self.data_aware else weigh_errors(self.errors(kind), objective)
            for r in candidate_ranks(errors.size - 1, multiple):
                if np.isfinite(errors[r]):
                    options.append(Option(self.rank_macs[kind] * r, float(errors[r]), kind, r, self.rank_params[kind] * r + self.bias))
        return LayerChoices(self.key, options)


def make_units(
    selected: Sequence[Site],
    allowed: tuple[Kind, ...],
    rank_requests: dict[str, Any] | None,
    shared: SharedDecompositions,
) -> list[Unit]:
    """The selected sites grouped by the weight they read (and, with a ranks file, by the rank asked for)."""
    buckets: dict[tuple[object, ...], list[Site]] = {}
    for site in selected:
        rank_key = rank_requests.get(site.key) if rank_requests else None
        buckets.setdefault((site.weight_key, type(site), site.groups, rank_key), []).append(site)
    return [Unit(group, group[0].available(allowed), shared) for group in buckets.values()]


def round_rank(rank: int, full: int, multiple: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at most ``full``."""
    return min(full, -(-rank // multiple) * multiple) if multiple > 1 and rank < full else min(rank, full)


# Under a MAC budget alone, a layer holding under this share of the MACs whose weight has more elements than
# SCREEN_WEIGHTS is not offered: it can save almost nothing, and its factorization (the fully connected layers
# of VGG: 100 M weights) would cost more time than all the convolutions together.
SCREEN_MAC_SHARE = 0.01
SCREEN_WEIGHTS = 1_000_000


def screen_for_macs(units: list[Unit], reasons: dict[str, str | None], total_macs: int) -> list[Unit]:
    """The units worth offering to a MAC budget alone; the others' sites get the reason in ``reasons``."""
    kept = []
    for unit in units:
        share = unit.macs / total_macs if total_macs else 0.0
        if share < SCREEN_MAC_SHARE and unit.params > SCREEN_WEIGHTS:
            for site in unit.sites:
                reasons[site.key] = (
                    f"holds {share:.2%} of the MACs with {unit.params:,} weights: not offered to --speedup alone "
                    "(--params-ratio or --rank/--energy decompose it)"
                )
            continue
        kept.append(unit)
    return kept


T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``map`` in ``workers`` threads (LAPACK releases the GIL), in order; plain ``map`` for one worker or item."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, items)


def compute_spectra(units: list[Unit], progress: Progress | None, workers: int) -> dict[str, str]:
    """Singular values of every unit and kind, in parallel threads (LAPACK releases the GIL).

    Returns the units that cannot be factored (non-finite weights), with the reason.
    """
    jobs = [(unit, kind) for unit in units for kind in unit.kinds]
    failed: dict[str, str] = {}
    if not jobs:
        return failed

    def run(job: tuple[Unit, Kind]) -> str:
        unit, kind = job
        try:
            unit.decomposition(kind).s  # noqa: B018 - computes and caches the spectrum
        except ValueError as exc:  # non-finite values in the weight
            failed[unit.key] = f"weight cannot be factored: {exc}"
        return unit.key

    for done, key in enumerate(parallel_map(run, jobs, workers), 1):
        if progress is not None:
            progress(done, len(jobs), key)
    return failed
