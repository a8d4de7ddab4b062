"""The part of the graph a fine-tune evaluates in torch: the whole graph, or the segment around the trained weights.

When the interpreter has a kernel for every node, the whole main graph is the student. Otherwise the
student is the *segment* of nodes downstream of the trained weights that can be evaluated:

* ``T``: the nodes that read a trained initializer; ``D``: every node downstream of ``T``;
* in graph order, a node of ``T ∪ D`` joins the segment ``S`` when the interpreter can run it and every
  tensor it reads that depends on the trained weights is made inside ``S`` (a value that passes through a
  node outside ``S`` would be fed stale, and the gradient would not reach it);
* the segment's inputs are what its nodes read from outside it — graph inputs, and tensors of the fixed
  upstream part, which onnxruntime computes once on the converted model (they do not depend on the
  trained weights);
* its outputs (the *cut*) are the tensors it makes that are graph outputs or read by a node outside it;
  their targets come from onnxruntime on the original model at the same names, as the converter keeps
  every tensor name outside the decomposed pairs.

Refused (:class:`LowRankError` naming the ops): a node that reads a trained weight cannot be evaluated,
or the segment would be empty.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import onnx

from ..errors import LowRankError

__all__ = ["Segment", "choose_segment", "node_reads"]


@dataclass(frozen=True)
class Segment:
    """Main-graph node indices the student evaluates, the tensors it is fed, and those its loss compares."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    whole: bool

    def describe(self, total: int) -> str:
        if self.whole:
            return "whole graph"
        cut = ", ".join(repr(o) for o in self.outputs[:3]) + (", …" if len(self.outputs) > 3 else "")
        return f"segment: {len(self.nodes)} of {total} nodes, cut at {cut}"


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads from its scope: its inputs, and what its subgraphs read from outside themselves."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
            local |= {o for inner in graph.node for o in inner.output}
            for inner in graph.node:
                names |= node_reads(inner) - local
    return names


def choose_segment(model: onnx.ModelProto, trained: Collection[str], problems: Mapping[int, str]) -> Segment:
    """The segment of ``model`` (main-graph nodes; ``problems``: index → why the interpreter cannot run it)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    graph_inputs = [v.name for v in graph.input if v.name not in constants]
    graph_outputs = [o.name for o in graph.output]
    reads = [node_reads(n) for n in graph.node]
    if not problems:
        return Segment(tuple(range(len(graph.node))), tuple(graph_inputs), tuple(graph_outputs), True)
    trained = set(trained)
    depends: set[str] = set(trained)  # tensors that change with the trained weights
    segment: list[int] = []
    made: set[str] = set()
    blocked: list[str] = []
    for index, node in enumerate(graph.node):
        dependent = reads[index] & depends
        if not dependent:
            continue
        depends.update(o for o in node.output if o)
        runnable = index not in problems and all(name in made or name in trained for name in dependent)
        if runnable:
            segment.append(index)
            made.update(o for o in node.output if o)
        elif reads[index] & trained:
            blocked.append(
                f"{node.op_type} {node.name or node.output[0]!r}: {problems.get(index, 'reads a tensor made outside the segment')}"
            )
    if blocked:
        raise LowRankError(f"the fine-tune cannot evaluate a node that reads a trained weight: {blocked[0]}")
    if not segment:
        raise LowRankError("the fine-tune found no node that reads the trained weights")
    inside = set(segment)
    # Constant nodes the segment reads are evaluated inside it (their value is fixed)
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    for index in segment.copy():
        for name in reads[index]:
            source = producers.get(name)
            if source is not None and source not in inside and graph.node[source].op_type == "Constant" and source not in problems:
                inside.add(source)
    nodes = sorted(inside)
    made_all = {o for i in nodes for o in graph.node[i].output if o}
    outside_reads: set[str] = set()
    for i, names in enumerate(reads):
        if i not in inside:
            outside_reads |= names
    outputs = [o for i in nodes for o in graph.node[i].output if o and (o in graph_outputs or o in outside_reads)]
    inputs = sorted({name for i in nodes for name in reads[i] if name not in made_all and name not in constants})
    return Segment(tuple(nodes), tuple(inputs), tuple(dict.fromkeys(outputs)), False)
