"""Choosing a kind and a rank for every layer: one module per way of choosing, behind one interface.

* :mod:`~onnx_lowrank.planning.interface` — :class:`Planner`, :class:`PlanInputs`, :class:`Plan`,
  :class:`LayerChoice`: a planner is made with its options and returns one choice per allocation unit,
  plus what it measured;
* :mod:`~onnx_lowrank.planning.units` — :class:`Unit`: the sites sharing one weight, with every rank's
  cost and error;
* :mod:`~onnx_lowrank.planning.per_layer` — ``--rank``, ``--energy``, ``--ranks``;
* :mod:`~onnx_lowrank.planning.mac_budget` — ``--speedup S --by macs`` and ``--params-ratio``;
* :mod:`~onnx_lowrank.planning.latency` — ``--speedup S`` by latency measured here: layer timings, rounds, budgets;
* :mod:`~onnx_lowrank.planning.calibrated` — calibration data turning the units' errors into predicted damage;
* :mod:`~onnx_lowrank.planning.select` — which planner, and the fall-backs;
* :mod:`~onnx_lowrank.planning.factors` — from the choices to the factors written and the layer reports.

A new way of choosing ranks is a new module with a :class:`Planner` subclass, picked in :func:`make_plan`.
"""

from __future__ import annotations

from .calibrated import CalibrationRun
from .factors import layer_factors, stored_error
from .interface import LayerChoice, PathBudget, Plan, PlanInputs, Planner
from .latency import LatencyPlanner, TimingFailed, untimeable_reason
from .mac_budget import MacBudgetPlanner
from .per_layer import PerLayerPlanner
from .select import make_plan
from .units import SharedDecompositions, Unit, compute_spectra, make_units, screen_for_macs

__all__ = [
    "CalibrationRun",
    "LatencyPlanner",
    "LayerChoice",
    "MacBudgetPlanner",
    "PathBudget",
    "PerLayerPlanner",
    "Plan",
    "PlanInputs",
    "Planner",
    "SharedDecompositions",
    "TimingFailed",
    "Unit",
    "compute_spectra",
    "layer_factors",
    "make_plan",
    "make_units",
    "screen_for_macs",
    "stored_error",
    "untimeable_reason",
]
