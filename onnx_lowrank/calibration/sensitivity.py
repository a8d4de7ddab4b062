"""Rank allocation from statistics: each layer's damage to the model's outputs at every rank, from one measurement.

The statistics give every rank's *layer* output error at once: with the whitened singular values ``s̃`` of
:mod:`onnx_lowrank.calibration.data_aware`, the relative output error of layer ``l`` at rank ``K`` is

    e_l(K) = Σ_{k>K} s̃_k² / Σ_k s̃_k².

What the allocation needs is the damage to the *model's* outputs, ``d_l(K)``. Each layer's output error is
carried to the model's outputs with some gain ``γ_l`` (early layers, or those whose output the next layers
amplify, hurt more; a layer before a saturating nonlinearity, less). Modelling ``d_l(K) = γ_l · e_l(K)``,
``γ_l`` is measured ONCE per layer: the layer's kernel is replaced by its data-aware rank-``K_p`` kernel
(the *probe*, at a rank whose predicted ``e_l`` is about :data:`PROBE_ERROR`), the model is run on a few
calibration samples, and

    γ_l = D_l / e_l(K_p),    D_l = mean over the float outputs o of ||f_o(x; probe) − f_o(x)||² / ||f_o(x)||².

The probe perturbs the layer the way a decomposition will (same directions, same structure), not with
random noise of the same energy, which a ReLU or a pooling after the layer treats differently.

Cost: ONE onnxruntime session of the model in which every probed node reads its weight from a graph input
(so no session is built per layer), one run with the original weights on the probe samples, then one run
per layer with that layer's probe kernel fed instead: ``1 + L`` runs on ``p`` samples, about
``(L + 1)·p/n`` plain passes over ``n`` calibration samples (weights fed as inputs are packed by onnxruntime
on every run, which costs a little more per run). The default ``p`` grows with ``n``
(:func:`probe_samples`), keeping this near or under half a pass.

The allocation then minimises ``Σ_l γ_l · e_l(K_l)`` under the MAC budget with
:func:`onnx_lowrank.ranks.allocate` (first-order additivity of independent perturbations of the outputs).

Preconditions: the probed node is in the main graph, an ``If`` branch or a model-local function (inlined
in the session's copy); a layer in a loop body gets the median of the measured gains, and the result says
so. The probe samples are the first of the calibration set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from ..passes import Site
from .collect import TensorRequest, run_session, session_with_inputs

__all__ = ["DEFAULT_PROBE_SAMPLES", "PROBE_ERROR", "GainResult", "Probe", "measure_gains", "probe_rank", "probe_samples"]

Array = npt.NDArray[Any]

PROBE_ERROR = 0.05  # relative squared output error of a layer at its probe rank
DEFAULT_PROBE_SAMPLES = 4  # at most; see probe_samples


def probe_samples(samples: int, layers: int, most: int = DEFAULT_PROBE_SAMPLES) -> int:
    """Samples the gains are measured on: enough that the ``layers + 1`` runs cost about half a pass over
    ``samples``, at least 1 and at most ``most``."""
    return max(1, min(most, samples // max(1, 2 * (layers + 1))))


def probe_rank(errors: npt.NDArray[np.float64], target: float = PROBE_ERROR) -> int:
    """The least rank whose predicted relative output error ``errors[K]`` is at most ``target`` (at least 1)."""
    ok = np.nonzero(errors <= target)[0]
    return max(1, int(ok[0]) if ok.size else errors.size - 1)


@dataclass
class Probe:
    """One layer to measure: its sites, its weight and the probe kernel as each site's node reads its weight
    input (layout and type), the probe rank and its predicted relative output error."""

    key: str
    sites: list[Site]
    originals: list[Array]
    weights: list[Array]
    rank: int
    predicted: float  # e_l(K_p)
    elem_types: list[int] = field(default_factory=list)


@dataclass
class GainResult:
    gains: dict[str, float] = field(default_factory=dict)
    damage: dict[str, float] = field(default_factory=dict)  # D_l measured at the probe
    estimated: dict[str, str] = field(default_factory=dict)  # layers whose gain is the median, and why
    samples: int = 0
    runs: int = 0
    seconds: float = 0.0


def _float_outputs(values: Sequence[Array], names: Sequence[str]) -> list[int]:
    return [i for i, (n, v) in enumerate(zip(names, values, strict=True)) if n and v.dtype.kind == "f"]


def measure_gains(
    model: onnx.ModelProto,
    probes: Sequence[Probe],
    batches: Iterable[Mapping[str, Array]],
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GainResult:
    """Measure ``γ_l`` of every probe (see the module docstring) on ``batches`` (the probe samples).

    One onnxruntime session of the model in which every probed node reads its weight from a graph input
    (:func:`~onnx_lowrank.calibration.collect.session_with_inputs`); a run with the original weights gives
    the reference, then one run per layer with its probe kernel.
    """
    start = time.perf_counter()
    result = GainResult()
    requests = [
        TensorRequest(f"{p}/{i}", site.node, site.scope, "input", 1, elem)
        for p, probe in enumerate(probes)
        for i, (site, elem) in enumerate(zip(probe.sites, probe.elem_types, strict=True))
    ]
    session, names, refused = session_with_inputs(model, requests, threads=threads)
    outputs = [o.name for o in session.get_outputs()]
    base: dict[str, Array] = {}
    for p, probe in enumerate(probes):
        for i, original in enumerate(probe.originals):
            for name in names.get(f"{p}/{i}", []):
                base[name] = original
    feeds = [dict(batch) for batch in batches]
    result.samples = sum(len(next(iter(f.values()))) for f in feeds if f)
    reference = [run_session(session, outputs, {**feed, **base}) for feed in feeds]
    result.runs = 1
    if not reference:
        return result
    kept = _float_outputs(reference[0], outputs)
    norms = {i: sum(float(np.sum(np.square(r[i].astype(np.float64)))) for r in reference) for i in kept}
    for p, probe in enumerate(probes):
        why = next((refused[f"{p}/{i}"] for i in range(len(probe.sites)) if f"{p}/{i}" in refused), None)
        if why is not None:
            result.estimated[probe.key] = why
            continue
        swapped = dict(base)
        for i, weight in enumerate(probe.weights):
            for name in names.get(f"{p}/{i}", []):
                swapped[name] = weight
        relative = dict.fromkeys(kept, 0.0)
        for feed, ref in zip(feeds, reference, strict=True):
            got = run_session(session, outputs, {**feed, **swapped})
            for i in kept:
                relative[i] += float(np.sum(np.square(got[i].astype(np.float64) - ref[i].astype(np.float64))))
        result.runs += 1
        damage = sum(relative[i] / norms[i] for i in kept if norms[i] > 0) / max(1, len(kept))
        result.damage[probe.key] = damage
        if probe.predicted > 1e-12 and math.isfinite(damage):
            result.gains[probe.key] = damage / probe.predicted
        else:
            result.estimated[probe.key] = "its probe rank changes the layer's output by nothing measurable"
        if progress is not None:
            progress(p + 1, len(probes))
    measured = [result.gains[k] for k in result.gains if k not in result.estimated]
    median = float(np.median(measured)) if measured else 1.0
    for probe in probes:
        result.gains.setdefault(probe.key, median)
    result.seconds = time.perf_counter() - start
    return result
