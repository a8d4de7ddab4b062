"""The library entry points: :func:`decompose` and :func:`inspect`.

This module turns a user's policy into ranks (via :mod:`onnx_lowrank.ranks`),
drives the graph pass and builds the report. It knows nothing of the CLI.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import external_data_helper, helper

from .errors import LowRankError
from .factorization import Decomposition, Factors, decompose_kernel, reconstruct, singular_values
from .model_io import load_model
from .passes.conv_decomposition import ConvSite, apply_factors, find_conv_sites
from .ranks import Infeasible, LayerChoices, Option, allocate, candidate_ranks, energy_rank, tail_errors
from .report import InspectLayer, LayerReport, Report
from .shapes import infer_shapes

__all__ = ["DEFAULT_SPEEDUP", "decompose", "inspect", "count_params"]

DEFAULT_SPEEDUP = 2.0
ModelLike = str | os.PathLike[str] | onnx.ModelProto


@dataclass(frozen=True)
class _Policy:
    name: str  # "rank" | "energy" | "speedup" | "ranks"
    value: float | Mapping[str, int]


def _policy(
    rank: int | None, energy: float | None, speedup: float | None, ranks: Mapping[str, int] | None
) -> _Policy:
    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("speedup", speedup), ("ranks", ranks)) if v is not None}
    if len(given) > 1:
        raise LowRankError(f"choose one rank policy, got {' and '.join('--' + k for k in given)}")
    if not given:
        return _Policy("speedup", DEFAULT_SPEEDUP)
    name, value = next(iter(given.items()))
    if name == "rank" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LowRankError(f"--rank must be a whole number >= 1, got {value!r}")
    if name == "energy" and not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
        raise LowRankError(f"--energy must be in (0, 1], got {value!r}")
    if name == "speedup" and not (isinstance(value, (int, float)) and math.isfinite(value) and float(value) >= 1.0):
        raise LowRankError(f"--speedup must be a number >= 1, got {value!r}")
    if name == "ranks":
        if not isinstance(value, Mapping):
            raise LowRankError("ranks must map node names to ranks")
        for node, r in value.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise LowRankError(f"ranks: node {node!r} has rank {r!r}; ranks must be whole numbers >= 1")
    return _Policy(name, value)  # type: ignore[arg-type]


def _regex(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LowRankError(f"{flag}: invalid regular expression {pattern!r} ({exc})") from None


def _as_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the caller's model is never changed
        return copy
    return load_model(model)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant tensor, in all graphs and functions."""
    return sum(math.prod(t.dims) for t in external_data_helper._get_all_tensors(model))


def _stored_error(site: ConvSite, factors: Factors) -> float:
    """``||W − W_K|| / ||W||`` with the factors rounded to the dtype they are written in."""
    assert site.weight is not None
    dtype = helper.tensor_dtype_to_np_dtype(site.weight.data_type)
    rounded = Factors(
        factors.kind,
        factors.rank,
        factors.first.astype(dtype).astype(np.float64),
        factors.second.astype(dtype).astype(np.float64),
        factors.singular_values,
    )
    w = site.weight.values.astype(np.float64)
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return 0.0
    return float(np.linalg.norm(w - reconstruct(rounded, site.groups)) / norm)


class _Group:
    """Sites that share one weight (factored once, one rank for all)."""

    def __init__(self, sites: list[ConvSite]) -> None:
        self.sites = sites
        first = sites[0]
        assert first.weight is not None and first.cost is not None
        self.decomposition: Decomposition = decompose_kernel(first.weight.values, first.groups, "spatial")
        self.errors = tail_errors(self.decomposition.s)
        self.macs = sum(s.cost.macs for s in sites if s.cost)
        self.rank_macs = sum(s.cost.rank_macs("spatial") for s in sites if s.cost)

    @property
    def key(self) -> str:
        return self.sites[0].key

    def choices(self, multiple: int) -> LayerChoices:
        options = [Option(self.macs, 0.0)]
        for r in candidate_ranks(self.decomposition.full_rank, multiple):
            options.append(Option(self.rank_macs * r, float(self.errors[r]), "spatial", r))
        return LayerChoices(self.key, options)


