"""A clock that reads no time: what the plan by latency measures, as a deterministic function of the models.

A model's "milliseconds" are its conv/Gemm weight elements times the output pixels of its first input (every conv of
the test models keeps the spatial size), over 1e7, plus ``per_node`` for each such node — the same for a layer timed
alone and inside a model, unless ``delivered`` says the model gives only that share of what its splits promise (the
gap a real machine shows: layouts, threads). ``noise`` spreads each run by that relative standard deviation (seeded),
``load`` scales the load probe (a busy machine). Tests of the plan's logic install it with :func:`install`; nothing
they assert then depends on how busy the machine is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest

import onnx_lowrank.timing as timing_module
from onnx_lowrank.runtime import HeldModel, SharedWeights
from onnx_lowrank.stats import SpeedupEstimate, speedup_estimate
from onnx_lowrank.timing import LayerTime, Timing


def model_ms(model: onnx.ModelProto, pixels: int, per_node: float = 0.01) -> float:
    """The fake milliseconds of ``model`` (see the module docstring)."""
    weights = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            total += weights.get(node.input[1], 0) * pixels / 1e7 + per_node
    return total


class FakeSession:
    """A real onnxruntime session (so models still run, on the store's shared weights) that knows its fake
    milliseconds."""

    def __init__(self, weights: SharedWeights, model: HeldModel, threads: int, ms: float) -> None:
        self.real = weights.session(model, threads=threads)
        self.ms = ms

    def run(self, names: Any, feeds: Mapping[str, Any]) -> Any:
        return self.real.run(names, feeds)


class FakeClock:
    def __init__(self, delivered: float = 1.0, noise: float = 0.0, load: float = 1.0, per_node: float = 0.01, seed: int = 0) -> None:
        self.delivered, self.noise, self.load_factor, self.per_node = delivered, noise, load, per_node
        self.rng = np.random.default_rng(seed)
        self.layers = 0  # layer models timed
        self.rounds: list[SpeedupEstimate] = []  # whole-model measurements, in order

    @staticmethod
    def pixels(feeds: Mapping[str, Any]) -> int:
        first = next(iter(feeds.values()))
        return int(math.prod(first.shape[2:])) if first.ndim > 2 else 1

    def _runs(self, ms: float, runs: int) -> list[float]:
        return [ms * (1.0 + self.noise * float(self.rng.standard_normal())) for _ in range(runs)]

    def session(self, weights: SharedWeights, model: HeldModel, threads: int) -> FakeSession:
        # the model as it was held: the original, before it is rewritten in place (a held graph keeps every dim)
        return FakeSession(weights, model, threads, model_ms(model.proto, _pixels_of(model.proto), self.per_node))

    def layer(self, model: onnx.ModelProto, feeds: Mapping[str, Any], threads: int, runs: int, warmup: int) -> LayerTime:
        self.layers += 1
        return LayerTime(model_ms(model, self.pixels(feeds), self.per_node), 0.02)

    def model_runs(self, session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
        return self._runs(session.ms, runs)

    def speedup(self, timing: Timing, candidate: HeldModel, *, max_runs: int, budget_ms: float, width: float) -> SpeedupEstimate:
        original = float(timing.original.ms)
        promised = model_ms(candidate.proto, self.pixels(timing.feeds), self.per_node)
        real = original - self.delivered * (original - promised)
        pairs = min(max_runs, 20)
        estimate = speedup_estimate(self._runs(original, pairs), self._runs(real, pairs))
        self.rounds.append(estimate)
        return estimate

    def load(self, threads: int) -> float:
        return 2.0 * self.load_factor


def install(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> FakeClock:
    """Make ``clock`` the one every conversion times with."""
    monkeypatch.setattr(timing_module, "CLOCK", clock)
    return clock


def _pixels_of(model: onnx.ModelProto) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(math.prod(d.dim_value for d in dims[2:])) if len(dims) > 2 else 1
