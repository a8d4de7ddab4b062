"""The library entry point, :func:`decompose`: the conversion's steps in order (:func:`onnx_lowrank.inspect` is in :mod:`.inspection`).

A conversion is load → sizes → plan → rewrite → check → report, each step a
call into the module that owns it:

1. **load** the model (a copy of a given ``ModelProto``; a path is read with its
   external data) and, with calibration data, read and check the data;
2. **sizes**: :func:`onnx_lowrank.layers.prepare` folds BatchNormalization,
   resolves the sizes that run (:mod:`onnx_lowrank.run_shapes`: one onnxruntime
   run where shape inference leaves them open) and finds the sites;
   :func:`onnx_lowrank.layers.select_layers` keeps those the policy may touch
   and groups them into allocation units;
3. **plan**: with calibration data the units' errors become predicted damage
   (:class:`onnx_lowrank.planning.CalibrationRun`); the spectra are computed and
   :func:`onnx_lowrank.planning.make_plan` picks the planner — per layer, by
   MACs or by latency measured here — that chooses a kind and rank per unit;
4. **rewrite**: :func:`onnx_lowrank.planning.layer_factors` gives the factors
   and :func:`onnx_lowrank.passes.apply_factors` writes each pair in place;
   with calibration data each pair is then refit to the original's outputs;
5. **check**: the result is timed against the original unless the plan by latency timed it
   (:class:`onnx_lowrank.timing.ResultCheck`: the original's weights are held before the rewrite, the
   result's after it — after the fine-tune, when there is one — both sessions share the tensors they have in
   common). :func:`convert` returns the check still to run, so a caller that writes the model can let go of
   it first; :func:`decompose` runs it;
6. **fine-tune** (``finetune=``, with calibration data): the converted model distilled toward the original
   on the calibration samples (:func:`onnx_lowrank.finetune.finetune_conversion`; its weights change, its
   graph and its speed do not);
7. **answers**: with calibration data the converted model's answers are measured on the samples held back
   from every step above (:mod:`onnx_lowrank.answers`), and an extreme plan is warned of;
8. **report** what was done per layer and in total (:class:`onnx_lowrank.report.Report`).

The options come in groups (:mod:`onnx_lowrank.config`); the keyword
arguments of :func:`decompose` build the same groups. Nothing here knows of
the command line.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Unpack

import onnx

from .answers import NO_DATA, finetune_and_measure, measure_answers, warn_of_damage
from .config import DecomposeConfig, DecomposeKeywords, FinetuneConfig
from .errors import LowRankError
from .layers import (
    Prepared,
    Selection,
    control_flow_report,
    layer_report,
    mobile_input_shapes,
    model_sizes,
    path_budgets,
    prepare,
    select_layers,
    shapes_report,
)
from .model_io import ModelLike, as_model, count_params
from .passes import apply_factors, find_sites
from .planning import CalibrationRun, Plan, PlanInputs, compute_spectra, layer_factors, make_plan
from .report import Report
from .threads import single_threaded_blas
from .timing import ResultCheck, kernel_block, plan_outcome

__all__ = [
    "Conversion",
    "ModelLike",
    "Progress",
    "calibrated_conversion",
    "convert",
    "convert_prepared",
    "count_params",
    "decompose",
]

Progress = Callable[[int, int, str], None]


@dataclass
class Conversion:
    """A converted model and its report, and the check of the result when it is still to run.

    The check holds what it needs of both models (their weights, once, in a file it maps), so the caller may
    write the model and let go of it before :meth:`finish` runs the check: both models are then out of memory
    while their sessions are timed.
    """

    model: onnx.ModelProto
    report: Report
    check: ResultCheck | None = None

    def finish(self, notice: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, Report]:
        """Run the check, if one is due, into ``report.latency``; ``notice`` gets what a large model's check will
        cost before it runs. Returns the model and the report."""
        if self.check is not None:
            check, self.check = self.check, None
            self.report.latency.update(check.run(notice))
        return self.model, self.report

    def discard(self) -> None:
        """Drop the check without running it (its file is removed)."""
        if self.check is not None:
            self.check.close()
            self.check = None

    @contextlib.contextmanager
    def discarded_on_error(self) -> Iterator[None]:
        """Run the block; if it raises, the check is dropped (its file removed) before the error goes on."""
        try:
            yield
        except BaseException:
            self.discard()
            raise


def decompose(
    model: ModelLike,
    config: DecomposeConfig | None = None,
    /,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    inplace: bool = False,
    **options: Unpack[DecomposeKeywords],
) -> tuple[onnx.ModelProto, Report]:
    """Decompose the model's layers; return the new model and what was done.

    ``config`` (a :class:`~onnx_lowrank.config.DecomposeConfig`) holds every option, in the groups of the
    command line; keyword arguments name single options (``decompose(m, speedup=2)``,
    ``decompose(m, rank=8, kinds=["spatial"])``, ``decompose(m, calibration="cal.npz")``) and override
    ``config``'s. With no policy given: ``speedup=2``, planned by latency measured here wherever the model
    can be timed. The groups' docstrings say what each option does.

    ``progress(done, total, name)`` is called as layers are analysed and as calibration passes advance;
    ``workers`` threads compute the spectra (default: the CPUs, at most 4). ``model`` is a path or a
    ``ModelProto``; a given ``ModelProto`` is copied, never changed — unless ``inplace``, which rewrites
    it and saves a copy of the weights. Raises :class:`~onnx_lowrank.errors.LowRankError` for bad
    arguments or models, with one line that says what is wrong.
    """
    return convert(model, config, progress=progress, workers=workers, inplace=inplace, **options).finish()


def convert(
    model: ModelLike,
    config: DecomposeConfig | None = None,
    /,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    inplace: bool = False,
    **options: Unpack[DecomposeKeywords],
) -> Conversion:
    """:func:`decompose`, with the check of the result left to :meth:`Conversion.finish` (arguments as there)."""
    config = DecomposeConfig.from_keywords(config, **options)
    if config.finetune.enabled:
        from .finetune import check_torch

        check_torch()  # refused before any work when torch is missing; imported when the fine-tune starts
    # numpy's BLAS on one thread: our workers (and onnxruntime's threads) fill the cores; a multi-threaded
    # OpenBLAS beside them was measured 2-20x slower on 2 cores, and slower even alone for these sizes
    with single_threaded_blas():
        start = time.perf_counter()
        if config.mobile.mobile_safe:
            from .mobile import keep_partitions_whole

            # the original is converted more than once and checked against: it is never rewritten in place
            source = as_model(model)
            rounds = DecomposeConfig.from_keywords(config, finetune=FinetuneConfig())  # the fine-tune runs once, after them

            def convert_once(exclude: str | None) -> tuple[onnx.ModelProto, Report]:
                changed = DecomposeConfig.from_keywords(rounds, exclude=exclude)
                return _convert(as_model(source), changed, progress, workers).finish()

            fixed = mobile_input_shapes(source, config.shapes)
            conversion = Conversion(*keep_partitions_whole(source, convert_once, config.policy.exclude, fixed))
            if config.finetune.enabled:  # the rounds timed the graph; the fine-tune changes its weights alone
                conversion.model = finetune_and_measure(source, conversion.model, conversion.report, config, progress)
                warn_of_damage(conversion.report, config)
        else:
            conversion = _convert(as_model(model, inplace), config, progress, workers)
        if config.mobile.quantize is not None:
            from .quantize import quantize_conversion

            conversion.finish()  # the float decomposition is what is timed against the original
            conversion.model = quantize_conversion(conversion.model, conversion.report, config.mobile.quantize, config.calibration.data)
        if config.mobile.wanted:
            conversion.report.seconds = time.perf_counter() - start
        return conversion


def _convert(source: onnx.ModelProto, config: DecomposeConfig, progress: Progress | None, workers: int | None) -> Conversion:
    """One conversion of ``source``, which it may rewrite (the caller's copy)."""
    start = time.perf_counter()
    policy, shapes = config.policy, config.shapes
    if not config.calibration.given:
        prepared = prepare(source, shapes=shapes, fold_bn=policy.fold_bn)
        conversion = _hold_result(_convert_prepared(prepared, config, progress=progress, workers=workers, copy=False, start=start))
        conversion.report.answers = {"not_measured": NO_DATA}
        warn_of_damage(conversion.report, config)
        return conversion
    from .calibration import hold_back, load_calibration

    # the last few samples are held back: the answers are measured on inputs the conversion never saw
    data, held = hold_back(load_calibration(config.calibration.source, source), source)
    for name, shape in shapes.input_shapes.items():
        if name in data and tuple(shape[1:]) != tuple(data[name].shape[1:]):
            raise LowRankError(
                f"--input-shape {name}={','.join(map(str, shape))} differs from the calibration data's samples "
                f"{tuple(data[name].shape[1:])}: the plan and the statistics must see the same size"
            )
    # one set of sizes for the statistics, the gains and the plan: those of a real input (the sample, else the first)
    sizes = model_sizes(source, shapes, data)
    run = CalibrationRun(data, config.calibration, policy, progress)
    conversion = _calibrated(source, run, config, None, progress, workers, sizes=sizes)
    if config.finetune.enabled:  # before the result is held for its check: the check times the fine-tuned model
        with conversion.discarded_on_error():
            conversion.model = finetune_and_measure(source, conversion.model, conversion.report, config, progress, (data, held))
    conversion = _hold_result(conversion)
    report = conversion.report
    report.calibration["seconds"] = time.perf_counter() - start
    with conversion.discarded_on_error():
        if not config.finetune.enabled:
            report.answers = measure_answers(source, conversion.model, held, config.speed.resolved_threads, config.speed.large_model_bytes)
        warn_of_damage(report, config)
    report.seconds = time.perf_counter() - start - (conversion.check.seconds if conversion.check is not None else 0.0)
    return conversion


def _hold_result(conversion: Conversion) -> Conversion:
    """The final model handed to its check (the check's own time is not the conversion's)."""
    check = conversion.check
    if check is not None:
        spent = check.seconds  # holding the original's weights, counted in the report's seconds
        with conversion.discarded_on_error():
            check.hold(conversion.model)
        conversion.report.seconds -= spent
    return conversion


def calibrated_conversion(
    source: onnx.ModelProto,
    run: CalibrationRun,
    config: DecomposeConfig,
    prepared: Prepared | None,
    progress: Progress | None,
    workers: int | None,
    sizes: Any = None,
) -> tuple[onnx.ModelProto, Report]:
    """One conversion with calibration data: data-aware factors and ranks from ``run``, then the refit to
    ``source`` as given. ``prepared``: a preparation of ``source`` whose copy is converted (else a copy of
    ``source`` is prepared here, on ``sizes``). The result is checked before it is returned."""
    return _hold_result(_calibrated(source, run, config, prepared, progress, workers, sizes)).finish()


def _calibrated(
    source: onnx.ModelProto,
    run: CalibrationRun,
    config: DecomposeConfig,
    prepared: Prepared | None,
    progress: Progress | None,
    workers: int | None,
    sizes: Any = None,
) -> Conversion:
    if prepared is None:
        copy = as_model(source)  # the refit compares with ``source`` as given
        prepared = prepare(copy, shapes=config.shapes, fold_bn=config.policy.fold_bn, sizes=sizes)
        conversion = _convert_prepared(prepared, config, progress=progress, workers=workers, copy=False, calibrate=run.calibrate)
    else:
        conversion = _convert_prepared(prepared, config, progress=progress, workers=workers, copy=True, calibrate=run.calibrate)
    with conversion.discarded_on_error():
        run.describe(conversion.report, config.policy)
        conversion.model = run.refit_conversion(source, conversion.model, conversion.report)
    return conversion


Calibrate = Callable[[onnx.ModelProto, list[Any], dict[str, str | None]], None]


def convert_prepared(
    prepared: Prepared, config: DecomposeConfig, *, progress: Progress | None = None, workers: int | None = None
) -> tuple[onnx.ModelProto, Report]:
    """Plan ranks on a prepared model and apply them to a copy (``prepared`` stays as it is for the next plan);
    the result is checked before it is returned."""
    return _hold_result(_convert_prepared(prepared, config, progress=progress, workers=workers)).finish()


def _convert_prepared(
    prepared: Prepared,
    config: DecomposeConfig,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    copy: bool = True,
    start: float | None = None,
    calibrate: Calibrate | None = None,
) -> Conversion:
    """Plan ranks on a prepared model and apply them: to a copy (``copy``), else to ``prepared.proto`` itself,
    which is then used up. ``calibrate(model, units, reasons)`` runs once the units are known, before any spectrum
    or rank is computed (the calibrated conversion gives it). The check of the result is returned unrun, its
    candidate not yet held."""
    start = time.perf_counter() if start is None else start
    workers = workers or min(os.cpu_count() or 1, 4)
    policy, speed = config.policy, config.speed
    proto, sizes = prepared.proto, prepared.shapes

    # sizes: the layers this policy may touch, grouped into units
    needs_macs = (policy.name == "budget" and policy.speedup is not None) or speed.by == "latency"
    selection = select_layers(prepared, policy, config.shapes, needs_macs)
    if calibrate is not None:
        calibrate(proto, selection.units, selection.reasons)
    selection.drop(compute_spectra(selection.units, progress, workers))

    # plan
    units = selection.units
    inputs = PlanInputs(units, selection.fixed_macs, prepared.params_before - sum(u.params for u in units), prepared.params_before)
    inputs.paths = path_budgets(sizes, selection)
    plan, timing, why_macs = make_plan(inputs, policy, speed, proto, sizes)
    if timing is not None:
        timing.close()  # the plan by latency timed the model: its sessions and their shared weights go
    check: ResultCheck | None = None
    if plan.by != "latency" and speed.check_runs and plan.decomposes and why_macs is None:
        # the original's weights are held before its layers are rewritten in place
        check, why_macs = ResultCheck.start(proto, sizes, speed.resolved_threads, speed.check_runs, speed.large_model_bytes)
    try:
        return Conversion(*_rewrite(prepared, config, selection, plan, why_macs, copy, start, workers), check)
    except BaseException:
        if check is not None:
            check.close()
        raise


def _rewrite(
    prepared: Prepared,
    config: DecomposeConfig,
    selection: Selection,
    plan: Plan,
    why_macs: str | None,
    copy: bool,
    start: float,
    workers: int,
) -> tuple[onnx.ModelProto, Report]:
    """Apply the plan's factors (to a copy of the prepared model with ``copy``) and report what was done."""
    policy, speed = config.policy, config.speed
    proto, sites, sizes, units = prepared.proto, prepared.sites, prepared.shapes, selection.units
    pad_to = kernel_block() if policy.pad_ranks and policy.name != "budget" else None

    # rewrite: per-layer policies give the ranks asked for; a budget's ranks are multiples of the rank multiple already
    counted = {id(site) for site in selection.counted}
    layers = {site.key: layer_report(site, selection.reasons[site.key], id(site) in counted) for site in sites}
    factors = layer_factors(units, plan.choices, layers, workers, pad_to)
    if copy:  # the prepared model stays as it is for the next plan: the same sites, found again in a copy
        proto = as_model(proto)
        own = {site.key: site for site in find_sites(proto, sizes)}
        factors = [(own[site.key], f) for site, f in factors]
    proto, made = apply_factors(proto, factors)
    for key, names in made.items():
        layers[key].vertical_node, layers[key].horizontal_node = names.first, names.second

    # check: what the plan measured, or what its check will say (it runs once the caller is done with the models)
    measured = plan.measured if plan.by == "latency" else plan_outcome(speed.check_runs, plan.decomposes, why_macs, plan.by)

    # report
    layer_list = [layers[s.key] for s in sites]
    report = Report(
        macs_before=sum(layer.macs_before for layer in layer_list if layer.counted),
        macs_after=sum(layer.macs_after for layer in layer_list if layer.counted),
        params_before=prepared.params_before,
        params_after=count_params(proto),
        layers=layer_list,
        policy={
            **policy.describe(),
            "kinds": list(policy.allowed),
            "force": policy.force,
            "rank_multiple": policy.multiple,
            "fold_bn": prepared.fold_bn,
            "by": plan.by,
            "threads": speed.resolved_threads,
        },
        folded_batchnorms=[bn for _, bn in prepared.folded],
        kept_batchnorms=dict(prepared.kept_batchnorms),
        warnings=[*selection.warnings, *plan.warnings],
        latency=measured,
        seconds=time.perf_counter() - start,
        macs_exact=selection.exact,
        shapes=shapes_report(sizes),
        notice=selection.notice,
    )
    report.control_flow = control_flow_report(sizes, sites, layers)
    return proto, report
