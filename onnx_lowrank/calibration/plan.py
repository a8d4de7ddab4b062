"""The data-aware plan of a conversion: statistics pass, data-aware factorizations, per-layer gains.

:func:`data_aware_plan` is what :func:`onnx_lowrank.decompose` calls with calibration data, once it knows the
layers it may decompose (its allocation units) and before it chooses ranks:

1. one statistics pass over the calibration set (:func:`~onnx_lowrank.calibration.layers.collect_moments`);
2. per unit and allowed kind, a :class:`~onnx_lowrank.calibration.data_aware.WhitenedDecomposition`, whose
   whitened spectrum gives every rank's relative output error and whose factors the planner writes;
3. with ``sensitivity``, each unit's gain from its output error to the model's outputs, measured once on a
   few samples (:mod:`onnx_lowrank.calibration.sensitivity`); the planner's options then carry the
   predicted damage ``γ_l · e_l(K)``.

The units are the planner's own (duck-typed: ``key``, ``sites``, ``kinds``, ``kernel``), so the shapes and
MACs stay those of the sites; this module imports nothing of :mod:`onnx_lowrank.api`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from ..factorization import Kind, reconstruct
from ..passes import Site
from ..ranks import tail_errors
from .data import Batches, batch_size_of, iter_batches, sample_count
from .data_aware import DEFAULT_DAMPING, WhitenedDecomposition
from .layers import DEFAULT_FULL_GRAM_MAX, DEFAULT_POSITIONS, Layer, collect_moments, conv_elem_type, kernel_to_weight, layer_of
from .refit import DEFAULT_ACTIVATIONS, RefitOptions
from .sensitivity import DEFAULT_PROBE_SAMPLES, GainResult, Probe, measure_gains, probe_rank, probe_samples

__all__ = ["CalibrationOptions", "DataAwarePlan", "UnitLike", "data_aware_plan"]

Array = npt.NDArray[Any]
PassProgress = Callable[[int, int, str], None]


class UnitLike(Protocol):
    """What the planner's allocation units offer this module."""

    @property
    def key(self) -> str: ...

    sites: list[Site]
    kinds: list[Kind]

    @property
    def kernel(self) -> npt.NDArray[np.generic]: ...


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs of the calibrated conversion (defaults are the measured choices; see ``benchmarks/calibration.py``)."""

    batch_size: int = 64  # at most; each pass sizes its batches to its memory budget
    positions: int | None = DEFAULT_POSITIONS  # output positions per sample and layer used by the statistics
    damping: float = DEFAULT_DAMPING
    full_gram_max: int = DEFAULT_FULL_GRAM_MAX
    sensitivity: bool = True
    probe_samples: int = DEFAULT_PROBE_SAMPLES
    refit: bool = True
    stages: int = 3
    ridge: float = 1e-4
    activation_refit: bool = DEFAULT_ACTIVATIONS  # refit a layer read only by Relu/LeakyRelu/Clip to that activation's output
    threads: int | None = None
    workers: int = 2

    def refit_options(self) -> RefitOptions:
        """The refit's options these knobs set (the refit's own knobs keep their defaults)."""
        return RefitOptions(
            ridge=self.ridge,
            batch_size=self.batch_size,
            stages=self.stages,
            positions=self.positions,
            threads=self.threads,
            activations=self.activation_refit,
        )


@dataclass
class DataAwarePlan:
    decompositions: dict[str, dict[Kind, WhitenedDecomposition]] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # units without statistics, and why
    gain_result: GainResult | None = None
    samples: int = 0
    statistics_seconds: float = 0.0
    factor_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "samples": self.samples,
            "statistics_seconds": self.statistics_seconds,
            "factor_seconds": self.factor_seconds,
            "without_statistics": dict(self.reasons),
        }
        if self.gain_result is not None:
            g = self.gain_result
            out["sensitivity"] = {
                "samples": g.samples,
                "runs": g.runs,
                "seconds": g.seconds,
                "estimated": dict(g.estimated),
            }
        return out


def data_aware_plan(
    model: onnx.ModelProto,
    units: Sequence[UnitLike],
    data: Mapping[str, Array],
    options: CalibrationOptions = CalibrationOptions(),
    progress: PassProgress | None = None,
) -> DataAwarePlan:
    """Statistics, data-aware decompositions and (with ``options.sensitivity``) gains for ``units`` of ``model``."""
    plan = DataAwarePlan(samples=sample_count(data))
    start = time.perf_counter()
    layers: list[Layer] = [layer_of(unit.key, unit.sites) for unit in units]
    collect_moments(
        model,
        layers,
        Batches(model, data, options.batch_size),
        positions=options.positions,
        full_gram_max=options.full_gram_max,
        centered=False,  # raw second moments: the mean's error counts (a bias is refit only where the refit runs)
        threads=options.threads,
        workers=options.workers,
        progress=(lambda done, total: progress(done, total, "statistics")) if progress is not None else None,
    )
    plan.statistics_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jobs: list[tuple[UnitLike, Layer, Kind]] = []
    for unit, layer in zip(units, layers, strict=True):
        if layer.moments is None:
            plan.reasons[unit.key] = layer.reason or "no statistics"
            continue
        jobs += [(unit, layer, kind) for kind in unit.kinds]

    def factor(job: tuple[UnitLike, Layer, Kind]) -> tuple[str, Kind, WhitenedDecomposition | str]:
        unit, layer, kind = job
        assert layer.moments is not None
        try:
            decomposition = WhitenedDecomposition(unit.kernel, layer.groups, kind, layer.moments, damping=options.damping)
            decomposition.s  # noqa: B018 - the spectrum, computed in this worker thread
        except ValueError as exc:
            return unit.key, kind, f"weight cannot be factored: {exc}"
        return unit.key, kind, decomposition

    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        for key, kind, got in pool.map(factor, jobs):
            if isinstance(got, str):
                plan.reasons[key] = got
            else:
                plan.decompositions.setdefault(key, {})[kind] = got
    plan.factor_seconds = time.perf_counter() - start
    if options.sensitivity:
        probes: list[Probe] = []
        for unit, layer in zip(units, layers, strict=True):
            kinds = plan.decompositions.get(unit.key)
            if not kinds:
                continue
            kind = unit.kinds[0] if unit.kinds[0] in kinds else next(iter(kinds))
            decomposition = kinds[kind]
            errors = tail_errors(decomposition.s)
            rank = probe_rank(errors)
            kernel = reconstruct(decomposition.factors(rank), layer.groups)
            elems = [conv_elem_type(site) for site in unit.sites]
            dtypes = [helper.tensor_dtype_to_np_dtype(e) for e in elems]
            originals = [kernel_to_weight(site, unit.kernel).astype(d, copy=False) for site, d in zip(unit.sites, dtypes, strict=True)]
            weights = [kernel_to_weight(site, kernel).astype(d) for site, d in zip(unit.sites, dtypes, strict=True)]
            probes.append(Probe(unit.key, list(unit.sites), originals, weights, rank, float(errors[rank]), elems))
        if probes:
            fixed = batch_size_of(model)
            count = probe_samples(plan.samples, len(probes), options.probe_samples)
            limit = max(count, fixed or 1)
            plan.gain_result = measure_gains(
                model,
                probes,
                iter_batches(model, data, limit, limit=limit),
                threads=options.threads,
                progress=(lambda done, n: progress(done, n, "sensitivity")) if progress is not None else None,
            )
            plan.gains = dict(plan.gain_result.gains)
    return plan
