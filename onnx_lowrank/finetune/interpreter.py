"""An ONNX graph evaluated node by node with torch operations: the student network the fine-tune trains.

:class:`GraphModule` is a ``torch.nn.Module`` built from a ``ModelProto``. The initializers named
*trainable* become ``nn.Parameter`` s (fp16 and bf16 ones held as float32 master copies and cast to their
own dtype where the graph reads them, so the stored tensor is exactly what the module computed with); every
other initializer and constant is a plain tensor that no optimiser sees. ``forward`` runs the nodes in the
graph's order with the kernels of :mod:`onnx_lowrank.finetune.ops`, only those the requested tensors depend
on, and returns any main-graph tensors asked for (the graph outputs, or intermediate tensors for a feature
loss). Nothing in it depends on train or eval mode: ``BatchNormalization`` keeps its inference semantics,
so the function the module computes is the graph's in either.

Preconditions (a node that fails one is reported by :func:`unsupported_nodes` with its reason, and a module
built over it refuses to run it):

* the op is in the default domain and has a kernel (model-local functions are inlined first);
* its attributes are ones the kernel implements (see :mod:`onnx_lowrank.finetune.ops`);
* ``If`` branches hold only such nodes; ``Loop``/``Scan`` bodies are not evaluated;
* constants are dense tensors of an element type torch computes with, stored in the model (external data
  loaded).

A module may be built over a subset of the main graph's nodes (``nodes``): tensors those nodes read from
outside the subset are then fed like graph inputs (the segment a fine-tune trains when the rest of the graph
holds an op without a kernel).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from .ops import COMPILERS, Kernel, KernelFailure, NodeSpec, Unsupported, onnx_to_torch_dtype, tensor_from_proto, tensor_to_array
from .segment import node_reads

__all__ = ["GraphModule", "describe_problems", "graph_problems", "inline_functions", "node_label"]

Tensor = torch.Tensor
Env = MutableMapping[str, Tensor]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in messages: its op type and its name (or first output)."""
    return f"{node.op_type} {node.name or (node.output[0] if node.output else '?')!r}"


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    found = {imp.domain or "": int(imp.version) for imp in model.opset_import}
    if "ai.onnx" in found:
        found.setdefault("", found["ai.onnx"])
    return found


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its model-local functions inlined (node names of the main graph are kept)."""
    if not model.functions:
        return model
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # onnx's inliner raises its own exception types
        raise Unsupported(f"model-local functions could not be inlined ({type(exc).__name__})") from None


def _reads(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(node_reads(node) - set(node.input))


@dataclass
class _Step:
    node: onnx.NodeProto
    inputs: list[str]
    outputs: list[str]
    kernel: Kernel | None = None
    branches: tuple[_Graph, _Graph] | None = None  # If: (then, else)
    problem: str | None = None


class _Graph:
    """A graph's nodes compiled to kernels; constants are its initializers and its Constant nodes' values."""

    def __init__(self, graph: onnx.GraphProto, opsets: Mapping[str, int], skip_initializers: Collection[str] = ()) -> None:
        self.constants: dict[str, Tensor] = {}
        self.problems: dict[int, str] = {}
        for tensor in graph.initializer:
            if tensor.name in skip_initializers:
                continue
            try:
                self.constants[tensor.name] = _constant(tensor)
            except Unsupported as exc:
                self.problems[-1 - len(self.problems)] = f"initializer {tensor.name!r}: {exc}"
        if len(graph.sparse_initializer):
            self.problems[-1 - len(self.problems)] = "sparse initializers"
        self.outputs = [o.name for o in graph.output]
        self.steps: list[_Step] = []
        for index, node in enumerate(graph.node):
            step = _Step(node, [i for i in node.input], [o for o in node.output])
            try:
                self._compile(step, opsets)
            except Unsupported as exc:
                step.problem = str(exc)
                self.problems[index] = str(exc)
            self.steps.append(step)

    def _compile(self, step: _Step, opsets: Mapping[str, int]) -> None:
        node = step.node
        if node.domain not in _DEFAULT_DOMAINS:
            raise Unsupported(f"op {node.op_type} of domain {node.domain!r}")
        opset = opsets.get("", 0)
        if node.op_type == "If":
            then_graph = next((a.g for a in node.attribute if a.name == "then_branch"), None)
            else_graph = next((a.g for a in node.attribute if a.name == "else_branch"), None)
            if then_graph is None or else_graph is None:
                raise Unsupported("If without both branches")
            branches = (_Graph(then_graph, opsets), _Graph(else_graph, opsets))
            inner = [p for b in branches for p in b.problems.values()]
            if inner:
                raise Unsupported(f"a branch of If holds {inner[0]}")
            step.branches = branches
            return
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise Unsupported(f"{node.op_type} with a subgraph")
        compiler = COMPILERS.get(node.op_type)
        if compiler is None:
            raise Unsupported(f"no kernel for {node.op_type}")
        spec = NodeSpec.of(node, opset)
        kernel = compiler(spec)
        if node.op_type == "Constant":  # folded once: its value never changes
            self.constants[node.output[0]] = kernel([])[0]
            step.kernel = _constant_kernel(self.constants[node.output[0]])
            return
        step.kernel = kernel

    def run_step(self, step: _Step, env: Env) -> None:
        if step.problem is not None:
            raise Unsupported(f"{node_label(step.node)}: {step.problem}")
        values = [env[name] if name else None for name in step.inputs]
        if step.branches is not None:
            condition = values[0]
            assert condition is not None
            branch = step.branches[0] if bool(condition.reshape(-1)[0]) else step.branches[1]
            scope: ChainMap[str, Tensor] = ChainMap({}, branch.constants, env)
            for inner in branch.steps:
                branch.run_step(inner, scope)
            outs = [scope[name] for name in branch.outputs]
        else:
            assert step.kernel is not None
            try:
                outs = step.kernel(values)
            except KernelFailure as exc:
                raise KernelFailure(f"{node_label(step.node)}: {exc}") from None
            except Unsupported as exc:
                raise Unsupported(f"{node_label(step.node)}: {exc}") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise KernelFailure(f"{node_label(step.node)}: torch failed: {text}") from None
        for name, value in zip(step.outputs, outs, strict=False):
            if name:
                env[name] = value


def _constant(tensor: onnx.TensorProto) -> Tensor:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise Unsupported("stored in external data that is not loaded")
    return tensor_from_proto(tensor)


def _constant_kernel(value: Tensor) -> Kernel:
    return lambda inputs: [value]


def graph_problems(model: onnx.ModelProto) -> dict[int, str]:
    """Why the interpreter cannot run parts of ``model`` (functions inlined already): main-graph node index
    (negative for a problem of no node: a constant) → reason; empty when it can run every node."""
    return dict(_Graph(model.graph, _opsets(model)).problems)


def describe_problems(model: onnx.ModelProto, problems: Mapping[int, str]) -> str:
    """``no kernel for Loop (2 nodes: 'a', 'b'); Resize mode 'cubic' (1 node: 'up')``, most frequent first."""
    grouped: dict[str, list[str]] = {}
    for index, reason in problems.items():
        label = ""
        if index >= 0:
            node = model.graph.node[index]
            label = node.name or (node.output[0] if node.output else "?")
        grouped.setdefault(reason, []).append(label)
    parts = []
    for reason, labels in sorted(grouped.items(), key=lambda item: -len(item[1])):
        named = [repr(n) for n in labels if n]
        shown = ", ".join(named[:3]) + (", …" if len(named) > 3 else "")
        count = f"{len(labels)} node{'s' if len(labels) != 1 else ''}" if named else ""
        parts.append(f"{reason} ({count}{': ' + shown if shown else ''})" if count else reason)
    return "; ".join(parts)


class GraphModule(nn.Module):
    """The main graph of ``model`` as a torch module (see the module docstring).

    ``trainable``: names of main-graph float initializers to hold as parameters. ``nodes``: indices of the
    main graph's nodes to evaluate (all when ``None``); others are skipped, and what the evaluated ones read
    from them must be fed. Raises :class:`~onnx_lowrank.finetune.ops.Unsupported` when an evaluated node
    cannot run, naming every such node's reason.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Collection[str] = (), nodes: Collection[int] | None = None) -> None:
        super().__init__()
        inlined = inline_functions(model)
        graph = inlined.graph
        initializers = {t.name: t for t in graph.initializer}
        missing = sorted(set(trainable) - set(initializers))
        if missing:
            raise Unsupported(f"trainable tensor(s) not among the main graph's initializers: {', '.join(missing[:5])}")
        self._graph = _Graph(graph, _opsets(inlined), skip_initializers=set(trainable))
        chosen = set(range(len(graph.node))) if nodes is None else set(nodes)
        problems = {i: p for i, p in self._graph.problems.items() if i < 0 or i in chosen}
        if problems:
            raise Unsupported(describe_problems(inlined, problems))
        self._chosen = sorted(chosen)
        self.parameter_names: list[str] = []
        self.stored_dtypes: dict[str, torch.dtype] = {}
        self.weights = nn.ParameterList()
        for name in (t.name for t in graph.initializer if t.name in trainable):
            tensor = _constant(initializers[name])
            if not tensor.is_floating_point():
                raise Unsupported(f"trainable tensor {name!r} is not floating point")
            master = tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
            self.parameter_names.append(name)
            self.stored_dtypes[name] = tensor.dtype
            self.weights.append(nn.Parameter(master))
        self.input_names = [v.name for v in graph.input if v.name not in initializers]
        self.output_names = list(self._graph.outputs)
        self.input_dtypes = {
            v.name: onnx_to_torch_dtype(v.type.tensor_type.elem_type)
            for v in graph.input
            if v.name not in initializers and v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
        }
        self._plans: dict[tuple[str, ...], tuple[list[int], dict[int, list[str]]]] = {}

    # --------------------------------------------------------------------------- evaluation

    def external_reads(self, outputs: Sequence[str]) -> list[str]:
        """Tensors the evaluated nodes need for ``outputs`` that neither they nor the constants provide."""
        steps, _ = self._plan(tuple(outputs))
        made = {o for i in steps for o in self._graph.steps[i].outputs if o}
        known = set(self._graph.constants) | set(self.parameter_names)
        needed: list[str] = []
        for i in steps:
            for name in _reads(self._graph.steps[i].node):
                if name not in made and name not in known and name not in needed:
                    needed.append(name)
        needed += [o for o in outputs if o not in made and o not in known and o not in needed]
        return needed

    def _plan(self, outputs: tuple[str, ...]) -> tuple[list[int], dict[int, list[str]]]:
        """The steps ``outputs`` depend on, and after which step each intermediate tensor can be let go."""
        plan = self._plans.get(outputs)
        if plan is not None:
            return plan
        producer = {o: i for i in self._chosen for o in self._graph.steps[i].outputs if o}
        wanted, stack = set(), list(outputs)
        while stack:
            name = stack.pop()
            index = producer.get(name)
            if index is None or index in wanted:
                continue
            wanted.add(index)
            stack.extend(_reads(self._graph.steps[index].node))
        steps = sorted(wanted)
        last: dict[str, int] = {}
        for i in steps:
            for name in _reads(self._graph.steps[i].node):
                last[name] = i
        keep = set(outputs)
        release: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep and name in producer:
                release.setdefault(i, []).append(name)
        plan = (steps, release)
        self._plans[outputs] = plan
        return plan

    def weight_values(self) -> dict[str, Tensor]:
        """Each trainable tensor as the graph reads it: the parameter cast to the initializer's dtype."""
        return {
            name: p if p.dtype == self.stored_dtypes[name] else p.to(self.stored_dtypes[name])
            for name, p in zip(self.parameter_names, self.weights, strict=True)
        }

    def forward(self, feeds: Mapping[str, Tensor], outputs: Sequence[str] | None = None) -> list[Tensor]:
        """The tensors ``outputs`` (the graph outputs by default) computed from ``feeds``."""
        names = tuple(outputs) if outputs is not None else tuple(self.output_names)
        steps, release = self._plan(names)
        env: dict[str, Tensor] = {}
        scope: ChainMap[str, Tensor] = ChainMap(env, dict(feeds), self.weight_values(), self._graph.constants)
        for i in steps:
            self._graph.run_step(self._graph.steps[i], scope)
            for name in release.get(i, ()):
                env.pop(name, None)
        return [scope[name] for name in names]

    def stored_arrays(self) -> dict[str, np.ndarray]:
        """The trainable tensors as numpy arrays in their initializers' dtypes."""
        return {name: tensor_to_array(value) for name, value in self.weight_values().items()}

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.weights]

    def restore(self, saved: Iterable[Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.weights, saved, strict=True):
                p.copy_(value)
