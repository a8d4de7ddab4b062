"""What each decomposable layer reads, and the statistics pass that measures it.

A :class:`Layer` is one allocation unit of the planner — one weight, read by one or more nodes (a weight
shared by several nodes, or a node in a function called several times, is factored once) — described by
what the data-aware math needs: its kernel shape in conv layout, its :class:`PatchGeometry`, and the
requests for the tensors it reads. :func:`layer_of` builds one from the planner's sites
(:class:`onnx_lowrank.passes.Site`); shapes and MACs stay the sites' own (``Site.cost``), so this
module computes no shape of its own beyond what onnxruntime hands it at run time.

:func:`collect_moments` is the statistics pass: ONE onnxruntime session of the model with every layer's
input as an extra output (:mod:`onnx_lowrank.calibration.collect`), run over the calibration set batch by
batch; each batch's inputs are cut into patches (at most ``positions`` output positions per sample, drawn
at random, seeded) and folded into each layer's :class:`MomentAccumulator`. Memory: the accumulators
(``R² + kw²`` floats per group, ``(R·kw)²`` more where the full Gram is kept) and one batch of activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..passes import Site
from .collect import DEFAULT_MEMORY, TensorRequest, prepare, stream
from .statistics import FULL_ROWS_MAX, MomentAccumulator, PatchGeometry, PatchMoments, gather_patches, output_size, sample_grid, sample_rows

__all__ = [
    "DEFAULT_FULL_GRAM_MAX",
    "DEFAULT_POSITIONS",
    "Layer",
    "MomentOptions",
    "collect_moments",
    "conv_elem_type",
    "kernel_to_weight",
    "layer_of",
]

Array = npt.NDArray[Any]

# output positions per sample and layer that the statistics use; more are drawn at random
DEFAULT_POSITIONS = 256
# the exact patch covariance of the channel split is accumulated up to this size (R·kw); beyond, its Kronecker model
DEFAULT_FULL_GRAM_MAX = 0


def conv_elem_type(site: Site) -> int:
    """The element type the node computes in: its weight's type after any Cast."""
    assert site.weight is not None
    return int(site.weight.cast_to or site.weight.data_type)


