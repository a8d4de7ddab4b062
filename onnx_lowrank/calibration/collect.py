"""Intermediate tensors out of onnxruntime: the one mechanism every calibration pass uses.

:func:`prepare` turns a model and the tensors wanted into a *collection model*: a copy pruned to the nodes
those tensors depend on, whose graph outputs are exactly those tensors. :func:`stream` runs it in ONE
onnxruntime session, batch by batch, and hands each batch's tensors to a callback, which reduces them to
statistics; nothing is kept between batches, so memory is one batch of activations whatever the size of
the calibration set.

Where a wanted tensor lives:

* in the main graph: it becomes a graph output as it is (a graph input is taken from the feed);
* in a model-local function: the copy is made with every function inlined (``onnx.inliner``), which keeps
  node metadata, so the node is found again by a tag set on it (``metadata_props``) before the copy; a
  function called several times yields one tensor per call;
* in a branch of an ``If`` (at any depth, and after inlining): the tensor is added to the branch's outputs,
  the other branch outputs an empty tensor of the same type, and the ``If`` gets one more output, up to
  the main graph; a batch on which the branch is not taken yields an empty array, which callers skip;
* in a ``Loop`` or ``Scan`` body: refused, with that reason (its tensors exist once per iteration).

Outputs carry their element type and no shape, so onnxruntime checks nothing it does not know.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..errors import LowRankError
from ..graph import Scope
from ..runtime import make_session
from .data import Batches

__all__ = [
    "DEFAULT_MEMORY",
    "Collection",
    "TensorRequest",
    "cut_model",
    "prepare",
    "run_session",
    "session_with_inputs",
    "stream",
    "stream_together",
    "subgraph_reads",
]

Array = npt.NDArray[Any]
Feed = Mapping[str, Array]
PassProgress = Callable[[str, int, int], None]

_TAG = "onnx_lowrank.collect"
# bytes of collected tensors one batch may hold; the batch is sized to it (see stream)
DEFAULT_MEMORY = 256 * 2**20


@dataclass(frozen=True, eq=False)
class TensorRequest:
    """The tensor read (``port="input"``) or written (``"output"``) at position ``index`` of ``node``, which lives
    in ``scope``; ``key`` is the caller's label for it and ``elem_type`` its element type."""

    key: str
    node: onnx.NodeProto
    scope: Scope
    port: Literal["input", "output"]
    index: int
    elem_type: int = onnx.TensorProto.FLOAT

    @property
    def tensor(self) -> str:
        names = self.node.input if self.port == "input" else self.node.output
        return str(names[self.index])


@dataclass
class Collection:
    """A model whose outputs are the wanted tensors; ``names[key]`` lists the tensors of each request (one per
    function call), ``refused[key]`` says why a request cannot be served."""

    model: onnx.ModelProto
    names: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)  # wanted names that are graph inputs (taken from the feed)

    def __post_init__(self) -> None:
        self._outputs: list[str] | None = None

    @property
    def outputs(self) -> list[str]:
        if self._outputs is None:
            return [o.name for o in self.model.graph.output]
        return self._outputs

    def session(self, threads: int | None = None) -> Any:
        """The onnxruntime session of the collection model (None when it has no outputs); the model itself is
        let go once the session holds it, so its weights are not kept twice."""
        outputs = self.outputs
        # no arena: a pass feeds batches of changing sizes, and the arena would keep the largest of each
        session = make_session(self.model, threads=threads, arena=False) if outputs else None
        self._outputs = outputs
        self.model = onnx.ModelProto()
        return session


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside the node's subgraphs (outer-scope reads among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_reads(inner)
    return names


def _location(scope: Scope) -> str | None:
    """None for the main graph; else "function", "branch", or why the scope cannot be collected from."""
    current: Scope | None = scope
    kinds: list[str] = []
    while current is not None:
        if current.function is not None:
            kinds.append("function")
        if current.parent is not None and current.graph is not None:
            owner = _owner(current)
            if owner is None:
                return "inside a subgraph whose owner node was not found"
            if owner.op_type != "If":
                return f"inside a {owner.op_type} body (its tensors exist once per iteration)"
            kinds.append("branch")
        current = current.parent
    if not kinds:
        return None
    return "function" if "function" in kinds else "branch"


def _owner(scope: Scope) -> onnx.NodeProto | None:
    assert scope.parent is not None
    for node in scope.parent.nodes:
        for attr in node.attribute:
            graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            if any(g is scope.graph or g == scope.graph for g in graphs):
                found: onnx.NodeProto = node
                return found
    return None


