"""What every decomposable layer offers the planner, and the rewrite that replaces it by two nodes.

A :class:`Site` is one node of the model with a constant weight. It says which
kinds of split it allows (``kinds``: kind → ``None`` or the reason it cannot),
its cost model, the weight in *conv layout* ``(N, C_g, *spatial)`` that the
factorization works on, and how to turn factors back into two nodes.
:class:`Rewriter` does the graph surgery common to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..cost import LayerCost, total_cost
from ..factorization import Factors, Kind
from ..graph import Names, Scope, namespace_names
from ..run_shapes import ModelShapes
from ._graph import WeightSource, add_constant, remove_unused, resolve_weight

__all__ = ["FLOAT_TYPES", "NewNodes", "Rewriter", "Site", "apply_factors", "node_key", "scope_label"]

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def scope_label(scope: Scope) -> str:
    """Where a scope sits, for messages: ``the then_branch of If 'cond' in the body of Loop 'loop'``."""
    parts = []
    current: Scope | None = scope
    while current is not None:
        if current.owner is not None and current.path:
            owner = current.owner
            parts.append(f"the {current.path[-1][1]} of {owner.op_type} {owner.name or current.path[-1][0]!r}")
        elif current.function is not None:
            parts.append(f"function {current.function.name!r}")
        current = current.parent
    return " in ".join(parts) or "the main graph"


def node_key(node: onnx.NodeProto, function: onnx.FunctionProto | None = None) -> str:
    """The name a layer is reported and selected by: its node name, else its first output."""
    base = node.name or (node.output[0] if node.output else node.op_type)
    return f"{function.name}::{base}" if function is not None else base


@dataclass
class NewNodes:
    """Names of the two nodes that replaced a site."""

    first: str
    second: str


@dataclass(eq=False)
class Site:
    key: str
    node: onnx.NodeProto
    scope: Scope
    reason: str | None = None  # why no kind applies (None: at least one does)
    weight: WeightSource | None = None
    groups: int = 1
    kinds: dict[Kind, str | None] = field(default_factory=dict)
    cost: LayerCost | None = None
    shape_known: bool = False  # the cost counts sizes a run saw (or inference fixed for every input), not a guess
    ran: bool | None = None  # False: the layer did not run on the reference input; None: not known
    executions: int = 1  # how many times the layer ran per inference on the reference input
    input_shape: tuple[int, ...] | None = None  # its input on the reference input's first run: the size --measure times

    def sizes(self, shapes: ModelShapes, name: str) -> list[tuple[int, ...]] | None:
        """Each shape the tensor ``name`` had when this layer ran; records what was learnt on the site.

        ``None`` when no size is known, ``[]`` when the layer did not run on the reference input; either
        way the builder costs the layer at one output pixel (a cost the totals do not count, see ``shape_known``).
        """
        found = shapes.sizes(self.scope.path, name, self.scope.in_function)
        if found is None:
            return None
        self.ran = bool(found.shapes) if found.exact else None
        self.shape_known = found.exact and bool(found.shapes)
        self.executions = len(found.shapes)
        self.input_shape = found.shapes[0] if found.shapes else None
        return found.shapes

    def costed(self, costs: list[LayerCost]) -> LayerCost | None:
        """The cost of all of the layer's runs."""
        return total_cost(costs) if costs else None

    @property
    def weight_key(self) -> tuple[int, str] | None:
        return (self.weight.scope.namespace, self.weight.name) if self.weight else None

    def available(self, allowed: tuple[Kind, ...]) -> list[Kind]:
        return [k for k in allowed if k in self.kinds and self.kinds[k] is None]

    def why_not(self, allowed: tuple[Kind, ...]) -> str:
        """The reason none of ``allowed`` applies."""
        if self.reason:
            return self.reason
        reasons = [self.kinds[k] for k in allowed if self.kinds.get(k)]
        if reasons:
            return "; ".join(r for r in reasons if r)
        return f"no split of kind {', '.join(allowed)} for {self.node.op_type}"

    # --- to be provided by each op
    def kernel(self) -> npt.NDArray[np.generic]:
        """The weight in conv layout ``(N, C_g, *spatial)`` (groups along N)."""
        raise NotImplementedError

    def layout_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`kernel`, without reading the weight."""
        raise NotImplementedError

    def storage(self, factors: Factors) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The two factors in the layout the two new nodes read."""
        return factors.first, factors.second

    def labels(self, kind: Kind) -> tuple[str, str]:
        return ("vertical", "horizontal") if kind == "spatial" else ("channel_reduce", "channel_expand")

    def emit(self, kind: Kind, first_w: str, second_w: str, middle: str, names: tuple[str, str]) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        raise NotImplementedError


