"""What a conversion did, per layer and in total; the same fields as ``--report`` JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["InspectLayer", "LayerReport", "Report", "unsized_warning"]


@dataclass
class LayerReport:
    """One conv-like node of the input model.

    ``relative_error`` is ``||W − W_K||_F / ||W||_F`` measured on the factors as
    stored (in the model's dtype); ``optimal_error`` is the Eckart–Young optimum
    from the singular values (data-free factors only). ``macs_*`` are per inference at batch 1.
    """

    node: str
    op_type: str
    decomposed: bool
    reason: str | None
    kind: str | None = None
    rank: int | None = None
    full_rank: int | None = None
    relative_error: float | None = None
    optimal_error: float | None = None
    macs_before: int = 0
    macs_after: int = 0
    vertical_node: str | None = None
    horizontal_node: str | None = None
    weight: str | None = None
    weight_shape: list[int] | None = None
    groups: int | None = None
    shape_known: bool = False  # the MACs count sizes seen in a run (or fixed for every input), not a guess
    ran: bool | None = None  # False: the layer did not run on the reference input (an If branch not taken)
    executions: int = 1  # runs per inference on the reference input (a Loop body's trip count)
    scope: str = "the main graph"  # where the node is: the main graph, a branch of an If, a Loop body, a function
    counted: bool = True  # its MACs are in the report's totals
    stored_rank: int | None = None  # the pair's intermediate channels when zero filters pad the rank to a kernel block
    quantized: str | None = None  # with quantize: the form its node(s) run in ("int8 (QDQ)", "ConvInteger", "float")
    # with calibration data: the relative output error on it (||ΔW x|| / ||W x||, predicted from the input
    # statistics; after the refit, as measured on its inputs in the converted model), and the layer's gain
    # from output error to the model's outputs (None: not measured)
    output_error: float | None = None
    gain: float | None = None

    @property
    def mac_ratio(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else math.nan


@dataclass
class Report:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[LayerReport] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    folded_batchnorms: list[str] = field(default_factory=list)  # BatchNormalization nodes folded into their Conv
    kept_batchnorms: dict[str, str] = field(default_factory=dict)  # BatchNormalization nodes not folded -> why
    warnings: list[str] = field(default_factory=list)  # what the user should know about the plan (one line each)
    latency: dict[str, Any] = field(default_factory=dict)  # what the plan was made by, and the result timed: threads, runs, ms, ratio
    calibration: dict[str, Any] = field(default_factory=dict)  # with calibration data: samples, sensitivity cost, refit per layer
    mobile: dict[str, Any] = field(default_factory=dict)  # with mobile_safe: coverage before/after, layers kept whole
    quantization: dict[str, Any] = field(default_factory=dict)  # with quantize: mode, types, samples, nodes quantized
    seconds: float = 0.0
    macs_exact: bool = True  # False: layers of unknown size are counted at one output pixel (--allow-unknown-shapes)
    # where the sizes came from: source, reference input, missing inputs, what random values decided (random_choices),
    # the further runs that sized If branches (branch_runs, with --branches all)
    shapes: dict[str, Any] = field(default_factory=dict)
    # per If/Loop/Scan holding layers: runs, per subgraph what sized it and its MACs (for an If branch, of its path too)
    control_flow: list[dict[str, Any]] = field(default_factory=list)
    notice: str | None = None  # "nothing to decompose: …" when no layer of the model can be decomposed, and why
    # what the conversion did to the answers: per output the measure and value on held-back calibration samples
    # ("outputs", "samples", "data"), or "not_measured" and why
    answers: dict[str, Any] = field(default_factory=dict)
    # with a fine-tune: what trained and how long, each output's loss, the early stopping's held-back metrics, the
    # answers before and after ("answers": "before", "after" on the samples of ``answers``), the equivalence and
    # write-back checks with their tolerance; or "skipped" and why
    finetune: dict[str, Any] = field(default_factory=dict)
    # with an accuracy budget (--max-drop): every target searched (MACs cut, measured speedup, drop) and the one kept
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def mac_ratio(self) -> float:
        """MACs that run on the reference input, before / after (every MAC-carrying layer counted; NaN when none are known)."""
        return self.macs_before / self.macs_after if self.macs_after else math.nan

    @property
    def decomposed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decomposed]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mac_ratio"] = self.mac_ratio if self.macs_after else None  # JSON has no NaN
        for layer in data["layers"]:
            layer["mac_ratio"] = layer["macs_before"] / layer["macs_after"] if layer["macs_after"] else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class InspectLayer:
    """One layer as ``inspect`` sees it; ``energy_ranks`` maps an energy to ``[rank, layer MAC ratio]``."""

    node: str
    op_type: str
    weight_shape: list[int] | None
    groups: int | None
    macs: int
    eligible: bool
    reason: str | None
    full_rank: int | None = None
    kind: str | None = None
    energy_ranks: dict[str, list[float]] = field(default_factory=dict)
    shape_known: bool = True  # False: the input's size is unknown and ``macs`` counts one output pixel
    size_note: str | None = None  # why the size is unknown, and what would fix it


def unsized_warning(nodes: list[str], why: str) -> str:
    """The line that says the MACs of layers whose input size is unknown count one output pixel."""
    shown = ", ".join(nodes[:3]) + (", …" if len(nodes) > 3 else "")
    return (
        f"{len(nodes)} layer(s) have an input of unknown size ({shown}): their MACs are counted at one output pixel, "
        f"so layers at different resolutions weigh alike in the plan and the totals ({why})"
    )
