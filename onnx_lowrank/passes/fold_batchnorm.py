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
  or Constant nodes, maybe behind Identity/Cast — see :func:`resolve_weight`)
  whose data holds the dims they declare;
* the weight is floating point, the four BN parameters and the Conv bias have
  one value per output channel, and the scale ``γ/sqrt(σ² + ε)``, the folded
  weight (in its dtype) and the folded bias are finite.

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
import numpy.typing as npt
import onnx
from onnx import helper

from ..graph import InvalidAttribute, Names, Scope, attr_float, attr_int, iter_scopes, namespace_names
from ._graph import WeightSource, add_constant, remove_unused, resolve_weight

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
    if len(conv.input) < 2 or not conv.output or not conv.output[0]:
        return "the Conv has no weight input or no output"
    if uses.get((scope.namespace, conv.output[0]), 0) != 1:
        return "the Conv output has readers besides the BatchNormalization"
    try:
        if attr_int(bn, "training_mode", 0) != 0:
            return "BatchNormalization is in training mode"
        if attr_int(bn, "spatial", 1) != 1:
            return "BatchNormalization has spatial=0"
        attr_float(bn, "epsilon", 1e-5)
    except InvalidAttribute as exc:
        return f"BatchNormalization {exc}"
    if any(o and uses.get((scope.namespace, o), 0) for o in bn.output[1:]):
        return "BatchNormalization running statistics outputs are used"
    if len(bn.input) < 5 or not all(bn.input[:5]):
        return "BatchNormalization lacks inputs"
    if not bn.output or not bn.output[0]:
        return "BatchNormalization has no output"
    return None


_LABELS = ("Conv weight", "BatchNormalization scale", "BatchNormalization bias", "mean", "variance", "Conv bias")


def _folded(
    sources: list[WeightSource], bias_source: WeightSource | None, epsilon: float
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]] | str:
    """The folded weight (in the weight's dtype) and bias (in the dtype the Conv computes in), or why the pair cannot be folded."""
    try:
        weight, gamma, beta, mean, var = (s.values.astype(np.float64) for s in sources)
        bias = bias_source.values.astype(np.float64) if bias_source is not None else None
    except ValueError as exc:  # data that does not hold the declared dims
        return str(exc)
    channels = weight.shape[0] if weight.ndim else 0
    for label, values in zip(_LABELS[1:], (gamma, beta, mean, var, bias), strict=True):
        if values is not None and values.shape != (channels,):
            return f"{label} has shape {list(values.shape)} for {channels} output channels"
    with np.errstate(all="ignore"):  # non-finite results are refused below, not warned about
        scale = gamma / np.sqrt(var + epsilon)
        folded_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        folded_b = ((bias if bias is not None else np.zeros_like(mean)) - mean) * scale + beta
        stored_w = folded_w.astype(helper.tensor_dtype_to_np_dtype(sources[0].data_type))
        stored_b = folded_b.astype(helper.tensor_dtype_to_np_dtype(sources[0].cast_to or sources[0].data_type))
    if not np.all(np.isfinite(scale)):
        return "variance + epsilon is not positive (or a parameter is NaN/Inf): the scale is not finite"
    if not (np.all(np.isfinite(stored_w)) and np.all(np.isfinite(stored_b))):
        return "the folded weight or bias is not finite in the weight's dtype"
    return stored_w, stored_b


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldResult]:
    """Fold every foldable Conv → BatchNormalization pair, in place."""
    result = FoldResult([], {})
    uses = _uses(model)
    names: dict[int, Names] | None = None
    touched: set[tuple[int, str]] = set()
    for scope in list(iter_scopes(model)):
        for bn in [n for n in scope.nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            conv = scope.producers.get(bn.input[0]) if bn.input else None
            reason = _check(bn, conv, scope, uses)
            folded: tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]] | str | None = None
            if reason is None:
                assert conv is not None
                sources = [resolve_weight(name, scope) for name in [conv.input[1], *bn.input[1:5]]]
                has_bias = len(conv.input) > 2 and bool(conv.input[2])
                bias_source = resolve_weight(conv.input[2], scope) if has_bias else None
                bad = next(((label, s) for label, s in zip(_LABELS, [*sources, bias_source], strict=True) if isinstance(s, str)), None)
                resolved = [s for s in sources if not isinstance(s, str)]
                if bad is not None:
                    reason = f"{bad[0]} {bad[1].removeprefix('weight ')}"
                elif resolved[0].data_type not in _FLOATS:
                    reason = "Conv weight is not floating point"
                else:
                    epsilon = attr_float(bn, "epsilon", 1e-5)  # its type was checked with the other attributes
                    folded = _folded(resolved, bias_source if not isinstance(bias_source, str) else None, epsilon)
                    if isinstance(folded, str):
                        reason = folded
            if reason is not None or folded is None or isinstance(folded, str):
                result.refused[bn.name or (bn.output[0] if bn.output else "") or "BatchNormalization"] = str(reason)
                continue
            assert conv is not None
            folded_w, folded_b = folded
            w_source = resolved[0]
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
                folded_w,  # in the weight's storage dtype, behind its Cast if it had one
                w_source.cast_to,
            )
            b_name, _ = add_constant(
                model,
                ns,
                w_source.scope,
                scope,
                index + n1,
                f"{base}.folded_bias",
                folded_b,  # in the dtype the Conv computes in
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
