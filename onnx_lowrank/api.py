"""The library entry points: :func:`decompose` and :func:`inspect`.

This module turns a user's policy into one (kind, rank) per layer — via
:mod:`onnx_lowrank.ranks` — drives the graph passes and builds the report. It
knows nothing of the CLI.

Layers: ``Conv`` (spatial split of Tai et al., or channel split), ``ConvTranspose``
(spatial split) and ``Gemm``/``MatMul`` with a constant weight (channel split,
i.e. a truncated SVD of the matrix). ``kinds`` restricts the splits offered.
How each policy picks per layer:

* ``rank K``: the spatial split at ``min(K, full rank)`` where the layer allows
  it, else the channel split (when allowed).
* ``energy E``: per allowed kind the least rank keeping ``E`` of Σ s²; the kind
  with fewer MACs at that rank.
* ``ranks {node: K | {"rank": K, "kind": ...}}``: as ``rank``, for the named nodes only.
* ``speedup S`` and/or ``params_ratio R``: every allowed kind at every rank
  competes in one allocation (see :mod:`onnx_lowrank.ranks`).

A weight shared by several layers is factored once: its layers form one
allocation unit and get the same kind and rank.
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import external_data_helper, helper

from . import mac_plan
from ._threads import single_threaded_blas
from .errors import LowRankError
from .factorization import Decomposition, Factors, Kind, decompose_kernel, padded, reconstruct, singular_values
from .latency_plan import (
    CHECK_RUNS,
    Timing,
    TimingFailed,
    adaptive_interleaved,
    check_candidate,
    interpolate,
    kernel_block,
    open_store,
    resolve_by,
    resolve_threads,
    timed_ranks,
    untimeable_reason,
)
from .mac_plan import LayerOverhead, allocate_effective
from .model_io import load_model
from .passes._rewrite import Site, apply_factors, scope_label
from .passes.conv_decomposition import find_conv_sites
from .passes.fc_decomposition import find_fc_sites
from .passes.fixed_layers import find_fixed_sites
from .passes.fold_batchnorm import fold_batchnorm
from .ranks import (
    OBJECTIVES,
    Infeasible,
    LayerChoices,
    Option,
    allocate,
    allocate_two,
    candidate_ranks,
    energy_rank,
    tail_errors,
    weigh_errors,
)
from .report import InspectLayer, LayerReport, Report, unsized_warning
from .run_shapes import ModelShapes, resolve_shapes
from .runtime import first_line
from .shapes import needs_input_shape_message
from .timing_cache import TimingStore

__all__ = ["DEFAULT_KINDS", "DEFAULT_RANK_MULTIPLE", "DEFAULT_SPEEDUP", "count_params", "decompose", "inspect"]

DEFAULT_SPEEDUP = 2.0
# ranks chosen by the budget allocation are multiples of this: onnxruntime's blocked CPU kernels run such
# channel counts fastest (VGG-16 and ResNet-50 at speedup 2: 1.62x and 1.61x measured with any rank,
# 1.76x and 1.91x with multiples of 16, one thread; benchmarks/results/studies.json)
DEFAULT_RANK_MULTIPLE = 16
DEFAULT_KINDS: tuple[Kind, ...] = ("spatial", "channel")
# what the data-free budget allocation minimises (onnx_lowrank.ranks.weigh_errors); chosen by benchmarks/calibration.py
DEFAULT_OBJECTIVE = "sum"
ALL_KINDS: tuple[Kind, ...] = ("spatial", "channel")
ModelLike = str | os.PathLike[str] | onnx.ModelProto
CalibrationSource = str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class _Policy:
    rank: int | None = None
    energy: float | None = None
    speedup: float | None = None
    params_ratio: float | None = None
    ranks: Mapping[str, tuple[int, Kind | None]] | None = None

    @property
    def name(self) -> str:
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        if self.ranks is not None:
            return "ranks"
        return "budget"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for field in ("rank", "energy", "speedup", "params_ratio"):
            if getattr(self, field) is not None:
                out[field] = getattr(self, field)
        return out


def _parse_ranks(ranks: Mapping[str, Any]) -> dict[str, tuple[int, Kind | None]]:
    parsed: dict[str, tuple[int, Kind | None]] = {}
    for node, value in ranks.items():
        kind: Any = None
        if isinstance(value, Mapping):
            kind = value.get("kind")
            value = value.get("rank")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LowRankError(f"ranks: node {node!r} has rank {value!r}; ranks must be whole numbers >= 1")
        if kind is not None and kind not in ALL_KINDS:
            raise LowRankError(f"ranks: node {node!r} has kind {kind!r}; kinds are {', '.join(ALL_KINDS)}")
        parsed[str(node)] = (value, kind)
    return parsed


def _policy(
    rank: int | None, energy: float | None, speedup: float | None, params_ratio: float | None, ranks: Mapping[str, Any] | None
) -> _Policy:
    per_layer = {k: v for k, v in (("rank", rank), ("energy", energy), ("ranks", ranks)) if v is not None}
    budgets = {k: v for k, v in (("speedup", speedup), ("params-ratio", params_ratio)) if v is not None}
    if len(per_layer) > 1 or (per_layer and budgets):
        raise LowRankError(f"choose one rank policy, got {' and '.join('--' + k for k in [*per_layer, *budgets])}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LowRankError(f"--rank must be a whole number >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise LowRankError(f"--energy must be in (0, 1], got {energy!r}")
    if speedup is not None and not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and float(speedup) >= 1.0):
        raise LowRankError(f"--speedup must be a number >= 1, got {speedup!r}")
    if params_ratio is not None and not (isinstance(params_ratio, (int, float)) and 0.0 < float(params_ratio) <= 1.0):
        raise LowRankError(f"--params-ratio must be in (0, 1], got {params_ratio!r}")
    if ranks is not None:
        if not isinstance(ranks, Mapping) or not ranks:
            raise LowRankError("ranks must be a non-empty mapping of node name to rank")
        return _Policy(ranks=_parse_ranks(ranks))
    if not per_layer and not budgets:
        return _Policy(speedup=DEFAULT_SPEEDUP)
    return _Policy(rank=rank, energy=energy, speedup=speedup, params_ratio=params_ratio)


def _regex(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LowRankError(f"{flag}: invalid regular expression {pattern!r} ({exc})") from None


def _kinds(kinds: Sequence[str] | None) -> tuple[Kind, ...]:
    if kinds is None:
        return DEFAULT_KINDS
    chosen = tuple(dict.fromkeys(kinds))
    bad = [k for k in chosen if k not in ALL_KINDS]
    if bad or not chosen:
        raise LowRankError(f"--kinds: unknown kind(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ALL_KINDS)}")
    return chosen  # type: ignore[return-value]


def _as_model(model: ModelLike, inplace: bool = False) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        if inplace:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the caller's model is never changed
        return copy
    return load_model(model)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant tensor, in all graphs and functions."""
    return sum(math.prod(t.dims) for t in external_data_helper._get_all_tensors(model))


def _stored_error(site: Site, kernel: np.ndarray, factors: Factors) -> float:
    """``||W − W_K|| / ||W||`` for ``kernel`` (the site's, in conv layout), the factors rounded to the dtype they are written in."""
    assert site.weight is not None
    dtype = helper.tensor_dtype_to_np_dtype(site.weight.data_type)
    rounded = Factors(
        factors.kind,
        factors.rank,
        factors.first.astype(dtype).astype(np.float64),
        factors.second.astype(dtype).astype(np.float64),
        factors.singular_values,
    )
    w = kernel.astype(np.float64)
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return 0.0
    return float(np.linalg.norm(w - reconstruct(rounded, site.groups)) / norm)


_SharedDecompositions = dict[tuple[object, ...], dict[Kind, Decomposition]]


