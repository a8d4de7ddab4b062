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
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..cost import LayerCost, fc_cost, fixed_cost
from ..factorization import Factors, Kind
from ..graph import InvalidAttribute, Scope, attr_float, attr_int, iter_scopes, type_name
from ..run_shapes import ModelShapes
from ._graph import resolve_weight
from ._rewrite import FLOAT_TYPES, Site, node_key

__all__ = ["FCSite", "find_fc_sites", "product_cost", "product_macs"]

FC_OPS = {"Gemm", "MatMul"}


class FCSite(Site):
    """A Gemm or MatMul whose second input is a constant matrix."""

    trans_a: bool = False
    trans_b: bool = False
    gemm_scales: dict[str, float] | None = None  # alpha/beta as given (absent ones are not written)

    @classmethod
    def build(cls, node: onnx.NodeProto, scope: Scope, shapes: ModelShapes, key: str) -> FCSite:
        site = cls(key, node, scope)
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            site.reason = f"{node.op_type} with {len(node.input)} inputs in domain {node.domain!r}"
            return site
        weight = resolve_weight(node.input[1], scope)
        if isinstance(weight, str):
            site.reason = weight
            site.cost = product_cost(site, shapes)
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
        runs = site.sizes(shapes, node.input[0])
        planned = shapes.planning.get(node.input[0])
        checked: list[tuple[int | None, ...]] = list(runs) if runs else ([planned] if planned is not None else [])
        for x_shape in checked:
            inner = x_shape[0 if site.trans_a else -1] if x_shape else None
            if node.op_type == "Gemm" and len(x_shape) != 2:
                site.reason = f"Gemm input of rank {len(x_shape)}: Gemm takes a matrix"
                return site
            if inner is not None and inner != in_features:
                site.reason = f"input inner dim {inner} does not match the weight's {in_features} input features"
                return site
        bias = 0
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c_shape = shapes.planning.get(node.input[2])
            bias = math.prod(int(d or 1) for d in c_shape) if c_shape else out_features
        rows = [_rows(node.op_type, site.trans_a, shape) for shape in runs] if runs else [1]  # unknown or did not run: one row
        site.cost = site.costed([fc_cost(r, int(in_features), int(out_features), bias) for r in rows])
        if site.reason is None:
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


def _rows(op_type: str, trans_a: bool, x_shape: tuple[int, ...]) -> int:
    """Rows the weight multiplies: every vector of a MatMul's leading axes; a Gemm's M."""
    if op_type == "Gemm":
        return int(x_shape[1] if trans_a else x_shape[0]) if len(x_shape) == 2 else 1
    return math.prod(x_shape[:-1]) if x_shape else 1


def product_macs(op_type: str, trans: tuple[bool, bool], a: Sequence[int], b: Sequence[int]) -> int | None:
    """MACs of ``A·B`` (MatMul with numpy broadcasting, or Gemm with its transposes ``trans``); None for shapes
    that do not fit."""
    if op_type == "Gemm":
        if len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if trans[0] else (a[0], a[1])
        n = b[0] if trans[1] else b[1]
        return int(m * k * n)
    if not a or not b:
        return None
    a2 = list(a) if len(a) > 1 else [1, a[0]]
    b2 = list(b) if len(b) > 1 else [b[0], 1]
    try:
        batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    except ValueError:
        return None
    return int(math.prod(batch) * a2[-2] * a2[-1] * b2[-1])


def product_cost(site: Site, shapes: ModelShapes, first: int = 0, second: int = 1) -> LayerCost | None:
    """MACs of a product whose operands are not a constant weight (attention's ``Q·Kᵀ``): not decomposed, but counted."""
    node = site.node
    try:
        trans = (bool(attr_int(node, "transA", 0)), bool(attr_int(node, "transB", 0))) if node.op_type == "Gemm" else (False, False)
    except InvalidAttribute:
        return None
    a_runs = site.sizes(shapes, node.input[first])
    b_sizes = shapes.sizes(site.scope.path, node.input[second], site.scope.in_function)
    if a_runs is None or b_sizes is None:
        return None
    b_runs = b_sizes.shapes * len(a_runs) if len(b_sizes.shapes) == 1 else b_sizes.shapes  # a constant operand is one shape
    if len(b_runs) != len(a_runs):
        return None
    op = "Gemm" if node.op_type == "Gemm" else "MatMul"
    macs = [product_macs(op, trans, a, b) for a, b in zip(a_runs, b_runs, strict=True)]
    if any(m is None for m in macs):
        return None
    return site.costed([fixed_cost(int(m)) for m in macs if m is not None])


def find_fc_sites(model: onnx.ModelProto, shapes: ModelShapes) -> list[Site]:
    """Every Gemm and MatMul with a constant weight; others are reported with a reason."""
    sites: list[Site] = []
    for scope in iter_scopes(model):
        for node in scope.nodes:
            if node.op_type in FC_OPS:
                sites.append(FCSite.build(node, scope, shapes, node_key(node, scope.function)))
    return sites
