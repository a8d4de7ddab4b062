"""Multiply-accumulate and parameter counts of a layer and of its decomposed forms.

Pure arithmetic on shapes; knows nothing of ONNX. Counts are per inference at
batch 1. Every decomposed form costs ``rank_macs[kind] · K`` MACs and
``rank_params[kind] · K`` weights (+ the bias), linear in the rank K, which is
all the allocator in :mod:`onnx_lowrank.ranks` needs.

Conv, kernel ``(N, C_g, *S, kw)``, ``g`` groups, input ``(*I, W_in)``, output ``(*O, W_out)``:

* original: ``N·C_g·|S|·kw·|O|·W_out``
* spatial pair (height geometry on the vertical conv, width on the horizontal):
  vertical ``(g·K, C_g, *S, 1)`` runs at the *input* width — the width stride
  belongs to the horizontal conv — ``g·K·C_g·|S|·|O|·W_in``; horizontal
  ``(N, K, 1.., kw)``: ``N·K·kw·|O|·W_out``.
* channel pair: ``(g·K, C_g, *S, kw)`` at the output size, then ``(N, K, 1..)``:
  ``g·K·C_g·|S|·kw·|O|·W_out + N·K·|O|·W_out``.

ConvTranspose, weight ``(C, N_g, *S, kw)``: every *input* pixel scatters into
``N_g·|S|·kw`` outputs: ``C·N_g·|S|·kw·|I|·W_in``. Its spatial pair: vertical
``(C, K, *S, 1)`` on the input, ``C·K·|S|·|I|·W_in``; horizontal ``(g·K, N_g, 1.., kw)``
on the vertical output ``(*O, W_in)``: ``g·K·N_g·kw·|O|·W_in``.

Fully connected, ``rows × in → out``: ``rows·in·out``; channel pair ``rows·K·(in + out)``.

Activations: ``activations`` is the number of elements a layer writes (its
output), ``rank_activations[kind] · K`` those of a pair's intermediate tensor —
the vertical conv's output ``(g·K, *O, W_in)``, the channel split's ``(g·K, *O, W_out)``,
a fully connected pair's ``rows × K``. They carry the memory traffic that MACs
do not count (see :func:`effective_macs`).

Layers the tool does not decompose still count in a model's totals, so that a
speedup is the one of the whole model as it runs: a product of two
activations (attention's ``Q·Kᵀ``), ``out_elements · inner``; a recurrent layer
(LSTM, GRU, RNN) over ``T`` steps, ``T·batch·dirs·gates·H·(I + H)`` with 4, 3
and 1 gates. A layer run several times per inference (in a ``Loop`` body, or
at several sizes) costs the sum of its runs: :func:`total_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .factorization import Kind

__all__ = ["LayerCost", "conv_cost", "conv_transpose_cost", "effective_macs", "fc_cost", "fixed_cost", "recurrent_cost", "total_cost"]


@dataclass(frozen=True)
class LayerCost:
    macs: int
    weights: int
    bias: int
    rank_macs: Mapping[Kind, int] = field(default_factory=dict)
    rank_params: Mapping[Kind, int] = field(default_factory=dict)
    activations: int = 0  # elements of the layer's output
    rank_activations: Mapping[Kind, int] = field(default_factory=dict)  # a pair's intermediate elements per unit of rank

    @property
    def params(self) -> int:
        return self.weights + self.bias

    def pair_macs(self, kind: Kind, rank: int) -> int:
        return self.rank_macs[kind] * rank

    def pair_params(self, kind: Kind, rank: int) -> int:
        return self.rank_params[kind] * rank + self.bias


def conv_cost(
    out_channels: int,
    in_per_group: int,
    kernel: tuple[int, ...],
    groups: int,
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    bias: bool,
) -> LayerCost:
    lead = math.prod(kernel[:-1])
    out_lead, out_pixels = math.prod(out_spatial[:-1]), math.prod(out_spatial)
    macs = out_channels * in_per_group * math.prod(kernel) * out_pixels
    spatial = groups * in_per_group * lead * out_lead * in_spatial[-1] + out_channels * kernel[-1] * out_pixels
    channel = groups * in_per_group * math.prod(kernel) * out_pixels + out_channels * out_pixels
    return LayerCost(
        macs=macs,
        weights=out_channels * in_per_group * math.prod(kernel),
        bias=out_channels if bias else 0,
        rank_macs={"spatial": spatial, "channel": channel},
        rank_params={
            "spatial": groups * in_per_group * lead + out_channels * kernel[-1],
            "channel": groups * in_per_group * math.prod(kernel) + out_channels,
        },
        activations=out_channels * out_pixels,
        rank_activations={"spatial": groups * out_lead * in_spatial[-1], "channel": groups * out_pixels},
    )


def conv_transpose_cost(
    in_channels: int,
    out_per_group: int,
    kernel: tuple[int, ...],
    groups: int,
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    bias: bool,
) -> LayerCost:
    lead = math.prod(kernel[:-1])
    in_pixels = math.prod(in_spatial)
    vertical = in_channels * lead * in_pixels
    horizontal = groups * out_per_group * kernel[-1] * math.prod(out_spatial[:-1]) * in_spatial[-1]
    return LayerCost(
        macs=in_channels * out_per_group * math.prod(kernel) * in_pixels,
        weights=in_channels * out_per_group * math.prod(kernel),
        bias=groups * out_per_group if bias else 0,
        rank_macs={"spatial": vertical + horizontal},
        rank_params={"spatial": in_channels * lead + groups * out_per_group * kernel[-1]},
        activations=groups * out_per_group * math.prod(out_spatial),
        rank_activations={"spatial": groups * math.prod(out_spatial[:-1]) * in_spatial[-1]},
    )


def fc_cost(rows: int, in_features: int, out_features: int, bias: int) -> LayerCost:
    return LayerCost(
        macs=rows * in_features * out_features,
        weights=in_features * out_features,
        bias=bias,
        rank_macs={"channel": rows * (in_features + out_features)},
        rank_params={"channel": in_features + out_features},
        activations=rows * out_features,
        rank_activations={"channel": rows},
    )


def fixed_cost(macs: int) -> LayerCost:
    """A layer that is never decomposed: its MACs count in the totals, it offers no split."""
    return LayerCost(macs=macs, weights=0, bias=0)


def recurrent_cost(gates: int, steps: int, batch: int, directions: int, input_size: int, hidden: int) -> LayerCost:
    return fixed_cost(steps * batch * directions * gates * hidden * (input_size + hidden))


def total_cost(costs: list[LayerCost]) -> LayerCost:
    """The cost of a layer run once per entry of ``costs`` (MACs add up; the weights are the same ones)."""
    first = costs[0]
    rank_macs = {kind: sum(c.rank_macs[kind] for c in costs) for kind in first.rank_macs}
    rank_activations = {kind: sum(c.rank_activations[kind] for c in costs) for kind in first.rank_activations}
    return LayerCost(
        sum(c.macs for c in costs),
        first.weights,
        first.bias,
        rank_macs,
        dict(first.rank_params),
        sum(c.activations for c in costs),
        rank_activations,
    )


def effective_macs(macs: float, nodes: int, written: float, per_node: float, per_element: float) -> float:
    """A layer's cost in MAC equivalents: its MACs, ``per_node`` for each node it runs as, and ``per_element`` for
    each activation element it writes (and the next node reads back). The constants are measured per machine
    class by the caller; with both 0 this is the MAC count."""
    return macs + per_node * nodes + per_element * written