def _prune(model: onnx.ModelProto, anchors: set[str], cut: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` holding only the main-graph nodes (and constants) ``anchors`` depend on; no outputs.

    ``cut`` (name → element type) turns tensors into graph inputs: what they depend on is not kept.
    """
    graph = model.graph
    cut = dict(cut or {})
    needed = set(anchors)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed and o not in cut for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_reads(node)
    keep.reverse()
    result = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
    )
    result.opset_import.extend(model.opset_import)
    result.functions.extend(model.functions)
    g = result.graph
    g.name = graph.name
    g.node.extend(keep)
    g.initializer.extend(t for t in graph.initializer if t.name in needed and t.name not in cut)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed and t.values.name not in cut)
    g.input.extend(v for v in graph.input if v.name in needed and v.name not in cut)
    g.input.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in cut.items())
    g.value_info.extend(v for v in graph.value_info if v.name in needed and v.name not in cut)
    return result


def cut_model(model: onnx.ModelProto, outputs: Sequence[str], cut: Mapping[str, int]) -> onnx.ModelProto:
    """The part of the main graph computing ``outputs`` from the tensors ``cut`` (name → element type), which
    become graph inputs: a suffix of the model, fed tensors collected from an earlier run."""
    pruned = _prune(model, set(outputs), cut)
    pruned.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    return pruned


def _all_names(graph: onnx.GraphProto, into: set[str]) -> None:
    into.update(t.name for t in graph.initializer)
    into.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in graph.node:
        into.add(node.name)
        into.update(node.input)
        into.update(node.output)
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _all_names(g, into)


def _find_tagged(graph: onnx.GraphProto, chain: list[tuple[onnx.NodeProto, str]], found: dict[str, list[Any]]) -> None:
    """Record every tagged node under ``graph`` with its chain of (owner node, attribute name)."""
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == _TAG:
                for key in prop.value.split("\n"):
                    found.setdefault(key, []).append((node, list(chain)))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _find_tagged(attr.g, [*chain, (node, attr.name)], found)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _find_tagged(g, [*chain, (node, attr.name)], found)


def _hoist(name: str, elem: int, chain: list[tuple[onnx.NodeProto, str]], used: set[str]) -> str | None:
    """Make ``name`` (a tensor of the innermost branch of ``chain``) an output of the outermost If; None if a
    body on the way is not an If branch."""

    def fresh(base: str) -> str:
        candidate, i = base, 1
        while candidate in used:
            candidate, i = f"{base}_{i}", i + 1
        used.add(candidate)
        return candidate

    for owner, attr_name in reversed(chain):
        if owner.op_type != "If":
            return None
        branches = {a.name: a.g for a in owner.attribute if a.type == onnx.AttributeProto.GRAPH}
        inside, other = branches[attr_name], branches["else_branch" if attr_name == "then_branch" else "then_branch"]
        # through an Identity: a branch may not return an outer-scope value (or an initializer) directly
        copied = fresh(f"{name}/collect")
        inside.node.append(helper.make_node("Identity", [name], [copied], name=fresh(f"{copied}/Identity")))
        inside.output.append(helper.make_tensor_value_info(copied, elem, None))
        empty_name = fresh(f"{name}/collect_empty")
        empty = onnx.TensorProto(name=empty_name, data_type=elem, dims=[0])
        other.node.append(helper.make_node("Constant", [], [empty_name], name=fresh(f"{empty_name}/Constant"), value=empty))
        other.output.append(helper.make_tensor_value_info(empty_name, elem, None))
        name = fresh(f"{owner.name or owner.output[0]}/collect_{name}")
        owner.output.append(name)
    return name


@contextlib.contextmanager
def _tagged(requests: Sequence[TensorRequest]) -> Iterator[None]:
    """Each request's node carries the request's key in its metadata (copied with it, so an inlined copy still
    says which node is which) for the time of the ``with`` block; the model is left as it was."""
    tagged: list[onnx.NodeProto] = []
    try:
        for request in requests:
            prop = next((p for p in request.node.metadata_props if p.key == _TAG), None)
            if prop is None:
                request.node.metadata_props.add(key=_TAG, value=request.key)
                tagged.append(request.node)
            else:
                prop.value += "\n" + request.key
        yield
    finally:
        for node in tagged:
            for i, prop in enumerate(node.metadata_props):
                if prop.key == _TAG:
                    del node.metadata_props[i]
                    break


def prepare(model: onnx.ModelProto, requests: Sequence[TensorRequest], names: Sequence[str] = ()) -> Collection:
    """The collection model for ``requests`` (tensors of nodes anywhere in the model) and ``names`` (tensors
    of the main graph). ``model`` is not changed."""
    refused: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    inner: list[TensorRequest] = []
    for request in requests:
        where = _location(request.scope)
        if where is None:
            direct.setdefault(request.key, []).append(request.tensor)
        elif where in ("function", "branch"):
            inner.append(request)
        else:
            refused[request.key] = where
    functions = any(_location(r.scope) == "function" for r in inner)
    source = model
    with _tagged(inner):
        if functions:
            from onnx import inliner

            try:
                source = inliner.inline_local_functions(model)
            except Exception as exc:  # onnx's inliner raises its own exception types
                for request in inner:
                    refused[request.key] = f"functions could not be inlined to collect its tensors ({type(exc).__name__})"
                inner = []
        found: dict[str, list[Any]] = {}
        if inner:
            _find_tagged(source.graph, [], found)
        anchors = {n for names_ in direct.values() for n in names_} | set(names)
        for request in inner:
            for node, chain in found.get(request.key, []):
                anchors.update(chain[0][0].output if chain else node.input if request.port == "input" else node.output)
        pruned = _prune(source, anchors)
    graph_inputs = {v.name for v in pruned.graph.input}
    collection = Collection(pruned, refused=refused)
    outputs: dict[str, int] = {}
    for key, tensors in direct.items():
        collection.names[key] = list(tensors)
        elem = next((r.elem_type for r in requests if r.key == key), onnx.TensorProto.FLOAT)
        for tensor in tensors:
            outputs.setdefault(tensor, elem)
    for name in names:
        outputs.setdefault(name, 0)
    if inner:
        found = {}
        _find_tagged(pruned.graph, [], found)
        used: set[str] = set()
        _all_names(pruned.graph, used)
        for request in inner:
            hits = found.get(request.key, [])
            if not hits:
                refused[request.key] = "its node was not found in the inlined model"
                continue
            for node, chain in hits:
                tensor = str((node.input if request.port == "input" else node.output)[request.index])
                hoisted = _hoist(tensor, request.elem_type, chain, used) if chain else tensor
                if hoisted is None:
                    refused[request.key] = "inside a loop body (its tensors exist once per iteration)"
                    collection.names.pop(request.key, None)
                    break
                collection.names.setdefault(request.key, []).append(hoisted)
                outputs.setdefault(hoisted, request.elem_type)
    for name, elem in outputs.items():
        if name in graph_inputs:
            collection.inputs.add(name)
            continue
        collection.model.graph.output.append(
            helper.make_tensor_value_info(name, elem, None) if elem else helper.make_empty_tensor_value_info(name)
        )
    return collection


def session_with_inputs(
    model: onnx.ModelProto, requests: Sequence[TensorRequest], *, threads: int | None = None
) -> tuple[Any, dict[str, list[str]], dict[str, str]]:
    """One onnxruntime session of ``model`` in which the tensor each request names (an input of its node,
    such as a weight) is read from a new graph input instead: ``(session, names, refused)`` with
    ``names[key]`` the inputs to feed for each request (one per function call).

    Nodes in the main graph or in ``If`` branches read the new input from the outer scope; functions are
    inlined in a copy first. ``model`` is edited for the time it takes to build the session and restored.
    """
    refused: dict[str, str] = {}
    served: list[TensorRequest] = []
    for request in requests:
        where = _location(request.scope)
        if where in (None, "function", "branch"):
            served.append(request)
        else:
            refused[request.key] = where
    functions = any(_location(r.scope) == "function" for r in served)
    undo: list[tuple[onnx.NodeProto, int, str]] = []
    added = 0
    target = model
    with _tagged(served):
        try:
            if functions:
                from onnx import inliner

                try:
                    target = inliner.inline_local_functions(model)
                except Exception as exc:  # onnx's inliner raises its own exception types
                    for request in served:
                        if _location(request.scope) == "function":
                            refused[request.key] = f"functions could not be inlined ({type(exc).__name__})"
            found: dict[str, list[Any]] = {}
            _find_tagged(target.graph, [], found)
            used: set[str] = set()
            _all_names(target.graph, used)
            names: dict[str, list[str]] = {}
            for request in served:
                if request.key in refused:
                    continue
                for node, chain in found.get(request.key, []):
                    if any(owner.op_type != "If" for owner, _ in chain):
                        refused[request.key] = "inside a loop body"
                        names.pop(request.key, None)
                        break
                    base, i = f"{node.input[request.index]}/as_input", 1
                    fresh = base
                    while fresh in used:
                        fresh, i = f"{base}_{i}", i + 1
                    used.add(fresh)
                    undo.append((node, request.index, node.input[request.index]))
                    node.input[request.index] = fresh
                    target.graph.input.append(helper.make_tensor_value_info(fresh, request.elem_type, None))
                    added += 1
                    names.setdefault(request.key, []).append(fresh)
                if request.key not in names and request.key not in refused:
                    refused[request.key] = "its node was not found"
            session = make_session(target, threads=threads, arena=False)
        finally:
            if target is model:
                for node, index, name in undo:
                    node.input[index] = name
                for _ in range(added):
                    del model.graph.input[-1]
    return session, names, refused


def run_session(session: Any, names: list[str], feed: Feed) -> list[Array]:
    """``session.run`` with the feeds it takes; onnxruntime's errors as a one-line :class:`LowRankError`."""
    wanted = {i.name for i in session.get_inputs()}
    try:
        return list(session.run(names, {k: v for k, v in feed.items() if k in wanted}))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowRankError(f"onnxruntime failed on the calibration data: {first}") from None


def stream(
    collection: Collection,
    batches: Iterable[Feed],
    consume: Callable[[dict[str, Array], int], None],
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory: int = DEFAULT_MEMORY,
) -> int:
    """Run the collection model on every batch and pass ``{tensor: array}`` (graph inputs included) and the
    batch's sample count to ``consume``; returns the number of samples. One session for the whole stream.

    When ``batches`` is a :class:`~onnx_lowrank.calibration.data.Batches`, its first batch is one sample and
    the rest are sized so the tensors of one batch take at most ``memory`` bytes (or the size it was given).
    """
    return stream_together(
        [collection], batches, lambda values, n: consume(values[0], n), threads=threads, progress=progress, memory=memory
    )


# glibc's mallopt parameters (malloc.h) and their defaults; the largest mmap threshold it takes on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_THRESHOLD = 128 * 1024
_KEPT_THRESHOLD = 32 * 2**20


def _glibc() -> Any:
    """glibc, when this process runs on it (None elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def _freed_blocks_reused() -> Iterator[None]:
    """For the time of a pass, glibc keeps the large blocks freed after one batch for the next instead of giving
    them back to the kernel, whose fresh pages are zeroed on first touch (one fault per 4 KiB).

    The collection sessions run without onnxruntime's arena (it would keep the activations of every batch size),
    so each run allocates its tensors, and the collected ones again as numpy arrays: a 640x640 detector's
    statistics pass took 25 600 page faults and 0.29 s a sample, 2,500 and 0.17 s with the blocks reused (with
    the arena: 0.17 s). Afterwards glibc's defaults are set back and what is free is returned (malloc_trim);
    elsewhere than glibc this does nothing.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _KEPT_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def stream_together(
    collections: Sequence[Collection],
    batches: Iterable[Feed],
    consume: Callable[[list[dict[str, Array]], int], None],
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory: int = DEFAULT_MEMORY,
) -> int:
    """:func:`stream` for several collection models fed the same batches (one session each): ``consume``
    gets one ``{tensor: array}`` per collection, in order, and the batch's sample count."""
    with _freed_blocks_reused():
        return _stream_together(collections, batches, consume, threads, progress, memory)


def _stream_together(
    collections: Sequence[Collection],
    batches: Iterable[Feed],
    consume: Callable[[list[dict[str, Array]], int], None],
    threads: int | None,
    progress: Callable[[int, int], None] | None,
    memory: int,
) -> int:
    sessions = [c.session(threads) for c in collections]
    adaptive = batches if isinstance(batches, Batches) else None
    wanted = adaptive.size if adaptive is not None else 0
    if adaptive is not None:
        adaptive.resize(1)
    total = adaptive.count if adaptive is not None else 0
    done = 0
    for feed in batches:
        values: list[dict[str, Array]] = []
        for collection, session in zip(collections, sessions, strict=True):
            got: dict[str, Array] = {}
            if session is not None:
                got = dict(zip(collection.outputs, run_session(session, collection.outputs, feed), strict=True))
            for name in collection.inputs:
                got[name] = np.asarray(feed[name])
            values.append(got)
        samples = len(next(iter(feed.values()))) if feed else 0
        if adaptive is not None and done == 0 and samples:
            held = sum(v.nbytes for got in values for v in got.values()) + sum(v.nbytes for v in feed.values())
            adaptive.resize(max(1, min(wanted, memory // max(1, held // samples))))
        consume(values, samples)
        del values
        done += samples
        if progress is not None:
            progress(done, total)
    return done
