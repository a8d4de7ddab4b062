"""Which inputs' *values* decide what a model runs: the If branches, the Loop trip counts and the sizes set from values.

A sizing run on random values sizes the model for those values. For a float signal that is a fair stand-in,
but an integer or boolean input often is a setting — a sample rate, a step count, a flag — whose value picks
an ``If`` branch, sets a ``Loop``'s trip count or a ``Reshape``'s target, and so which layers run at which
size. :func:`value_decisions` finds those places, so a plan made on random values can say which of its
choices a random value made.

How: a forward pass over the graph (and its subgraphs, which read outer names) marks every tensor whose values
depend on the given inputs' values, and every tensor whose *shape* does (a ``Shape`` or ``Size`` node passes
on only the latter); a *decision* is an ``If`` whose condition, a ``Loop`` whose trip count or condition, or
an operand that sets an output size (``Reshape``'s shape, ``Slice``'s bounds, ``Range``, ``Tile``,
``Expand``, ``ConstantOfShape``, ``Pad``, ``Resize``, …) depends on their values. Only decisions that matter
to the layers are kept: the node holds a layer that carries MACs in a subgraph, or its outputs reach one.

Names are taken as unique across the model's graphs (exporters write them so); a subgraph's formal inputs
(a Loop body's iteration number, condition and carried values) take the marks of the node's inputs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

import onnx

from .graph import GraphPath, subgraphs

__all__ = ["SIZE_OPERANDS", "Decision", "value_decisions"]

# the operands whose values set the output's size, per op
SIZE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Pad": (1, 3),
    "Resize": (2, 3),
    "Upsample": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "NonZero": (0,),
    "Compress": (1,),
    "CenterCropPad": (1,),
}
_SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclass
class Decision:
    """A place where the values of ``inputs`` decide what runs: ``what`` is ``"branch"`` (an If's condition),
    ``"trip count"`` (a Loop's) or ``"sizes"`` (an operand that sets an output size)."""

    node: str  # the node's name, else its first output
    op_type: str
    what: str
    inputs: list[str]
    path: GraphPath  # the graph holding the node
    key: str  # its first output (what a GraphPath entry calls it)
    within: list[str] = field(default_factory=list)  # the control-flow nodes it sits in, outermost first ("the else_branch of If 'X'")


def _key(node: onnx.NodeProto) -> str:
    return node.output[0] if node.output else node.name


def _walk(graph: onnx.GraphProto, path: GraphPath = ()) -> Iterator[tuple[GraphPath, onnx.NodeProto]]:
    for node in graph.node:
        yield path, node
        for label, g in subgraphs(node):
            yield from _walk(g, (*path, (_key(node), label)))


def _holds(node: onnx.NodeProto, ops: Collection[str]) -> bool:
    return any(inner.op_type in ops for _, g in subgraphs(node) for _, inner in _walk(g))


class _Flow:
    """The marks: for each tensor name, the inputs its values (``value``) and its shape (``shape``) depend on."""

    def __init__(self, sources: Iterable[str]) -> None:
        self.value: dict[str, frozenset[str]] = {name: frozenset({name}) for name in sources}
        self.shape: dict[str, frozenset[str]] = {}
        self.decisions: list[tuple[GraphPath, onnx.NodeProto, str, frozenset[str]]] = []

    def _of(self, marks: dict[str, frozenset[str]], names: Iterable[str]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for name in names:
            if name:
                out |= marks.get(name, frozenset())
        return out

    def graph(self, graph: onnx.GraphProto, path: GraphPath, formal: frozenset[str] = frozenset()) -> None:
        for value in graph.input:  # a subgraph's formal inputs take the marks of the node's inputs
            if formal:
                self.value[value.name] = self.value.get(value.name, frozenset()) | formal
        for node in graph.node:
            self.node(node, path)

    def node(self, node: onnx.NodeProto, path: GraphPath) -> None:
        values = self._of(self.value, node.input)
        shapes = self._of(self.shape, node.input)
        op = node.op_type
        decided: frozenset[str] = frozenset()
        if op == "If" and node.input:
            decided, what = self._of(self.value, node.input[:1]), "branch"
        elif op == "Loop":
            decided, what = self._of(self.value, node.input[:2]), "trip count"
        elif op in SIZE_OPERANDS:
            decided, what = self._of(self.value, [node.input[i] for i in SIZE_OPERANDS[op] if i < len(node.input)]), "sizes"
        if decided:
            self.decisions.append((path, node, what, decided))
        inner_values: frozenset[str] = frozenset()
        inner_shapes: frozenset[str] = frozenset()
        for label, g in subgraphs(node):
            self.graph(g, (*path, (_key(node), label)), values | shapes)
            outs = [o.name for o in g.output]
            inner_values |= self._of(self.value, outs)
            inner_shapes |= self._of(self.shape, outs)
        out_shapes: frozenset[str] = frozenset()
        if op in _SHAPE_ONLY:
            out_values = shapes
        else:
            out_values = values | shapes | inner_values | inner_shapes
            out_shapes = shapes | inner_shapes | decided
        for name in node.output:
            if name:
                self.value[name], self.shape[name] = out_values, out_shapes


def _reaching(model: onnx.ModelProto, layers: Collection[str]) -> set[str]:
    """Names whose values reach the input of a layer (an op in ``layers``), in any graph of the model."""
    nodes = [node for _, node in _walk(model.graph)]
    needed: set[str] = {node.input[0] for node in nodes if node.op_type in layers and node.input}
    holders = [node for node in nodes if _holds(node, layers)]
    needed |= {name for node in holders for name in node.input}
    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            if not any(name in needed for name in node.output):
                continue
            wanted = set(node.input) | {o.name for _, g in subgraphs(node) for o in g.output}
            if not wanted <= needed:
                needed |= wanted
                changed = True
    return needed


def _within(path: GraphPath, names: dict[str, tuple[str, str]]) -> list[str]:
    """``path`` as words: ``["the else_branch of If '/If'"]``."""
    out = []
    for key, label in path:
        op, name = names.get(key, ("node", key))
        out.append(f"the {label} of {op} {name!r}")
    return out


def value_decisions(model: onnx.ModelProto, inputs: Iterable[str], layers: Collection[str]) -> list[Decision]:
    """The decisions that the values of ``inputs`` make and that matter to the layers (ops in ``layers``), in
    graph order (see the module docstring)."""
    sources = list(inputs)
    if not sources:
        return []
    flow = _Flow(sources)
    flow.graph(model.graph, ())
    reaching = _reaching(model, layers)
    names = {_key(node): (node.op_type, node.name or _key(node)) for _, node in _walk(model.graph)}
    out = []
    for path, node, what, decided in flow.decisions:
        matters = _holds(node, layers) or any(name in reaching for name in node.output)
        if matters:
            out.append(
                Decision(
                    node.name or _key(node),
                    node.op_type,
                    what,
                    [n for n in sources if n in decided],
                    path,
                    _key(node),
                    _within(path, names),
                )
            )
    return out