class Rewriter:
    """Applies factors to sites; one instance per model so shared weights are written once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.names: dict[int, Names] = namespace_names(model)
        self.written: dict[tuple[int, str, Kind, int], tuple[str, str]] = {}
        self.touched: set[tuple[int, str]] = set()

    def _store(self, site: Site, base: str, values: npt.NDArray[np.float64], before: int) -> tuple[str, int]:
        """A factor in the weight's own scope and dtype (and behind its Cast, if it had one)."""
        assert site.weight is not None
        source = site.weight
        stored = values.astype(helper.tensor_dtype_to_np_dtype(source.data_type))
        return add_constant(self.model, self.names[site.scope.namespace], source.scope, site.scope, before, base, stored, source.cast_to)

    def apply(self, site: Site, factors: Factors) -> NewNodes:
        assert site.weight is not None
        node, scope = site.node, site.scope
        names = self.names[scope.namespace]
        index = next(i for i, n in enumerate(scope.nodes) if n is node or n == node)
        labels = site.labels(factors.kind)
        base = node.name or node.output[0]
        cache_key = (site.weight.scope.namespace, site.weight.name, factors.kind, factors.rank)
        cached = self.written.get(cache_key)
        # a shared weight is factored once; Constant-node factors (function bodies) must precede each reader, so
        # only initializers are reused
        if cached is not None and site.weight.scope.graph is not None:
            first_w, second_w = cached
        else:
            first_values, second_values = site.storage(factors)
            first_w, n1 = self._store(site, f"{base}/{labels[0]}.weight", first_values, index)
            second_w, n2 = self._store(site, f"{base}/{labels[1]}.weight", second_values, index + n1)
            index += n1 + n2
            self.written[cache_key] = (first_w, second_w)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = resolve_weight(bias_name, scope) if bias_name else None
        stored_bias = None
        if bias is not None and not isinstance(bias, str) and bias.folded:
            # a bias computed from constants (a zero bias built from the weight's shape, say) is stored as the
            # constant it is: left as an expression it would keep reading the original weight, which then stays
            stored_bias, inserted = add_constant(self.model, names, bias.scope, scope, index, f"{base}.bias", bias.values, bias.cast_to)
            index += inserted
        middle = names.fresh(f"{base}/{labels[0]}_output")
        first, second = site.emit(
            factors.kind, first_w, second_w, middle, (names.fresh(f"{base}/{labels[0]}"), names.fresh(f"{base}/{labels[1]}"))
        )
        if stored_bias is not None:
            for new in (first, second):
                for i, name in enumerate(new.input):
                    if name == bias_name:
                        new.input[i] = stored_bias
            self.touched.add((scope.namespace, bias_name))
        for new in (first, second):
            new.doc_string = node.doc_string
            new.metadata_props.extend(node.metadata_props)
        del scope.nodes[index]
        scope.nodes.insert(index, second)
        scope.nodes.insert(index, first)
        scope.producers[middle] = first
        for out in node.output:
            scope.producers[out] = second
        self.touched.add((scope.namespace, node.input[1]))
        return NewNodes(first.name, second.name)

    def finish(self) -> None:
        remove_unused(self.model, self.touched)


def apply_factors(model: onnx.ModelProto, plan: list[tuple[Site, Factors]]) -> tuple[onnx.ModelProto, dict[str, NewNodes]]:
    """Rewrite ``model`` in place; return it and the new node names per site key."""
    rewriter = Rewriter(model)
    made = {site.key: rewriter.apply(site, factors) for site, factors in plan}
    rewriter.finish()
    return model, made
