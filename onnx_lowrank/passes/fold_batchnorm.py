"""Graph pass: fold inference-mode BatchNormalization into the Conv before it.

Math: for ``Y = Conv(X, W, B)`` followed by
``Z = γ · (Y − μ) / sqrt(σ² + ε) + β`` (per output channel ``n``),

    scale_n = γ_n / sqrt(σ²_n + ε)
    W'[n, ...] = scale_n · W[n, ...]
    B'_n = (B_n − μ_n) · scale_n + β_n        (B = 0 when the Conv has no bias)

gives ``Z = Conv(X, W', B')`` exactly. Folding first lets the decomposition see
the kernel the network really applies, and removes the BN's own cost.

Preconditions (a pair that fails one is left as it is):

* the Conv is in the default domain and its output feeds only this BN — no
  other node, graph output or subgraph reads it;
* the BN is in inference mode: ``training_mode`` is 0 (opset ≥ 14), only its
  first output is used, and ``spatial`` is 1 (opset < 9);
* the Conv weight and bias and the four BN inputs are constants (initializers
  or Constant nodes, maybe behind Identity/Cast — see :func:`resolve_weight`);
* the weight is floating point.

Why our own pass and not onnxscript's ``_fuse_batchnorm`` rule: that rule
needs a round trip of the whole model through onnx-ir, accepts only initializer
weights (TF and Paddle exports carry weights in Constant nodes), folds in the
weight's dtype (fp16 models lose precision in ``γ/σ``), and does not check
that the Conv output has no other reader. Here the arithmetic is float64, the
result is written in the weight's dtype, and the folded Conv keeps its name and
takes the BN's output name so everything downstream is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ._graph import Names, Scope, add_constant, attrs, iter_scopes, namespace_names, remove_unused, resolve_weight

__all__ = ["FoldResult", "fold_batchnorm"]

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class FoldResult:
    """``folded``: (conv node, BN node) names; ``refused``: BN node name → reason."""

    folded: list[tuple[str, str]]
    refused: dict[str, str]

    @property
    def modified(self) -> bool:
        return bool(self.folded)


def _uses(model: onnx.ModelProto) -> dict[tuple[int, str], int]:
    count: dict[tuple[int, str], int] = {}
    for scope in iter_scopes(model):
        for node in scope.nodes:
            for name in node.input:
                key = (scope.namespace, name)
                count[key] = count.get(key, 0) + 1
        outputs = [v.name for v in scope.graph.output] if scope.graph is not None else list(scope.function.output)  # type: ignore[union-attr]
        for name in outputs:
            key = (scope.namespace, name)
            count[key] = count.get(key, 0) + 1
    return count


def _check(bn: onnx.NodeProto, conv: onnx.NodeProto | None, scope: Scope, uses: dict[tuple[int, str], int]) -> str | None:
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return "input is not produced by a Conv"
    if uses.get((scope.namespace, conv.output[0]), 0) != 1:
        return "the Conv output has readers besides the BatchNormalization"
    bn_attrs = attrs(bn)
    if int(bn_attrs.get("training_mode", 0)) != 0:  # type: ignore[call-overload]
        return "BatchNormalization is in training mode"
    if int(bn_attrs.get("spatial", 1)) != 1:  # type: ignore[call-overload]
        return "BatchNormalization has spatial=0"
    if any(o and uses.get((scope.namespace, o), 0) for o in bn.output[1:]):
        return "BatchNormalization running statistics outputs are used"
    if len(bn.input) < 5:
        return "BatchNormalization lacks inputs"
    return None


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldResult]:
    """Fold every foldable Conv → BatchNormalization pair, in place."""
    result = FoldResult([], {})
    uses = _uses(model)
    names: dict[int, Names] | None = None
    touched: set[tuple[int, str]] = set()
    for scope in list(iter_scopes(model)):
        for bn in [n for n in scope.nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            conv = scope.producers.get(bn.input[0])
            reason = _check(bn, conv, scope, uses)
            if reason is None:
                assert conv is not None
                sources = [resolve_weight(name, scope) for name in [conv.input[1], *bn.input[1:5]]]
                has_bias = len(conv.input) > 2 and bool(conv.input[2])
                bias_source = resolve_weight(conv.input[2], scope) if has_bias else None
                labels = ("Conv weight", "BatchNormalization scale", "BatchNormalization bias", "mean", "variance", "Conv bias")
                bad = next(((label, s) for label, s in zip(labels, [*sources, bias_source], strict=True) if isinstance(s, str)), None)
                if bad is not None:
                    reason = f"{bad[0]} {bad[1].removeprefix('weight ')}"
                elif not isinstance(sources[0], str) and sources[0].data_type not in _FLOATS:
                    reason = "Conv weight is not floating point"
            if reason is not None:
                result.refused[bn.name or bn.output[0]] = reason
                continue
            assert conv is not None
            weight, gamma, beta, mean, var = (s.values.astype(np.float64) for s in sources)  # type: ignore[union-attr]
            eps = float(attrs(bn).get("epsilon", 1e-5))  # type: ignore[arg-type]
            scale = gamma / np.sqrt(var + eps)
            bias = bias_source.values.astype(np.float64) if bias_source is not None else np.zeros_like(mean)  # type: ignore[union-attr]
            folded_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            folded_b = (bias - mean) * scale + beta
            w_source = sources[0]
            assert not isinstance(w_source, str)
            # the weight keeps its storage dtype; the bias takes the dtype the Conv computes in
            compute_type = w_source.cast_to or w_source.data_type
            if names is None:
                names = namespace_names(model)
            ns = names[scope.namespace]
            index = next(i for i, n in enumerate(scope.nodes) if n is conv or n == conv)
            base = conv.name or conv.output[0]
            w_name, n1 = add_constant(
                model,
                ns,
                w_source.scope,
                scope,
                index,
                f"{base}.folded_weight",
                folded_w.astype(helper.tensor_dtype_to_np_dtype(w_source.data_type)),
                w_source.cast_to,
            )
            b_name, _ = add_constant(
                model,
                ns,
                w_source.scope,
                scope,
                index + n1,
                f"{base}.folded_bias",
                folded_b.astype(helper.tensor_dtype_to_np_dtype(compute_type)),
            )
            old_inputs = list(conv.input[1:]) + list(bn.input[1:])
            old_output = conv.output[0]
            del conv.input[1:]
            conv.input.extend([w_name, b_name])
            conv.output[0] = bn.output[0]
            scope.producers[bn.output[0]] = conv
            bn_index = next(i for i, n in enumerate(scope.nodes) if n is bn or n == bn)
            result.folded.append((conv.name or conv.output[0], bn.name or bn.output[0]))
            del scope.nodes[bn_index]
            if scope.graph is not None:  # the Conv's old output is gone; so is its value_info
                for i, value in enumerate(scope.graph.value_info):
                    if value.name == old_output:
                        del scope.graph.value_info[i]
                        break
            touched.update((scope.namespace, n) for n in old_inputs if n)
    if touched:
        remove_unused(model, touched)
    return model, result
