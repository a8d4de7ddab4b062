"""From a plan to the factors written per site, and what each layer's report says about them.

For every unit a plan decomposes, the factors of its chosen kind and rank are
computed (in threads: LAPACK releases the GIL) and their error measured as
stored: ``||W − W_K||_F / ||W||_F`` with the factors rounded to the weight's
dtype. With ``pad_to`` (``--pad-ranks``, per-layer policies) a Conv pair whose
rank does not fill whole channel blocks of onnxruntime's blocked CPU
convolution gets zero filters up to the next block, where that still saves
MACs: the zeros cost less than the layout reorders and plain kernel it would
run otherwise (``benchmarks/speed.py --parts paper``: VGG-16's conv1_1 at rank 5).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import helper

from ..factorization import Factors, padded, reconstruct
from ..passes import Site
from ..report import LayerReport
from .interface import LayerChoice
from .units import Unit, parallel_map

__all__ = ["layer_factors", "stored_error"]


def stored_error(site: Site, kernel: np.ndarray, factors: Factors) -> float:
    """``||W − W_K|| / ||W||`` for ``kernel`` (the site's, in conv layout), the factors rounded to the dtype they are written in."""
    assert site.weight is not None
    dtype = helper.tensor_dtype_to_np_dtype(site.weight.data_type)
    rounded = Factors(
        factors.kind,
        factors.rank,
        factors.first.astype(dtype).astype(np.float64),
        factors.second.astype(dtype).astype(np.float64),
        factors.singular_values,
    )
    w = kernel.astype(np.float64)
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return 0.0
    return float(np.linalg.norm(w - reconstruct(rounded, site.groups)) / norm)


def layer_factors(
    units: list[Unit],
    chosen: Mapping[str, LayerChoice],
    layers: dict[str, LayerReport],
    workers: int = 1,
    pad_to: int | None = None,
) -> list[tuple[Site, Factors]]:
    """The factors to write per site (computed in ``workers`` threads), filling in the layer reports."""

    def factor(unit: Unit) -> tuple[Factors, float]:
        choice = chosen[unit.key]
        assert choice.kind is not None
        factors = unit.decomposition(choice.kind).factors(choice.rank)
        site = unit.sites[0]
        error = stored_error(site, unit.kernel, factors)
        width = -(-factors.rank // pad_to) * pad_to if pad_to else factors.rank
        if width != factors.rank and site.groups == 1 and site.node.op_type == "Conv" and unit.rank_macs[choice.kind] * width < unit.macs:
            factors = padded(factors, width)
        return factors, error

    todo = [unit for unit in units if chosen[unit.key].kind is not None]
    results = dict(zip([u.key for u in todo], parallel_map(factor, todo, workers), strict=True))

    plan: list[tuple[Site, Factors]] = []
    for unit in units:
        choice = chosen[unit.key]
        for site in unit.sites:
            layers[site.key].full_rank = unit.decomposition(unit.kinds[0]).full_rank
            if choice.kind is None:
                layers[site.key].reason = choice.reason
        if choice.kind is None:
            continue
        kind = choice.kind
        factors, error = results[unit.key]
        for site in unit.sites:
            plan.append((site, factors))
            layer = layers[site.key]
            layer.decomposed = True
            layer.kind = kind
            layer.rank = factors.rank
            layer.full_rank = unit.decomposition(kind).full_rank
            layer.relative_error = error
            if kind in unit.data_aware:  # whitened spectrum: the predicted output error, not a kernel optimum
                layer.output_error = factors.relative_error
            else:
                layer.optimal_error = factors.relative_error
            width = factors.first.shape[0] // site.groups  # intermediate channels per group as stored, zero filters included
            layer.stored_rank = width if width != factors.rank else None
            layer.macs_after = site.cost.pair_macs(kind, width) if site.cost else 0
    return plan