def _group_sites(sites: list[ConvSite], ranks: Mapping[str, int] | None) -> list[_Group]:
    buckets: dict[tuple[object, ...], list[ConvSite]] = {}
    for site in sites:
        key = (site.weight_key, site.groups, ranks.get(site.key) if ranks else None)
        buckets.setdefault(key, []).append(site)
    return [_Group(v) for v in buckets.values()]


def _choose(groups: list[_Group], policy: _Policy, fixed_macs: int, force: bool, multiple: int) -> dict[str, tuple[int | None, str | None]]:
    """Rank per group key, or ``None`` with the reason the group is left alone."""
    chosen: dict[str, tuple[int | None, str | None]] = {}
    if policy.name == "speedup":
        target = float(policy.value)  # type: ignore[arg-type]
        before = fixed_macs + sum(g.macs for g in groups)
        try:
            picks = allocate([g.choices(multiple) for g in groups], before / target, fixed=fixed_macs)
        except Infeasible as exc:
            best = before / exc.best if exc.best else float("inf")
            raise LowRankError(
                f"--speedup {target:g} cannot be reached: the most any allocation gives is {best:.3g}x "
                "(every eligible layer at its smallest rank)"
            ) from None
        for g in groups:
            pick = picks[g.key]
            if pick.kind is None:
                if force:
                    chosen[g.key] = (g.decomposition.full_rank, None)
                else:
                    chosen[g.key] = (None, f"left as is by --speedup {target:g}: other layers lose less accuracy per MAC saved")
            else:
                chosen[g.key] = (pick.rank, None)
        return chosen
    for g in groups:
        full = g.decomposition.full_rank
        if policy.name == "rank":
            r = min(int(policy.value), full)  # type: ignore[call-overload]
        elif policy.name == "energy":
            r = energy_rank(g.decomposition.s, float(policy.value))  # type: ignore[arg-type]
        else:
            r = min(int(policy.value[g.key]), full)  # type: ignore[index]
        if multiple > 1 and r < full:
            r = min(full, -(-r // multiple) * multiple)
        pair = g.rank_macs * r
        if pair >= g.macs and not force:
            chosen[g.key] = (None, f"rank {r} would not cut MACs (pair {pair:,} >= original {g.macs:,}); --force decomposes anyway")
        else:
            chosen[g.key] = (r, None)
    return chosen


def _layer_report(site: ConvSite, reason: str | None) -> LayerReport:
    w = site.weight.values if site.weight is not None else None
    macs = site.cost.macs if site.cost else 0
    return LayerReport(
        node=site.key,
        op_type=site.node.op_type,
        decomposed=False,
        reason=reason,
        macs_before=macs,
        macs_after=macs,
        weight=site.weight.name if site.weight else None,
        weight_shape=list(w.shape) if w is not None else None,
        groups=site.groups if w is not None else None,
        shape_known=site.shape_known,
    )


def decompose(
    model: ModelLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    speedup: float | None = None,
    ranks: Mapping[str, int] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    force: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rank_multiple: int = 1,
) -> tuple[onnx.ModelProto, Report]:
    """Decompose the model's Conv layers; return the new model and what was done.

    Exactly one policy may be given: ``rank`` (every layer, clipped to its full
    rank), ``energy`` (per layer, the least rank keeping that share of Σ s²),
    ``speedup`` (total Conv MACs before/after ≥ the target with the least total
    relative squared error; the default, at 2) or ``ranks`` (node name → rank;
    other layers are left alone). ``include``/``exclude`` are regular expressions
    searched in node names. ``force`` decomposes layers even where the pair costs
    more MACs than the original. ``input_shapes`` fixes symbolic input dims for
    the cost model. ``rank_multiple`` rounds ranks up to a multiple (kernels of
    onnxruntime favour multiples of 8 or 16).

    ``model`` is a path or a ``ModelProto``; a given ``ModelProto`` is copied, never changed.
    Raises :class:`LowRankError` for bad arguments or models.
    """
    start = time.perf_counter()
    policy = _policy(rank, energy, speedup, ranks)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise LowRankError(f"rank multiple must be a whole number >= 1, got {rank_multiple!r}")
    include_re, exclude_re = _regex(include, "--include"), _regex(exclude, "--exclude")
    proto = _as_model(model)
    shapes = infer_shapes(proto, input_shapes)
    sites = find_conv_sites(proto, shapes)
    params_before = count_params(proto)
    if policy.name == "ranks":
        keys = {s.key for s in sites}
        unknown = sorted(set(policy.value) - keys)  # type: ignore[arg-type]
        if unknown:
            raise LowRankError(f"ranks file names nodes that are not Convs of the model: {', '.join(unknown[:5])}")

    reasons: dict[str, str | None] = {}
    selected: list[ConvSite] = []
    for site in sites:
        reason = site.reason
        if reason is None and include_re is not None and not include_re.search(site.key):
            reason = "not matched by --include"
        if reason is None and exclude_re is not None and exclude_re.search(site.key):
            reason = "matched by --exclude"
        if reason is None and policy.name == "ranks" and site.key not in policy.value:  # type: ignore[operator]
            reason = "not named in the ranks file"
        reasons[site.key] = reason
        if reason is None:
            selected.append(site)

    groups = _group_sites(selected, policy.value if policy.name == "ranks" else None)  # type: ignore[arg-type]
    fixed = sum(s.cost.macs for s in sites if s.cost and s not in selected)
    chosen = _choose(groups, policy, fixed, force, rank_multiple)

    layers = {site.key: _layer_report(site, reasons[site.key]) for site in sites}
    plan: list[tuple[ConvSite, Factors]] = []
    for g in groups:
        r, why = chosen[g.key]
        if r is None:
            for site in g.sites:
                layers[site.key].reason = why
            continue
        factors = g.decomposition.factors(r)
        error = _stored_error(g.sites[0], factors)
        for site in g.sites:
            plan.append((site, factors))
            layer = layers[site.key]
            layer.decomposed = True
            layer.kind = "spatial"
            layer.rank = factors.rank
            layer.full_rank = g.decomposition.full_rank
            layer.relative_error = error
            layer.optimal_error = factors.relative_error
            layer.macs_after = site.cost.pair_macs("spatial", factors.rank) if site.cost else 0
    for g in groups:  # full rank is worth reporting for layers left alone, too
        for site in g.sites:
            layers[site.key].full_rank = g.decomposition.full_rank

    proto, made = apply_factors(proto, plan)
    for key, names in made.items():
        layers[key].vertical_node = names.first
        layers[key].horizontal_node = names.second
    layer_list = [layers[s.key] for s in sites]
    policy_dict: dict[str, object] = {"name": policy.name, "force": force, "rank_multiple": rank_multiple}
    if policy.name != "ranks":
        policy_dict["value"] = policy.value
    report = Report(
        macs_before=sum(layer.macs_before for layer in layer_list),
        macs_after=sum(layer.macs_after for layer in layer_list),
        params_before=params_before,
        params_after=count_params(proto),
        layers=layer_list,
        policy=policy_dict,
        seconds=time.perf_counter() - start,
    )
    return proto, report


INSPECT_ENERGIES = (0.9, 0.99, 0.999)


def inspect(model: ModelLike, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[InspectLayer]:
    """Per conv: shape, groups, MACs, and the ranks keeping 90/99/99.9 % of the energy with their speedups."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    sites = find_conv_sites(proto, infer_shapes(proto, input_shapes))
    result = []
    for site in sites:
        w = site.weight.values if site.weight is not None else None
        layer = InspectLayer(
            node=site.key,
            op_type=site.node.op_type,
            weight_shape=list(w.shape) if w is not None else None,
            groups=site.groups if w is not None else None,
            macs=site.cost.macs if site.cost else 0,
            eligible=site.reason is None,
            reason=site.reason,
            input_spatial=list(site.cost.in_spatial) if site.cost and site.shape_known else None,
            output_spatial=list(site.cost.out_spatial) if site.cost and site.shape_known else None,
        )
        if site.reason is None and site.cost is not None and w is not None:
            s = singular_values(w, site.groups, "spatial")
            layer.full_rank = int(s.shape[1])
            for e in INSPECT_ENERGIES:
                r = energy_rank(s, e)
                layer.energy_ranks[f"{e:g}"] = [r, site.cost.macs / site.cost.pair_macs("spatial", r)]
        result.append(layer)
    return result