class _Unit:
    """Sites that share one weight: factored once, one kind and rank for all."""

    def __init__(self, sites: list[Site], kinds: list[Kind], shared: _SharedDecompositions | None = None) -> None:
        self.sites = sites
        self.kinds = kinds
        first = sites[0]
        # keyed by the weight as buckets are: units of several plans over one prepared model share the spectra
        self._decompositions: dict[Kind, Decomposition] = (
            {} if shared is None else shared.setdefault((first.weight_key, type(first), first.groups), {})
        )
        self.macs = sum(s.cost.macs for s in sites if s.cost)
        assert first.cost is not None
        self.params = first.cost.params  # the weight is stored once
        self.rank_macs = {k: sum(s.cost.rank_macs[k] for s in sites if s.cost) for k in kinds}
        self.rank_params = {k: first.cost.rank_params[k] for k in kinds}
        self.bias = first.cost.bias
        # with calibration data: data-aware decompositions (per kind) and the gain from this layer's output
        # error to the model's outputs (see onnx_lowrank.calibration.plan)
        self.data_aware: dict[Kind, Any] = {}
        self.gain = 1.0
        self.overhead = LayerOverhead(
            len(sites),
            sum(s.cost.activations for s in sites if s.cost),
            {k: sum(s.cost.rank_activations.get(k, 0) for s in sites if s.cost) for k in kinds},
        )

    @property
    def key(self) -> str:
        return self.sites[0].key

    @functools.cached_property
    def kernel(self) -> np.ndarray:
        """The weight in conv layout, read once and shared by every kind's decomposition."""
        return self.sites[0].kernel()

    def decomposition(self, kind: Kind) -> Decomposition:
        if kind in self.data_aware:
            found: Decomposition = self.data_aware[kind]
            return found
        if kind not in self._decompositions:
            self._decompositions[kind] = decompose_kernel(self.kernel, self.sites[0].groups, kind)
        return self._decompositions[kind]

    def errors(self, kind: Kind) -> np.ndarray:
        """Per rank, the error the allocation weighs: relative squared kernel error, or with calibration data
        the predicted relative output error times the layer's gain."""
        return tail_errors(self.decomposition(kind).s) * self.gain

    def choices(self, multiple: int, objective: str = "sum") -> LayerChoices:
        options = [Option(self.macs, 0.0, None, 0, self.params)]
        for kind in self.kinds:
            # with calibration data the errors are predicted damage, which adds up: summed as they are
            errors = self.errors(kind) if kind in self.data_aware else weigh_errors(self.errors(kind), objective)
            for r in candidate_ranks(errors.size - 1, multiple):
                if np.isfinite(errors[r]):
                    options.append(Option(self.rank_macs[kind] * r, float(errors[r]), kind, r, self.rank_params[kind] * r + self.bias))
        return LayerChoices(self.key, options)


