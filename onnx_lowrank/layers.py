"""A model's decomposable layers: prepared once, selected per plan with the reason for every layer left out.

:func:`prepare` makes a model ready for any number of plans: BatchNormalization
folded, the sizes that run resolved (:mod:`onnx_lowrank.run_shapes`) and every
MAC-carrying node found (:func:`onnx_lowrank.passes.find_sites`).
:func:`select_layers` then applies one conversion's policy: the layers its
splits, name filters and ranks file allow, the sizes it needs (a plan by MACs
on sizes no run could fix is refused, naming the inputs that need
``--input-shape``), grouped into allocation units. Every layer left out keeps
its reason, and the report's entries (:func:`layer_report`) start here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from .config import PolicyConfig, ShapeConfig
from .errors import LowRankError
from .factorization import Kind
from .model_io import count_params
from .passes import Site, find_sites, fold_batchnorm, scope_label
from .planning import SharedDecompositions, Unit, make_units, screen_for_macs
from .report import LayerReport, unsized_warning
from .run_shapes import ModelShapes, resolve_shapes
from .shapes import needs_input_shape_message

__all__ = [
    "Prepared",
    "Selection",
    "control_flow_report",
    "layer_report",
    "nothing_to_decompose",
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


def prepare(
    proto: onnx.ModelProto,
    *,
    shapes: ShapeConfig | None = None,
    fold_bn: bool = True,
    sizes: ModelShapes | None = None,
    reference: Mapping[str, Any] | None = None,
) -> Prepared:
    """Fold BatchNormalization in ``proto`` (in place), resolve the sizes that run and find the sites.

    ``sizes``: sizes resolved already (by :func:`onnx_lowrank.run_shapes.resolve_shapes`); ``reference``: the
    input to size the model on (the first calibration sample, say), else a random one of ``shapes``."""
    params_before = count_params(proto)
    folded: list[tuple[str, str]] = []
    kept: dict[str, str] = {}
    if fold_bn:
        proto, fold = fold_batchnorm(proto)
        folded, kept = fold.folded, fold.refused
    input_shapes = shapes.input_shapes if shapes is not None else None
    model_shapes = sizes if sizes is not None else resolve_shapes(proto, input_shapes, reference)
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


def size_check(sites: list[Site], shapes: ModelShapes, needs_macs: bool, allow_unknown: bool) -> tuple[list[str], dict[str, str], bool]:
    """What the sizes allow: warnings, layers to leave alone for want of a size (key → reason), and whether the
    totals are exact (``False``: layers of unknown size are counted at one output pixel, by request).

    A plan by MACs on sizes that no run could fix is refused, naming the inputs that need ``--input-shape``.
    """
    warnings = list(shapes.warnings)
    # a layer that did not run (an If branch the reference input does not take) has no size to plan by
    idle = {s.key: f"does not run on the reference input: it is in {scope_label(s.scope)}" for s in sites if s.ran is False}
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
    """Where the sizes came from (the report's ``shapes``)."""
    return {
        "source": shapes.source,
        "reference_from": shapes.reference_from,
        "reference_input": {name: list(shape) for name, shape in shapes.input_shapes().items()},
        "missing_inputs": dict(shapes.missing_inputs),
        "seconds": shapes.seconds,
    }


def control_flow_report(shapes: ModelShapes, sites: list[Site], layers: Mapping[str, LayerReport]) -> list[dict[str, Any]]:
    """Per If/Loop/Scan that holds layers: how it ran on the reference input, and the MACs of each subgraph."""
    out = []
    for flow in shapes.control_flow:
        branches: dict[str, dict[str, Any]] = {}
        for site in sites:
            step = next((label for key, label in site.scope.path if key == flow.key), None)
            if step is None:
                continue
            entry = branches.setdefault(step, {"layers": 0, "ran": bool(flow.runs.get(step)), "macs_before": 0, "macs_after": 0})
            entry["layers"] += 1
            layer = layers[site.key]
            if layer.counted:
                entry["macs_before"] += layer.macs_before
                entry["macs_after"] += layer.macs_after
        out.append({"node": flow.node, "op_type": flow.op_type, "runs": dict(flow.runs), "subgraphs": branches})
    return out
