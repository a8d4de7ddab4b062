"""Multiply-accumulate and parameter counts of a conv and of its decomposed forms.

Pure arithmetic on shapes; knows nothing of ONNX. A conv with kernel
``(N, C_g, *S, kw)``, ``g`` groups, input spatial size ``(*I, W_in)`` and output
spatial size ``(*O, W_out)`` costs ``N·C_g·|S|·kw·|O|·W_out`` MACs.

Spatial pair at rank K (height strides, dilations and pads on the vertical conv,
width ones on the horizontal conv):

* vertical ``(g·K, C_g, *S, 1)``: its output is ``(*O, W_in)`` — it runs at the
  full input width, since the width stride belongs to the horizontal conv;
  ``g·K·C_g·|S|·|O|·W_in`` MACs.
* horizontal ``(N, K, 1.., kw)``: ``N·K·kw·|O|·W_out`` MACs.

Channel pair at rank K: ``(g·K, C_g, *S, kw)`` at the output size, then
``(N, K, 1..)`` pointwise: ``g·K·C_g·|S|·kw·|O|·W_out + N·K·|O|·W_out``.

Both are linear in K, so a layer's cost is ``rank_cost · K`` and the allocator
in :mod:`onnx_lowrank.ranks` only needs ``rank_cost`` and ``macs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .factorization import Kind

__all__ = ["ConvCost"]


@dataclass(frozen=True)
class ConvCost:
    """MAC and parameter model of one conv (batch 1).

    ``in_spatial``/``out_spatial`` are the input and output spatial sizes; when a
    model's spatial size is unknown they are per output pixel (``out`` all 1 and
    the input width = the width stride), which keeps ratios right.
    """

    out_channels: int
    in_channels_per_group: int
    kernel: tuple[int, ...]
    groups: int
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    has_bias: bool

    @property
    def macs(self) -> int:
        return self.out_channels * self.in_channels_per_group * math.prod(self.kernel) * math.prod(self.out_spatial)

    @property
    def params(self) -> int:
        weight = self.out_channels * self.in_channels_per_group * math.prod(self.kernel)
        return weight + (self.out_channels if self.has_bias else 0)

    def rank_macs(self, kind: Kind) -> int:
        """MACs added by each unit of rank (the pair costs ``rank_macs · K``)."""
        lead = math.prod(self.kernel[:-1])
        out_lead = math.prod(self.out_spatial[:-1])
        out_pixels = math.prod(self.out_spatial)
        if kind == "spatial":
            vertical = self.groups * self.in_channels_per_group * lead * out_lead * self.in_spatial[-1]
            horizontal = self.out_channels * self.kernel[-1] * out_pixels
            return vertical + horizontal
        first = self.groups * self.in_channels_per_group * math.prod(self.kernel) * out_pixels
        return first + self.out_channels * out_pixels

    def rank_params(self, kind: Kind) -> int:
        """Weights added by each unit of rank (bias excluded)."""
        lead = math.prod(self.kernel[:-1])
        if kind == "spatial":
            return self.groups * self.in_channels_per_group * lead + self.out_channels * self.kernel[-1]
        return self.groups * self.in_channels_per_group * math.prod(self.kernel) + self.out_channels

    def pair_macs(self, kind: Kind, rank: int) -> int:
        return self.rank_macs(kind) * rank

    def pair_params(self, kind: Kind, rank: int) -> int:
        return self.rank_params(kind) * rank + (self.out_channels if self.has_bias else 0)