def _round(rank: int, full: int, multiple: int) -> int:
    return min(full, -(-rank // multiple) * multiple) if multiple > 1 and rank < full else min(rank, full)


def _choose_per_layer(unit: _Unit, policy: _Policy, force: bool, multiple: int) -> tuple[Kind | None, int, str | None]:
    if policy.rank is not None or policy.ranks is not None:
        if policy.ranks is not None:
            rank, wanted = policy.ranks[unit.key]
            if wanted is not None and wanted not in unit.kinds:
                return None, 0, f"ranks file asks for kind {wanted!r}, which this layer does not allow"
            kind: Kind = wanted or unit.kinds[0]
        else:
            rank, kind = int(policy.rank), unit.kinds[0]  # type: ignore[arg-type]
        r = _round(rank, unit.decomposition(kind).full_rank, multiple)
    else:
        candidates = []
        for k in unit.kinds:
            r_k = _round(energy_rank(unit.decomposition(k).s, float(policy.energy)), unit.decomposition(k).full_rank, multiple)  # type: ignore[arg-type]
            candidates.append((unit.rank_macs[k] * r_k, k, r_k))
        _, kind, r = min(candidates)
    pair = unit.rank_macs[kind] * r
    if pair >= unit.macs and not force:
        return None, r, f"{kind} rank {r} would not cut MACs ({pair:,} >= {unit.macs:,}); --force decomposes anyway"
    return kind, r, None


# Under a MAC budget alone, a layer holding under this share of the MACs whose weight has more elements than
# SCREEN_WEIGHTS is not offered: it can save almost nothing, and its factorization (the fully connected layers
# of VGG: 100 M weights) would cost more time than all the convolutions together.
SCREEN_MAC_SHARE = 0.01
SCREEN_WEIGHTS = 1_000_000


def _screen_for_macs(units: list[_Unit], reasons: dict[str, str | None], total_macs: int) -> list[_Unit]:
    kept = []
    for unit in units:
        share = unit.macs / total_macs if total_macs else 0.0
        if share < SCREEN_MAC_SHARE and unit.params > SCREEN_WEIGHTS:
            for site in unit.sites:
                reasons[site.key] = (
                    f"holds {share:.2%} of the MACs with {unit.params:,} weights: not offered to --speedup alone "
                    "(--params-ratio or --rank/--energy decompose it)"
                )
            continue
        kept.append(unit)
    return kept


T = TypeVar("T")
R = TypeVar("R")


def _parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``map`` in ``workers`` threads (LAPACK releases the GIL), in order; plain ``map`` for one worker or item."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, items)


def _spectra(units: list[_Unit], progress: Progress | None, workers: int) -> dict[str, str]:
    """Singular values of every unit and kind, in parallel threads (LAPACK releases the GIL).

    Returns the units that cannot be factored (non-finite weights), with the reason.
    """
    jobs = [(unit, kind) for unit in units for kind in unit.kinds]
    failed: dict[str, str] = {}
    if not jobs:
        return failed

    def run(job: tuple[_Unit, Kind]) -> str:
        unit, kind = job
        try:
            unit.decomposition(kind).s  # noqa: B018 - computes and caches the spectrum
        except ValueError as exc:  # non-finite values in the weight
            failed[unit.key] = f"weight cannot be factored: {exc}"
        return unit.key

    for done, key in enumerate(_parallel_map(run, jobs, workers), 1):
        if progress is not None:
            progress(done, len(jobs), key)
    return failed


def _choose_budget(
    units: list[_Unit],
    policy: _Policy,
    fixed_macs: int,
    fixed_params: int,
    params_total: int,
    force: bool,
    multiple: int,
    objective: str = "sum",
) -> dict[str, tuple[Kind | None, int, str | None]]:
    layers = [u.choices(multiple, objective) for u in units]
    before = fixed_macs + sum(u.macs for u in units)
    try:
        if policy.params_ratio is None:
            # the MAC budget, the splits ranked by what they cost to run (onnx_lowrank.mac_plan)
            mac_budget = before / float(policy.speedup)  # type: ignore[arg-type]
            overheads = [u.overhead for u in units]
            picks = allocate_effective(layers, overheads, mac_budget, fixed_macs, mac_plan.PER_NODE_MACS, mac_plan.PER_ELEMENT_MACS)
        else:
            mac_budget = before / float(policy.speedup) if policy.speedup else float("inf")
            picks = allocate_two(layers, mac_budget, policy.params_ratio * params_total, fixed_macs, fixed_params)
    except Infeasible as exc:
        if policy.params_ratio is not None and "parameter" in str(exc):
            best = exc.best / params_total if params_total else 1.0
            raise LowRankError(
                f"--params-ratio {policy.params_ratio:g} cannot be reached: the least reachable is {best:.3g} (all at rank 1)"
            ) from None
        best_speedup = before / exc.best if exc.best else float("inf")
        raise LowRankError(
            f"--speedup {policy.speedup:g} cannot be reached: the most any allocation gives is {best_speedup:.3g}x "
            "(every eligible layer at its smallest rank)"
        ) from None
    chosen: dict[str, tuple[Kind | None, int, str | None]] = {}
    what = " and ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in policy.describe().items() if k in ("speedup", "params_ratio"))
    for unit in units:
        pick = picks[unit.key]
        if pick.kind is not None:
            chosen[unit.key] = (pick.kind, pick.rank, None)
        elif force:
            kind = unit.kinds[0]
            chosen[unit.key] = (kind, unit.decomposition(kind).full_rank, None)
        else:
            chosen[unit.key] = (None, 0, f"left as is by {what}: other layers lose less per MAC/parameter saved")
    return chosen


def _layer_report(site: Site, reason: str | None) -> LayerReport:
    shape = site.weight.shape if site.weight is not None else None
    macs = site.cost.macs if site.cost else 0
    return LayerReport(
        node=site.key,
        op_type=site.node.op_type,
        decomposed=False,
        reason=reason,
        macs_before=macs,
        macs_after=macs,
        weight=site.weight.name if site.weight else None,
        weight_shape=list(shape) if shape is not None else None,
        groups=site.groups if shape is not None else None,
        shape_known=site.shape_known,
        ran=site.ran,
        executions=site.executions,
        scope=scope_label(site.scope),
    )


def find_sites(model: onnx.ModelProto, shapes: ModelShapes) -> list[Site]:
    """Every MAC-carrying node of the model — conv-like, fully connected, then the layers no pass decomposes
    (recurrent layers, quantized products) — each under a unique key.

    Exporters sometimes repeat node names; a repeated key gets ``#2``, ``#3``, … in graph order.
    """
    sites = [*find_conv_sites(model, shapes), *find_fc_sites(model, shapes), *find_fixed_sites(model, shapes)]
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.key, 0) + 1
        seen[site.key] = count
        if count > 1:
            site.key = f"{site.key}#{count}"
    return sites


def decompose(
    model: ModelLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    speedup: float | None = None,
    params_ratio: float | None = None,
    ranks: Mapping[str, Any] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    force: bool = False,
    kinds: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rank_multiple: int | None = None,
    fold_bn: bool = True,
    progress: Progress | None = None,
    workers: int | None = None,
    measure: bool = False,
    threads: int | None = None,
    calibration: CalibrationSource | None = None,
    refit: bool | None = None,
    sensitivity: bool | None = None,
    calibration_options: Any = None,
    objective: str | None = None,
    inplace: bool = False,
    allow_unknown_shapes: bool = False,
    shapes: ModelShapes | None = None,
    mobile_safe: bool = False,
    quantize: str | None = None,
    by: str | None = None,
    timing_cache: bool | str | os.PathLike[str] = True,
    check_runs: int | None = None,
    pad_ranks: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Decompose the model's layers; return the new model and what was done.

    One per-layer policy may be given — ``rank`` (every layer, clipped to its
    full rank), ``energy`` (per layer, the least rank keeping that share of
    Σ s²) or ``ranks`` (node name → rank; other layers are left alone) — or the
    global budgets ``speedup`` (total MACs before/after ≥ S) and/or
    ``params_ratio`` (parameters after/before ≤ R), met with the least total
    relative squared error. With nothing given: ``speedup=2``.

    ``kinds`` lists the splits offered (``"spatial"``, ``"channel"``; default
    both). ``include``/``exclude`` are regular expressions searched in node
    names. ``force`` decomposes layers even where the pair costs more MACs.

    Sizes (see :mod:`onnx_lowrank.run_shapes`): MACs are those that run on a
    reference input — the first calibration sample, else a random input of the
    ``input_shapes`` (input name → shape, fixing symbolic dims) or declared
    shapes — read off one onnxruntime run wherever shape inference leaves a
    layer's size open or a layer sits in an If/Loop/Scan body; only the branch
    that runs counts, a Loop body counts once per iteration. When an input has a
    symbolic dim and no size, a MAC budget is refused, naming the input, unless
    ``allow_unknown_shapes`` (then such layers count at one output pixel).
    ``shapes`` passes sizes already resolved by :func:`onnx_lowrank.run_shapes.resolve_shapes`.
    ``rank_multiple`` rounds ranks up to a multiple (default: 16 for the
    ``speedup``/``params_ratio`` allocation — measured fastest in onnxruntime,
    see ``benchmarks/results/studies.json`` — and 1 for ``rank``/``energy``/``ranks``,
    which then give the rank asked for). ``fold_bn`` first folds
    BatchNormalization into the Conv before it. ``progress(done, total, name)``
    is called as layers are analysed. ``workers`` threads compute the spectra
    (default: the number of CPUs, at most 4).

    What ``speedup`` (alone) plans by, ``by``: ``"latency"`` — every layer's
    splits timed in onnxruntime on this machine with ``threads`` intra-op
    threads (default: onnxruntime's own default, the physical cores), the
    allocation made on milliseconds and the whole model re-timed until it meets
    the target — or ``"macs"``, a plan by MAC count, portable to other hardware.
    The default (None) is latency whenever the model can be timed (a reference
    input exists and every layer to plan has a known size on it), MACs
    otherwise; ``measure=True`` is ``by="latency"``. Layer timings are kept
    across runs in the user's cache folder (``timing_cache``: True, a folder,
    or False to keep nothing; see :mod:`onnx_lowrank.timing_cache`). Whatever
    the plan, the result is timed against the original (``check_runs``
    interleaved runs at most, default 10; 0 skips it) where the model can be
    run, and ``Report.latency`` holds the measured ratio beside the MAC ratio.
    ``pad_ranks`` (per-layer policies): a Conv pair whose rank does not fill
    whole channel blocks of onnxruntime's blocked CPU kernels on this machine
    gets zero filters up to the next block (``LayerReport.stored_rank``; the
    MACs count them), where that still saves MACs.

    ``calibration`` (an ``.npz`` or a folder of ``<input>.npy``, arrays keyed by
    input name with samples on axis 0, or an iterable of such batches) makes the
    conversion data-aware (:mod:`onnx_lowrank.calibration`): one streamed pass
    gathers each layer's input statistics, every split's factors minimise the
    layer's output error on them, and every rank's output error comes from the
    same statistics; with a budget (``speedup``/``params_ratio``) the ranks
    minimise the predicted damage to the model's outputs, each layer's error
    weighted by its gain measured once on a few samples (``sensitivity``,
    default on); then every decomposed layer's second factor and bias are refit
    to the original layer's outputs from the inputs it really receives, stage
    by stage (``refit``, default on). Input sizes the cost model does not know
    are taken from the calibration data. ``calibration_options`` (a
    :class:`onnx_lowrank.calibration.CalibrationOptions`) tunes the passes.

    ``mobile_safe`` keeps whole every layer whose pair a mobile execution
    provider (NNAPI, CoreML) would refuse where it takes the original, so the
    decomposition adds no partition (:mod:`onnx_lowrank.mobile`; the layer's
    reason says which EP and node). ``quantize`` (``"dynamic"`` or
    ``"static"``) then quantizes the result to INT8 with onnxruntime's tools,
    ``static`` calibrated on ``calibration`` (:mod:`onnx_lowrank.quantize`);
    each layer's ``quantized`` says the form its nodes run in.

    ``model`` is a path or a ``ModelProto``; a given ``ModelProto`` is copied,
    never changed — unless ``inplace``, which rewrites it and saves a copy of
    the weights. Raises :class:`LowRankError` for bad arguments or models.
    """
    options: dict[str, Any] = dict(
        rank=rank,
        energy=energy,
        speedup=speedup,
        params_ratio=params_ratio,
        ranks=ranks,
        include=include,
        exclude=exclude,
        force=force,
        kinds=kinds,
        input_shapes=input_shapes,
        rank_multiple=rank_multiple,
        fold_bn=fold_bn,
        progress=progress,
        workers=workers,
        measure=measure,
        threads=threads,
        inplace=inplace,
        allow_unknown_shapes=allow_unknown_shapes,
        shapes=shapes,
        objective=objective,
        by=by,
        timing_cache=timing_cache,
        check_runs=check_runs,
        pad_ranks=pad_ranks,
    )
    if objective is not None and objective not in OBJECTIVES:
        raise LowRankError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if calibration is None and (refit or sensitivity):
        raise LowRankError("refit and sensitivity allocation need calibration data")
    if quantize is not None or mobile_safe:
        return _decompose_for_mobile(model, options, calibration, refit, sensitivity, calibration_options, mobile_safe, quantize)
    # numpy's BLAS on one thread: our workers (and onnxruntime's threads) fill the cores; a multi-threaded
    # OpenBLAS beside them was measured 2-20x slower on 2 cores, and slower even alone for these sizes
    with single_threaded_blas():
        if calibration is None:
            return _decompose(model, **options)
        return _decompose_calibrated(model, options, calibration, refit, sensitivity, calibration_options)


def _check_calibration_use(
    policy: _Policy, sensitivity: bool | None, input_shapes: Mapping[str, Sequence[int]] | None, data: Mapping[str, Any]
) -> None:
    """Refuse, before any work, what calibration cannot do with these options (one line each)."""
    if sensitivity and policy.name != "budget":
        raise LowRankError(f"--sensitivity allocates ranks under a budget: it needs --speedup or --params-ratio, not --{policy.name}")
    for name, shape in (input_shapes or {}).items():
        if name in data and tuple(shape[1:]) != tuple(data[name].shape[1:]):
            raise LowRankError(
                f"--input-shape {name}={','.join(map(str, shape))} differs from the calibration data's samples "
                f"{tuple(data[name].shape[1:])}: the plan and the statistics must see the same size"
            )


def _decompose_calibrated(
    model: ModelLike,
    options: dict[str, Any],
    calibration: CalibrationSource,
    refit: bool | None,
    sensitivity: bool | None,
    calibration_options: Any,
) -> tuple[onnx.ModelProto, Report]:
    from .calibration import load_calibration

    start = time.perf_counter()
    policy = _policy(options["rank"], options["energy"], options["speedup"], options["params_ratio"], options["ranks"])
    # the refit compares with the model as given, so the conversion itself works on a copy
    source = _as_model(model, options["inplace"])
    data = load_calibration(calibration, source)
    _check_calibration_use(policy, sensitivity, options["input_shapes"], data)
    if options["shapes"] is None:
        # one set of sizes for the statistics, the gains and the plan: those of a real input
        reference = {name: values[:1] for name, values in data.items()}
        options = {**options, "shapes": resolve_shapes(source, options["input_shapes"], reference)}
    run = _CalibrationRun(data, options, refit, sensitivity, calibration_options)
    new, report = _calibrated_target(source, run, options)
    report.calibration["seconds"] = time.perf_counter() - start
    report.seconds = time.perf_counter() - start
    return new, report


class _CalibrationRun:
    """What calibration measures once for any number of plans over one model: the statistics, the data-aware
    decompositions and the gains (:func:`onnx_lowrank.calibration.data_aware_plan`, made by the first plan's
    units and handed to every later plan's units of the same layers), and the settings of the refit."""

    def __init__(
        self,
        data: Mapping[str, Any],
        options: Mapping[str, Any],
        refit: bool | None,
        sensitivity: bool | None,
        calibration_options: Any,
    ) -> None:
        from .calibration import CalibrationOptions

        policy = _policy(options["rank"], options["energy"], options["speedup"], options["params_ratio"], options["ranks"])
        chosen = calibration_options if calibration_options is not None else CalibrationOptions()
        # the refit/sensitivity arguments, when given, override the options' own
        self.weigh = policy.name == "budget" and (chosen.sensitivity if sensitivity is None else sensitivity)
        self.refit = chosen.refit if refit is None else refit
        self.settings = replace(chosen, sensitivity=self.weigh, refit=self.refit)
        self.data = data
        progress = options["progress"]
        self.passes = (lambda done, total, phase: progress(done, total, f"calibration {phase}")) if progress is not None else None
        self.plan: Any = None
        self._decompositions: dict[str, dict[Kind, Any]] = {}
        self._typical = 1.0

    def calibrate(self, proto: onnx.ModelProto, units: list[_Unit], reasons: dict[str, str | None]) -> None:
        """Give ``units`` their data-aware decompositions and gains (measured on the first call)."""
        from .calibration import data_aware_plan

        if self.plan is None:
            plan = data_aware_plan(proto, units, self.data, self.settings, progress=self.passes)
            estimated = plan.gain_result.estimated if plan.gain_result is not None else {}
            measured = [g for key, g in plan.gains.items() if key not in estimated]
            self._typical = float(statistics.median(measured)) if measured else 1.0
            self._decompositions, plan.decompositions = plan.decompositions, {}
            self.plan = plan
        for unit in units:
            unit.data_aware = self._decompositions.get(unit.key, {})
            if self.weigh:
                # a unit without statistics weighs its kernel error with a typical gain
                unit.gain = self.plan.gains.get(unit.key, self._typical) if unit.data_aware else self._typical


def _calibrated_target(
    source: onnx.ModelProto, run: _CalibrationRun, options: dict[str, Any], prepared: _Prepared | None = None
) -> tuple[onnx.ModelProto, Report]:
    """One conversion with calibration data: data-aware factors and ranks from ``run``, then the refit.
    ``prepared``: a :func:`_prepare` of ``source`` to convert a copy of (else ``source`` is prepared anew)."""
    from .calibration import refit_layers

    policy = _policy(options["rank"], options["energy"], options["speedup"], options["params_ratio"], options["ranks"])
    if prepared is None:
        # the refit compares with ``source`` as given, so the conversion works on a copy
        new, report = _decompose(source, **{**options, "inplace": False}, calibrate=run.calibrate)
    else:
        new, report = _decompose_prepared(prepared, **options, calibrate=run.calibrate)
    plan = run.plan
    if policy.name != "budget":
        allocation = f"fixed by --{policy.name}"
    elif run.weigh:
        allocation = "damage to the outputs (layer output errors from statistics, times gains measured once)"
    else:
        allocation = "layer output errors from statistics"
    report.policy["allocation"] = allocation
    if plan is not None:
        gains = plan.gains if run.weigh else {}
        estimated = plan.gain_result.estimated if plan.gain_result is not None else {}
        for layer in report.layers:
            if layer.node in gains and layer.node not in estimated:
                layer.gain = gains[layer.node]
        report.calibration.update(plan.to_dict())
    if run.refit and report.decomposed:
        settings = run.settings
        result = refit_layers(
            source,
            new,
            report,
            run.data,
            batch_size=settings.batch_size,
            stages=settings.stages,
            ridge=settings.ridge,
            positions=settings.positions,
            threads=settings.threads,
            progress=run.passes,
            inplace=True,
        )
        new = result.model
        report.calibration["refit"] = result.to_dict()
        by_node = {layer.node: layer for layer in result.layers}
        for layer in report.layers:
            done = by_node.get(layer.node)
            if done is not None and done.error_after is not None:
                layer.output_error = done.error_after
    report.calibration["samples"] = plan.samples if plan is not None else len(next(iter(run.data.values())))
    return new, report


@dataclass
class _Prepared:
    """A model made ready for planning, once for any number of plans: BatchNormalization folded, shapes
    inferred, the decomposable sites found. ``decompositions`` caches every spectrum computed, by weight."""

    proto: onnx.ModelProto
    params_before: int
    folded: list[tuple[str, str]]
    kept_batchnorms: dict[str, str]
    shapes: ModelShapes
    sites: list[Site]
    fold_bn: bool
    decompositions: _SharedDecompositions


def _prepare(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    fold_bn: bool = True,
    inplace: bool = False,
    shapes: ModelShapes | None = None,
    reference: Mapping[str, Any] | None = None,
) -> _Prepared:
    """Load (or copy) the model, fold BatchNormalization, resolve the sizes that run and find the sites."""
    proto = _as_model(model, inplace)
    params_before = count_params(proto)
    folded: list[tuple[str, str]] = []
    kept_batchnorms: dict[str, str] = {}
    if fold_bn:
        proto, fold = fold_batchnorm(proto)
        folded, kept_batchnorms = fold.folded, fold.refused
    model_shapes = shapes if shapes is not None else resolve_shapes(proto, input_shapes, reference)
    sites = find_sites(proto, model_shapes)
    return _Prepared(proto, params_before, folded, kept_batchnorms, model_shapes, sites, fold_bn, {})


def _decompose(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    fold_bn: bool = True,
    inplace: bool = False,
    shapes: ModelShapes | None = None,
    reference: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, Report]:
    """The data-free conversion; :func:`decompose` documents the arguments."""
    start = time.perf_counter()
    _check_options(**options)  # bad arguments are refused before the model is read
    prepared = _prepare(model, input_shapes=input_shapes, fold_bn=fold_bn, inplace=inplace, shapes=shapes, reference=reference)
    return _decompose_prepared(prepared, copy=False, start=start, **options)


def _check_options(
    *,
    rank: int | None = None,
    energy: float | None = None,
    speedup: float | None = None,
    params_ratio: float | None = None,
    ranks: Mapping[str, Any] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    kinds: Sequence[str] | None = None,
    rank_multiple: int | None = None,
    by: str | None = None,
    measure: bool = False,
    threads: int | None = None,
    check_runs: int | None = None,
    **_: Any,
) -> tuple[_Policy, tuple[Kind, ...], int, re.Pattern[str] | None, re.Pattern[str] | None]:
    """The policy, kinds, rank multiple and name filters, or :class:`LowRankError` for bad arguments."""
    policy = _policy(rank, energy, speedup, params_ratio, ranks)
    resolve_threads(threads)
    budget_alone = policy.name == "budget" and policy.speedup is not None and policy.params_ratio is None
    if resolve_by(by, measure) == "latency" and not budget_alone:
        raise LowRankError("--by latency (--measure) plans a --speedup budget alone, not --rank/--energy/--ranks or --params-ratio")
    if check_runs is not None and (isinstance(check_runs, bool) or not isinstance(check_runs, int) or check_runs < 0):
        raise LowRankError(f"check runs must be a whole number >= 0, got {check_runs!r}")
    allowed = _kinds(kinds)
    if rank_multiple is None:
        rank_multiple = DEFAULT_RANK_MULTIPLE if policy.name == "budget" else 1
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise LowRankError(f"rank multiple must be a whole number >= 1, got {rank_multiple!r}")
    return policy, allowed, rank_multiple, _regex(include, "--include"), _regex(exclude, "--exclude")


def _decompose_prepared(
    prepared: _Prepared,
    *,
    rank: int | None = None,
    energy: float | None = None,
    speedup: float | None = None,
    params_ratio: float | None = None,
    ranks: Mapping[str, Any] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    force: bool = False,
    kinds: Sequence[str] | None = None,
    rank_multiple: int | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    measure: bool = False,
    threads: int | None = None,
    allow_unknown_shapes: bool = False,
    copy: bool = True,
    start: float | None = None,
    objective: str | None = None,
    calibrate: Callable[[onnx.ModelProto, list[_Unit], dict[str, str | None]], None] | None = None,
    by: str | None = None,
    timing_cache: bool | str | os.PathLike[str] = True,
    check_runs: int | None = None,
    pad_ranks: bool = False,
    **_: Any,  # input_shapes, fold_bn, inplace, shapes: fixed by _prepare
) -> tuple[onnx.ModelProto, Report]:
    """Plan ranks for one policy on a prepared model and apply them: to a copy (``copy``), else to
    ``prepared.proto`` itself, which is then used up. ``calibrate(model, units, reasons)``, when given, runs
    on the model once the units are known, before any spectrum or rank is computed (the calibrated
    conversion gives it)."""
    start = time.perf_counter() if start is None else start
    workers = workers or min(os.cpu_count() or 1, 4)
    wanted_by = resolve_by(by, measure)
    threads = resolve_threads(threads)
    check_runs = CHECK_RUNS if check_runs is None else check_runs
    policy, allowed, rank_multiple, include_re, exclude_re = _check_options(
        rank=rank,
        energy=energy,
        speedup=speedup,
        params_ratio=params_ratio,
        ranks=ranks,
        include=include,
        exclude=exclude,
        kinds=kinds,
        rank_multiple=rank_multiple,
        by=by,
        measure=measure,
        threads=threads,
        check_runs=check_runs,
    )
    budget_alone = policy.name == "budget" and policy.speedup is not None and policy.params_ratio is None
    proto, model_shapes, sites = prepared.proto, prepared.shapes, prepared.sites
    params_before = prepared.params_before
    if policy.ranks is not None:
        unknown = sorted(set(policy.ranks) - {s.key for s in sites})
        if unknown:
            raise LowRankError(f"ranks file names nodes that are not decomposable layers of the model: {', '.join(unknown[:5])}")
    needs_macs = (policy.name == "budget" and policy.speedup is not None) or wanted_by == "latency"
    warnings, excluded, exact = _size_check(sites, model_shapes, needs_macs, allow_unknown_shapes)

    reasons: dict[str, str | None] = {}
    selected: list[Site] = []
    for site in sites:
        reason = None if site.available(allowed) else site.why_not(allowed)
        if reason is None and include_re is not None and not include_re.search(site.key):
            reason = "not matched by --include"
        if reason is None and exclude_re is not None and exclude_re.search(site.key):
            reason = "matched by --exclude"
        if reason is None and policy.ranks is not None and site.key not in policy.ranks:
            reason = "not named in the ranks file"
        if reason is None and site.key in excluded:
            reason = excluded[site.key]
        reasons[site.key] = reason
        if reason is None:
            selected.append(site)
    notice = None
    if not any(site.available(allowed) and reasons[site.key] != "not matched by --include" for site in sites):
        notice = _nothing_to_decompose(sites, allowed)
        if policy.speedup is not None and policy.speedup > 1:
            raise LowRankError(f"--speedup {policy.speedup:g} cannot be reached: {notice}")

    buckets: dict[tuple[object, ...], list[Site]] = {}
    for site in selected:
        rank_key = policy.ranks.get(site.key) if policy.ranks else None
        buckets.setdefault((site.weight_key, type(site), site.groups, rank_key), []).append(site)
    units = [_Unit(group, group[0].available(allowed), prepared.decompositions) for group in buckets.values()]
    counted = [s for s in sites if s.cost is not None and (s.shape_known or not exact)]
    if policy.name == "budget" and policy.params_ratio is None:
        units = _screen_for_macs(units, reasons, sum(s.cost.macs for s in counted if s.cost))
        selected = [site for unit in units for site in unit.sites]
    if calibrate is not None:
        calibrate(proto, units, reasons)
    failed = _spectra(units, progress, workers)
    if failed:
        for unit in units:
            for site in unit.sites:
                if unit.key in failed:
                    reasons[site.key] = failed[unit.key]
        units = [unit for unit in units if unit.key not in failed]
        selected = [site for unit in units for site in unit.sites]

    fixed_macs = sum(s.cost.macs for s in counted if s.cost and s not in selected)
    fixed_params = params_before - sum(u.params for u in units)
    plan_by, why_not_timed, timing = _plan_by(proto, model_shapes, units, wanted_by, budget_alone, threads, timing_cache)
    measured: dict[str, Any] = {}
    if policy.name == "budget" and plan_by == "latency":
        assert timing is not None
        try:
            chosen, measured = _measured_choice(proto, model_shapes, units, policy, timing, rank_multiple)
        except TimingFailed as exc:
            if wanted_by == "latency":
                raise
            plan_by, why_not_timed = "macs", str(exc)
        finally:  # the layers timed so far are kept, also when the target is refused
            assert timing.store is not None
            timing.store.save()
            warnings += timing.store.warnings
        if plan_by == "macs":
            timing = None
    if policy.name == "budget" and plan_by == "macs":
        chosen = _choose_budget(
            units, policy, fixed_macs, fixed_params, params_before, force, rank_multiple, objective or DEFAULT_OBJECTIVE
        )
    elif policy.name != "budget":
        chosen = {u.key: _choose_per_layer(u, policy, force, rank_multiple) for u in units}
    decomposes = any(kind is not None for kind, _, _ in chosen.values())
    if plan_by == "macs" and timing is None and check_runs and decomposes and why_not_timed is None:
        # the session of the original is made before its layers are rewritten in place
        timing, why_not_timed = _start_timing(proto, model_shapes, threads, None)

    layers = {site.key: _layer_report(site, reasons[site.key]) for site in sites}
    for site in sites:
        layers[site.key].counted = site in counted
    # per-layer policies give the ranks asked for; a budget's ranks are multiples of the rank multiple already
    plan = _plan(units, chosen, layers, workers, pad_to=kernel_block() if pad_ranks and policy.name != "budget" else None)
    if copy:  # the prepared model stays as it is for the next plan: the same sites, found again in a copy
        proto = _as_model(proto)
        own = {site.key: site for site in find_sites(proto, model_shapes)}
        plan = [(own[site.key], factors) for site, factors in plan]
    proto, made = apply_factors(proto, plan)
    for key, names in made.items():
        layers[key].vertical_node = names.first
        layers[key].horizontal_node = names.second
    if plan_by != "latency":
        measured = _check(proto, timing, check_runs, decomposes, why_not_timed, plan_by if policy.name == "budget" else None)
    del timing  # the original's session: its weights are a copy of the model's
    layer_list = [layers[s.key] for s in sites]
    report = Report(
        macs_before=sum(layer.macs_before for layer in layer_list if layer.counted),
        macs_after=sum(layer.macs_after for layer in layer_list if layer.counted),
        params_before=params_before,
        params_after=count_params(proto),
        layers=layer_list,
        policy={
            **policy.describe(),
            "kinds": list(allowed),
            "force": force,
            "rank_multiple": rank_multiple,
            "fold_bn": prepared.fold_bn,
            "measure": plan_by == "latency",
            "by": plan_by if policy.name == "budget" else None,
            "threads": threads,
        },
        folded_batchnorms=[bn for _, bn in prepared.folded],
        kept_batchnorms=dict(prepared.kept_batchnorms),
        warnings=warnings,
        latency=measured,
        seconds=time.perf_counter() - start,
        macs_exact=exact,
        shapes=_shapes_report(model_shapes),
        notice=notice,
    )
    report.control_flow = _control_flow_report(model_shapes, sites, layers)
    return proto, report


def _size_check(sites: list[Site], shapes: ModelShapes, needs_macs: bool, allow_unknown: bool) -> tuple[list[str], dict[str, str], bool]:
    """What the sizes allow: warnings, layers to leave alone for want of a size (key → reason), and whether the
    totals are exact (``False``: layers of unknown size are counted at one output pixel, by request).

    A plan by MACs on sizes that no run could fix is refused, naming the inputs that need ``--input-shape``.
    """
    warnings = list(shapes.warnings)
    # a layer that did not run (an If branch the reference input does not take) has no size to plan by
    idle = {s.key: f"does not run on the reference input: it is in {scope_label(s.scope)}" for s in sites if s.ran is False}
    if not needs_macs:
        idle = {}
    guessed = [s for s in sites if s.cost is not None and not s.shape_known and s.ran is not False]
    if not guessed:
        return warnings, idle, True
    no_run = shapes.source == "unknown"
    if no_run:
        why = needs_input_shape_message(shapes.missing_inputs) if shapes.missing_inputs else "the reference run failed"
        if needs_macs and not allow_unknown:
            raise LowRankError(
                f"the sizes of {len(guessed)} layer(s) are not known without a run, and no input can be built for one: {why}; "
                "or --allow-unknown-shapes to plan with those layers at one output pixel"
            )
        warnings.append(unsized_warning([s.key for s in guessed], why))
        return warnings, {}, False
    # a run was made (or none was needed) and these still have no size: inside a function body, say
    excluded = {s.key: f"its input size is not known (it is in {scope_label(s.scope)}): its MACs are not counted" for s in guessed}
    if needs_macs:
        shown = ", ".join(list(excluded)[:3]) + (", …" if len(excluded) > 3 else "")
        warnings.append(f"{len(excluded)} layer(s) of unknown size are left as they are and not counted in the totals ({shown})")
    else:
        excluded = {}
    return warnings, {**idle, **excluded}, True


def _nothing_to_decompose(sites: list[Site], allowed: tuple[Kind, ...]) -> str:
    """``nothing to decompose: 21 ConvInteger layers: quantized conv (ConvInteger)`` — the reasons, counted."""
    if not sites:
        return "nothing to decompose: the model has no Conv, ConvTranspose, Gemm or MatMul layer"
    counts: dict[tuple[str, str], int] = {}
    for site in sites:
        label = (site.node.op_type, site.why_not(allowed))
        counts[label] = counts.get(label, 0) + 1
    parts = sorted(counts.items(), key=lambda item: -item[1])
    shown = "; ".join(f"{n} {op} layer{'s' if n > 1 else ''}: {reason}" for (op, reason), n in parts[:3])
    return f"nothing to decompose: {shown}" + ("; …" if len(parts) > 3 else "")


def _shapes_report(shapes: ModelShapes) -> dict[str, Any]:
    return {
        "source": shapes.source,
        "reference_from": shapes.reference_from,
        "reference_input": {name: list(shape) for name, shape in shapes.input_shapes().items()},
        "missing_inputs": dict(shapes.missing_inputs),
        "seconds": shapes.seconds,
    }


def _control_flow_report(shapes: ModelShapes, sites: list[Site], layers: Mapping[str, LayerReport]) -> list[dict[str, Any]]:
    """Per If/Loop/Scan that holds layers: how it ran on the reference input, and the MACs of each subgraph."""
    out = []
    for flow in shapes.control_flow:
        branches: dict[str, dict[str, Any]] = {}
        for site in sites:
            step = next((label for key, label in site.scope.path if key == flow.key), None)
            if step is None:
                continue
            entry = branches.setdefault(step, {"layers": 0, "ran": bool(flow.runs.get(step)), "macs_before": 0, "macs_after": 0})
            entry["layers"] += 1
            layer = layers[site.key]
            if layer.counted:
                entry["macs_before"] += layer.macs_before
                entry["macs_after"] += layer.macs_after
        out.append({"node": flow.node, "op_type": flow.op_type, "runs": dict(flow.runs), "subgraphs": branches})
    return out


def _plan(
    units: list[_Unit],
    chosen: Mapping[str, tuple[Kind | None, int, str | None]],
    layers: dict[str, LayerReport],
    workers: int = 1,
    pad_to: int | None = None,
) -> list[tuple[Site, Factors]]:
    """The factors to write per site (computed in ``workers`` threads), filling in the layer reports.

    ``pad_to``: a Conv pair (one group) whose rank is not a multiple of it gets zero filters up to the next
    multiple — onnxruntime's blocked CPU convolution takes a second conv only when its input channels fill
    whole blocks, and the zeros cost less than the layout reorders and plain kernel it would run otherwise
    (``benchmarks/speed.py --parts paper``: VGG-16's conv1_1 at rank 5).
    """

    def factor(unit: _Unit) -> tuple[Factors, float]:
        kind, r, _ = chosen[unit.key]
        assert kind is not None
        factors = unit.decomposition(kind).factors(r)
        error = _stored_error(unit.sites[0], unit.kernel, factors)
        site = unit.sites[0]
        width = -(-factors.rank // pad_to) * pad_to if pad_to else factors.rank
        if width != factors.rank and site.groups == 1 and site.node.op_type == "Conv" and unit.rank_macs[kind] * width < unit.macs:
            factors = padded(factors, width)
        return factors, error

    todo = [unit for unit in units if chosen[unit.key][0] is not None]
    results = dict(zip([u.key for u in todo], _parallel_map(factor, todo, workers), strict=True))

    plan: list[tuple[Site, Factors]] = []
    for unit in units:
        kind, _, why = chosen[unit.key]
        for site in unit.sites:
            layers[site.key].full_rank = unit.decomposition(unit.kinds[0]).full_rank
            if kind is None:
                layers[site.key].reason = why
        if kind is None:
            continue
        factors, error = results[unit.key]
        for site in unit.sites:
            plan.append((site, factors))
            layer = layers[site.key]
            layer.decomposed = True
            layer.kind = kind
            layer.rank = factors.rank
            layer.full_rank = unit.decomposition(kind).full_rank
            layer.relative_error = error
            if kind in unit.data_aware:  # whitened spectrum: the predicted output error, not a kernel optimum
                layer.output_error = factors.relative_error
            else:
                layer.optimal_error = factors.relative_error
            width = factors.first.shape[0] // site.groups  # intermediate channels per group as stored, zero filters included
            layer.stored_rank = width if width != factors.rank else None
            layer.macs_after = site.cost.pair_macs(kind, width) if site.cost else 0
    return plan


MEASURE_STEP = 8  # timed ranks are multiples of this (or of --rank-multiple when larger): onnxruntime's kernels block by 8
MEASURE_POINTS = 6  # at most this many timed ranks per layer and kind; the ranks between are interpolated
# a layer taking less than this share of the model's time is left as it is without timing its splits: it could
# save at most that share, and timing every small layer of a large network (DenseNet: 120 convs) costs seconds
MEASURE_SCREEN = 0.002
# a round's whole-model check: interleaved runs of the original and the candidate, as many as fit in
# ROUND_BUDGET_MS between ROUND_MIN_RUNS and ROUND_RUNS (VGG-16 at 1 thread: 0.55 s a round, 7 runs; the medians
# of runs that long vary by 1-2 %), twice when the target is met
ROUND_RUNS = 10
ROUND_MIN_RUNS = 3
ROUND_BUDGET_MS = 4000.0
MAX_ROUNDS = 4
# when no round meets the target, the fastest is kept with a warning (as --measure always did) when it reaches this
# share of it, else the target is refused: a plan measured far below what was asked is not what the user asked for
# (and a sign that the layers, timed alone, promised more than the model gave)
FAR_MISS = 0.8


def _start_timing(proto: onnx.ModelProto, shapes: ModelShapes, threads: int, store: TimingStore | None) -> tuple[Timing | None, str | None]:
    """A session of the model as it is now, for timing against; or None and the reason it cannot be made."""
    if shapes.reference is None:
        return None, untimeable_reason(shapes, [])
    try:
        timing = Timing.start(proto, shapes.reference, threads, store)
    except LowRankError as exc:
        return None, str(exc)
    try:  # a model onnxruntime loads but cannot run (no output, an attribute its kernel refuses) is not timed
        timing.original.run(None, timing.feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        return None, f"onnxruntime cannot run the model on the reference input ({first_line(exc)})"
    return timing, None


def _plan_by(
    proto: onnx.ModelProto,
    shapes: ModelShapes,
    units: list[_Unit],
    wanted: str | None,
    budget_alone: bool,
    threads: int,
    timing_cache: bool | str | os.PathLike[str],
) -> tuple[str, str | None, Timing | None]:
    """What the plan is made by — ``"latency"`` or ``"macs"`` — why the model cannot be timed (None when it can,
    or when no timing is wanted) and, for a plan by latency, what timing needs."""
    if not budget_alone or wanted == "macs" or not units:
        return "macs", None, None
    why = untimeable_reason(shapes, [site for unit in units for site in unit.sites])
    timing = None
    if why is None:
        timing, why = _start_timing(proto, shapes, threads, open_store(threads, timing_cache))
    if why is not None:
        if wanted == "latency":
            raise LowRankError(f"--by latency times the model on this machine, and cannot: {why}; --by macs plans by MAC count")
        return "macs", why, None
    return "latency", None, timing


def _check(
    candidate: onnx.ModelProto, timing: Timing | None, runs: int, decomposes: bool, why_not: str | None, by: str | None
) -> dict[str, Any]:
    """The measured ratio of a plan not made by latency (``by``: "macs", or None for a per-layer policy), or why there is none."""
    out: dict[str, Any] = {"by": by}
    if why_not is not None:
        out["why_macs"] = why_not
    if not decomposes:
        return {**out, "not_timed": "no layer was decomposed"}
    if runs == 0:
        return {**out, "not_timed": "not asked for (0 check runs)"}
    if timing is None:
        return {**out, "not_timed": why_not or "the model cannot be run"}
    try:
        return {**out, **check_candidate(timing, candidate, runs)}
    except LowRankError as exc:
        return {**out, "not_timed": str(exc)}


def _measured_choice(
    proto: onnx.ModelProto,
    shapes: ModelShapes,
    units: list[_Unit],
    policy: _Policy,
    timing: Timing,
    multiple: int,
) -> tuple[dict[str, tuple[Kind | None, int, str | None]], dict[str, Any]]:
    """Ranks from measured latency: each layer's options are timed in onnxruntime, the whole model checked.

    The allocator of :mod:`onnx_lowrank.ranks` runs on measured milliseconds instead of MACs; an option slower
    than the original layer is never offered. Each layer's splits are timed at a few ranks and interpolated
    between them (:mod:`onnx_lowrank.latency_plan`); a layer under ``MEASURE_SCREEN`` of the model's time is
    left as it is. The result is then timed as a whole model against the original (interleaved runs); when
    it falls short of the target, the latency budget is tightened by the shortfall and the allocation redone
    (at most ``MAX_ROUNDS`` rounds). A round that meets the target is measured a second time and keeps the
    lower ratio, so noise does not pass a candidate that is too slow.

    An option's error is what the budget allocation by MACs would weigh (:meth:`_Unit.errors`: the kernel
    error, or with calibration data the predicted damage to the outputs).
    """
    from .latency import LayerTimer
    from .verify import interleaved_latency, make_session

    target = float(policy.speedup)  # type: ignore[arg-type]
    threads = timing.threads
    timer = LayerTimer(proto.opset_import, threads=threads, store=timing.store)
    step = max(multiple, MEASURE_STEP)
    feeds = timing.feeds
    warm = _timed_runs(timing.original, feeds, 1)[0]  # the warm-up run sets how many runs fit in ~2 s
    before_ms = statistics.median(_timed_runs(timing.original, feeds, max(3, min(7, int(2000.0 / max(warm, 1e-3))))))
    choices: list[LayerChoices] = []
    unit_ms: dict[str, float] = {}
    screened: set[str] = set()
    try:
        for unit in units:
            times = [timer.original(site) for site in unit.sites]
            if any(t is None for t in times):
                continue  # unknown input shape: cannot be timed, left as is
            # a layer that runs several times per inference (a Loop body) costs each run
            base = float(sum(t * site.executions for t, site in zip(times, unit.sites, strict=True) if t is not None))
            unit_ms[unit.key] = base
            options = [Option(int(base * 1e6), 0.0, None, 0)]
            if base < MEASURE_SCREEN * before_ms:
                screened.add(unit.key)
                choices.append(LayerChoices(unit.key, options))
                continue
            for kind in unit.kinds:
                errors = unit.errors(kind)
                full = errors.size - 1
                limit = min(full, unit.macs // max(unit.rank_macs[kind], 1))
                grid = list(range(step, limit + 1, step)) or ([limit] if limit >= 1 else [])
                timed = {
                    r: sum((timer.pair(site, kind, r) or 0.0) * site.executions for site in unit.sites)
                    for r in timed_ranks(grid, MEASURE_POINTS)
                }
                for r in grid:
                    pair = interpolate(timed, r)
                    if pair < base:  # never offer a layer that gets slower
                        error = float(errors[r])
                        options.append(Option(int(pair * 1e6), error, kind, r))
            choices.append(LayerChoices(unit.key, options))
    except LowRankError as exc:  # a layer model onnxruntime cannot load (a dtype its CPU kernels lack, say)
        raise TimingFailed(f"a layer could not be timed: {exc}; --by macs plans by MAC count") from None
    except Exception as exc:  # onnxruntime raises its own exception types when a layer model fails to run
        raise TimingFailed(f"a layer could not be timed in onnxruntime ({first_line(exc)}); --by macs plans by MAC count") from None
    # the rest of the model, by difference: a layer timed alone also pays its own layout reorders and the
    # session's call, which in the model it does not, so this can be negative; the allocation then works on
    # what each split saves (the layer alone minus the pair alone), which is what carries over to the model
    fixed = before_ms - sum(unit_ms.values())
    budget = before_ms / target
    history: list[dict[str, float]] = []
    rounds: list[tuple[float, float, dict[str, Option]]] = []  # measured ratio, total error, picks
    least = False  # the last round took every layer's fastest option
    for _ in range(MAX_ROUNDS):
        try:
            picks = allocate(choices, budget * 1e6, fixed=fixed * 1e6)
        except Infeasible as exc:
            if not rounds:
                raise LowRankError(_unreachable(target, threads, before_ms, exc.best / 1e6)) from None
            if least:
                break
            # short of the target and the correction asks for more than the splits can give: one last round
            # with every layer at its fastest option
            # (costs are whole nanoseconds, and the best can be negative: it counts what the splits save)
            budget, least = (exc.best + 1) / 1e6, True
            picks = allocate(choices, budget * 1e6, fixed=fixed * 1e6)
        predicted_ms = fixed + sum(o.macs for o in picks.values()) / 1e6
        candidate_session = make_session(_candidate(proto, shapes, units, picks), threads=threads)
        orig_ms, cand_ms, runs = adaptive_interleaved(
            timing.original, candidate_session, feeds, ROUND_RUNS, ROUND_MIN_RUNS, ROUND_BUDGET_MS, warmup=2
        )
        ratio = orig_ms / cand_ms
        if ratio >= target:
            # the median of a few runs on a busy small machine can be several percent off: a round is accepted
            # only when a second, independent measurement agrees, and the lower of the two is kept
            again_orig, again_cand = interleaved_latency(timing.original, candidate_session, feeds, runs=runs, warmup=0)
            if again_orig / again_cand < ratio:
                orig_ms, cand_ms, ratio = again_orig, again_cand, again_orig / again_cand
        del candidate_session
        history.append(
            {
                "predicted_speedup": before_ms / predicted_ms if predicted_ms > 0 else float("inf"),
                "measured_speedup": ratio,
                "original_ms": orig_ms,
                "candidate_ms": cand_ms,
                "runs": runs,
            }
        )
        rounds.append((ratio, sum(o.error for o in picks.values()), picks))
        if ratio >= target or least:
            break
        budget = _corrected_budget(before_ms, predicted_ms, ratio, target, budget)
    meeting = [r for r in rounds if r[0] >= target]
    # the least error among rounds that met the target, else the fastest round
    best = min(meeting, key=lambda r: r[1]) if meeting else max(rounds, key=lambda r: r[0])
    if best[0] < FAR_MISS * target:
        # the timed splits promised more than the model gave (layers of a few microseconds, timed alone, are
        # mostly the session's own overhead): no plan came near the target, so none is written
        raise LowRankError(
            f"--speedup {target:g} cannot be reached by latency on this machine ({threads} thread(s)): the plans timed "
            f"reached at most {best[0]:.3g}x in {len(rounds)} round(s); ask for less, or --by macs for a plan by MAC count"
        )
    picks = best[2]
    chosen: dict[str, tuple[Kind | None, int, str | None]] = {}
    what = f"--speedup {target:g} by latency ({threads} thread(s))"
    for unit in units:
        pick = picks.get(unit.key)
        if pick is None:
            chosen[unit.key] = (None, 0, "input shape unknown: cannot be timed")
        elif unit.key in screened:
            chosen[unit.key] = (None, 0, f"left as is by {what}: takes under {MEASURE_SCREEN:.1%} of the model's time")
        elif pick.kind is None:
            chosen[unit.key] = (None, 0, f"left as is by {what}: slower, or costlier in accuracy per ms saved")
        else:
            chosen[unit.key] = (pick.kind, pick.rank, None)
    final = history[rounds.index(best)]
    info = {
        "by": "latency",
        **final,
        "target": target,
        "met": final["measured_speedup"] >= target,
        "threads": threads,
        "rounds": history,
        "layers_timed": timer.timed,
        "timing_cache": timing.store.summary() if timing.store is not None else None,
    }
    return chosen, info


def _corrected_budget(before_ms: float, predicted_ms: float, ratio: float, target: float, budget_ms: float) -> float:
    """The next round's latency budget after a round that measured ``ratio`` where ``predicted_ms`` was predicted.

    The splits saved a share ``a`` of what their timings alone promised (layers timed alone pay layout reorders
    and thread wake-ups the model shares, and at two threads a pair parallelises worse in the model than alone);
    the next allocation is asked for the saving the target needs at that rate, ``before − (before − before/S)/a``
    — never for less than the last budget times ``ratio/S`` would.
    """
    promised = before_ms - predicted_ms
    measured_ms = before_ms / ratio
    scaled = budget_ms * ratio / target
    if promised <= 0:
        return scaled
    share = min(max((before_ms - measured_ms) / promised, 0.2), 1.5)
    return min(scaled, before_ms - (before_ms - before_ms / target) / share)


def _unreachable(target: float, threads: int, before_ms: float, best_ms: float) -> str:
    """The refusal of a latency target the timed layers cannot reach: what the fastest splits save at most."""
    reachable = before_ms / best_ms if best_ms > 0 else float("inf")
    return (
        f"--speedup {target:g} cannot be reached by latency on this machine ({threads} thread(s)): the timed splits allow "
        f"at most {reachable:.3g}x (they save at most {before_ms - best_ms:.3g} of the model's {before_ms:.3g} ms; the rest is "
        "work no split makes faster); ask for less, or --by macs for a plan by MAC count"
    )


def _timed_runs(session: Any, feeds: Mapping[str, Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _candidate(proto: onnx.ModelProto, shapes: ModelShapes, units: list[_Unit], picks: Mapping[str, Option]) -> onnx.ModelProto:
    """A decomposed copy of ``proto`` for timing; ``proto`` itself is left as it is."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    sites = {site.key: site for site in find_sites(copy, shapes)}
    plan = []
    for unit in units:
        pick = picks.get(unit.key)
        if pick is None or pick.kind is None:
            continue
        factors = unit.decomposition(pick.kind).factors(pick.rank)
        plan += [(sites[site.key], factors) for site in unit.sites]
    return apply_factors(copy, plan)[0]


INSPECT_ENERGIES = (0.9, 0.99, 0.999)


def inspect(
    model: ModelLike, *, input_shapes: Mapping[str, Sequence[int]] | None = None, kinds: Sequence[str] | None = None
) -> list[InspectLayer]:
    """Per layer: shape, groups, MACs, and the ranks keeping 90/99/99.9 % of the energy with their speedups.

    The ranks are those of the first allowed kind of each layer (spatial where it applies).
    """
    allowed = _kinds(kinds)
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    shapes = resolve_shapes(proto, input_shapes)
    sites = find_sites(proto, shapes)
    size_note = None
    if shapes.missing_inputs:
        size_note = needs_input_shape_message(shapes.missing_inputs)
    result = []
    for site in sites:
        w = site.weight if site.weight is not None else None
        usable = site.available(allowed)
        layer = InspectLayer(
            node=site.key,
            op_type=site.node.op_type,
            weight_shape=list(w.shape) if w is not None else None,
            groups=site.groups if w is not None else None,
            macs=site.cost.macs if site.cost else 0,
            eligible=bool(usable),
            reason=None if usable else site.why_not(allowed),
            shape_known=site.shape_known or site.cost is None,
            size_note=None if site.shape_known else (size_note or f"it is in {scope_label(site.scope)}"),
        )
        if usable and site.cost is not None:
            kind = usable[0]
            try:
                s = singular_values(site.kernel(), site.groups, kind)
            except ValueError as exc:  # non-finite values in the weight
                layer.eligible, layer.reason = False, f"weight cannot be factored: {exc}"
                result.append(layer)
                continue
            layer.kind = kind
            layer.full_rank = int(s.shape[1])
            for e in INSPECT_ENERGIES:
                r = energy_rank(s, e)
                layer.energy_ranks[f"{e:g}"] = [r, site.cost.macs / max(site.cost.pair_macs(kind, r), 1)]
        result.append(layer)
    return result


def _decompose_for_mobile(
    model: ModelLike,
    options: dict[str, Any],
    calibration: CalibrationSource | None,
    refit: bool | None,
    sensitivity: bool | None,
    calibration_options: Any,
    mobile_safe: bool,
    quantize: str | None,
) -> tuple[onnx.ModelProto, Report]:
    """:func:`decompose`, then the mobile checks: layers kept whole by ``mobile_safe``, INT8 by ``quantize``."""
    from .mobile import MOBILE_EPS, coverage, layers_adding_partitions, partitions_added
    from .quantize import MODES, layer_forms, quantize_model

    if quantize is not None and quantize not in MODES:
        raise LowRankError(f"--quantize must be one of {', '.join(MODES)}, got {quantize!r}")
    if quantize == "static" and calibration is None:
        raise LowRankError("--quantize static needs calibration data (--calibration FILE.npz|FOLDER)")
    start = time.perf_counter()

    def run(opts: dict[str, Any]) -> tuple[onnx.ModelProto, Report]:
        return decompose(
            model, calibration=calibration, refit=refit, sensitivity=sensitivity, calibration_options=calibration_options, **opts
        )

    if not mobile_safe:
        new, report = run(options)
    else:
        # the original is converted more than once and checked against: it is never rewritten in place
        source = _as_model(model)
        options = {**options, "inplace": False}
        model = source
        shapes = options.get("input_shapes")
        before = coverage(source, input_shapes=shapes)
        kept: dict[str, str] = {}
        user_exclude = options.get("exclude")
        for _ in range(len(MOBILE_EPS) + 2):  # each round keeps more layers whole; a few rounds settle it
            exclude = user_exclude
            if kept:
                names = "|".join(re.escape(k) for k in kept)
                exclude = f"(?:{user_exclude})|^(?:{names})$" if user_exclude else f"^(?:{names})$"
            new, report = run({**options, "exclude": exclude})
            after = coverage(new, input_shapes=shapes)
            pairs = {layer.node: [layer.vertical_node or "", layer.horizontal_node or ""] for layer in report.decomposed}
            found = layers_adding_partitions(before, after, pairs)
            if not found:
                break
            kept.update(found)
        for layer in report.layers:
            if layer.node in kept:
                layer.reason = f"kept whole by --mobile-safe: {kept[layer.node]}"
        added = partitions_added(before, after)
        for key, (was, now) in added.items():
            name = next(n for k, n, _, _ in MOBILE_EPS if k == key)
            report.warnings.append(f"{name}: {was} -> {now} partitions after decomposition, and no single layer's pair is to blame")
        report.mobile = {"original": before.to_dict(), "candidate": after.to_dict(), "kept_whole": dict(kept)}
    if quantize is not None:
        result = quantize_model(new, quantize, calibration=calibration)
        new = result.model
        for layer in report.layers:
            nodes = [layer.vertical_node or "", layer.horizontal_node or ""] if layer.decomposed else [layer.node]
            layer.quantized = layer_forms(result.forms, nodes)
        report.quantization = result.to_dict()
        report.warnings.extend(result.warnings)
    report.seconds = time.perf_counter() - start
    return new, report
