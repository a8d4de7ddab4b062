"""Walking an ONNX model: its graphs, subgraphs and function bodies, the names they use, node attributes.

A *scope* is a graph or function body with the outer scopes its nodes can see;
a *namespace* is the main graph with its nested subgraphs, or one model-local
function with its nested subgraphs: names are unique within it. Attributes are
read by type: one of the wrong type, given twice or referring to a function
attribute is refused (:class:`InvalidAttribute`), and the caller turns that into
the reason a layer is left as it is.

This module reads models and knows nothing of the conversion; the graph passes,
the sizing run and calibration build on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import onnx
from onnx import helper

__all__ = [
    "GraphPath",
    "InvalidAttribute",
    "Names",
    "Scope",
    "attr_float",
    "attr_int",
    "attr_ints",
    "attr_string",
    "attrs",
    "iter_scopes",
    "namespace_names",
    "subgraphs",
    "type_name",
]

# Where a subgraph sits: for each control-flow node from the main graph down, (the node's first output, the
# attribute holding the subgraph — "then_branch", "else_branch", "body", or "name[i]" for a list of graphs).
# First outputs are unique in a model, so a path names one subgraph in the model and in any copy of it.
GraphPath = tuple[tuple[str, str], ...]


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The node's subgraphs with the attribute label :data:`GraphPath` uses."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


@dataclass(eq=False)
class Scope:
    """A graph or function body, with the outer scopes its nodes can see."""

    nodes: onnx.RepeatedCompositeFieldContainer[onnx.NodeProto]  # type: ignore[name-defined]
    graph: onnx.GraphProto | None
    function: onnx.FunctionProto | None
    parent: Scope | None
    namespace: int  # 0: the main graph tree; i+1: model.functions[i] and its subgraphs
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    opset: int = 0  # version of the default domain, for evaluating constant expressions
    owner: onnx.NodeProto | None = None  # the control-flow node whose subgraph this is
    path: GraphPath = ()  # () for the main graph and for function bodies

    @property
    def in_function(self) -> bool:
        scope: Scope | None = self
        while scope is not None:
            if scope.function is not None:
                return True
            scope = scope.parent
        return False

    @classmethod
    def of_graph(cls, graph: onnx.GraphProto, parent: Scope | None, namespace: int) -> Scope:
        scope = cls(graph.node, graph, None, parent, namespace)
        scope.initializers = {t.name: t for t in graph.initializer}
        scope.inputs = {v.name for v in graph.input}
        scope.producers = {o: n for n in graph.node for o in n.output if o}
        return scope

    @classmethod
    def of_function(cls, function: onnx.FunctionProto, namespace: int) -> Scope:
        scope = cls(function.node, None, function, None, namespace)
        scope.inputs = set(function.input)
        scope.producers = {o: n for n in function.node for o in n.output if o}
        return scope


def iter_scopes(model: onnx.ModelProto) -> Iterator[Scope]:
    """Every graph and function body of the model, outer scopes first."""

    def walk(scope: Scope) -> Iterator[Scope]:
        yield scope
        for node in list(scope.nodes):
            for label, g in subgraphs(node):
                inner = Scope.of_graph(g, scope, scope.namespace)
                inner.opset = scope.opset
                inner.owner = node
                inner.path = (*scope.path, (node.output[0] if node.output else node.name, label))
                yield from walk(inner)

    def default_opset(imports: Iterable[onnx.OperatorSetIdProto]) -> int:
        return next((o.version for o in imports if o.domain in ("", "ai.onnx")), 0)

    main = Scope.of_graph(model.graph, None, 0)
    main.opset = default_opset(model.opset_import)
    yield from walk(main)
    for i, function in enumerate(model.functions):
        scope = Scope.of_function(function, i + 1)
        scope.opset = default_opset(function.opset_import) or main.opset
        yield from walk(scope)


class Names:
    """Unique names within one namespace (a graph tree or a function)."""

    def __init__(self, used: set[str]) -> None:
        self.used = used

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def namespace_names(model: onnx.ModelProto) -> dict[int, Names]:
    used: dict[int, set[str]] = {}
    for scope in iter_scopes(model):
        names = used.setdefault(scope.namespace, set())
        for node in scope.nodes:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
        if scope.graph is not None:
            names.update(t.name for t in scope.graph.initializer)
            names.update(v.name for v in scope.graph.input)
            names.update(v.name for v in scope.graph.output)
        if scope.function is not None:
            names.update(scope.function.input)
            names.update(scope.function.output)
    return {ns: Names(names) for ns, names in used.items()}


def type_name(data_type: int) -> str:
    """``FLOAT``, ``INT64``, … or ``element type 99`` for a number ONNX does not define."""
    try:
        return str(onnx.TensorProto.DataType.Name(data_type))
    except ValueError:
        return f"element type {data_type}"


class InvalidAttribute(ValueError):
    """A node attribute that cannot be read as the type the operator defines (the message says why)."""


def _attribute(node: onnx.NodeProto, name: str, kind: int) -> onnx.AttributeProto | None:
    found = [a for a in node.attribute if a.name == name]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidAttribute(f"attribute {name} is given {len(found)} times")
    attr: onnx.AttributeProto = found[0]
    if attr.ref_attr_name:
        raise InvalidAttribute(
            f"attribute {name} refers to the function attribute {attr.ref_attr_name!r}: its value is known only per call"
        )
    if attr.type != kind:
        kind_name = onnx.AttributeProto.AttributeType.Name(kind)
        try:
            got = onnx.AttributeProto.AttributeType.Name(attr.type)
        except ValueError:
            got = f"type {attr.type}"
        raise InvalidAttribute(f"attribute {name} is {got}, not {kind_name}")
    return attr


def attr_int(node: onnx.NodeProto, name: str, default: int | None) -> int | None:
    """The INT attribute ``name`` of ``node``, else ``default``."""
    attr = _attribute(node, name, onnx.AttributeProto.INT)
    return int(attr.i) if attr is not None else default


def attr_ints(node: onnx.NodeProto, name: str) -> tuple[int, ...] | None:
    """The INTS attribute ``name`` of ``node``, or None when absent."""
    attr = _attribute(node, name, onnx.AttributeProto.INTS)
    return tuple(int(v) for v in attr.ints) if attr is not None else None


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    """The FLOAT attribute ``name`` of ``node``, else ``default``."""
    attr = _attribute(node, name, onnx.AttributeProto.FLOAT)
    return float(attr.f) if attr is not None else default


def attr_string(node: onnx.NodeProto, name: str, default: str) -> str:
    """The STRING attribute ``name`` of ``node`` (UTF-8), else ``default``."""
    attr = _attribute(node, name, onnx.AttributeProto.STRING)
    if attr is None:
        return default
    try:
        return attr.s.decode()
    except UnicodeDecodeError:
        raise InvalidAttribute(f"attribute {name} is not valid UTF-8") from None


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
