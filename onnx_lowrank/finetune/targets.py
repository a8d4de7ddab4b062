"""Which initializers a fine-tune trains: the decomposed layers' factors and biases, or every float weight.

A decomposed layer is a pair of nodes, ``<node>/vertical`` + ``<node>/horizontal`` (spatial split) or
``<node>/channel_reduce`` + ``<node>/channel_expand`` (channel split, and fully connected layers); the
report lists them as ``vertical_node``/``horizontal_node``. :func:`decomposed_weights` resolves every
weight and bias input of both nodes to the main-graph initializer that stores it (through ``Identity`` and
``Cast``, so an fp16 factor behind a ``Cast`` trains as the fp16 tensor it is) and names the pair's output,
which the converter gives the original layer's name, for the feature term.

What cannot be trained is skipped with the reason: a factor stored in a ``Constant`` node (layers inside
model-local functions) or among a subgraph's own initializers, or a node not in the model.

:func:`float_weights` is every floating-point main-graph initializer some node reads as a weight: not the
ones only read as a shape, a scale of ``Resize``, a bound of ``Clip``, a pad value, or the running mean and
variance of ``BatchNormalization`` (statistics, not weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import onnx

from ..errors import LowRankError

__all__ = ["DecomposedWeights", "decomposed_weights", "float_weights"]

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}

# inputs that read a float constant that is not a weight, by op type and input position
_NOT_WEIGHTS: dict[str, set[int]] = {
    "Resize": {1, 2},
    "Upsample": {1},
    "Clip": {1, 2},
    "Pad": {2},
    "Range": {0, 1, 2},
    "BatchNormalization": {3, 4},
    "Dropout": {1},
}
_PASS_THROUGH = {"Identity", "Cast"}


@dataclass(frozen=True)
class DecomposedWeights:
    """The initializers of the decomposed layers and what could not be included.

    ``initializers``: main-graph initializer names, in the model's initializer order; ``features``:
    ``(converted tensor, original tensor)`` per pair of the main graph (the pair's output, which keeps the
    original layer's name); ``skipped``: ``(node or tensor, reason)``.
    """

    initializers: tuple[str, ...]
    features: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]


def _graphs(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.GraphProto, int]]:
    yield graph, depth
    for node in graph.node:
        for attr in node.attribute:
            inner = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for g in inner:
                yield from _graphs(g, depth + 1)


def _find_node(model: onnx.ModelProto, name: str) -> tuple[onnx.NodeProto, onnx.GraphProto, int] | None:
    for graph, depth in _graphs(model.graph):
        for node in graph.node:
            if node.name == name:
                return node, graph, depth
    return None


def _source(model: onnx.ModelProto, graph: onnx.GraphProto, name: str) -> tuple[str | None, str]:
    """The main-graph initializer a node input is read from, or ``None`` and why not."""
    main = model.graph
    main_inits = {t.name for t in main.initializer}
    producers = {o: n for n in main.node for o in n.output}
    if graph is not main:
        if any(t.name == name for t in graph.initializer):
            return None, "an initializer of a subgraph"
        if any(o == name for n in graph.node for o in n.output):
            local = next(n for n in graph.node if name in n.output)
            if local.op_type in _PASS_THROUGH and local.input:
                return _source(model, graph, local.input[0])
            return None, f"computed by {local.op_type} inside a subgraph"
    seen = 0
    while name not in main_inits:
        node = producers.get(name)
        if node is None:
            return None, "not a constant of the main graph"
        if node.op_type == "Constant":
            return None, "stored in a Constant node, not an initializer"
        if node.op_type not in _PASS_THROUGH or not node.input or seen > 16:
            return None, f"computed by {node.op_type}"
        name, seen = node.input[0], seen + 1
    return name, ""


def decomposed_weights(converted: onnx.ModelProto, pairs: Iterable[tuple[str, str]]) -> DecomposedWeights:
    """The factors and biases of the decomposed layers ``pairs`` = ``(first node, second node)`` names.

    Raises :class:`LowRankError` when no pair leaves anything to train (each pair's reason is in the
    message); pairs that leave nothing are listed in ``skipped`` otherwise.
    """
    found: set[str] = set()
    features: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for pair in pairs:
        for node_name in pair:
            located = _find_node(converted, node_name)
            if located is None:
                skipped.append((node_name, "no node of that name in the converted model"))
                continue
            node, graph, depth = located
            for tensor in list(node.input)[1:]:
                if not tensor:
                    continue
                source, reason = _source(converted, graph, tensor)
                if source is None:
                    skipped.append((f"{node_name}:{tensor}", reason))
                else:
                    found.add(source)
            if node_name == pair[-1] and depth == 0 and node.output and node.output[0]:
                features.append((node.output[0], node.output[0]))
    floats = {t.name for t in converted.graph.initializer if t.data_type in FLOAT_TYPES}
    for name in sorted(found - floats):
        skipped.append((name, "not a floating-point tensor"))
    ordered = tuple(t.name for t in converted.graph.initializer if t.name in found and t.name in floats)
    if not ordered:
        why = "; ".join(f"{what}: {reason}" for what, reason in skipped[:3]) or "no pairs given"
        raise LowRankError(f"the decomposed layers leave no initializer to fine-tune ({why})")
    return DecomposedWeights(ordered, tuple(dict.fromkeys(features)), tuple(skipped))


def float_weights(model: onnx.ModelProto) -> tuple[str, ...]:
    """Every floating-point main-graph initializer read as a weight by some node (see the module docstring)."""
    candidates = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    producers = {o: n for n in model.graph.node for o in n.output}
    weights: set[str] = set()
    for graph, _ in _graphs(model.graph):
        for node in graph.node:
            skip = _NOT_WEIGHTS.get(node.op_type, set())
            for position, name in enumerate(node.input):
                if position in skip or not name:
                    continue
                if name in candidates and node.op_type not in _PASS_THROUGH:
                    weights.add(name)
                elif node.op_type not in _PASS_THROUGH and name in producers and producers[name].op_type in _PASS_THROUGH:
                    source, _ = _source(model, model.graph, name)
                    if source is not None and source in candidates:
                        weights.add(source)
    return tuple(t.name for t in model.graph.initializer if t.name in weights)
