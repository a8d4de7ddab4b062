"""A model's decomposable layers: prepared once, selected per plan with the reason for every layer left out.

:func:`prepare` makes a model ready for any number of plans: BatchNormalization
folded, the sizes that run resolved (:mod:`onnx_lowrank.run_shapes`, on the
input :func:`model_sizes` picks: the sample, else the first calibration sample,
else random values) and every MAC-carrying node found
(:func:`onnx_lowrank.passes.find_sites`).
:func:`select_layers` then applies one conversion's policy: the layers its
splits, name filters and ranks file allow, the sizes it needs (a plan by MACs
on sizes no run could fix is refused, naming the inputs that need
``--input-shape``), grouped into allocation units. Every layer left out keeps
its reason, and the report's entries (:func:`layer_report`) start here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from .config import PolicyConfig, SampleSource, ShapeConfig
from .data_io import load_sample, model_input_specs
from .errors import LowRankError
from .factorization import Kind
from .model_io import count_params
from .passes import Site, find_sites, fold_batchnorm, scope_label
from .planning import PathBudget, SharedDecompositions, Unit, make_units, screen_for_macs
from .report import LayerReport, unsized_warning
from .run_shapes import ModelShapes, resolve_shapes
from .shapes import needs_input_shape_message

__all__ = [
    "Prepared",
    "Selection",
    "control_flow_report",
    "layer_report",
    "load_samples",
    "model_sizes",
    "nothing_to_decompose",
    "path_budgets",
    "prepare",
    "select_layers",
    "shapes_report",
]


@dataclass
class Prepared:
    """A model made ready for planning, once for any number of plans: BatchNormalization folded, sizes
    resolved, the decomposable sites found. ``decompositions`` caches every spectrum computed, by weight."""

    proto: onnx.ModelProto
    params_before: int
    folded: list[tuple[str, str]]
    kept_batchnorms: dict[str, str]
    shapes: ModelShapes
    sites: list[Site]
    fold_bn: bool
    decompositions: SharedDecompositions = field(default_factory=dict)


def _sample_name(source: SampleSource, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"the sample {os.fspath(source)}"
    return "the sample" if index == 0 else f"sample {index + 1}"


def load_samples(proto: onnx.ModelProto, shapes: ShapeConfig) -> list[tuple[str, dict[str, Any]]]:
    """The samples of ``shapes``, read and checked against ``proto``'s inputs, each with the name the report
    gives it (the reference first; empty when none is given). ``--input-shape`` must agree with the first."""
    out = [(_sample_name(source, i), load_sample(source, proto)) for i, source in enumerate(shapes.samples)]
    if out:
        name, first = out[0]
        for input_name, shape in shapes.input_shapes.items():
            if input_name in first and tuple(shape) != tuple(first[input_name].shape):
                raise LowRankError(
                    f"--input-shape {input_name}={','.join(map(str, shape))} differs from {name}'s {input_name!r} "
                    f"{tuple(first[input_name].shape)}: the sample sizes the plan"
                )
    return out


def mobile_input_shapes(model: onnx.ModelProto, shapes: ShapeConfig) -> dict[str, list[int]]:
    """The input shapes the mobile check fixes: ``--input-shape``, and the sample's shapes of the inputs whose
    declared dims are symbolic."""
    fixed = {name: list(shape) for name, shape in shapes.input_shapes.items()}
    samples = load_samples(model, shapes)
    if samples:
        specs = {spec.name: spec for spec in model_input_specs(model)}
        for name, value in samples[0][1].items():
            dims = specs[name].dims
            if dims is None or any(not isinstance(d, int) for d in dims):
                fixed.setdefault(name, list(value.shape))
    return fixed


def model_sizes(
    proto: onnx.ModelProto,
    shapes: ShapeConfig | None,
    calibration: Mapping[str, Any] | None = None,
    samples: list[tuple[str, dict[str, Any]]] | None = None,
) -> ModelShapes:
    """The sizes that run (:func:`onnx_lowrank.run_shapes.resolve_shapes`) on the reference input: the sample
    (``samples`` as read by :func:`load_samples`, else read here), else the first sample of the calibration
    data (arrays with their samples on axis 0), else random values of the input shapes."""
    shapes = shapes or ShapeConfig()
    if samples is None:
        samples = load_samples(proto, shapes)
    if samples:
        (name, first), more = samples[0], samples[1:]
        return resolve_shapes(proto, shapes.input_shapes, first, reference_from=name, more=more, branches=shapes.branches)
    reference = {name: values[:1] for name, values in calibration.items()} if calibration is not None else None
    return resolve_shapes(proto, shapes.input_shapes, reference, branches=shapes.branches)


def prepare(
    proto: onnx.ModelProto,
    *,
    shapes: ShapeConfig | None = None,
    fold_bn: bool = True,
    sizes: ModelShapes | None = None,
) -> Prepared:
    """Fold BatchNormalization in ``proto`` (in place), resolve the sizes that run and find the sites.

    ``sizes``: sizes resolved already (by :func:`model_sizes`); else they are resolved here on the sample of
    ``shapes`` or random values."""
    params_before = count_params(proto)
    folded: list[tuple[str, str]] = []
    kept: dict[str, str] = {}
    if fold_bn:
        proto, fold = fold_batchnorm(proto)
        folded, kept = fold.folded, fold.refused
    model_shapes = sizes if sizes is not None else model_sizes(proto, shapes)
    return Prepared(proto, params_before, folded, kept, model_shapes, find_sites(proto, model_shapes), fold_bn)


@dataclass
class Selection:
    """What one policy may decompose: per site the reason it is left out (None: selected), the allocation
    units, the sites whose MACs the totals count, the warnings about sizes, whether the totals are exact,
    and the notice when nothing at all can be decomposed."""

    reasons: dict[str, str | None]
    units: list[Unit]
    counted: list[Site]
    warnings: list[str]
    exact: bool
    notice: str | None

    @property
    def selected(self) -> list[Site]:
        return [site for unit in self.units for site in unit.sites]

    def drop(self, failed: Mapping[str, str]) -> None:
        """Leave out the units that cannot be factored (``failed``: unit key → reason)."""
        for unit in self.units:
            if unit.key in failed:
                for site in unit.sites:
                    self.reasons[site.key] = failed[unit.key]
        self.units = [unit for unit in self.units if unit.key not in failed]

    @property
    def fixed_macs(self) -> int:
        """MACs of the counted layers outside the units."""
        selected = {id(site) for site in self.selected}
        return sum(s.cost.macs for s in self.counted if s.cost and id(s) not in selected)


def select_layers(prepared: Prepared, policy: PolicyConfig, shapes: ShapeConfig, needs_macs: bool) -> Selection:
    """The layers ``policy`` may decompose on ``prepared``, grouped into units (see the module docstring).

    ``needs_macs``: the plan weighs MACs (a ``--speedup`` budget, or a plan by latency), so every layer it
    touches needs a size."""
    sites, allowed = prepared.sites, policy.allowed
    requests = policy.rank_requests
    if policy.ranks is not None:
        unknown = sorted(set(requests) - {s.key for s in sites})
        if unknown:
            raise LowRankError(f"ranks file names nodes that are not decomposable layers of the model: {', '.join(unknown[:5])}")
    warnings, excluded, exact = size_check(sites, prepared.shapes, needs_macs, shapes.allow_unknown_shapes)
    include, exclude = policy.include_pattern(), policy.exclude_pattern()
    reasons: dict[str, str | None] = {}
    selected: list[Site] = []
    for site in sites:
        reason = None if site.available(allowed) else site.why_not(allowed)
        if reason is None and include is not None and not include.search(site.key):
            reason = "not matched by --include"
        if reason is None and exclude is not None and exclude.search(site.key):
            reason = "matched by --exclude"
        if reason is None and policy.ranks is not None and site.key not in requests:
            reason = "not named in the ranks file"
        if reason is None and site.key in excluded:
            reason = excluded[site.key]
        reasons[site.key] = reason
        if reason is None:
            selected.append(site)
    notice = None
    if not any(site.available(allowed) and reasons[site.key] != "not matched by --include" for site in sites):
        notice = nothing_to_decompose(sites, allowed)
        if policy.speedup is not None and policy.speedup > 1:
            raise LowRankError(f"--speedup {policy.speedup:g} cannot be reached: {notice}")
    units = make_units(selected, allowed, dict(requests) if policy.ranks is not None else None, prepared.decompositions)
    counted = [s for s in sites if s.cost is not None and (s.shape_known or not exact)]
    if policy.name == "budget" and policy.params_ratio is None:
        units = screen_for_macs(units, reasons, sum(s.cost.macs for s in counted if s.cost))
    return Selection(reasons, units, counted, warnings, exact, notice)


def path_budgets(shapes: ModelShapes, selection: Selection) -> list[PathBudget]:
    """With If branches sized by runs of their own (``branches="all"``), the paths a MAC budget must each meet:
    per sized branch of an If, the counted layers outside the other branch of that If and of every If it
    sits in. Empty when fewer than two distinct paths hold MACs (the whole is then the one budget)."""
    if not shapes.branch_runs:
        return []
    in_units = {site.key: unit for unit in selection.units for site in unit.sites}
    out: dict[frozenset[str], PathBudget] = {}
    for flow in shapes.control_flow:
        if flow.op_type != "If":
            continue
        for label in flow.sized_by:
            chain = dict((*flow.path, (flow.key, label)))
            on = [s for s in selection.counted if s.cost and all(chain.get(key, step) == step for key, step in s.scope.path)]
            keys = frozenset(s.key for s in on)
            if not on or keys in out:
                continue
            shares: dict[str, float] = {}
            fixed = 0
            for site in on:
                assert site.cost is not None
                unit = in_units.get(site.key)
                if unit is None:
                    fixed += site.cost.macs
                elif unit.macs:
                    shares[unit.key] = shares.get(unit.key, 0.0) + site.cost.macs / unit.macs
            before = fixed + round(sum(share * next(u.macs for u in selection.units if u.key == key) for key, share in shares.items()))
            if before:
                out[keys] = PathBudget(f"the path through the {label} of If {flow.node!r}", shares, fixed, before)
    return list(out.values()) if len(out) > 1 else []


def size_check(sites: list[Site], shapes: ModelShapes, needs_macs: bool, allow_unknown: bool) -> tuple[list[str], dict[str, str], bool]:
    """What the sizes allow: warnings, layers to leave alone for want of a size (key → reason), and whether the
    totals are exact (``False``: layers of unknown size are counted at one output pixel, by request).

    A plan by MACs on sizes that no run could fix is refused, naming the inputs that need ``--input-shape``.
    """
    warnings = list(shapes.warnings)
    # a layer that did not run (an If branch the reference input does not take) has no size to plan by
    idle_why = "no run sized it" if shapes.branches == "all" else "does not run on the reference input"
    idle = {s.key: f"{idle_why}: it is in {scope_label(s.scope)}" for s in sites if s.ran is False}
    if not needs_macs:
        idle = {}
    guessed = [s for s in sites if s.cost is not None and not s.shape_known and s.ran is not False]
    if not guessed:
        return warnings, idle, True
    if shapes.source == "unknown":
        why = needs_input_shape_message(shapes.missing_inputs) if shapes.missing_inputs else "the reference run failed"
        if needs_macs and not allow_unknown:
            raise LowRankError(
                f"the sizes of {len(guessed)} layer(s) are not known without a run, and no input can be built for one: {why}; "
                "or --allow-unknown-shapes to plan with those layers at one output pixel"
            )
        warnings.append(unsized_warning([s.key for s in guessed], why))
        return warnings, {}, False
    # a run was made (or none was needed) and these still have no size: inside a function body, say
    excluded = {s.key: f"its input size is not known (it is in {scope_label(s.scope)}): its MACs are not counted" for s in guessed}
    if needs_macs:
        shown = ", ".join(list(excluded)[:3]) + (", …" if len(excluded) > 3 else "")
        warnings.append(f"{len(excluded)} layer(s) of unknown size are left as they are and not counted in the totals ({shown})")
    else:
        excluded = {}
    return warnings, {**idle, **excluded}, True


def nothing_to_decompose(sites: list[Site], allowed: tuple[Kind, ...]) -> str:
    """``nothing to decompose: 21 ConvInteger layers: quantized conv (ConvInteger)`` — the reasons, counted."""
    if not sites:
        return "nothing to decompose: the model has no Conv, ConvTranspose, Gemm or MatMul layer"
    counts: dict[tuple[str, str], int] = {}
    for site in sites:
        label = (site.node.op_type, site.why_not(allowed))
        counts[label] = counts.get(label, 0) + 1
    parts = sorted(counts.items(), key=lambda item: -item[1])
    shown = "; ".join(f"{n} {op} layer{'s' if n > 1 else ''}: {reason}" for (op, reason), n in parts[:3])
    return f"nothing to decompose: {shown}" + ("; …" if len(parts) > 3 else "")


def layer_report(site: Site, reason: str | None, counted: bool) -> LayerReport:
    """A site's entry in the report as it stands before any plan: its shape, MACs, where it is, and the reason
    it is left out (None: selected)."""
    shape = site.weight.shape if site.weight is not None else None
    macs = site.cost.macs if site.cost else 0
    return LayerReport(
        node=site.key,
        op_type=site.node.op_type,
        decomposed=False,
        reason=reason,
        macs_before=macs,
        macs_after=macs,
        weight=site.weight.name if site.weight else None,
        weight_shape=list(shape) if shape is not None else None,
        groups=site.groups if shape is not None else None,
        shape_known=site.shape_known,
        ran=site.ran,
        executions=site.executions,
        scope=scope_label(site.scope),
        counted=counted,
    )


def shapes_report(shapes: ModelShapes) -> dict[str, Any]:
    """Where the sizes came from (the report's ``shapes``): the source and reference input, what random values
    decided in the run, and with ``branches="all"`` the further runs that sized branches."""
    return {
        "source": shapes.source,
        "reference_from": shapes.reference_from,
        "reference_input": {name: list(shape) for name, shape in shapes.input_shapes().items()},
        "missing_inputs": dict(shapes.missing_inputs),
        "random_choices": [choice.to_dict() for choice in shapes.random_choices],
        "branches": shapes.branches,
        "branch_runs": list(shapes.branch_runs),
        "seconds": shapes.seconds,
    }


def control_flow_report(shapes: ModelShapes, sites: list[Site], layers: Mapping[str, LayerReport]) -> list[dict[str, Any]]:
    """Per If/Loop/Scan that holds layers: how it ran on the reference input, what sized each subgraph, and the
    MACs of each subgraph; for an If, also the MACs of each branch's path: the counted layers outside the other
    branch of this If and of every If it sits in (with ``branches="all"`` the totals hold every branch)."""
    out = []
    for flow in shapes.control_flow:
        branches: dict[str, dict[str, Any]] = {}
        for site in sites:
            step = next((label for key, label in site.scope.path if key == flow.key), None)
            if step is None:
                continue
            entry = branches.setdefault(
                step,
                {
                    "layers": 0,
                    "ran": bool(flow.runs.get(step)),
                    "sized_by": flow.sized_by.get(step),
                    "macs_before": 0,
                    "macs_after": 0,
                },
            )
            entry["layers"] += 1
            layer = layers[site.key]
            if layer.counted:
                entry["macs_before"] += layer.macs_before
                entry["macs_after"] += layer.macs_after
        if flow.op_type == "If":
            for label, entry in branches.items():
                chain = dict((*flow.path, (flow.key, label)))
                on_path = [
                    layers[site.key]
                    for site in sites
                    if layers[site.key].counted and all(chain.get(key, step) == step for key, step in site.scope.path)
                ]
                entry["path_macs_before"] = sum(layer.macs_before for layer in on_path)
                entry["path_macs_after"] = sum(layer.macs_after for layer in on_path)
        out.append({"node": flow.node, "op_type": flow.op_type, "runs": dict(flow.runs), "subgraphs": branches})
    return out
