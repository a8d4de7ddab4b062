"""MAC-carrying layers that no pass decomposes, listed with their cost so the totals count what runs.

A speedup is the whole model's: a recurrent layer or a quantized product takes
its share of the work whether or not the tool touches it, so its MACs count in
``macs_before`` and ``macs_after`` alike (``--speedup S`` then has to find all
of its savings elsewhere). Costs (:mod:`onnx_lowrank.cost`):

* LSTM / GRU / RNN (``X`` of shape ``(T, B, I)``, or ``(B, T, I)`` with
  ``layout=1``): ``T·B·dirs·gates·H·(I + H)``, with 4, 3 and 1 gates;
* MatMulInteger ``(A, B)`` and QLinearMatMul ``(A, ·, ·, B)``: the product's MACs.

Quantized convolutions (QLinearConv, ConvInteger, a Conv behind
DequantizeLinear) are counted by the conv pass's own sites.
"""

from __future__ import annotations

import onnx

from ..cost import recurrent_cost
from ..graph import Scope, attrs, iter_scopes
from ..run_shapes import ModelShapes
from ._rewrite import Site, node_key
from .fc_decomposition import product_cost

__all__ = ["RECURRENT_GATES", "find_fixed_sites"]

RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
QUANTIZED_PRODUCTS = {"MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


def _recurrent(node: onnx.NodeProto, scope: Scope, shapes: ModelShapes, key: str) -> Site:
    site = Site(key, node, scope, reason=f"recurrent layer ({node.op_type}): not decomposed, its MACs count in the totals")
    a = attrs(node)
    hidden = int(a.get("hidden_size", 0))  # type: ignore[call-overload]
    directions = 2 if a.get("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    runs = site.sizes(shapes, node.input[0])
    if not hidden or runs is None or any(len(x) != 3 for x in runs):
        return site
    layout = int(a.get("layout", 0))  # type: ignore[call-overload]
    costs = []
    for x in runs:
        steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
        costs.append(recurrent_cost(RECURRENT_GATES[node.op_type], steps, batch, directions, x[2], hidden))
    site.cost = site.costed(costs)
    return site


def find_fixed_sites(model: onnx.ModelProto, shapes: ModelShapes) -> list[Site]:
    """Every recurrent layer and quantized matrix product of the model, in graph order, with its cost where known."""
    sites: list[Site] = []
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.domain not in ("", "ai.onnx"):
                continue
            key = node_key(node, scope.function)
            if node.op_type in RECURRENT_GATES:
                sites.append(_recurrent(node, scope, shapes, key))
            elif node.op_type in QUANTIZED_PRODUCTS:
                site = Site(key, node, scope, reason=f"quantized product ({node.op_type}): its MACs count in the totals")
                first, second = QUANTIZED_PRODUCTS[node.op_type]
                if len(node.input) > second:
                    site.cost = product_cost(site, shapes, first, second)
                sites.append(site)
    return sites
