"""``inspect``: what each layer could give before anything is decided.

Per layer: its shape, groups and MACs, whether the options let it be decomposed (or why not), and the ranks
that keep 90/99/99.9 % of its kernel's energy with the speedup each would give that layer. The sizes are
found as a conversion finds them (:func:`onnx_lowrank.layers.model_sizes`); nothing is rewritten.
"""

from __future__ import annotations

from typing import Unpack

import onnx

from .config import DecomposeConfig, DecomposeKeywords
from .factorization import singular_values
from .layers import model_sizes
from .model_io import ModelLike, load_model
from .passes import find_sites, scope_label
from .ranks import energy_rank
from .report import InspectLayer
from .shapes import needs_input_shape_message

__all__ = ["INSPECT_ENERGIES", "inspect"]

INSPECT_ENERGIES = (0.9, 0.99, 0.999)


def inspect(model: ModelLike, config: DecomposeConfig | None = None, /, **options: Unpack[DecomposeKeywords]) -> list[InspectLayer]:
    """Per layer: shape, groups, MACs, and the ranks keeping 90/99/99.9 % of the energy with their speedups.

    The ranks are those of the first allowed kind of each layer (spatial where it applies); of the options
    only the shapes group (``input_shapes``, ``sample``, ``branches``) and the kinds count.
    """
    config = DecomposeConfig.from_keywords(config, **options)
    allowed = config.policy.allowed
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    sizes = model_sizes(proto, config.shapes)
    size_note = needs_input_shape_message(sizes.missing_inputs) if sizes.missing_inputs else None
    result = []
    for site in find_sites(proto, sizes):
        w = site.weight
        usable = site.available(allowed)
        layer = InspectLayer(
            node=site.key,
            op_type=site.node.op_type,
            weight_shape=list(w.shape) if w is not None else None,
            groups=site.groups if w is not None else None,
            macs=site.cost.macs if site.cost else 0,
            eligible=bool(usable),
            reason=None if usable else site.why_not(allowed),
            shape_known=site.shape_known or site.cost is None,
            size_note=None if site.shape_known else (size_note or f"it is in {scope_label(site.scope)}"),
        )
        if usable and site.cost is not None:
            kind = usable[0]
            try:
                s = singular_values(site.kernel(), site.groups, kind)
            except ValueError as exc:  # non-finite values in the weight
                layer.eligible, layer.reason = False, f"weight cannot be factored: {exc}"
                result.append(layer)
                continue
            layer.kind = kind
            layer.full_rank = int(s.shape[1])
            for e in INSPECT_ENERGIES:
                r = energy_rank(s, e)
                layer.energy_ranks[f"{e:g}"] = [r, site.cost.macs / max(site.cost.pair_macs(kind, r), 1)]
        result.append(layer)
    return result
