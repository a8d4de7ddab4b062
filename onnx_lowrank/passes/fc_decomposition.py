"""Graph pass: replace fully connected layers (Gemm, MatMul) by two thin ones.

Math: a weight ``W`` (``out × in``) has the truncated SVD ``W ≈ Q·P`` with
``P = √S_K V_Kᵀ`` (``K × in``) and ``Q = U_K √S_K`` (``out × K``), the
Eckart–Young optimum of ``||W − W_K||_F`` (the "channel" kind of
:mod:`onnx_lowrank.factorization` on ``W`` seen as an ``(out, in, 1)`` kernel).

* ``Y = α·A'·B' + β·C`` (Gemm, ``B' = Wᵀ``) becomes
  ``T = Gemm(A, P, transA=transA, transB=1)`` then
  ``Y = Gemm(T, Q, C, alpha=α, beta=β, transB=1)``: ``transA`` stays on the
  first node, ``alpha``/``beta`` and the bias ``C`` on the second.
* ``Y = MatMul(X, B)`` with a constant ``B`` (``in × out``, ``W = Bᵀ``) becomes
  ``T = MatMul(X, Pᵀ)`` then ``Y = MatMul(T, Qᵀ)``.

Preconditions: the weight is the second input, a 2-D floating-point constant
(Identity/Cast chains allowed) with no empty dim; a MatMul's first input is not
constant; ``transA``/``transB`` are 0 or 1 and ``alpha``/``beta`` floats; where
the input's shape is known, a Gemm's input is a matrix and the input's inner
dim is the weight's (a layer that fails one is left as it is, with the reason). A
``K`` at or above ``in·out / (in + out)`` saves nothing, which the planner
sees in the cost model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..cost import fc_cost
from ..factorization import Factors, Kind
from ..shapes import Shape
from ._graph import InvalidAttribute, Scope, attr_float, attr_int, iter_scopes, resolve_weight, type_name
from ._rewrite import FLOAT_TYPES, Site, node_key

__all__ = ["FCSite", "find_fc_sites"]

FC_OPS = {"Gemm", "MatMul"}


class FCSite(Site):
    """A Gemm or MatMul whose second input is a constant matrix."""

    trans_a: bool = False
    trans_b: bool = False
    gemm_scales: dict[str, float] | None = None  # alpha/beta as given (absent ones are not written)

    @classmethod
    def build(cls, node: onnx.NodeProto, scope: Scope, shapes: dict[str, Shape], key: str) -> FCSite:
        site = cls(key, node, scope)
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            site.reason = f"{node.op_type} with {len(node.input)} inputs in domain {node.domain!r}"
            return site
        weight = resolve_weight(node.input[1], scope)
        if isinstance(weight, str):
            site.reason = weight
            return site
        w = weight.shape
        if weight.data_type not in FLOAT_TYPES or (weight.cast_to is not None and weight.cast_to not in FLOAT_TYPES):
            bad = weight.data_type if weight.data_type not in FLOAT_TYPES else weight.cast_to
            site.reason = f"weight type {type_name(bad)} is not floating point"  # type: ignore[arg-type]
            return site
        if len(w) != 2:
            site.reason = f"weight of shape {w} is not a matrix"
            return site
        if any(d < 1 for d in w):
            site.reason = f"weight of shape {w} is empty"
            return site
        if node.op_type == "MatMul" and not isinstance(resolve_weight(node.input[0], scope), str):
            site.reason = "both MatMul inputs are constant"
            return site
        site.weight = weight
        if node.op_type == "Gemm":
            try:
                flags = {name: attr_int(node, name, 0) for name in ("transA", "transB")}
                site.gemm_scales = {
                    name: attr_float(node, name, 1.0) for name in ("alpha", "beta") if any(a.name == name for a in node.attribute)
                }
            except InvalidAttribute as exc:
                site.reason = str(exc)
                return site
            flag = next((f"{name} {value}" for name, value in flags.items() if value not in (0, 1)), None)
            if flag is not None:
                site.reason = f"{flag} is not 0 or 1"
                return site
            site.trans_a, site.trans_b = bool(flags["transA"]), bool(flags["transB"])
        out_features, in_features = (w[0], w[1]) if site.trans_b else (w[1], w[0])
        x_shape = shapes.get(node.input[0])
        if x_shape is not None:
            inner = x_shape[0 if site.trans_a else -1] if x_shape else None
            if node.op_type == "Gemm" and len(x_shape) != 2:
                site.reason = f"Gemm input of rank {len(x_shape)}: Gemm takes a matrix"
                return site
            if inner is not None and inner != in_features:
                site.reason = f"input inner dim {inner} does not match the weight's {in_features} input features"
                return site
        rows = 1
        if x_shape is not None and all(d is not None for d in x_shape):
            dims = [int(d) for d in x_shape]  # type: ignore[arg-type]
            if node.op_type == "Gemm":
                rows = dims[1] if site.trans_a else dims[0]
            else:
                rows = math.prod(dims[:-1])
            site.shape_known = True
        bias = 0
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c_shape = shapes.get(node.input[2])
            bias = math.prod(int(d or 1) for d in c_shape) if c_shape else out_features
        site.cost = fc_cost(rows, int(in_features), int(out_features), bias)
        site.kinds = {"channel": None, "spatial": "fully connected layer: no spatial split"}
        return site

    def layout_shape(self) -> tuple[int, ...]:
        assert self.weight is not None
        rows, cols = self.weight.shape
        return (rows, cols, 1) if self.trans_b else (cols, rows, 1)

    def kernel(self) -> npt.NDArray[np.generic]:
        """``W`` (out × in) as an ``(out, in, 1)`` kernel."""
        assert self.weight is not None
        w = self.weight.values
        return (w if self.trans_b else w.T)[:, :, None]

    def storage(self, factors: Factors) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        p = factors.first[:, :, 0]  # (K, in)
        q = factors.second[:, :, 0]  # (out, K)
        if self.node.op_type == "Gemm":
            return p, q  # both read with transB=1
        return p.T, q.T

    def labels(self, kind: Kind) -> tuple[str, str]:
        return ("reduce", "expand")

    def emit(self, kind: Kind, first_w: str, second_w: str, middle: str, names: tuple[str, str]) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        node = self.node
        if node.op_type == "MatMul":
            return (
                helper.make_node("MatMul", [node.input[0], first_w], [middle], name=names[0], domain=node.domain),
                helper.make_node("MatMul", [middle, second_w], list(node.output), name=names[1], domain=node.domain),
            )
        first: dict[str, Any] = {"transB": 1}
        if self.trans_a:
            first["transA"] = 1
        second: dict[str, Any] = {"transB": 1, **(self.gemm_scales or {})}
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        return (
            helper.make_node("Gemm", [node.input[0], first_w], [middle], name=names[0], domain=node.domain, **first),
            helper.make_node("Gemm", [middle, second_w, *bias], list(node.output), name=names[1], domain=node.domain, **second),
        )


def find_fc_sites(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[Site]:
    """Every Gemm and MatMul with a constant weight; others are reported with a reason."""
    sites: list[Site] = []
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.op_type in FC_OPS:
                sites.append(FCSite.build(node, scope, shapes, node_key(node, scope.function)))
    return sites
