"""Every MAC-carrying node of a model, found by the passes that know each kind of layer."""

from __future__ import annotations

import onnx

from ..run_shapes import ModelShapes
from ._rewrite import Site
from .conv_decomposition import find_conv_sites
from .fc_decomposition import find_fc_sites
from .fixed_layers import find_fixed_sites

__all__ = ["find_sites"]


def find_sites(model: onnx.ModelProto, shapes: ModelShapes) -> list[Site]:
    """Every MAC-carrying node of the model — conv-like, fully connected, then the layers no pass decomposes
    (recurrent layers, quantized products) — each under a unique key.

    Exporters sometimes repeat node names; a repeated key gets ``#2``, ``#3``, … in graph order.
    """
    sites = [*find_conv_sites(model, shapes), *find_fc_sites(model, shapes), *find_fixed_sites(model, shapes)]
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.key, 0) + 1
        seen[site.key] = count
        if count > 1:
            site.key = f"{site.key}#{count}"
    return sites