def _ints_or_int(node: onnx.NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return 0


def geometry_of(site: Site) -> PatchGeometry:
    """The patch geometry of a site's node (the sites of :mod:`onnx_lowrank.passes` hold the parsed attributes)."""
    op = site.node.op_type
    if op in ("Gemm", "MatMul"):
        return PatchGeometry()
    kernel = tuple(int(k) for k in getattr(site, "kernel_shape", ()))
    strides = tuple(int(s) for s in getattr(site, "strides", ()))
    dilations = tuple(int(d) for d in getattr(site, "dilations", ()))
    pads = getattr(site, "pads", None)
    auto_pad = str(getattr(site, "auto_pad", "NOTSET"))
    if op == "ConvTranspose":
        output_shape = getattr(site, "output_shape", None)
        return PatchGeometry(
            kernel,
            strides,
            dilations,
            tuple(pads) if pads is not None and auto_pad == "NOTSET" else None,
            auto_pad,
            site.groups,
            transposed=True,
            output_padding=tuple(getattr(site, "output_padding", ())),
            output_shape=tuple(output_shape) if output_shape is not None else None,
        )
    return PatchGeometry(kernel, strides, dilations, tuple(pads) if pads is not None else None, auto_pad, site.groups)


def fc_rows(site: Site, x: Array) -> Array:
    """A fully connected layer's input as ``(rows, features)``."""
    trans_a = bool(_ints_or_int(site.node, "transA"))
    if site.node.op_type == "Gemm":
        return x.T if trans_a else x
    return x.reshape(-1, x.shape[-1])


def kernel_to_weight(site: Site, kernel: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """A kernel in conv layout ``(N, C_g, *spatial)`` as the node's weight input reads it (inverse of ``Site.kernel``)."""
    op = site.node.op_type
    if op == "ConvTranspose":
        g = site.groups
        n, c_g = kernel.shape[:2]
        return kernel.reshape(g, n // g, c_g, *kernel.shape[2:]).swapaxes(1, 2).reshape(g * c_g, n // g, *kernel.shape[2:])
    if op in ("Gemm", "MatMul"):
        matrix = kernel[:, :, 0]  # (out, in)
        return matrix if bool(getattr(site, "trans_b", False)) else matrix.T
    return kernel


@dataclass(eq=False)
class Layer:
    """One allocation unit as the statistics see it (see the module docstring)."""

    key: str
    sites: list[Site]
    geometry: PatchGeometry
    kernel_shape: tuple[int, ...]  # conv layout (N, C_g, *spatial)
    moments: PatchMoments | None = None
    reason: str | None = None  # why no statistics were gathered
    positions_seen: int = 0

    @property
    def groups(self) -> int:
        return self.geometry.groups if not self.geometry.fully_connected else 1

    @property
    def rows(self) -> int:
        return self.kernel_shape[1] * int(np.prod(self.kernel_shape[2:-1], dtype=np.int64))

    @property
    def taps(self) -> int:
        return self.kernel_shape[-1]

    def requests(self) -> list[TensorRequest]:
        return [TensorRequest(self.key, site.node, site.scope, "input", 0, conv_elem_type(site)) for site in self.sites]


def layer_of(key: str, sites: Sequence[Site]) -> Layer:
    """The :class:`Layer` of an allocation unit (its sites share one weight and one geometry)."""
    first = sites[0]
    return Layer(key, list(sites), geometry_of(first), tuple(int(d) for d in first.layout_shape()))


@dataclass
class _Sink:
    layer: Layer
    accumulator: MomentAccumulator
    rng: np.random.Generator
    names: list[str] = field(default_factory=list)


def _add(sink: _Sink, values: Mapping[str, Array], positions: int | None, batch: int) -> None:
    """Fold one batch's inputs of a layer into its moments (``batch`` samples: a fully connected layer's rows
    per sample are ``rows / batch``)."""
    layer, geometry = sink.layer, sink.layer.geometry
    for name in sink.names:
        x = values.get(name)
        if x is None or x.size == 0:  # an If branch not taken on this batch
            continue
        if geometry.fully_connected:
            x = fc_rows(layer.sites[0], x)
            limit = None if positions is None else positions * max(1, x.shape[0] // max(1, batch))
            patches = gather_patches(x, geometry, (sample_rows(x.shape[0], limit, sink.rng),))
        else:
            grid = sample_grid(output_size(geometry, x.shape[2:]), positions, sink.rng)
            patches = gather_patches(x, geometry, grid)
        sink.accumulator.add(patches)
        layer.positions_seen += patches.shape[1]


@dataclass(frozen=True)
class MomentOptions:
    """How the statistics pass samples and accumulates.

    ``positions``: output positions per sample and layer (None: all); a layer whose patch has at most
    ``full_gram_max`` features gets the full Gram of its taps, and at most ``rows_max`` rows; ``centered``:
    central moments (else raw second moments); ``threads``: onnxruntime's; ``workers``: threads folding the
    layers' patches; ``seed``: the position sampling; ``memory``: bytes of layer inputs one batch may hold.
    """

    positions: int | None = DEFAULT_POSITIONS
    full_gram_max: int = DEFAULT_FULL_GRAM_MAX
    rows_max: int = FULL_ROWS_MAX
    centered: bool = True
    threads: int | None = None
    workers: int = 1
    seed: int = 0
    memory: int = DEFAULT_MEMORY


def collect_moments(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Iterable[Mapping[str, Array]],
    options: MomentOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **keywords: Any,
) -> None:
    """The statistics pass: fill ``layer.moments`` (or ``layer.reason``) of every layer from one streamed run
    (``progress(samples done, samples)``); ``options`` (:class:`MomentOptions`), or keywords naming single
    options that override ``options``'."""
    options = replace(options, **keywords) if options is not None else MomentOptions(**keywords)
    positions, workers = options.positions, options.workers
    requests = [r for layer in layers for r in layer.requests()]
    collection = prepare(model, requests)
    sinks: list[_Sink] = []
    for i, layer in enumerate(layers):
        if layer.key in collection.refused:
            layer.reason = collection.refused[layer.key]
            continue
        full = layer.taps > 1 and layer.rows * layer.taps <= options.full_gram_max
        accumulator = MomentAccumulator(
            layer.groups, layer.rows, layer.taps, lead=layer.geometry.lead, full=full, rows_max=options.rows_max
        )
        sinks.append(_Sink(layer, accumulator, np.random.default_rng([options.seed, i]), collection.names.get(layer.key, [])))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def consume(values: dict[str, Array], batch: int) -> None:
        if pool is None:
            for sink in sinks:
                _add(sink, values, positions, batch)
        else:
            list(pool.map(lambda sink: _add(sink, values, positions, batch), sinks))

    try:
        stream(collection, batches, consume, threads=options.threads, progress=progress, memory=options.memory)
    finally:
        if pool is not None:
            pool.shutdown()
    for sink in sinks:
        if sink.accumulator.count == 0:
            sink.layer.reason = "no calibration input reached it (an If branch never taken?)"
            continue
        sink.layer.moments = sink.accumulator.result(centered=options.centered)
