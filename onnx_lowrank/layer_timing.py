"""Timing layers alone in onnxruntime, for rank choice by measured latency.

MACs are not latency: a thin pair of convs runs below its MAC ratio when its
channel counts miss the blocked kernels of onnxruntime's CPU convolution, and
small layers are bound by memory, not arithmetic. :class:`LayerTimer` builds a
one-node model per layer (the original) and a two-node model per candidate
(kind, rank), at the layer's real input shape, and times each with the clock
(:meth:`onnx_lowrank.timing.Clock.layer`: a warm-up run, then the median of at
least ``runs`` runs and of as many more as make up 30 ms, thread spinning off),
keeping the runs' spread. Timings are cached per (geometry, kind, rank,
threads), so layers of the same shape — the repeated blocks of ResNets — are
timed once.

The timings outlive the run in a :class:`onnx_lowrank.timing_cache.TimingStore`
(per CPU, onnxruntime version, threads and optimization level): a geometry timed
once on a machine is not timed again there, unless it was timed on a busier
machine than today's or a whole-model measurement contradicted it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data_io import check_allocation
from .factorization import Factors, Kind
from .passes import Site
from .timing import CLOCK, Clock
from .timing_cache import TimingStore

__all__ = ["LayerTimer"]


class LayerTimer:
    """Times layers alone and their decomposed pairs, at the layer's real input shape."""

    def __init__(
        self,
        opset_imports: Sequence[onnx.OperatorSetIdProto],
        threads: int = 1,
        runs: int = 3,
        warmup: int = 1,
        store: TimingStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.opset_imports = list(opset_imports)
        self.threads = threads
        self.runs = runs
        self.warmup = warmup
        self.clock = clock if clock is not None else CLOCK
        self.keys: dict[str, set[str]] = {}  # per site, the store keys its timings went under
        # timings of this run and of earlier ones on this machine; an in-memory store when none is given
        self.store = store if store is not None else TimingStore(None, {"threads": threads})
        self.rng = np.random.default_rng(0)
        self.timed = 0  # how many models were actually timed (the rest came from the store)
        self.spread = 0.0  # of the last model timed

    def _input(self, site: Site) -> tuple[int, ...] | None:
        # the size the layer's input had on the reference input; a layer of unknown size is not timed
        return site.input_shape if site.shape_known else None

    def _dtype(self, site: Site) -> int:
        assert site.weight is not None
        return site.weight.cast_to or site.weight.data_type

    def _key(self, site: Site, x_shape: tuple[int, ...], kind: Kind | None, rank: int) -> str:
        """The entry of the timing store: what the timed model is made of (the store's file holds the machine)."""
        assert site.weight is not None
        node_attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in site.node.attribute)
        bias = len(site.node.input) > 2 and bool(site.node.input[2])
        dtype = onnx.TensorProto.DataType.Name(self._dtype(site))
        return json.dumps([site.node.op_type, node_attrs, list(x_shape), list(site.weight.shape), bias, dtype, kind, rank])

    def _lookup(self, site: Site, key: str) -> float | None:
        self.keys.setdefault(site.key, set()).add(key)
        return self.store.get(key)

    def forget(self, sites: Sequence[Site]) -> None:
        """Drop every timing of ``sites`` from the store: their next lookups time them again."""
        self.store.discard(key for site in sites for key in self.keys.get(site.key, ()))

    def _time(self, site: Site, x_shape: tuple[int, ...], nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> float:
        dtype = self._dtype(site)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        x_name = site.node.input[0]
        graph = helper.make_graph(
            nodes,
            "layer",
            [helper.make_tensor_value_info(x_name, dtype, list(x_shape))],
            [helper.make_tensor_value_info(site.node.output[0], dtype, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=self.opset_imports)
        # drawn in float64, then cast: both copies live at once
        check_allocation(
            math.prod(x_shape) * (8 + np_dtype.itemsize), f"the input of layer {site.key!r} (shape {list(x_shape)}) to time it"
        )
        feeds = {x_name: self.rng.standard_normal(x_shape).astype(np_dtype)}
        self.timed += 1
        timed = self.clock.layer(model, feeds, self.threads, self.runs, self.warmup)
        self.spread = timed.spread
        return timed.ms

    def _bias(self, site: Site) -> list[onnx.TensorProto]:
        node = site.node
        if len(node.input) < 3 or not node.input[2] or site.cost is None:
            return []
        np_dtype = helper.tensor_dtype_to_np_dtype(self._dtype(site))
        length = site.cost.bias or 1
        return [numpy_helper.from_array(self.rng.standard_normal(length).astype(np_dtype), node.input[2])]

    def original(self, site: Site) -> float | None:
        """Milliseconds of one run of the layer as it is, or None when its input shape is unknown."""
        x_shape = self._input(site)
        if x_shape is None or site.weight is None:
            return None
        key = self._key(site, x_shape, None, 0)
        found = self._lookup(site, key)
        if found is None:
            np_dtype = helper.tensor_dtype_to_np_dtype(self._dtype(site))
            weight = numpy_helper.from_array(self.rng.standard_normal(site.weight.shape).astype(np_dtype), site.node.input[1])
            node = onnx.NodeProto()
            node.CopyFrom(site.node)
            found = self._time(site, x_shape, [node], [weight, *self._bias(site)])
            self.store.put(key, found, self.spread)
        return found

    def pair(self, site: Site, kind: Kind, rank: int) -> float | None:
        """Milliseconds of one run of the decomposed pair at ``rank``, or None when the input shape is unknown."""
        x_shape = self._input(site)
        if x_shape is None or site.weight is None:
            return None
        key = self._key(site, x_shape, kind, rank)
        found = self._lookup(site, key)
        if found is None:
            kernel_shape = site.layout_shape()
            n, c, *spatial = kernel_shape
            g = site.groups
            if kind == "spatial":
                first_shape = (g * rank, c, *spatial[:-1], 1)
                second_shape = (n, rank, *([1] * (len(spatial) - 1)), spatial[-1])
            else:
                first_shape = (g * rank, c, *spatial)
                second_shape = (n, rank, *([1] * len(spatial)))
            factors = Factors(kind, rank, self.rng.standard_normal(first_shape), self.rng.standard_normal(second_shape), np.ones((g, rank)))
            first_values, second_values = site.storage(factors)
            np_dtype = helper.tensor_dtype_to_np_dtype(self._dtype(site))
            inits = [
                numpy_helper.from_array(first_values.astype(np_dtype), "first.weight"),
                numpy_helper.from_array(second_values.astype(np_dtype), "second.weight"),
                *self._bias(site),
            ]
            nodes = list(site.emit(kind, "first.weight", "second.weight", "middle", ("first", "second")))
            found = self._time(site, x_shape, nodes, inits)
            self.store.put(key, found, self.spread)
        return found
