"""The calibrated plan: the units' errors become predicted damage to the model's outputs.

With calibration data the units a planner sees are changed before any rank is
chosen (:meth:`CalibrationRun.calibrate`): each unit gets its data-aware
decompositions — whitened factors that minimise the layer's output error on
the calibration inputs, whose spectra give every rank's relative output error
(:func:`onnx_lowrank.calibration.data_aware_plan`) — and, under a budget with
``sensitivity``, its gain ``γ_l`` from output error to the model's outputs,
measured once on a few samples. Any planner then allocates on ``γ_l · e_l(K)``.

What calibration measures is measured once per model: a :class:`CalibrationRun`
serves every plan over the same prepared model (the targets of a sweep). After
the rewrite, :meth:`CalibrationRun.refit_conversion` refits each decomposed
pair to the original layer's outputs (:func:`onnx_lowrank.calibration.refit_layers`,
with the settings :attr:`CalibrationRun.settings` holds).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import onnx

from ..config import CalibrationConfig, PolicyConfig
from ..factorization import Kind
from ..report import Report
from .units import Unit

__all__ = ["CalibrationRun"]

PassProgress = Callable[[int, int, str], None]


class CalibrationRun:
    """What calibration measures once for any number of plans over one model: the statistics, the data-aware
    decompositions and the gains (made by the first plan's units and handed to every later plan's units of the
    same layers), and the settings of the refit."""

    def __init__(
        self, data: Mapping[str, Any], config: CalibrationConfig, policy: PolicyConfig, progress: PassProgress | None = None
    ) -> None:
        from ..calibration import CalibrationOptions

        chosen = config.options if config.options is not None else CalibrationOptions()
        # the refit/sensitivity options, when given, override the knobs' own
        self.weigh = policy.name == "budget" and (chosen.sensitivity if config.sensitivity is None else config.sensitivity)
        self.refit = chosen.refit if config.refit is None else config.refit
        self.settings = replace(chosen, sensitivity=self.weigh, refit=self.refit)
        self.data = data
        self.passes: PassProgress | None = (
            (lambda done, total, phase: progress(done, total, f"calibration {phase}")) if progress is not None else None
        )
        self.plan: Any = None
        self._decompositions: dict[str, dict[Kind, Any]] = {}
        self._typical = 1.0

    @property
    def samples(self) -> int:
        if self.plan is not None:
            return int(self.plan.samples)
        return len(next(iter(self.data.values()))) if self.data else 0

    def calibrate(self, proto: onnx.ModelProto, units: list[Unit], reasons: dict[str, str | None]) -> None:
        """Give ``units`` their data-aware decompositions and gains (measured on the first call)."""
        from ..calibration import data_aware_plan

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

    def describe(self, report: Report, policy: PolicyConfig) -> None:
        """Write into ``report`` what the ranks were allocated by, each layer's measured gain and the plan's figures."""
        if policy.name != "budget":
            allocation = f"fixed by --{policy.name}"
        elif self.weigh:
            allocation = "damage to the outputs (layer output errors from statistics, times gains measured once)"
        else:
            allocation = "layer output errors from statistics"
        report.policy["allocation"] = allocation
        plan = self.plan
        if plan is not None:
            gains = plan.gains if self.weigh else {}
            estimated = plan.gain_result.estimated if plan.gain_result is not None else {}
            for layer in report.layers:
                if layer.node in gains and layer.node not in estimated:
                    layer.gain = gains[layer.node]
            report.calibration.update(plan.to_dict())
        report.calibration["samples"] = self.samples

    def refit_conversion(self, source: onnx.ModelProto, new: onnx.ModelProto, report: Report) -> onnx.ModelProto:
        """``new`` (rewritten in place) with every decomposed pair refit to ``source``'s layer outputs, when the
        refit is on and something was decomposed; what the refit did goes into ``report``."""
        if not (self.refit and report.decomposed):
            return new
        from ..calibration import refit_layers

        result = refit_layers(source, new, report, self.data, self.settings.refit_options(), progress=self.passes, inplace=True)
        report.calibration["refit"] = result.to_dict()
        by_node = {layer.node: layer for layer in result.layers}
        for layer in report.layers:
            done = by_node.get(layer.node)
            if done is not None and done.error_after is not None:
                layer.output_error = done.error_after
        return result.model
